"""The analysis notebooks run top to bottom on fresh smoke runs, alone and side by side.

Each notebook is executed with nbclient in a kernel of the interpreter running the tests (the
"python3" kernelspec that ipykernel provides for sys.executable, never one installed elsewhere),
with LIFELONG_RUN naming the runs. Any cell error fails the test.
"""

from __future__ import annotations

from pathlib import Path

import nbformat
import pytest
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import AsyncKernelManager
from nbclient import NotebookClient

from lifelong.runs import load_run

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"
SMALL = ["stream.train_tokens=4096", "stream.test_tokens=2048"]
RUNS = {
    "plain": SMALL + ["eval.curve_every=0"],
    "grow": SMALL + ["growth.schedule=boundary", "growth.experts=64", "growth.warmup_steps=2",
                     "eval.curve_every=2"],
    "dense": SMALL + ["model.ffn=dense", "eval.curve_every=0"],
    "moe": SMALL + ["model.ffn=moe", "growth.schedule=boundary", "growth.experts=2", "eval.curve_every=0"],
}


@pytest.fixture(scope="module")
def smoke_runs(tmp_path_factory) -> dict[str, Path]:
    """Finished smoke runs: PEER without growth or curves, PEER with growth and curves, dense, MoE with growth."""
    from lifelong import experiment
    from lifelong.presets import resolve

    root = tmp_path_factory.mktemp("runs")
    with pytest.MonkeyPatch.context() as mp:  # the session's stream cache (conftest), not the user's
        mp.setenv("LIFELONG_CACHE", str(tmp_path_factory.getbasetemp() / "stream-cache"))
        for name, overrides in RUNS.items():
            experiment.run(resolve("smoke", overrides=overrides), root / name, progress=False, echo=lambda *_: None)
    return {name: root / name for name in RUNS}


def execute(name: str, run_dirs: list[Path], cwd: Path, monkeypatch) -> nbformat.NotebookNode:
    """Run notebooks/NAME with LIFELONG_RUN=run_dirs; return the executed notebook."""
    monkeypatch.setenv("LIFELONG_RUN", ",".join(str(p) for p in run_dirs))
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    # No kernel directories: "python3" resolves to ipykernel's native spec, i.e. sys.executable.
    km = AsyncKernelManager(kernel_name="python3", kernel_spec_manager=KernelSpecManager(kernel_dirs=[]))
    NotebookClient(nb, km=km, timeout=120, resources={"metadata": {"path": str(cwd)}}).execute()
    return nb


def outputs(nb) -> tuple[str, int]:
    """(all text printed or displayed, number of figures)."""
    text, images = [], 0
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            assert out["output_type"] != "error", out
            if out["output_type"] == "stream":
                text.append(out["text"])
            data = out.get("data", {})
            images += "image/png" in data
            text.append(data.get("text/plain", "") + data.get("text/markdown", ""))
    return "\n".join(text), images


@pytest.mark.parametrize("name", ["forgetting.ipynb", "experts.ipynb"])
def test_notebooks_are_stored_without_outputs(name):
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and all(c.outputs == [] and c.execution_count is None for c in code)
    assert sum(c.cell_type == "markdown" for c in nb.cells) >= len(code)  # every figure is explained


def test_forgetting_one_run_without_curves(smoke_runs, tmp_path, monkeypatch):
    text, images = outputs(execute("forgetting.ipynb", [smoke_runs["plain"]], tmp_path, monkeypatch))
    assert images == 5  # matrices, forgetting, learning curves, transfer, the forgetting-plasticity plane
    assert "set LIFELONG_RUN=DIR1,DIR2" in text and "plain" in text


def test_forgetting_compares_two_runs(smoke_runs, tmp_path, monkeypatch):
    nb = execute("forgetting.ipynb", [smoke_runs["grow"], smoke_runs["dense"]], tmp_path, monkeypatch)
    text, images = outputs(nb)
    assert images == 2 * 4 + 1 + 2  # per run, the plane with both, then side-by-side matrices and summary bars
    assert "| grow |" in text and "| dense |" in text


def test_experts_with_growth(smoke_runs, tmp_path, monkeypatch):
    text, images = outputs(execute("experts.ipynb", [smoke_runs["grow"]], tmp_path, monkeypatch))
    assert images == 8  # usage, domain x bins, overlap, generation traffic, entry curve, isolation, drift, PCA
    assert "growth at step" in text and "share of routing weight per generation" in text


def test_experts_without_growth_without_experts_and_with_moe(smoke_runs, tmp_path, monkeypatch):
    dirs = [smoke_runs["dense"], smoke_runs["plain"], smoke_runs["moe"]]
    text, images = outputs(execute("experts.ipynb", dirs, tmp_path, monkeypatch))
    assert images == 5 + 8  # plain: all but the three growth figures; moe: all eight
    assert "dense has no PEER or MoE layer" in text
    assert "plain blocks.1.ffn: no growth in this run" in text and "no growth, every key is original" in text
    assert "moe blocks.1.ffn at after:legal: share of routing weight per generation" in text


def test_stage_boundaries_match_the_steps_growth_happened_at(smoke_runs):
    run = load_run(smoke_runs["grow"])
    boundary_steps = sorted({e["step"] for e in run.growth_events()})
    assert boundary_steps == run.boundaries()[:-1]  # schedule=boundary grows at each new experience
    curve_steps, _ = run.curves()["python"]
    assert curve_steps[-1] == run.boundaries()[-1]  # the last curve point is the end of the stream


def test_both_notebooks_on_a_grown_pretrained_model(tiny_hf, tmp_path, monkeypatch):
    from lifelong import experiment
    from lifelong.presets import resolve

    overrides = SMALL + [f"model.hf={tiny_hf('gpt2')}", "growth.schedule=boundary", "growth.experts=64",
                         "growth.warmup_steps=2", "eval.curve_every=2"]
    run_dir = tmp_path / "pretrained"
    experiment.run(resolve("smoke", overrides=overrides), run_dir, progress=False, echo=lambda *_: None)
    text, images = outputs(execute("forgetting.ipynb", [run_dir], tmp_path, monkeypatch))
    assert images == 5 and "pretrained" in text
    text, images = outputs(execute("experts.ipynb", [run_dir], tmp_path, monkeypatch))
    assert images == 8 and "hf.transformer.h.1.mlp.peer" in text and "growth at step" in text
