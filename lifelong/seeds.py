"""Several seeds of one configuration: one run directory per seed (`DIR/seed-N/`), then an
aggregate results.json in `DIR` with the mean matrices and the spread of every summary figure."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from lifelong import checkpoint, distributed, rundir
from lifelong import results as results_io
from lifelong.config import RunConfig, dump_yaml
from lifelong.experiment import resume, run
from lifelong.plots import save_matrix_heatmap


def _mean_std(values: list[float | None]) -> dict:
    present = [v for v in values if v is not None]
    if not present:
        return {"mean": None, "std": None, "values": values}
    return {"mean": float(np.mean(present)), "std": float(np.std(present, ddof=1)) if len(present) > 1 else 0.0,
            "values": values}


def aggregate_seeds(per_seed: list[dict], seeds: list[int]) -> dict:
    """results.json of a multi-seed run: matrices averaged over seeds, every figure recomputed from
    the mean matrices, plus `over_seeds`: mean, sample std and per-seed values of every summary figure."""
    first = per_seed[0]
    mean = lambda key: np.mean([r[key] for r in per_seed], axis=0).tolist()  # noqa: E731
    res = results_io.assemble(first["domains"], first["stages"], mean("loss_matrix"), mean("bpb_matrix"),
                              first["num_experts"], domain_info=first["domain_info"],
                              flops_per_token=first["flops_per_token"], params=first["params"],
                              config=first["config"])
    over: dict = {}
    for prefix, pick in (("", lambda r: r), ("bpb_", lambda r: r["bpb_summary"])):
        for key in ("final_average", "plasticity", "bwt", "fwt"):
            over[prefix + key] = _mean_std([pick(r)[key] for r in per_seed])
        for domain in first["forgetting"]:
            over[f"{prefix}forgetting/{domain}"] = _mean_std([pick(r)["forgetting"][domain] for r in per_seed])
    res.update(seeds=seeds, runs=[rundir.seed_name(s) for s in seeds], over_seeds=over)
    return res


def _finished(run_dir: Path) -> dict:
    """A finished run's results.json, with its run_info.json under "run_info" as `run` returns it."""
    info = run_dir / rundir.RUN_INFO_FILE
    return {**rundir.read_json(run_dir / rundir.RESULTS_FILE),
            "run_info": rundir.read_json(info) if info.is_file() else {}}


def run_seeds(cfg: RunConfig, seeds: list[int], out_dir: str | Path, progress: bool | None = None,
              echo=print, resuming: bool = False) -> dict:
    """One run per seed in `out_dir/seed-N/`, then the aggregate results.json in `out_dir`.

    When `resuming`, finished seeds are read back, interrupted ones resumed, missing ones started.
    """
    out_dir = Path(out_dir)
    main = distributed.is_main()
    if main:
        out_dir.mkdir(parents=True, exist_ok=True)
    if main and not resuming:
        (out_dir / rundir.CONFIG_FILE).write_text(dump_yaml(cfg))
        rundir.write_json_atomic(out_dir / rundir.SEEDS_FILE, {"seeds": seeds})
    per_seed = []
    for seed in seeds:
        seed_dir = rundir.seed_dir(out_dir, seed)
        echo(f"--- seed {seed} ({seed_dir})")
        if resuming and (seed_dir / rundir.RESULTS_FILE).is_file():
            per_seed.append(_finished(seed_dir))
        elif resuming and checkpoint.latest(seed_dir) is not None:
            per_seed.append(resume(seed_dir, progress=progress, echo=echo))
        else:
            per_seed.append(run(dataclasses.replace(cfg, seed=seed), seed_dir, progress=progress, echo=echo))
    res = aggregate_seeds(per_seed, seeds)
    info = {key: round(sum(r["run_info"].get(key, 0.0) for r in per_seed), 2)
            for key in ("wall_time_s", "eval_time_s")}
    if main:
        rundir.write_json_atomic(out_dir / rundir.RESULTS_FILE, res)
        save_matrix_heatmap(res, out_dir / rundir.HEATMAP_FILE)
        rundir.write_json_atomic(out_dir / rundir.RUN_INFO_FILE, info)
    distributed.barrier()
    return {**res, "run_info": info}


def read_seeds(run_dir: str | Path) -> list[int] | None:
    """The seeds of a multi-seed run directory, or None for a single run."""
    path = Path(run_dir) / rundir.SEEDS_FILE
    return [int(s) for s in rundir.read_json(path)["seeds"]] if path.is_file() else None
