"""The run directory: every file and folder name `lifelong run` writes, atomic writes, whether a
folder holds a run worth keeping (and replacing one only when a new run starts), and reading a
run's saved config. Torch-free, so readers of finished runs stay light.

    runs/NAME/
      config.yaml       the resolved config          results.json   everything measured
      run_info.json     timing, versions, machine    seeds.json     the seeds of a multi-seed run
      metrics.csv       every logged value           tb/            TensorBoard events
      bpb_matrix.png    the stage x domain heatmap   snapshots/     stage-NN.safetensors
      checkpoints/      ckpt-NNNNNN/ with model.safetensors and state.pt (lifelong/checkpoint.py)
      seed-N/           one run directory per seed of a multi-seed run
"""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

from lifelong.errors import ConfigError

CONFIG_FILE = "config.yaml"
RESULTS_FILE = "results.json"
RUN_INFO_FILE = "run_info.json"
SEEDS_FILE = "seeds.json"
METRICS_FILE = "metrics.csv"
TB_DIR = "tb"
HEATMAP_FILE = "bpb_matrix.png"
SNAPSHOT_DIR = "snapshots"
CHECKPOINT_DIR = "checkpoints"
SEED_PREFIX = "seed-"
# Everything a run writes at the top of its directory (what --overwrite replaces).
RUN_FILES = (CONFIG_FILE, RESULTS_FILE, RUN_INFO_FILE, SEEDS_FILE, METRICS_FILE, HEATMAP_FILE, TB_DIR,
             CHECKPOINT_DIR, SNAPSHOT_DIR)
# metrics.csv series of each domain's learning curve (CurvePlugin writes it, RunRecord.curves reads it).
CURVE_PREFIX = "Curve/test_stream/"
# A checkpoint folder checkpoints/ckpt-NNNNNN/ is complete when it holds both files.
CHECKPOINT_NAME = re.compile(r"^ckpt-(\d{6,})$")
MODEL_FILE = "model.safetensors"
STATE_FILE = "state.pt"


def seed_name(seed: int) -> str:
    """The folder name of one seed's run inside a multi-seed run directory."""
    return f"{SEED_PREFIX}{seed}"


def seed_dir(out_dir: str | Path, seed: int) -> Path:
    """The run directory of one seed of a multi-seed run."""
    return Path(out_dir) / seed_name(seed)


def seed_dirs(out_dir: str | Path) -> list[Path]:
    """The seed run directories already under `out_dir` (those holding a config)."""
    return sorted(p for p in Path(out_dir).glob(f"{SEED_PREFIX}*") if (p / CONFIG_FILE).is_file())


def is_seed_dir(path: Path) -> bool:
    return path.name.startswith(SEED_PREFIX)


def checkpoint_folders(run_dir: str | Path) -> tuple[list[tuple[int, Path]], list[Path]]:
    """(complete checkpoints as (number, folder) in number order, `ckpt-*` entries that are not
    complete: a folder missing a file, or a stray file of that name)."""
    complete, incomplete = [], []
    root = Path(run_dir) / CHECKPOINT_DIR
    for child in sorted(root.iterdir()) if root.is_dir() else []:
        match = CHECKPOINT_NAME.match(child.name)
        if not match:
            continue
        if child.is_dir() and all((child / name).is_file() for name in (MODEL_FILE, STATE_FILE)):
            complete.append((int(match.group(1)), child))
        else:
            incomplete.append(child)
    return sorted(complete), incomplete


def holds_started_run(path: str | Path) -> bool:
    """Whether `path` holds a run worth keeping: results, or a complete checkpoint to resume, of its
    own or of one of its seeds. A start killed before its first checkpoint holds neither."""
    path = Path(path)
    dirs = [path, *(p for p in path.glob(f"{SEED_PREFIX}*") if p.is_dir())]
    return any((d / RESULTS_FILE).is_file() or checkpoint_folders(d)[0] for d in dirs)


def run_entries(path: str | Path) -> list[str]:
    """The names of what a run writes (RUN_FILES and seed folders) that `path` already holds."""
    path = Path(path)
    if not path.is_dir():
        return []
    seeds = sorted(p.name for p in path.glob(f"{SEED_PREFIX}*") if p.is_dir())
    return [name for name in RUN_FILES if (path / name).exists() or (path / name).is_symlink()] + seeds


def check_writable(path: str | Path) -> None:
    """ConfigError unless a run directory can be created or written at `path`: its nearest
    existing ancestor must be a writable directory (and `path`, if it exists, a directory)."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{path} exists and is not a directory")
    existing = next(p for p in (path, *path.parents) if p.exists() or p == Path(p.anchor or "."))
    if not existing.is_dir():
        raise ConfigError(f"cannot create run directory {path}: {existing} is not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"cannot write run directory {path}: {existing} is not writable "
                          "(permissions or a read-only file system)")


def check_out_dir(path: str | Path, overwrite: bool) -> list[str]:
    """Validate `path` as the directory of a new run and return the entries the run will replace.

    A run worth keeping (`holds_started_run`) is refused unless `overwrite`; leftovers of a start
    killed before its first checkpoint are replaced. Nothing is removed here: `replace_entries`
    does that when the new run is about to write, after everything else was validated.
    """
    check_writable(path)
    entries = run_entries(path)
    if entries and not overwrite and holds_started_run(path):
        raise ConfigError(f"{path} already holds a run ({', '.join(entries)}); "
                          "choose another directory, pass --overwrite, or continue it with --resume")
    return entries


def replace_entries(path: str | Path, names: list[str]) -> None:
    """Remove `names` from run directory `path`: each is first renamed into one hidden folder
    (atomic), which is then deleted. config.yaml goes first (RUN_FILES order), so a kill midway
    leaves no config beside part of an old run: `--resume` refuses it and the same command starts again."""
    path = Path(path)
    present = [name for name in names if (path / name).exists() or (path / name).is_symlink()]
    for old in path.glob(".replaced-*"):  # from a process killed while deleting
        shutil.rmtree(old, ignore_errors=True)
    if not present:
        return
    trash = Path(tempfile.mkdtemp(prefix=".replaced-", dir=path))
    for name in present:
        os.replace(path / name, trash / name)
    shutil.rmtree(trash, ignore_errors=True)


class RunLock:
    """An exclusive advisory lock (flock) on a run directory while a process writes it, so a second
    `lifelong run` or `--resume` into the same directory is refused instead of mixing its files."""

    def __init__(self, path: str | Path):
        self.path, self._fd = Path(path), None

    def acquire(self) -> None:
        try:
            import fcntl
        except ImportError:  # no flock on this platform: unlocked, as before
            return
        fd = os.open(self.path, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise ConfigError(f"{self.path} is being written by another lifelong process; wait for it to end, "
                              "or choose another directory") from None
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the lock
            self._fd = None


def snapshot_path(run_dir: str | Path, stage: int) -> Path:
    """The snapshot file of stage `stage` (0 = before training)."""
    return Path(run_dir) / SNAPSHOT_DIR / f"stage-{stage:02d}.safetensors"


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write `text` to a temporary file in the same folder, fsync it, then rename over `path`.

    A crash at any moment leaves either the old file or the new one, never a torn one.
    """
    path = Path(path)
    for stale in path.parent.glob(f".{path.name}.*.tmp"):  # from a process killed while writing
        stale.unlink(missing_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json_atomic(path: str | Path, data: Any) -> None:
    """`data` as indented JSON, written atomically (`write_text_atomic`)."""
    write_text_atomic(path, json.dumps(data, indent=2, allow_nan=True) + "\n")


def read_json(path: str | Path) -> Any:
    """The JSON value in `path`; ConfigError naming the file when it cannot be read, is not UTF-8
    or is not JSON (a truncated or damaged file)."""
    try:
        text = Path(path).read_text(encoding="utf-8")
        return json.loads(text)
    except UnicodeDecodeError:
        reason = "not UTF-8 text"
    except json.JSONDecodeError as err:
        reason = "empty file" if not text.strip() else f"{err.msg} at line {err.lineno} column {err.colno}"
    except RecursionError:
        reason = "nested too deeply"
    except OSError as err:
        reason = f"cannot read it: {err.strerror or err}"
    raise ConfigError(f"{path} is not valid JSON ({reason})")


def read_metrics(path: str | Path) -> dict[str, tuple[list[float], list[float]]]:
    """metrics.csv (rows name,x,value) -> {name: (xs, values)} in file order; {} without the file.
    A torn last line (a run killed while writing) is skipped."""
    columns: dict[str, tuple[list[float], list[float]]] = {}
    path = Path(path)
    if not path.is_file():
        return columns
    with path.open(newline="") as f:
        reader = csv.reader(f)
        next(reader, None)  # header
        for row in reader:
            if len(row) != 3:
                continue
            xs, ys = columns.setdefault(row[0], ([], []))
            xs.append(float(row[1]))
            ys.append(float(row[2]))
    return columns


def read_config_values(run_dir: str | Path) -> dict:
    """The mapping saved in a run's config.yaml; ConfigError if `run_dir` is not a run."""
    import yaml

    path = Path(run_dir) / CONFIG_FILE
    if not path.is_file():
        raise ConfigError(f"{run_dir} is not a run directory (no {CONFIG_FILE})")
    try:
        values = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path} is not UTF-8 text (byte {err.start})") from None
    except OSError as err:
        raise ConfigError(f"{path} cannot be read: {err.strerror or err}") from None
    except (yaml.YAMLError, RecursionError):  # RecursionError: nested too deeply to parse
        raise ConfigError(f"{path} is not valid YAML") from None
    if not isinstance(values, dict):
        raise ConfigError(f"{path} does not hold a run configuration")
    return values


def read_run_config(run_dir: str | Path):
    """The resolved `RunConfig` saved in a run directory; ConfigError if `run_dir` is not a run."""
    from lifelong.config import from_dict

    return from_dict(read_config_values(run_dir))
