"""Run under torchrun by tests/test_distributed.py: train a config on every rank, then check the
ranks' weights are identical (written by rank 0 as JSON). Not a test module itself."""

import hashlib
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from lifelong import distributed, experiment
from lifelong.presets import resolve


def weights_digest(model: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def main(out: str, *overrides: str) -> None:
    cfg = resolve("smoke", overrides=list(overrides))
    distributed.init_from_env(cfg.train.device)
    out_dir = Path(out)
    if distributed.is_main():
        out_dir.mkdir(parents=True, exist_ok=True)
    distributed.barrier()
    session = experiment.RunSession(cfg, out_dir, progress_bars=False, echo=lambda *_: None)
    result = session.execute()
    digests = [None] * distributed.world_size()
    dist.all_gather_object(digests, weights_digest(session.model))
    if distributed.is_main():
        (out_dir / "ranks.json").write_text(json.dumps({"digests": digests, "num_experts": result["num_experts"],
                                                       "growth_events": len(result["growth_events"])}))
    del session  # its DDP wrapper holds the process group: let shutdown() destroy it (see there)
    distributed.shutdown()
    left = [name for name in native_threads() if "gloo" in name]
    if left:  # they would meet interpreter finalization, where they can abort the process
        sys.exit(f"process-group threads outlived distributed.shutdown(): {left}")


def native_threads() -> list[str]:
    """Names of this process's native threads (Linux; empty elsewhere)."""
    tasks = Path("/proc/self/task")
    return [(task / "comm").read_text().strip() for task in tasks.iterdir()] if tasks.is_dir() else []


if __name__ == "__main__":
    main(*sys.argv[1:])
