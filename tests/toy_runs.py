"""Small hand-made runs shared by the tests of lifelong.analysis and lifelong.plots: a two-domain
loss matrix whose figures are worked out by hand, and a PEER-like layer that grows once."""

from __future__ import annotations

import json
import math

import numpy as np

from lifelong.runs import RunRecord

LN2 = math.log(2)
L = [[5.0, 5.0], [2.0, 4.0], [3.0, 1.0]]  # 2 domains: a forgets 1 nat, FWT to b is 1 nat


def summary(scale: float = 1.0) -> dict:
    """`transfer.summarize` of L, worked out by hand (forgetting_a = 3 - 2, BWT = 2 - 3, FWT = 5 - 4)."""
    return {"forgetting": {"a": 1.0 * scale}, "forgetting_first_last": {"a": 1.0 * scale},
            "max_forgetting": 1.0 * scale, "bwt": -1.0 * scale, "fwt_gem": 1.0 * scale,
            "final_average": 2.0 * scale, "plasticity": 1.5 * scale}


def results(**extra) -> dict:
    res = {"domains": ["a", "b"], "stages": ["init", "after:a", "after:b"], "loss_matrix": L,
           "bpb_matrix": [[v / LN2 for v in row] for row in L], **summary(), "bpb_summary": summary(1 / LN2),
           "num_experts": [4, 4, 6], "growth_events": [], "config": {}}
    res.update(extra)
    return res


def expert_run(**extra) -> RunRecord:
    """A PEER-like layer "L": 2 x 2 grid (n2 = 2), one head, top-2; growth adds a row (ids 4, 5)
    while learning b, so generation 1 first appears at stage 2."""
    stats = {"num_experts": [4, 4, 6],
             "usage": [[1.0, 1.0], [0.5, 0.75], [0.5, 0.5]], "unevenness": [[0.0, 0.0], [0.7, 0.3], [0.6, 0.9]],
             "usage_all": [1.0, 0.75, 0.67], "unevenness_all": [0.0, 0.2, 0.4],
             "overlap": [[[1, 1], [1, 1]], [[1, 0.5], [0.5, 1]], [[1, 0.25], [0.25, 1]]],
             "top_experts": [[[0], [1]]] * 3}
    fields = {"experts": {"L": stats}, "domain_info": [{"train_blocks": 32}, {"train_blocks": 30}],
              "growth_events": [{"step": 8, "experience": 1, "domain": "b", "layer": "L", "reason": "boundary",
                                 "init": "kmeans", "added": 2, "num_experts": 6, "output_change": 0.0}],
              "config": {"train": {"batch_size": 4, "grad_accum": 1, "epochs": 1}, "strategy": {"name": "naive"},
                         "model": {"ffn": "peer"}}}
    res = results(**{**fields, **extra})
    routes = [
        {"a": [[[0, 1]], [[2, 3]]], "b": [[[0, 1]], [[0, 1]]]},
        {"a": [[[1, 0]], [[2, 1]]], "b": [[[0, 1]], [[0, 1]]]},  # a: token 1 swapped expert 3 for 1
        {"a": [[[4, 0]], [[2, 5]]], "b": [[[0, 1]], [[0, 1]]]},  # a: half the ids changed, both to new experts
    ]
    usage = [{"a": [[1, 1, 1, 1]], "b": [[1, 1, 1, 1]]}, {"a": [[1, 1, 0, 0]], "b": [[0, 1, 1, 2]]},
             {"a": [[1, 1, 0, 0, 2, 0]], "b": [[0, 0, 0, 1, 0, 3]]}]
    generation = [[0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0, 1, 1]]
    keys1 = [np.arange(4, dtype=np.float32).reshape(1, 2, 2), np.arange(4, dtype=np.float32).reshape(1, 2, 2),
             np.array([[[0, 0], [1, 0], [5, 5]]], np.float32)]
    snapshots = []
    for s in range(3):
        snap = {"generation/L": np.array(generation[s]), "keys1/L": keys1[s],
                "keys2/L": np.zeros((1, 2, 2), np.float32)}
        for d in "ab":
            snap[f"routes/L/{d}"] = np.array(routes[s][d], np.int32)
            snap[f"usage/L/{d}"] = np.array(usage[s][d], np.float32)
        snapshots.append(snap)
    curves = {f"Curve/test_stream/{d}": ([4, 8, 12], [4.0, 3.0, 2.5]) for d in "ab"}
    return RunRecord.from_data(res, name="toy", metrics=curves, snapshots=snapshots)


def rewrite_results(path, change):
    """Replace the run's results.json in folder `path` by `change(results)`; return `path`."""
    results = json.loads((path / "results.json").read_text())
    (path / "results.json").write_text(json.dumps(change(results)))
    return path
