"""lifelong.report: the comparison table of runs as text, Markdown, CSV and PNG, and the paired
differences against the first run."""

from __future__ import annotations

import csv
import json
import math

import pytest

from toy_runs import rewrite_results

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
                   "plasticity_bpb": None, **{f"{k}_interval": None for k in report.FIGURES},
                   "max_intrusion": None, "max_intrusion_interval": None, "min_own": None, "min_own_interval": None,
                   "experts": 384, "flops_per_token": 194424, "wall_time_s": 12.34, "path": str(tmp_path / "grow")}


def test_undefined_figures_show_as_dashes(tmp_path):
    joint = make_run(tmp_path / "joint", strategy="joint", bwt=None, fwt=None, forgetting={}, wall=None)
    rows = report.report([joint])
    assert rows[0]["max_forgetting_bpb"] is None and rows[0]["wall_time_s"] is None
    line = report.format_text(rows).splitlines()[2]
    assert line.split() == ["joint", "joint", "peer", "-", "4.500", "-", "-", "-", "-", "-", "-", "384", "194,424",
                            "-"]


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
    assert lines[1].count("---:") == 10  # numeric columns right-aligned
    assert lines[2].startswith("| a | naive | peer | - | 4.500 | +0.250 | -0.125 | +1.500 |")


def test_figures_show_their_intervals(tmp_path):
    intervals = {"final_average": [4.4, 4.6], "bwt": [-0.2, -0.05], "fwt_gem": [1.3, 1.7]}
    summary = {"final_average": 4.5, "bwt": -0.125, "fwt_gem": 1.5, "forgetting": FORGETTING, "intervals": intervals}
    rows = report.report([make_run(tmp_path / "agg", seeds=[0, 1, 2], bpb_summary=summary)])
    assert rows[0]["name"] == "agg (3 seeds)" and rows[0]["final_bpb_interval"] == [4.4, 4.6]
    assert "4.500 [4.400, 4.600]" in report.format_text(rows)
    assert "+1.500 [+1.300, +1.700]" in report.format_markdown(rows)


def test_csv_keeps_full_precision(tmp_path):
    rows = report.report([make_run(tmp_path / "a", final=4.123456789),
                          make_run(tmp_path / "b", strategy="joint", bwt=None)])
    path = report.write_csv(rows, tmp_path / "table.csv")
    with path.open() as f:
        read = list(csv.DictReader(f))
    assert [r["name"] for r in read] == ["a", "b"]
    assert float(read[0]["final_bpb"]) == 4.123456789 and read[1]["bwt_bpb"] == ""
    assert read[0]["final_bpb_lo"] == "" and "d_final_bpb_hi" in read[0]
    assert list(read[0])[-1] == "path" and read[0]["experts"] == "384"


def test_comparability_notes_flag_different_data(tmp_path):
    from lifelong.runs import load_run

    a, same = load_run(make_run(tmp_path / "a")), load_run(make_run(tmp_path / "same"))
    other = load_run(make_run(tmp_path / "other", content="h2"))
    assert report.comparability_notes([a, same]) == []
    assert "different text" in report.comparability_notes([a, same, other])[0]


def test_main_report_writes_the_requested_files(tmp_path):
    runs = [make_run(tmp_path / "a"), make_run(tmp_path / "b", content="h2")]
    text = report.main_report(runs, markdown=True, csv_path=tmp_path / "t.csv", png_path=tmp_path / "m.png",
                              frontier_path=tmp_path / "f.png")
    assert text.startswith("| run |") and "different text" in text
    assert f"wrote {tmp_path / 't.csv'}" in text and f"wrote {tmp_path / 'm.png'}" in text
    assert (tmp_path / "m.png").read_bytes()[:4] == b"\x89PNG" and (tmp_path / "t.csv").stat().st_size > 0
    assert f"wrote {tmp_path / 'f.png'}" in text and (tmp_path / "f.png").read_bytes()[:4] == b"\x89PNG"
    assert report.main_report(runs[:1]).startswith("run ")


def test_main_report_rejects_what_is_not_a_run(tmp_path):
    (tmp_path / "notarun").mkdir()
    with pytest.raises(ValueError, match="notarun is not a run directory"):
        report.main_report([make_run(tmp_path / "a"), tmp_path / "notarun"])
    with pytest.raises(ValueError, match="no run directory given"):
        report.main_report([])


# ---- paired differences --------------------------------------------------------------------------

def run_with_blocks(path, blocks, test_hash="t1", **extra):
    """A run directory whose snapshots hold per-block losses: blocks[stage][domain] arrays (nats)."""
    import numpy as np
    from safetensors.numpy import save_file

    L = [[float(np.mean(b)) for b in row] for row in blocks]
    make_run(path, loss_matrix=L, domain_info=[{"content_hash": "h1", "test_hash": test_hash,
                                                "bytes_per_token": 1.0}] * 3, **extra)
    (path / "snapshots").mkdir()
    for stage, row in enumerate(blocks):
        save_file({f"blocks/{d}": np.asarray(b, np.float64) for d, b in zip("abc", row)},
                  str(path / "snapshots" / f"stage-{stage:02d}.safetensors"))
    return path


def toy_blocks(shift=0.0, seed=0):
    import numpy as np

    g = np.random.default_rng(seed)
    base = [[5, 5, 5], [3, 4, 4], [3.2, 3, 4], [3.5, 3.1, 3]]
    return [[g.normal(v + (shift if s == 3 else 0.0), 0.2, size=40) for v in row] for s, row in enumerate(base)]


def test_paired_differences_resample_the_same_blocks(tmp_path):
    from lifelong.runs import load_run

    a = load_run(run_with_blocks(tmp_path / "a", toy_blocks()))
    same = load_run(run_with_blocks(tmp_path / "same", toy_blocks()))
    worse = load_run(run_with_blocks(tmp_path / "worse", toy_blocks(0.3)))
    rows, notes = report.paired([a, same, worse], samples=200)
    assert notes == [] and [r["name"] for r in rows] == ["same", "worse"]
    assert rows[0]["d_final_bpb"] == (0.0, 0.0, 0.0)  # same blocks, same losses: no difference at all
    value, lo, hi = rows[1]["d_final_bpb"]
    assert value == pytest.approx(0.3 / math.log(2)) and 0 < lo < value < hi  # every final loss 0.3 nats worse
    text = report.format_paired(rows, "a", samples=200)
    assert "+0.000 [+0.000, +0.000]" in text and f"+{value:.3f} [+{lo:.3f}, +{hi:.3f}] *" in text


def test_paired_differences_pair_the_seeds_of_multi_seed_runs(tmp_path):
    from lifelong.runs import load_run

    for name, shift in (("a", 0.0), ("b", 0.2)):
        for seed in (0, 1):
            run_with_blocks(tmp_path / name / f"seed-{seed}", toy_blocks(shift, seed))
        make_run(tmp_path / name / "agg", seeds=[0, 1], runs=["../seed-0", "../seed-1"],
                 domain_info=[{"content_hash": "h1", "test_hash": "t1", "bytes_per_token": 1.0}] * 3)
    rows, _ = report.paired([load_run(tmp_path / "a" / "agg"), load_run(tmp_path / "b" / "agg")], samples=200)
    value, lo, hi = rows[0]["d_final_bpb"]
    assert value == pytest.approx(0.2 / math.log(2)) and lo > 0


def test_paired_comparison_refuses_runs_on_other_test_blocks(tmp_path, capsys):
    from lifelong import cli

    a = run_with_blocks(tmp_path / "a", toy_blocks())
    b = run_with_blocks(tmp_path / "b", toy_blocks(), test_hash="t2")
    assert cli.main(["report", str(a), str(b)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "not evaluated on the same test blocks" in err and "--no-paired" in err
    assert cli.main(["report", str(a), str(b), "--no-paired"]) == 0


def test_runs_without_block_losses_get_a_note_not_a_refusal(tmp_path):
    text = report.main_report([make_run(tmp_path / "a"), make_run(tmp_path / "b")])
    assert "no paired differences for b" in text and "earlier version" in text


def test_isolation_of_grown_experts_shows_as_shares(tmp_path):
    rows = report.report([make_run(tmp_path / "g", max_intrusion=0.125, min_own=0.5),
                          make_run(tmp_path / "n")])
    assert rows[0]["max_intrusion"] == 0.125 and rows[1]["min_own"] is None
    text = report.format_text(rows)
    assert "12.5%" in text and "50.0%" in text
    path = report.write_csv(rows, tmp_path / "t.csv")
    assert "max_intrusion_lo" in path.read_text().splitlines()[0]


def test_a_multi_seed_run_counts_the_growths_of_its_seeds(tmp_path):
    events = [{"step": s, "layer": "l", "added": 64} for s in (10, 20)]
    growth = {"strategy": {"name": "naive"}, "model": {"ffn": "peer"}, "growth": {"schedule": "trigger"}}
    make_run(tmp_path / "g" / "seed-0", growth_events=events, config=growth)
    make_run(tmp_path / "g" / "seed-1", growth_events=events[:1], config=growth)
    agg = make_run(tmp_path / "g" / "agg", seeds=[0, 1], runs=["../seed-0", "../seed-1"], config=growth)
    assert report.row(agg)["growth"] == "trigger x1-2"
    assert report.row(tmp_path / "g" / "seed-0")["growth"] == "trigger x2"


# ---- bad input: one line naming the problem, exit status 2 -------------------------------------------

def one_line_error(argv, capsys, *parts):
    """`lifelong ARGV` exits with status 2 and one line on stderr holding every one of `parts`."""
    from lifelong import cli

    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    for part in parts:
        assert part in err, err
    return err


@pytest.mark.parametrize("change, what", [
    (lambda r: [], "expected a JSON object, got a list"),
    (lambda r: {}, "no domains"),
    (lambda r: {"domains": 3}, "domains: expected a non-empty list of strings"),
    (lambda r: {k: v for k, v in r.items() if k != "stages"}, "no stages"),
    (lambda r: {k: v for k, v in r.items() if k != "bpb_matrix"}, "no bpb_matrix"),
    (lambda r: {**r, "bpb_matrix": r["bpb_matrix"][1:]}, "bpb_matrix: expected 4 rows of 3 numbers"),
    (lambda r: {**r, "bpb_matrix": [row[:2] for row in r["bpb_matrix"]]}, "bpb_matrix: expected 4 rows of 3 numbers"),
    (lambda r: {**r, "loss_matrix": [["5"] * 3] * 4}, "loss_matrix: expected 4 rows of 3 numbers"),
    (lambda r: {k: v for k, v in r.items() if k != "bpb_summary"}, "no bpb_summary"),
    (lambda r: {**r, "bpb_summary": [4.5]}, "bpb_summary: expected an object, got a list"),
    (lambda r: {**r, "bpb_summary": {**r["bpb_summary"], "final_average": "4.5"}},
     "bpb_summary.final_average: expected a number, got a string"),
    (lambda r: {**r, "bpb_summary": {**r["bpb_summary"], "forgetting": {"a": None}}}, "bpb_summary.forgetting"),
    (lambda r: {**r, "bpb_summary": {**r["bpb_summary"], "intervals": {"bwt": [1]}}},
     "bpb_summary.intervals.bwt: expected [low, high]"),
    (lambda r: {**r, "num_experts": "384"}, "num_experts: expected a list, got a string"),
    (lambda r: {**r, "flops_per_token": "lots"}, "flops_per_token: expected a number"),
    (lambda r: {**r, "config": {"growth": "none"}}, "config.growth: expected an object"),
])
def test_report_of_results_of_the_wrong_shape(tmp_path, capsys, change, what):
    run = rewrite_results(make_run(tmp_path / "a"), change)
    one_line_error(["report", str(make_run(tmp_path / "ok")), str(run)], capsys,
                   f"{run / 'results.json'} is not a lifelong results file ({what}")


@pytest.mark.parametrize("name, content, reason", [
    ("results.json", b'{"domains": ["a", "b", "c"], "stages": ["init", "aft', "Unterminated string"),
    ("results.json", b"", "empty file"),
    ("results.json", b"<html>", "Expecting value at line 1 column 1"),
    ("results.json", b'{"domains": ["\xe9"]}', "not UTF-8 text"),
    ("run_info.json", b'{"wall_time_s": 12.', "Expecting"),
])
def test_report_of_a_damaged_file_names_it(tmp_path, capsys, name, content, reason):
    run = make_run(tmp_path / "a")
    (run / name).write_bytes(content)
    one_line_error(["report", str(run)], capsys, f"{run / name} is not valid JSON ({reason}")


def test_report_of_a_run_info_of_the_wrong_shape(tmp_path, capsys):
    run = make_run(tmp_path / "a")
    (run / "run_info.json").write_text('{"wall_time_s": "12s"}')
    one_line_error(["report", str(run)], capsys, f"{run / 'run_info.json'} is not a lifelong run info file")
    (run / "run_info.json").write_text("12.34")
    one_line_error(["report", str(run)], capsys, "run_info.json is not a lifelong run info file", "got a number")


def test_report_checks_its_output_files_first(tmp_path, capsys):
    run, afile = make_run(tmp_path / "a"), tmp_path / "afile"
    afile.write_text("")
    for option, path, what in (("--csv", tmp_path / "missing" / "t.csv", f"the folder {tmp_path / 'missing'} does "
                                "not exist"), ("--png", afile / "m.png", f"{afile} is not a folder"),
                               ("--frontier", tmp_path / "gone" / "f.png", f"the folder {tmp_path / 'gone'} does not exist"),
                               ("--csv", tmp_path, "it is a folder")):
        one_line_error(["report", str(run), option, str(path)], capsys, f"cannot write {path}: {what}")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "afile"]  # nothing written


def test_a_failed_write_names_the_file(tmp_path):
    rows = report.report([make_run(tmp_path / "a")])
    with pytest.raises(ValueError, match="cannot write .*t.csv: No such file or directory"):
        report.write_csv(rows, tmp_path / "gone" / "t.csv")
    with pytest.raises(ValueError, match="cannot write .*m.png: No such file or directory"):
        report.save_comparison_png([tmp_path / "a"], tmp_path / "gone" / "m.png")
