"""Several seeds of one configuration: one run directory per seed (`DIR/seed-N/`), then an
aggregate results.json in `DIR` with the mean matrices and the spread of every summary figure."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from lifelong import distributed, rundir
from lifelong.results import FIGURE_KEYS
from lifelong.config import MAX_SEED, RunConfig, dump_yaml
from lifelong.errors import ConfigError
from lifelong.experiment import resume, run
from lifelong.plots import save_matrix_heatmap


def t_interval(values: list[float], level: float = 0.95) -> list[float] | None:
    """mean -+ t_{(1 + level) / 2, n - 1} * s / sqrt(n) over seeds (Student t); None below two values."""
    from scipy.stats import t

    n = len(values)
    if n < 2:
        return None
    mean, half = float(np.mean(values)), float(t.ppf((1 + level) / 2, n - 1) * np.std(values, ddof=1) / np.sqrt(n))
    return [mean - half, mean + half]


def _over_seeds(values: list[float | None], level: float) -> dict:
    """Mean, sample standard deviation, t interval and per-seed values of one figure."""
    present = [v for v in values if v is not None]
    if not present:
        return {"mean": None, "std": None, "interval": None, "values": values}
    return {"mean": float(np.mean(present)), "std": float(np.std(present, ddof=1)) if len(present) > 1 else 0.0,
            "interval": t_interval(present, level), "values": values}


def _summary(summaries: list[dict], domains: list[str], level: float, over: dict, prefix: str) -> tuple[dict, dict]:
    """The mean over seeds of every per-seed figure (a figure with a min or max inside, like
    forgetting, is averaged after it is computed per seed), and the t intervals over seeds."""
    out, intervals = {}, {}
    for key in FIGURE_KEYS:
        if key in ("forgetting", "forgetting_first_last"):
            out[key] = {}
            for d in summaries[0].get(key) or {}:
                stats = _over_seeds([s[key][d] for s in summaries], level)
                out[key][d] = stats["mean"]
                if key == "forgetting":
                    over[f"{prefix}forgetting/{d}"] = stats
                    intervals.setdefault("forgetting", {})[d] = stats["interval"]
            continue
        stats = _over_seeds([s.get(key) for s in summaries], level)
        out[key], intervals[key] = stats["mean"], stats["interval"]
        over[prefix + key] = stats
    return out, intervals


def aggregate_seeds(per_seed: list[dict], seeds: list[int], level: float = 0.95) -> dict:
    """results.json of a multi-seed run: the matrices averaged over seeds (each cell with a t interval
    over seeds), every summary figure the mean of the per-seed figures with its t interval, and
    `over_seeds`: mean, sample std, interval and per-seed values of every figure."""
    first = per_seed[0]
    domains = first["domains"]
    cells = {key: np.asarray([r[key] for r in per_seed], dtype=np.float64) for key in ("loss_matrix", "bpb_matrix")}
    over: dict = {}
    nats, nats_iv = _summary(per_seed, domains, level, over, "")
    bpb, bpb_iv = _summary([r["bpb_summary"] for r in per_seed], domains, level, over, "bpb_")
    bpb["intervals"] = bpb_iv
    res = {"domains": domains, "stages": first["stages"],
           "loss_matrix": cells["loss_matrix"].mean(axis=0).tolist(),
           "bpb_matrix": cells["bpb_matrix"].mean(axis=0).tolist(),
           **nats, "bpb_summary": bpb, "num_experts": first["num_experts"]}
    for key in ("max_intrusion", "min_own"):  # isolation of grown experts, per seed first too
        stats = _over_seeds([r.get(key) for r in per_seed], level)
        res[key] = stats["mean"]
        nats_iv[key] = stats["interval"]
        over[key] = stats
    if len(per_seed) > 1:
        for key, name in (("loss_matrix", "loss_interval"), ("bpb_matrix", "bpb_interval")):
            res[name] = [[t_interval(cells[key][:, s, j].tolist(), level) for j in range(len(domains))]
                         for s in range(len(res["stages"]))]
    res.update(intervals=nats_iv, interval_method={"kind": "Student t over seeds", "level": level,
                                                  "seeds": len(per_seed)},
               domain_info=first["domain_info"], flops_per_token=first["flops_per_token"], params=first["params"],
               config=first["config"], seeds=seeds, runs=[rundir.seed_name(s) for s in seeds], over_seeds=over)
    return res


def _finished(run_dir: Path) -> dict:
    """A finished run's results.json, with its run_info.json under "run_info" as `run` returns it."""
    try:
        info = run_dir / rundir.RUN_INFO_FILE
        return {**rundir.read_json(run_dir / rundir.RESULTS_FILE),
                "run_info": rundir.read_json(info) if info.is_file() else {}}
    except ConfigError as err:
        raise ConfigError(f"{err}; delete it and --resume again to recompute it from the seed's last checkpoint") from None


def run_seeds(cfg: RunConfig, seeds: list[int], out_dir: str | Path, progress: bool | None = None,
              echo=print, resuming: bool = False, replace: list[str] | None = None,
              allow_changed_data: bool = False) -> dict:
    """One run per seed in `out_dir/seed-N/`, then the aggregate results.json in `out_dir`.

    When `resuming`, finished seeds are read back, interrupted ones resumed, missing ones started.
    Otherwise `out_dir` is checked like a single run's (`rundir.check_out_dir`; `replace` lists
    what may be replaced), and the old entries go only once the first seed's run is built.
    """
    out_dir = Path(out_dir)
    main = distributed.is_main()
    if not resuming and replace is None:
        replace = rundir.check_out_dir(out_dir, overwrite=False)

    lock = rundir.RunLock(out_dir)

    def start() -> None:  # seeds.json first: a kill before config.yaml leaves no half multi-seed run
        if main:
            out_dir.mkdir(parents=True, exist_ok=True)
            lock.acquire()
            rundir.replace_entries(out_dir, replace)
            rundir.write_json_atomic(out_dir / rundir.SEEDS_FILE, {"seeds": seeds})
            rundir.write_text_atomic(out_dir / rundir.CONFIG_FILE, dump_yaml(cfg))
        distributed.barrier()

    if resuming and main:
        lock.acquire()
    try:
        return _run_each(cfg, seeds, out_dir, progress, echo, resuming, start, allow_changed_data)
    finally:
        lock.release()


def _run_each(cfg: RunConfig, seeds: list[int], out_dir: Path, progress, echo, resuming: bool, start,
              allow_changed_data: bool) -> dict:
    """The seeds' runs (read back, resumed or started), then the aggregate written in `out_dir`."""
    main = distributed.is_main()
    per_seed = []
    for i, seed in enumerate(seeds):
        seed_dir = rundir.seed_dir(out_dir, seed)
        echo(f"--- seed {seed} ({seed_dir})")
        if resuming and (seed_dir / rundir.RESULTS_FILE).is_file():
            per_seed.append(_finished(seed_dir))
        elif resuming and (seed_dir / rundir.CONFIG_FILE).is_file():
            per_seed.append(resume(seed_dir, progress=progress, echo=echo, allow_changed_data=allow_changed_data))
        else:
            # a new run's seed folders were checked with out_dir and go with its old entries
            per_seed.append(run(dataclasses.replace(cfg, seed=seed), seed_dir, progress=progress, echo=echo,
                                replace=None if resuming else [],
                                before_writing=start if i == 0 and not resuming else None))
    res = aggregate_seeds(per_seed, seeds, cfg.eval.interval_level)
    info = {key: round(sum(r["run_info"].get(key, 0.0) for r in per_seed), 2)
            for key in ("wall_time_s", "eval_time_s")}
    if main:
        rundir.write_json_atomic(out_dir / rundir.RESULTS_FILE, res)
        save_matrix_heatmap(res, out_dir / rundir.HEATMAP_FILE)
        rundir.write_json_atomic(out_dir / rundir.RUN_INFO_FILE, info)
    distributed.barrier()
    return {**res, "run_info": info}


def read_seeds(run_dir: str | Path) -> list[int] | None:
    """The seeds of a multi-seed run directory, or None for a single run; ConfigError naming
    seeds.json when it is damaged or does not hold a list of distinct seeds."""
    path = Path(run_dir) / rundir.SEEDS_FILE
    if not path.is_file():
        return None
    data = rundir.read_json(path)
    seeds = data.get("seeds") if isinstance(data, dict) else None
    if (not isinstance(seeds, list) or not seeds or len(set(map(str, seeds))) != len(seeds)
            or not all(isinstance(x, int) and not isinstance(x, bool) and 0 <= x <= MAX_SEED for x in seeds)):
        raise ConfigError(f'{path} does not hold a list of distinct seeds ({{"seeds": [0, 1, ...]}})')
    return seeds
