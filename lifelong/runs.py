"""Finding and reading run directories, for the notebooks and `lifelong report`.

Reads only what `lifelong run` wrote (results.json, run_info.json, metrics.csv,
snapshots/*.safetensors; the names are in lifelong.rundir) with the standard library, NumPy
and safetensors, so it is quick to import: no torch, no Avalanche.

    from lifelong.runs import find_runs, load_run
    run = load_run(find_runs()[0])      # a RunRecord: LIFELONG_RUN, else the newest run under runs/
    run.results["bpb_matrix"], run.curves(), run.usage("blocks.1.ffn", stage=-1)
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from lifelong import transfer
from lifelong.results_shape import check_results, json_kind
from lifelong.rundir import (CURVE_PREFIX, METRICS_FILE, RESULTS_FILE, RUN_INFO_FILE, SEED_PREFIX, SNAPSHOT_DIR,
                             is_seed_dir, read_json, read_metrics, snapshot_path)

ENV_VAR = "LIFELONG_RUN"


def _check_run_dir(path: Path) -> Path:
    if not path.exists():
        raise ValueError(f"{path}: no such directory")
    if not (path / RESULTS_FILE).is_file():
        raise ValueError(f"{path} is not a run directory (no {RESULTS_FILE}; is the run finished?)")
    return path


def _default_roots() -> list[Path]:
    """`runs/` in the working directory, else in its parent (a notebook runs in notebooks/)."""
    cwd = Path.cwd().resolve()
    return [folder / "runs" for folder in (cwd, cwd.parent) if (folder / "runs").is_dir()][:1]


def newest_run(root: str | Path | None = None) -> Path:
    """The run directory under `root` (default: ./runs, else ../runs) whose results.json was
    written last; ValueError if there is none."""
    roots = [Path(root)] if root is not None else _default_roots()
    found = [p for r in roots if r.is_dir() for p in r.rglob(RESULTS_FILE)]
    if not found:
        where = ", ".join(str(r) for r in roots) or f"no runs/ folder in {Path.cwd()} or its parent"
        raise ValueError(f"no finished run found ({where}); run `lifelong run` first "
                         f"or set {ENV_VAR}=RUN_DIR[,RUN_DIR...]")
    return max(found, key=lambda p: p.stat().st_mtime).parent


def find_runs(spec: str | Path | Sequence[str | Path] | None = None, root: str | Path | None = None) -> list[Path]:
    """The run directories to analyse.

    `spec`: a comma-separated string or a sequence of paths; None reads the environment
    variable LIFELONG_RUN (same format); when that is unset or empty, the newest run under
    `root` (default ./runs, else ../runs). Every path must hold a
    results.json, otherwise ValueError names it.
    """
    if spec is None:
        spec = os.environ.get(ENV_VAR, "")
    items = spec.split(",") if isinstance(spec, str) else [str(s) for s in spec]
    paths = [Path(item.strip()).expanduser() for item in items if item.strip()]
    if not paths:
        return [newest_run(root)]
    return [_check_run_dir(p) for p in paths]


def _read_metrics(path: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """metrics.csv (name,x,value) -> {name: (x, value)}, each sorted by x."""
    out = {}
    for name, (xs, ys) in read_metrics(path).items():
        x, y = np.asarray(xs), np.asarray(ys)
        order = np.argsort(x, kind="stable")
        out[name] = (x[order], y[order])
    return out


def experience_steps(results: dict) -> list[int] | None:
    """Optimizer steps of each training experience: results["experience_steps"] when the run
    recorded it, else `transfer.experience_steps` of the config and each domain's train_blocks
    (None if the results do not hold them)."""
    if results.get("experience_steps") is not None:
        return [int(s) for s in results["experience_steps"]]
    config, info = results.get("config") or {}, results.get("domain_info") or []
    if "train" not in config or not info or any("train_blocks" not in d for d in info):
        return None
    train = config["train"]
    return transfer.experience_steps(config.get("strategy", {}).get("name"), [d["train_blocks"] for d in info],
                                     int(train["batch_size"]), int(train.get("grad_accum", 1)),
                                     int(train.get("epochs", 1)))


class Snapshot(Mapping):
    """One stage's snapshot file as a read-only mapping {name: NumPy array}, read tensor by tensor
    (a figure that needs the generations does not load every usage table)."""

    def __init__(self, path: Path):
        from safetensors import safe_open

        self.path = path
        self._open = lambda: safe_open(str(path), framework="numpy")
        with self._open() as f:
            self._names = list(f.keys())
        self._cache: dict[str, np.ndarray] = {}

    def __getitem__(self, name: str) -> np.ndarray:
        if name not in self._cache:
            if name not in self._names:
                raise KeyError(f"{name} (not in {self.path})")
            with self._open() as f:
                self._cache[name] = f.get_tensor(name)
        return self._cache[name]

    def __iter__(self):
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)


@dataclass
class RunRecord:
    """One finished run directory, loaded lazily: results and run info at once, metrics and snapshots on use.

    Build one with `load_run(path)`, or `RunRecord.from_data(results, ...)` for data held in memory.
    Stages are indexed 0..S-1 as in results["stages"] (0 = before training); negative indexes
    count from the end.
    """

    path: Path | None
    results: dict
    run_info: dict = field(default_factory=dict)
    name: str = "run"
    _metrics: dict | None = field(default=None, repr=False)
    _snapshots: dict = field(default_factory=dict, repr=False)

    @classmethod
    def from_data(cls, results: dict, name: str = "run", run_info: dict | None = None,
                  metrics: dict[str, tuple[Sequence[float], Sequence[float]]] | None = None,
                  snapshots: Sequence[dict] | None = None) -> RunRecord:
        """A RunRecord over in-memory data: metrics {name: (x, values)}, snapshots one dict per stage."""
        return cls(None, results, run_info or {}, name,
                   {k: (np.asarray(x, float), np.asarray(y, float)) for k, (x, y) in (metrics or {}).items()},
                   dict(enumerate(snapshots or [])))

    # -- results.json ------------------------------------------------------------------------

    @property
    def domains(self) -> list[str]:
        return list(self.results["domains"])

    @property
    def stages(self) -> list[str]:
        return list(self.results["stages"])

    @property
    def config(self) -> dict:
        return self.results.get("config") or {}

    @property
    def strategy(self) -> str:
        return self.config.get("strategy", {}).get("name", "?")

    @property
    def ffn(self) -> str:
        return self.config.get("model", {}).get("ffn", "?")

    @property
    def is_joint(self) -> bool:
        return self.strategy == "joint" or self.stages[-1:] == ["after:joint"]

    @property
    def layers(self) -> list[str]:
        """Names of the PEER / MoE layers with usage statistics (empty for a dense model)."""
        return list((self.results.get("experts") or {}).keys())

    def growth_events(self, layer: str | None = None) -> list[dict]:
        events = self.results.get("growth_events") or []
        return [e for e in events if layer is None or e["layer"] == layer]

    def growth_steps(self) -> dict[int, int]:
        """{optimizer step: experts added there, all layers together}, in step order."""
        added: dict[int, int] = {}
        for event in sorted(self.growth_events(), key=lambda e: e["step"]):
            added[event["step"]] = added.get(event["step"], 0) + event["added"]
        return added

    def experience_steps(self) -> list[int] | None:
        return experience_steps(self.results)

    def boundaries(self) -> list[int] | None:
        """Optimizer step at the end of each training experience (stage s >= 1 is evaluated at
        boundaries()[s - 1]); None when the run does not say enough to know."""
        steps = self.experience_steps()
        return None if steps is None else np.cumsum(steps).astype(int).tolist()

    def stage_steps(self) -> list[int] | None:
        """Optimizer step at which each stage was evaluated (0, then the end of each experience);
        None when the boundaries are unknown or do not match the stages."""
        boundaries = self.boundaries()
        return [0, *boundaries] if boundaries and len(boundaries) + 1 == len(self.stages) else None

    def stage_index(self, stage: int) -> int:
        n = len(self.stages)
        if not -n <= stage < n:
            raise IndexError(f"{self.name}: stage {stage} out of range (stages 0..{n - 1})")
        return stage % n

    def why_no_experts(self) -> str:
        """A sentence on why this run has no expert statistics (dense model, aggregate of seeds)."""
        if self.results.get("seeds"):
            return (f"{self.name} aggregates seeds {self.results['seeds']}: open one seed's run directory "
                    f"(e.g. .../{SEED_PREFIX}N) for expert statistics")
        return f"{self.name} has no PEER or MoE layer (model.ffn = {self.ffn!r}): no expert statistics"

    # -- metrics.csv -------------------------------------------------------------------------

    def metrics(self) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """Every series of metrics.csv: {name: (x, value)} sorted by x (empty if there is no file)."""
        if self._metrics is None:
            self._metrics = _read_metrics(self.path / METRICS_FILE) if self.path else {}
        return self._metrics

    def metric(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        """One series (x, value); two empty arrays if the run did not log it."""
        return self.metrics().get(name, (np.empty(0), np.empty(0)))

    def curves(self) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """Learning curves {domain: (optimizer step, test loss in nats on the probe blocks)}, in
        stream order; empty when the run had eval.curve_every = 0."""
        series = self.metrics()
        return {d: series[CURVE_PREFIX + d] for d in self.domains if CURVE_PREFIX + d in series}

    # -- snapshots ---------------------------------------------------------------------------

    def _snapshot_file(self, stage: int) -> Path | None:
        return None if self.path is None else snapshot_path(self.path, stage)

    @property
    def has_snapshots(self) -> bool:
        if self.path is None:
            return bool(self._snapshots)
        return all(self._snapshot_file(s).is_file() for s in range(len(self.stages)))

    def snapshot(self, stage: int) -> Mapping[str, np.ndarray]:
        """The tensors saved at a stage (see lifelong.snapshots), {name: NumPy array}, read on use."""
        stage = self.stage_index(stage)
        if stage not in self._snapshots:
            path = self._snapshot_file(stage)
            if path is None or not path.is_file():
                raise ValueError(f"{self.name}: no snapshot for stage {stage} ({path or 'in-memory run'})")
            self._snapshots[stage] = Snapshot(path)
        return self._snapshots[stage]

    def _per_domain(self, kind: str, layer: str, stage: int) -> dict[str, np.ndarray]:
        snap = self.snapshot(stage)
        return {d: snap[f"{kind}/{layer}/{d}"] for d in self.domains if f"{kind}/{layer}/{d}" in snap}

    def usage(self, layer: str, stage: int = -1) -> dict[str, np.ndarray]:
        """{domain: [heads, N]} routing weight each expert received on the domain's test split."""
        return self._per_domain("usage", layer, stage)

    def routes(self, layer: str, stage: int = -1) -> dict[str, np.ndarray]:
        """{domain: [tokens, heads, top_k]} expert ids of the fixed probe tokens."""
        return self._per_domain("routes", layer, stage)

    def generation(self, layer: str, stage: int = -1) -> np.ndarray:
        """[N] growth generation of each expert (0 = original, g = added by the layer's g-th growth)."""
        return self.snapshot(stage)[f"generation/{layer}"]

    def generation_stage(self, layer: str) -> dict[int, int]:
        """{generation: first stage whose snapshot holds it}. Generation g first seen at stage
        s >= 1 was added while training experience s - 1 (or at its start), i.e. for domain s - 1."""
        first: dict[int, int] = {}
        for stage in range(len(self.stages)):
            for g in np.unique(self.generation(layer, stage)).tolist():
                first.setdefault(int(g), stage)
        return first

    def has_growth(self, layer: str) -> bool:
        return bool(self.growth_events(layer)) or (
            self.has_snapshots and int(self.generation(layer, -1).max(initial=0)) > 0)

    # -- per-block test losses and seeds (paired comparisons) -------------------------------------

    def seed_runs(self) -> list[RunRecord]:
        """The run of every seed of a multi-seed run directory (in the order of its seeds), else [self]."""
        names = self.results.get("runs") if self.results.get("seeds") else None
        if not names:
            return [self]
        if self.path is None:
            raise ValueError(f"{self.name}: an in-memory multi-seed run has no seed directories")
        return [load_run(self.path / name) for name in names]

    def block_losses(self) -> list[list[np.ndarray]] | None:
        """[stage][domain] each test block's mean loss (nats/token) from the snapshots; None for a run
        that did not keep them (an earlier version's, or an aggregate of seeds)."""
        if self.results.get("seeds") or not self.has_snapshots:
            return None
        out = []
        for stage in range(len(self.stages)):
            snap = self.snapshot(stage)
            if any(f"blocks/{d}" not in snap for d in self.domains):
                return None
            out.append([np.asarray(snap[f"blocks/{d}"], dtype=np.float64) for d in self.domains])
        return out

    def test_hashes(self) -> list[str | None]:
        """Each domain's hash of its test blocks (None where the run did not record it)."""
        return [d.get("test_hash") for d in self.results.get("domain_info") or []]

    def bytes_per_token(self) -> list[float]:
        """Each domain's test bytes per token (what turns nats per token into bits per byte)."""
        return [float(d["bytes_per_token"]) for d in self.results["domain_info"]]


def load_run(path: str | Path) -> RunRecord:
    """Read a run directory (ValueError if it has no results.json, or one that is damaged or not
    shaped like one; the message names the file)."""
    path = _check_run_dir(Path(path).expanduser())
    results = check_results(read_json(path / RESULTS_FILE), path / RESULTS_FILE)
    info_path = path / RUN_INFO_FILE
    run_info = read_json(info_path) if info_path.is_file() else {}
    if not isinstance(run_info, dict):
        raise ValueError(f"{info_path} is not a lifelong run info file (expected a JSON object, "
                         f"got {json_kind(run_info)})")
    return RunRecord(path, results, run_info, run_name(path))


def load_runs(spec=None, root: str | Path | None = None) -> list[RunRecord]:
    """`load_run` of every directory `find_runs(spec, root)` names, with names made unique."""
    runs = [load_run(p) for p in find_runs(spec, root)]
    seen: dict[str, int] = {}
    for run in runs:
        seen[run.name] = seen.get(run.name, 0) + 1
        if seen[run.name] > 1:
            run.name = f"{run.name} ({seen[run.name]})"
    return runs


def run_name(path: Path) -> str:
    """A short display name: the directory's name, with its parent's for a seed of a multi-seed run."""
    return f"{path.parent.name}/{path.name}" if is_seed_dir(path) else path.name


def expert_layers(runs: Iterable[RunRecord], need_growth: bool = False, need_snapshots: bool = True,
                  echo: Callable[[str], None] = print) -> Iterator[tuple[RunRecord, str]]:
    """(run, layer) for every expert layer of every run that has the data a figure needs
    (snapshots unless `need_snapshots=False`, growth if `need_growth`); for each one skipped,
    `echo` says why (dense model, no snapshots, no growth)."""
    for run in runs:
        if not run.layers:
            echo(run.why_no_experts())
            continue
        if (need_snapshots or need_growth) and not run.has_snapshots:
            echo(f"{run.name}: no {SNAPSHOT_DIR}/ folder (a run from an older version?): no per-expert data")
            continue
        for layer in run.layers:
            if need_growth and not run.has_growth(layer):
                echo(f"{run.name} {layer}: no growth in this run (growth.schedule = "
                     f"{run.config.get('growth', {}).get('schedule', '?')!r}): every expert is original")
                continue
            yield run, layer
