"""The run directory: every file and folder name `lifelong run` writes, atomic JSON writes and
reading a run's saved config. Torch-free, so readers of finished runs stay light.

    runs/NAME/
      config.yaml       the resolved config          results.json   everything measured
      run_info.json     timing, versions, machine    seeds.json     the seeds of a multi-seed run
      metrics.csv       every logged value           tb/            TensorBoard events
      bpb_matrix.png    the stage x domain heatmap   snapshots/     stage-NN.safetensors
      checkpoints/      ckpt-NNNNNN/ (layout in lifelong/checkpoint.py)
      seed-N/           one run directory per seed of a multi-seed run
"""

from __future__ import annotations

import csv
import json
import os
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


def snapshot_path(run_dir: str | Path, stage: int) -> Path:
    """The snapshot file of stage `stage` (0 = before training)."""
    return Path(run_dir) / SNAPSHOT_DIR / f"stage-{stage:02d}.safetensors"


def write_json_atomic(path: str | Path, data: Any) -> None:
    """Write JSON to a temporary file in the same folder, fsync it, then rename over `path`.

    A crash at any moment leaves either the old file or the new one, never a torn one.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=2, allow_nan=True)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_json(path: str | Path) -> Any:
    return json.loads(Path(path).read_text())


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
        values = yaml.safe_load(path.read_text())
    except yaml.YAMLError:
        raise ConfigError(f"{path} is not valid YAML") from None
    if not isinstance(values, dict):
        raise ConfigError(f"{path} does not hold a run configuration")
    return values


def read_run_config(run_dir: str | Path):
    """The resolved `RunConfig` saved in a run directory; ConfigError if `run_dir` is not a run."""
    from lifelong.config import from_dict

    return from_dict(read_config_values(run_dir))
