"""lifelong.report: the comparison table of runs as text, Markdown, CSV and PNG."""

from __future__ import annotations

import csv
import json

import pytest

from lifelong import report

FORGETTING = {"a": 0.25, "b": -0.5}


def make_run(path, *, strategy="naive", ffn="peer", final=4.5, bwt=-0.125, fwt=1.5, forgetting=FORGETTING,
             wall=12.34, content="h1", **extra):
    """A run directory holding what the report reads (results.json, run_info.json)."""
    path.mkdir(parents=True)
    results = {
        "domains": ["a", "b", "c"], "stages": ["init", "after:a", "after:b", "after:c"],
        "bpb_matrix": [[8, 8, 8], [5, 6, 6], [5.2, 5, 6], [5.25, 4.5, 4]],
        "loss_matrix": [[5, 5, 5], [3, 4, 4], [3, 3, 4], [3, 3, 3]],
        "bpb_summary": {"final_average": final, "bwt": bwt, "fwt": fwt, "forgetting": forgetting},
        "num_experts": [256, 256, 320, 384], "flops_per_token": 194424,
        "growth_events": [], "domain_info": [{"content_hash": content}] * 3,
        "config": {"strategy": {"name": strategy}, "model": {"ffn": ffn}, "growth": {"schedule": "none"}},
        **extra,
    }
    (path / "results.json").write_text(json.dumps(results))
    if wall is not None:
        (path / "run_info.json").write_text(json.dumps({"wall_time_s": wall}))
    return path


def test_row_collects_the_summary_of_a_run(tmp_path):
    events = [{"step": s, "layer": layer, "added": 64} for s in (16, 32) for layer in ("x", "y")]
    growth = {"strategy": {"name": "replay"}, "model": {"ffn": "peer"}, "growth": {"schedule": "boundary"}}
    row = report.row(make_run(tmp_path / "grow", growth_events=events, config=growth))
    assert row == {"name": "grow", "strategy": "replay", "ffn": "peer", "growth": "boundary x2",
                   "final_bpb": 4.5, "bwt_bpb": -0.125, "fwt_bpb": 1.5, "max_forgetting_bpb": 0.25,
                   "experts": 384, "flops_per_token": 194424, "wall_time_s": 12.34, "path": str(tmp_path / "grow")}


def test_undefined_figures_show_as_dashes(tmp_path):
    joint = make_run(tmp_path / "joint", strategy="joint", bwt=None, fwt=None, forgetting={}, wall=None)
    rows = report.report([joint])
    assert rows[0]["max_forgetting_bpb"] is None and rows[0]["wall_time_s"] is None
    line = report.format_text(rows).splitlines()[2]
    assert line.split() == ["joint", "joint", "peer", "-", "4.500", "-", "-", "-", "384", "194,424", "-"]


def test_text_table_aligns_columns(tmp_path):
    rows = report.report([make_run(tmp_path / "a"), make_run(tmp_path / "a-much-longer-name", final=10.25)])
    lines = report.format_text(rows).splitlines()
    assert lines[0].split("  ")[0].strip() == "run" and set(lines[1]) == {"-", " "}
    assert len({len(line) for line in lines}) == 1  # numbers are right-aligned to the last column
    assert lines[2].index("4.500") + len("4.500") == lines[3].index("10.250") + len("10.250")
    assert "-0.125" in lines[2] and "+1.500" in lines[2] and "+0.250" in lines[2]


def test_markdown_table(tmp_path):
    rows = report.report([make_run(tmp_path / "a"), make_run(tmp_path / "b")])
    lines = report.format_markdown(rows).splitlines()
    assert len(lines) == 4 and all(line.startswith("| ") and line.endswith(" |") for line in lines)
    assert lines[1].count("---:") == 7  # numeric columns right-aligned
    assert lines[2].startswith("| a | naive | peer | - | 4.500 | -0.125 |")


def test_multi_seed_runs_show_standard_deviations(tmp_path):
    over = {"bpb_final_average": {"mean": 4.5, "std": 0.05}, "bpb_bwt": {"mean": -0.125, "std": 0.01},
            "bpb_fwt": {"mean": 1.5, "std": 0.2}}
    rows = report.report([make_run(tmp_path / "agg", seeds=[0, 1, 2], over_seeds=over)])
    assert rows[0]["name"] == "agg (3 seeds)" and rows[0]["final_bpb_std"] == 0.05
    assert "4.500 ±0.050" in report.format_text(rows) and "+1.500 ±0.200" in report.format_markdown(rows)


def test_csv_keeps_full_precision(tmp_path):
    rows = report.report([make_run(tmp_path / "a", final=4.123456789),
                          make_run(tmp_path / "b", strategy="joint", bwt=None)])
    path = report.write_csv(rows, tmp_path / "table.csv")
    with path.open() as f:
        read = list(csv.DictReader(f))
    assert [r["name"] for r in read] == ["a", "b"]
    assert float(read[0]["final_bpb"]) == 4.123456789 and read[1]["bwt_bpb"] == ""
    assert list(read[0])[-1] == "path" and read[0]["experts"] == "384"


def test_comparability_notes_flag_different_data(tmp_path):
    from lifelong.runs import load_run

    a, same = load_run(make_run(tmp_path / "a")), load_run(make_run(tmp_path / "same"))
    other = load_run(make_run(tmp_path / "other", content="h2"))
    assert report.comparability_notes([a, same]) == []
    assert "different text" in report.comparability_notes([a, same, other])[0]


def test_main_report_writes_the_requested_files(tmp_path):
    runs = [make_run(tmp_path / "a"), make_run(tmp_path / "b", content="h2")]
    text = report.main_report(runs, markdown=True, csv_path=tmp_path / "t.csv", png_path=tmp_path / "m.png")
    assert text.startswith("| run |") and "different text" in text
    assert f"wrote {tmp_path / 't.csv'}" in text and f"wrote {tmp_path / 'm.png'}" in text
    assert (tmp_path / "m.png").read_bytes()[:4] == b"\x89PNG" and (tmp_path / "t.csv").stat().st_size > 0
    assert report.main_report(runs[:1]).startswith("run ")


def test_main_report_rejects_what_is_not_a_run(tmp_path):
    (tmp_path / "notarun").mkdir()
    with pytest.raises(ValueError, match="notarun is not a run directory"):
        report.main_report([make_run(tmp_path / "a"), tmp_path / "notarun"])
    with pytest.raises(ValueError, match="no run directory given"):
        report.main_report([])
