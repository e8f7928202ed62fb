"""Nothing lost, ever: a failed --overwrite keeps the old run byte for byte, a run killed at any moment
ends with the uninterrupted run's results.json, a refused --resume touches nothing, and every bad
input (files, sizes, folders, damaged JSON, a full disk, changed data) ends with one line and exit 2."""

import errno
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from lifelong import checkpoint, cli

TINY = ["--preset", "smoke", "--set", "stream.train_tokens=2048", "--set", "stream.test_tokens=1024",
        "--set", "checkpoint.every_steps=3", "--no-progress"]


def run_cli(argv) -> int:
    try:
        return cli.main(argv)
    except SystemExit as exit_:
        return exit_.code


def tree(path: Path) -> dict[str, bytes | None]:
    """Every entry under `path`: file contents, None for a folder (what "untouched" compares)."""
    return {str(p.relative_to(path)): None if p.is_dir() else p.read_bytes() for p in sorted(path.rglob("*"))}


def one_line_exit_2(argv, capsys, *needles) -> str:
    code = run_cli(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    last = err.splitlines()[-1]
    assert "Traceback" not in err and last.startswith("lifelong: error: "), err
    assert [line for line in err.splitlines() if not line.startswith("lifelong: warning: ")] == [last], err
    for needle in needles:
        assert needle in last, last
    return last


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("finished") / "run"
    assert run_cli(["run", *TINY, "--out", str(out)]) == 0
    return out


@pytest.fixture
def copy(finished, tmp_path) -> Path:
    """A copy of the finished run to damage."""
    shutil.copytree(finished, tmp_path / "run")
    return tmp_path / "run"


def nested_json_folder(tmp_path: Path) -> Path:
    """A data folder with a named pipe (reading it would hang) and JSON nested past the parser's limit."""
    folder = tmp_path / "hostile"
    folder.mkdir()
    os.mkfifo(folder / "pipe.txt")
    (folder / "deep.jsonl").write_text('{"text": ' + "[" * 100_000 + "\n")
    return folder


# -- a failed --overwrite loses nothing ---------------------------------------------------------


def _bad_overwrite(tmp_path: Path, case: str) -> list[str]:
    if case == "data path":
        return ["--set", "stream.domains=[{name: x, path: /nonexistent/data}]"]
    if case == "model size":
        return ["--set", "model.peer.num_experts=1000000000000"]
    if case == "config not UTF-8":
        (tmp_path / "c.yaml").write_bytes(b"train:\n  lr: \xff\xfe\n")
        return ["--config", str(tmp_path / "c.yaml")]
    if case == "hostile data":
        return ["--set", f"stream.domains=[{{name: h, path: {nested_json_folder(tmp_path)}}}]"]
    return ["--seeds", "0,1", "--set", "stream.domains=[{name: x, path: /nonexistent/data}]"]


@pytest.mark.parametrize("case", ["data path", "model size", "config not UTF-8", "hostile data", "seeds"])
def test_a_failed_overwrite_leaves_the_old_run_byte_identical(copy, tmp_path, capsys, case):
    before = tree(copy)
    one_line_exit_2(["run", *TINY, "--out", str(copy), "--overwrite", *_bad_overwrite(tmp_path, case)], capsys)
    assert tree(copy) == before


def test_overwrite_replaces_the_old_run_once_the_new_one_starts(copy, capsys):
    old = json.loads((copy / "results.json").read_text())
    assert run_cli(["run", *TINY, "--out", str(copy), "--overwrite", "--set", "seed=1"]) == 0
    new = json.loads((copy / "results.json").read_text())
    assert new["config"]["seed"] == 1 and new["loss_matrix"] != old["loss_matrix"]
    assert not list(copy.glob(".replaced-*"))
    assert [p.name for p in (copy / "checkpoints").iterdir()] == [checkpoint.latest(copy).name]


# -- killed at any moment -------------------------------------------------------------------------

# Runs the command line in a fresh process that SIGKILLs itself on the n-th call of a function.
KILLER = r"""
import os, signal, sys
import torch
torch.set_num_threads(1)
from lifelong import checkpoint, cli, rundir, session, snapshots

where, n = sys.argv[1], int(sys.argv[2])
calls = [0]

def killing(original, when=lambda *a: True):
    def wrapped(*args, **kwargs):
        if when(*args):
            calls[0] += 1
            if calls[0] == n:
                os.kill(os.getpid(), signal.SIGKILL)
        return original(*args, **kwargs)
    return wrapped

if where == "startup":
    session.RunSession.describe = killing(session.RunSession.describe)
elif where == "checkpoint":  # after the files are written, before the folder is renamed into place
    checkpoint._fsync_dir = killing(checkpoint._fsync_dir, lambda path: ".tmp-" in str(path))
elif where == "snapshot":
    snapshots.write = killing(snapshots.write)
elif where == "results":
    rundir.write_text_atomic = killing(rundir.write_text_atomic, lambda path, text: path.name == "results.json")
sys.exit(cli.main(sys.argv[3:]))
"""


def _killed_run(out: Path, where: str, n: int, delay: float | None = None) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.Popen([sys.executable, "-c", KILLER, where, str(n), "run", *TINY, "--out", str(out)],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if delay is not None:
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=600)
    return proc


@pytest.mark.parametrize("where, n, then", [
    ("startup", 1, "again"),       # config and logs written, no checkpoint yet: the same command starts again
    ("checkpoint", 1, "resume"),   # mid-write of the first checkpoint: --resume starts again
    ("snapshot", 3, "resume"),     # after later checkpoints, inside an evaluation
    ("checkpoint", 6, "resume"),   # mid-write of a later checkpoint
    ("results", 1, "resume"),      # while writing results.json
])
def test_a_run_killed_at_any_moment_ends_with_the_uninterrupted_results(finished, tmp_path, capsys, where, n, then):
    out = tmp_path / "killed"
    proc = _killed_run(out, where, n)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert not (out / "results.json").exists()
    argv = ["run", *TINY, "--out", str(out)] if then == "again" else ["run", "--resume", str(out), "--no-progress"]
    assert run_cli(argv) == 0, capsys.readouterr().err
    assert (out / "results.json").read_bytes() == (finished / "results.json").read_bytes()
    assert not list((out / "checkpoints").glob(".tmp-*"))


def test_a_run_killed_at_a_random_moment_ends_with_the_uninterrupted_results(finished, tmp_path, capsys):
    seed = random.randrange(2**16)
    delay = random.Random(seed).uniform(0.5, 12.0)
    out = tmp_path / "killed"
    proc = _killed_run(out, "none", 0, delay=delay)
    assert proc.returncode in (0, -signal.SIGKILL), proc.stderr
    argv = ["run", "--resume", str(out), "--no-progress"] if (out / "config.yaml").exists() else \
        ["run", *TINY, "--out", str(out)]
    assert run_cli(argv) == 0, f"killed after {delay:.2f} s (seed {seed}): {capsys.readouterr().err}"
    assert (out / "results.json").read_bytes() == (finished / "results.json").read_bytes(), f"seed {seed}"


def test_incomplete_checkpoint_folders_are_skipped_with_a_warning(finished, copy, capsys):
    (copy / "results.json").unlink()
    (copy / "checkpoints" / "ckpt-999998").write_text("stray")
    (copy / "checkpoints" / "ckpt-999999").mkdir()
    shutil.copy(checkpoint.latest(finished) / checkpoint.MODEL_FILE, copy / "checkpoints" / "ckpt-999999")
    assert run_cli(["run", "--resume", str(copy), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "warning: skipping" in out and "ckpt-999999" in out and "ckpt-999998" in out
    assert (copy / "results.json").read_bytes() == (finished / "results.json").read_bytes()


def test_a_full_disk_names_the_checkpoint_and_keeps_the_previous_one(finished, tmp_path, capsys, monkeypatch):
    saves, real_save = [0], torch.save

    def full_disk(obj, path, *args, **kwargs):
        saves[0] += 1
        if saves[0] == 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(checkpoint.torch, "save", full_disk)
    out = tmp_path / "full"
    last = one_line_exit_2(["run", *TINY, "--out", str(out)], capsys, "no space left", "ckpt-000002", "MiB",
                           "ckpt-000001 is kept")
    assert "needs about" in last
    monkeypatch.undo()
    assert checkpoint.latest(out).name == "ckpt-000001"
    assert run_cli(["run", "--resume", str(out), "--no-progress"]) == 0
    assert (out / "results.json").read_bytes() == (finished / "results.json").read_bytes()


def test_a_full_disk_anywhere_else_is_one_line_naming_the_file(tmp_path, capsys, monkeypatch):
    from lifelong import rundir, snapshots

    def full(run_dir, stage, tensors):
        raise OSError(errno.ENOSPC, "No space left on device", str(rundir.snapshot_path(run_dir, stage)))

    monkeypatch.setattr(snapshots, "write", full)
    one_line_exit_2(["run", *TINY, "--out", str(tmp_path / "r")], capsys, "stage-00.safetensors: No space left")


# -- a refused --resume touches nothing --------------------------------------------------------


def _damage(run_dir: Path, how: str) -> str:
    ckpt = checkpoint.latest(run_dir)
    if how == "weights of another model":
        from safetensors.torch import save_file
        save_file({"tok_emb.weight": torch.zeros(3, 3)}, str(ckpt / checkpoint.MODEL_FILE))
        return "does not fit this model"
    if how == "foreign progress":
        state = torch.load(ckpt / checkpoint.STATE_FILE, weights_only=True)
        state["progress"] = {"not_a_field": 1}
        torch.save(state, ckpt / checkpoint.STATE_FILE)
        return "does not fit this run"
    if how == "garbage state":
        (ckpt / checkpoint.STATE_FILE).write_bytes(b"\x00" * 64)
        return "cannot be loaded safely"
    (run_dir / "config.yaml").write_bytes(b"seed: \xff\n")
    return "not UTF-8"


@pytest.mark.parametrize("how", ["weights of another model", "foreign progress", "garbage state", "config bytes"])
def test_a_refused_resume_touches_nothing(copy, capsys, how):
    (copy / "results.json").unlink()
    needle = _damage(copy, how)
    before = tree(copy)
    one_line_exit_2(["run", "--resume", str(copy), "--no-progress"], capsys, needle)
    assert tree(copy) == before  # no new TensorBoard file, metrics.csv not truncated


# -- local data changed under a run --------------------------------------------------------------


def _local_domains(root: Path) -> list[Path]:
    rng = random.Random(0)
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()
    files = []
    for name in ("a", "b"):
        (root / name).mkdir(parents=True)
        text = "\n".join(" ".join(rng.choice(words) for _ in range(12)) for _ in range(600))
        (root / name / "text.txt").write_text(text)
        files.append(root / name / "text.txt")
    return files


def test_resume_refuses_changed_local_data_unless_allowed(tmp_path, capsys):
    files = _local_domains(tmp_path / "data")
    domains = ", ".join(f"{{name: {f.parent.name}, path: {f.parent}}}" for f in files)
    out = tmp_path / "run"
    assert run_cli(["run", *TINY, "--set", f"stream.domains=[{domains}]", "--out", str(out)]) == 0
    (out / "results.json").unlink()
    os.utime(files[0], (1, 1))  # touched, same text: the same token blocks, so not a change
    assert run_cli(["run", "--resume", str(out), "--no-progress"]) == 0
    files[1].write_text(files[1].read_text().replace("alpha", "omega"))
    before = tree(out)
    one_line_exit_2(["run", "--resume", str(out), "--no-progress"], capsys, "domain 'b'", "--allow-changed-data")
    assert tree(out) == before
    assert run_cli(["run", "--resume", str(out), "--no-progress", "--allow-changed-data"]) == 0
    assert "changed data of domain 'b'" in capsys.readouterr().out
    assert json.loads((out / "run_info.json").read_text())["data_changes"] == [{"stage": 3, "domains": ["b"]}]


# -- every remaining bad input: one line, exit 2 ------------------------------------------------


def test_bad_folders_for_out(tmp_path, capsys, monkeypatch):
    (tmp_path / "file").write_text("x")
    one_line_exit_2(["run", *TINY, "--out", str(tmp_path / "file" / "run")], capsys, "is not a directory")
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode: False if Path(path) == tmp_path else real_access(path, mode))
    one_line_exit_2(["run", *TINY, "--out", str(tmp_path / "run")], capsys, "not writable")
    assert not (tmp_path / "run").exists()


def test_sizes_that_cannot_be_allocated(copy, capsys):
    one_line_exit_2(["run", *TINY, "--set", "model.peer.num_experts=1000000000000", "--out", str(copy.parent / "n")],
                    capsys, "model:", "GiB", "model.peer.num_experts")
    one_line_exit_2(["grow", str(copy), "--experts", "1000000000000"], capsys, "grow --experts", "GiB")
    one_line_exit_2(["grow", str(copy), "--experts", "100000"], capsys, "kmeans", "input tokens")
    # flops counts any size without allocating it
    assert run_cli(["flops", "--preset", "smoke", "--set", "model.peer.num_experts=1000000000000"]) == 0
    assert "experts: 1,000,000,000,000" in capsys.readouterr().out


def _multi_seed(copy: Path) -> Path:
    """A multi-seed run directory holding `copy` as its one finished seed."""
    multi = copy.parent / "multi"
    multi.mkdir()
    shutil.copytree(copy, multi / "seed-0")
    shutil.copy(copy / "config.yaml", multi / "config.yaml")
    (multi / "seeds.json").write_text('{"seeds": [0]}')
    return multi


@pytest.mark.parametrize("damage, needle", [
    ("seeds.json", "seeds.json is not valid JSON"),
    ("seeds shape", "does not hold a list of distinct seeds"),
    ("seed results", "seed-0/results.json is not valid JSON"),
])
def test_a_damaged_multi_seed_run_on_resume(copy, capsys, damage, needle):
    multi = _multi_seed(copy)
    if damage == "seeds.json":
        (multi / "seeds.json").write_text('{"seeds": [0')
    elif damage == "seeds shape":
        (multi / "seeds.json").write_text('{"seeds": "0"}')
    else:
        (multi / "seed-0" / "results.json").write_text("{")
    before = tree(multi)
    one_line_exit_2(["run", "--resume", str(multi), "--no-progress"], capsys, needle)
    assert tree(multi) == before


def test_report_of_results_of_the_wrong_shape_or_into_a_missing_folder(copy, capsys):
    one_line_exit_2(["report", str(copy), "--csv", str(copy / "missing" / "t.csv")], capsys, "missing")
    (copy / "results.json").write_text('{"domains": 3}')
    one_line_exit_2(["report", str(copy)], capsys, "results.json")


def test_hostile_data_folder_never_hangs(tmp_path, capsys):
    folder = nested_json_folder(tmp_path)
    code = run_cli(["run", *TINY, "--set", f"stream.domains=[{{name: h, path: {folder}}}]",
                    "--out", str(tmp_path / "r")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert err[0].startswith("lifelong: warning: ") and "pipe.txt (named pipe)" in err[0]
    assert err[-1].startswith("lifelong: error: ") and "deep.jsonl line 1" in err[-1] and len(err) == 2


# -- found by a hostile sweep -----------------------------------------------------------------------


def test_a_run_into_a_directory_being_written_is_refused(copy, capsys):
    from lifelong import rundir

    lock = rundir.RunLock(copy)
    lock.acquire()  # another process writing there, as far as flock can tell
    try:
        before = tree(copy)
        one_line_exit_2(["run", *TINY, "--out", str(copy), "--overwrite"], capsys, "another lifelong process")
        (copy / "results.json").unlink()
        before = tree(copy)
        one_line_exit_2(["run", "--resume", str(copy), "--no-progress"], capsys, "another lifelong process")
        assert tree(copy) == before
    finally:
        lock.release()


def test_report_never_writes_into_a_run_it_reads(copy, capsys):
    before = tree(copy)
    one_line_exit_2(["report", str(copy), "--csv", str(copy / "results.json")], capsys, "inside the run directory")
    assert tree(copy) == before


def test_input_nested_too_deeply_is_one_line(copy, tmp_path, capsys):
    (tmp_path / "deep.yaml").write_text("train: " + "[" * 100_000 + "]" * 100_000 + "\n")
    one_line_exit_2(["flops", "--preset", "smoke", "--config", str(tmp_path / "deep.yaml")], capsys, "deep.yaml")
    multi = _multi_seed(copy)
    (multi / "seeds.json").write_text("[" * 100_000 + "]" * 100_000)
    one_line_exit_2(["run", "--resume", str(multi), "--no-progress"], capsys, "seeds.json is not valid JSON")
    (copy / "results.json").write_text("[" * 100_000 + "]" * 100_000)
    one_line_exit_2(["report", str(copy)], capsys, "results.json is not valid JSON (nested too deeply)")


def test_a_bad_value_is_named_in_a_bounded_line(tmp_path, capsys):
    bomb = ["seed: [" + ", ".join(f"&a{i} [" + ", ".join(["x"] * 10 if i == 0 else [f"*a{i - 1}"] * 10) + "]"
                                  for i in range(9)) + "]"]
    (tmp_path / "bomb.yaml").write_text(bomb[0] + "\n")
    last = one_line_exit_2(["flops", "--preset", "smoke", "--config", str(tmp_path / "bomb.yaml")], capsys, "seed")
    assert len(last) < 400


@pytest.mark.parametrize("setting, needle", [
    ("model.dim=1000000000", "too large to describe"),
    ("model.n_layers=1000000000", "cannot even be described"),
])
def test_sizes_too_large_to_describe(setting, needle, tmp_path, capsys):
    one_line_exit_2(["flops", "--preset", "smoke", "--set", setting], capsys, needle)
    one_line_exit_2(["run", *TINY, "--set", setting, "--out", str(tmp_path / "r")], capsys, needle)
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("setting, needle", [
    ("eval.bootstrap_samples=1000000000000", "eval.bootstrap_samples"),
    ("train.trainable=['blocks.99.*']", "'blocks.99.*' is neither a group"),
])
def test_settings_that_would_fail_after_training_are_refused_before(setting, needle, tmp_path, capsys):
    one_line_exit_2(["run", *TINY, "--set", setting, "--out", str(tmp_path / "r")], capsys, needle)
    assert not (tmp_path / "r").exists()


def test_an_interrupt_while_torch_loads_is_one_line(monkeypatch, capsys):
    # the console script imports lifelong.cli before main() runs: it must not load torch itself
    code = "import sys, lifelong.cli\nprint('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "False"

    def loading(args):  # an interrupt inside main, where the heavy imports happen
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "_main", loading)
    assert cli.main(["flops", "--preset", "smoke"]) == 130
    assert capsys.readouterr().err.strip() == "lifelong: interrupted"
