"""Compute paths for PEER's two hot spots: product-key retrieval and expert mixing.

"reference" (plain torch, reference.py), "bag" (fused embedding-bag mixing, bag.py: the fast CPU
path, runs on any device), "triton" (fused kernels, triton_kernels.py, imported lazily) and "auto"
("triton" for float32 / bfloat16 / float16 CUDA tensors when triton imports and the kernels passed
their self-check on that device model, else "bag"). All compute the same function;
EXPERTS_KERNEL overrides "auto". Design, tie order and numerics: docs/kernels.md.
"""

from __future__ import annotations

import functools
import os
import warnings

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
        if x.is_cuda and table.dtype in _TRITON_DTYPES and triton_available() and triton_agrees(x.device):
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


_AGREES: dict[str, bool] = {}  # device -> the self-check's verdict (a device is one model)


def triton_agrees(device: torch.device) -> bool:
    """Whether the Triton kernels compute what the embedding-bag path computes on ``device``:
    checked once per device and device model on a small random problem (retrieval ids and scores,
    mixing output and every gradient). On a disagreement or an error, one warning line, and "auto"
    takes the embedding-bag path there ("triton" still forces the kernels)."""
    key = str(device)
    if key not in _AGREES:
        device = torch.device(device)
        model = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
        try:
            problem = _self_check(device)
        except Exception as err:  # a compile or launch failure is a disagreement too
            problem = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
        _AGREES[key] = problem is None
        if problem is not None:
            warnings.warn(f"experts: the Triton PEER kernels disagree with the embedding-bag path on {model} "
                          f"({problem}); kernel='auto' uses the embedding-bag path there", stacklevel=3)
    return _AGREES[key]


def _self_check(device: torch.device) -> str | None:
    """None when both paths agree on a small float32 problem, else what differs."""
    g = torch.Generator().manual_seed(0)
    T, H, d, n1, n2, k, D = 64, 2, 8, 16, 16, 4, 32
    q = torch.randn(T, H, 2 * d, generator=g).to(device)
    keys1, keys2 = (torch.randn(H, n, d, generator=g).to(device) for n in (n1, n2))
    offset = torch.zeros(H, n1, device=device)
    offset[:, -1] = float("-inf")  # a dormant row, as after growth
    (s_t, i_t), (s_r, i_r) = _triton().retrieve(q, keys1, keys2, offset, k), reference.retrieve(q, keys1, keys2, offset, k)
    if not torch.equal(i_t, i_r) or not torch.allclose(s_t, s_r, atol=1e-4, rtol=1e-4):
        return "retrieval differs"
    x = torch.randn(T, D, generator=g).to(device)
    w = torch.rand(T, H * k, generator=g).to(device)
    u, v = (torch.randn(n1 * n2, D, generator=g).to(device) / D ** 0.5 for _ in range(2))
    ids = i_r.reshape(T, -1)
    frozen = torch.zeros(n1 * n2, dtype=torch.bool, device=device)
    frozen[ids[0, 0]] = True
    outs = []
    for path in (_triton().mix, bag.mix):
        leaves = [t.clone().requires_grad_() for t in (x, w, u, v)]
        y = path(leaves[0], leaves[1], ids, leaves[2], leaves[3], "gelu", frozen)
        y.pow(2).sum().backward()
        outs.append([y.detach()] + [t.grad for t in leaves])
    for name, a, b in zip(("output", "dx", "dw", "du", "dv"), *outs):
        if a is None or b is None or not torch.allclose(a, b, atol=1e-4, rtol=1e-3):
            return f"mixing {name} differs"
    return None


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


__all__ = ["KERNELS", "ENV_VAR", "resolve", "retrieve", "mix", "check_kernel", "triton_available", "triton_agrees",
           "reference", "bag"]
