"""Compute paths for PEER's two hot spots: product-key retrieval and expert mixing.

"reference" (plain torch, reference.py), "bag" (fused embedding-bag mixing, bag.py: the fast CPU
path, runs on any device), "triton" (fused kernels, triton_kernels.py, imported lazily) and "auto"
("triton" for float32 / bfloat16 / float16 CUDA tensors when triton imports, else "bag"). All
compute the same function; EXPERTS_KERNEL overrides "auto". Design, tie order and numerics:
docs/kernels.md.
"""

from __future__ import annotations

import functools
import os

import torch

from ..checks import check_choice
from . import bag, reference

KERNELS = ("auto", "reference", "bag", "triton")
ENV_VAR = "EXPERTS_KERNEL"
_TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@functools.cache
def triton_available() -> bool:
    """Whether triton imports (checked once; experts never needs it)."""
    try:
        import triton  # noqa: F401
    except Exception:  # ImportError, or a broken install without a driver
        return False
    return True


def _triton():
    from . import triton_kernels
    return triton_kernels


def check_kernel(kernel) -> None:
    """Raise ValueError unless ``kernel`` is one of KERNELS."""
    check_choice("kernel", kernel, KERNELS)


def resolve(kernel: str, x: torch.Tensor, table: torch.Tensor) -> str:
    """The concrete path ("reference" | "bag" | "triton") for ``kernel`` on these tensors."""
    check_kernel(kernel)
    if kernel == "auto":
        env = os.environ.get(ENV_VAR, "").strip()
        if env:
            check_choice(ENV_VAR, env, KERNELS)
            kernel = env
    if kernel == "auto":
        if x.is_cuda and table.dtype in _TRITON_DTYPES and triton_available():
            return "triton"
        return "bag"
    if kernel == "triton":
        if not triton_available():
            raise RuntimeError("kernel='triton' needs the triton package; use kernel='auto' to fall back")
        if table.dtype not in _TRITON_DTYPES:
            raise ValueError(f"kernel='triton' supports float32, bfloat16 and float16 tables, got {table.dtype}")
        if not x.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
            raise ValueError("kernel='triton' needs CUDA tensors (or TRITON_INTERPRET=1 for the interpreter)")
    return kernel


def retrieve(kernel: str, q_THD, keys1_Hnd, keys2_Hnd, offset1_Hn, k: int):
    """(scores [T, H, k], flat ids [T, H, k]) of each head's exact top-k product keys."""
    if kernel == "triton":
        return _triton().retrieve(q_THD, keys1_Hnd, keys2_Hnd, offset1_Hn, k)
    return reference.retrieve(q_THD, keys1_Hnd, keys2_Hnd, offset1_Hn, k)


def mix(kernel: str, x_TD, w_TM, ids_TM, u_ND, v_ND, activation: str, frozen_N=None):
    """y [T, D] = sum_m w act(u_e . x) v_e over the slots' experts; frozen rows get zero gradient."""
    if kernel == "triton":
        return _triton().mix(x_TD, w_TM, ids_TM, u_ND, v_ND, activation, frozen_N)
    if kernel == "bag":
        return bag.mix(x_TD, w_TM, ids_TM, u_ND, v_ND, activation, frozen_N)
    return reference.mix(x_TD, w_TM, ids_TM, u_ND, v_ND, activation, frozen_N)


__all__ = ["KERNELS", "ENV_VAR", "resolve", "retrieve", "mix", "check_kernel", "triton_available",
           "reference", "bag"]
