"""What every benchmark records about the machine it ran on, and how it writes its JSON."""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path


def machine(device: str | None = None) -> dict:
    """CPU model, core count, Python/torch versions, torch threads, the 1-minute load average (the
    cores here are shared, so it says how much to trust a timing) and the GPU when `device` is CUDA."""
    import torch

    cpu = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    info = {"cpus": os.cpu_count(), "cpu": cpu, "python": platform.python_version(), "torch": torch.__version__,
            "platform": platform.platform(), "torch_threads": torch.get_num_threads(),
            "load_average_1min": load_average()}
    if device is not None:
        info["device"] = str(device)
        if torch.device(device).type == "cuda":
            info["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return info


def load_average() -> float | None:
    return round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None


def write_json(path: str | None, **sections) -> None:
    """Write the given sections (machine, args, results, ...) as one JSON file, if a path was given."""
    if path:
        Path(path).write_text(json.dumps(sections, indent=1))
        print(f"# wrote {path}")


def status_kib(key: str) -> int:
    """A memory figure of this process from /proc/self/status, in KiB (Linux: VmRSS, VmHWM, ...);
    OSError where there is no such file."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(key + ":"))
