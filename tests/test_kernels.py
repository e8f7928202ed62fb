"""PEER compute paths (experts/kernels, docs/kernels.md) against the plain torch reference: the fused
embedding-bag CPU path, and the Triton kernels run on the CPU by Triton's interpreter.

The interpreter is chosen when a @triton.jit function is decorated, and triton's own standard
library (tl.zeros, tl.max, ...) is decorated when triton is first imported: TRITON_INTERPRET=1
must be set before that. Importing torchvision or creating a torch optimizer imports
torch._dynamo, which imports triton, so in the full suite triton is usually loaded (compiled mode)
before this module is even collected. Hence: this module sets TRITON_INTERPRET=1 at import when
triton is not loaded yet (and restores it afterwards), the ``tk`` fixture checks that triton really
runs interpreted, and otherwise the in-process Triton tests skip and
test_triton_tests_in_a_subprocess runs them in a fresh process. Nothing here times anything.
"""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import experts
from experts import PEER, kernels
from experts.kernels import bag, reference
from experts.product_keys import product_scores
from helpers import randomize_peer_

HAS_TRITON = importlib.util.find_spec("triton") is not None
ACTS = ("gelu", "relu")
_INTERPRET_BEFORE = os.environ.get("TRITON_INTERPRET")
if HAS_TRITON and "triton" not in sys.modules:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything here (an optimizer) imports triton


@pytest.fixture(scope="module", autouse=True)
def _restore_interpret_env():
    yield
    if _INTERPRET_BEFORE is None:
        os.environ.pop("TRITON_INTERPRET", None)
    else:
        os.environ["TRITON_INTERPRET"] = _INTERPRET_BEFORE


def _interpreted() -> bool:
    """Whether the imported triton decorated its standard library for the interpreter."""
    triton = sys.modules.get("triton")
    return triton is not None and type(triton.language.zeros).__name__ == "InterpretedFunction"


@pytest.fixture(scope="module")
def tk():
    """experts.kernels.triton_kernels, running in Triton's interpreter (TRITON_INTERPRET=1)."""
    pytest.importorskip("triton")
    if not _interpreted() or os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("triton was imported before TRITON_INTERPRET=1; test_triton_tests_in_a_subprocess runs these")
    from experts.kernels import triton_kernels
    return triton_kernels


# ---- helpers ------------------------------------------------------------------------------------
def mixing_inputs(T, M, D, N, dtype=torch.float64, seed=0, frozen=()):
    """x, w, ids (with duplicates inside tokens and one hot expert), U, V, dy, frozen mask."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, D, generator=g, dtype=dtype)
    w = torch.rand(T, M, generator=g, dtype=dtype)
    ids = torch.randint(N, (T, M), generator=g)
    if T and M > 1:
        ids[:, 0] = ids[:, 1]  # a duplicate id in every token: its two slots must add up
        ids[:, -1] = 0          # expert 0 is used by every token: a long run of slots
    u = torch.randn(N, D, generator=g, dtype=dtype)
    v = torch.randn(N, D, generator=g, dtype=dtype)
    dy = torch.randn(T, D, generator=g, dtype=dtype)
    frozen_N = torch.zeros(N, dtype=torch.bool)
    frozen_N[list(frozen)] = True
    return x, w, ids, u, v, dy, (frozen_N if frozen else None)


def mix_and_grads(fn, x, w, ids, u, v, dy, activation, frozen_N):
    """(y, dx, dw, du, dv) of y = fn(...) with upstream gradient dy, all in float64 for comparison."""
    leaves = [t.detach().clone().requires_grad_(True) for t in (x, w, u, v)]
    y = fn(leaves[0], leaves[1], ids, leaves[2], leaves[3], activation, frozen_N)
    grads = torch.autograd.grad(y, leaves, dy.to(y.dtype))
    return [t.double() for t in (y.detach(), *grads)]


def assert_close_all(got, want, atol, rtol=0.0):
    for name, a, b in zip(("y", "dx", "dw", "du", "dv"), got, want):
        assert a.shape == b.shape, name
        assert torch.allclose(a, b, atol=atol, rtol=rtol), f"{name}: max abs diff {(a - b).abs().max():.3g}"


def peer(grid=(6, 5), heads=2, top_k=3, key_dim=4, dim=8, seed=0, **kw):
    torch.manual_seed(seed)
    return randomize_peer_(PEER(dim=dim, num_experts=grid, heads=heads, top_k=top_k, key_dim=key_dim, **kw))


def peer_outputs(layer, kernel, x, dy):
    """y and the gradient of every parameter and x of layer(x) on ``kernel``, float64, plus routes."""
    layer.kernel = kernel
    x = x.detach().clone().requires_grad_(True)
    layer.zero_grad(set_to_none=True)
    y = layer(x)
    y.backward(dy.to(y.dtype))
    with torch.no_grad():
        _, ids = layer.route(x)
    grads = {name: p.grad.double() for name, p in layer.named_parameters()}
    grads["x"] = x.grad.double()
    return y.detach().double(), grads, ids


def assert_same_peer(a, b, atol):
    (ya, ga, ia), (yb, gb, ib) = a, b
    assert torch.equal(ia, ib)
    assert torch.allclose(ya, yb, atol=atol, rtol=0), (ya - yb).abs().max()
    assert ga.keys() == gb.keys()
    for name in ga:
        assert torch.allclose(ga[name], gb[name], atol=atol, rtol=0), (name, (ga[name] - gb[name]).abs().max())


def grown_frozen_peer(dim=8, key_dim=4, grid=(6, 5), top_k=3, dtype=torch.float32):
    """A PEER that grew twice: rows of the second growth still dormant (-inf offset), rows of the
    first one warming in with a negative offset small enough that some of them are retrieved;
    some old experts frozen."""
    layer = peer(grid=grid, key_dim=key_dim, dim=dim, top_k=top_k).to(dtype)
    old_n = layer.num_experts
    layer.grow(2 * grid[1], warmup_steps=4)
    layer.advance_warmup(1)
    with torch.no_grad():  # the margin keeps new rows out for a while: make them competitive now
        layer.codebooks.offset1[:, grid[0]:] = -0.1
    mid_n = layer.num_experts
    layer.grow(grid[1], warmup_steps=4)
    assert torch.isinf(layer.codebooks.offset1[:, -1]).all() and layer.codebooks.offset1[:, grid[0]].lt(0).all()
    experts.freeze(layer, [0, 1, 2, 7, old_n + 1], optimizer=torch.optim.SGD(layer.parameters(), lr=0.0))
    return layer, old_n, mid_n


# ---- reference ----------------------------------------------------------------------------------
def test_reference_retrieval_is_product_keys_topk():
    layer = peer(grid=(7, 6), heads=3, key_dim=6)
    q = torch.randn(11, 3, 6)
    cb = layer.codebooks
    s_ref, ids_ref = reference.retrieve(q, cb.keys1, cb.keys2, cb.offset1, 3)
    s_pk, ids_pk = cb.topk(q, 3)
    assert torch.equal(ids_ref, ids_pk) and torch.equal(s_ref, s_pk)


@pytest.mark.parametrize("activation", ACTS)
def test_reference_mix_matches_explicit_loop(activation):
    x, w, ids, u, v, _, _ = mixing_inputs(4, 5, 3, 6)
    y = reference.mix(x, w, ids, u, v, activation)
    act = torch.nn.functional.gelu if activation == "gelu" else torch.relu
    want = torch.stack([sum(w[t, m] * act(u[ids[t, m]] @ x[t]) * v[ids[t, m]] for m in range(5)) for t in range(4)])
    assert torch.allclose(y, want, atol=1e-12, rtol=0)


# ---- bag (CPU fast path) ------------------------------------------------------------------------
@pytest.mark.parametrize("activation", ACTS)
@pytest.mark.parametrize("T,M,D,N", [(1, 1, 1, 1), (5, 6, 7, 9), (33, 12, 16, 5), (40, 128, 24, 300), (0, 4, 3, 6)])
def test_bag_matches_reference_float64(T, M, D, N, activation):
    inputs = mixing_inputs(T, M, D, N, frozen=[0, N - 1] if N > 2 else ())
    got = mix_and_grads(bag.mix, *inputs[:6], activation, inputs[6])
    want = mix_and_grads(reference.mix, *inputs[:6], activation, inputs[6])
    assert_close_all(got, want, atol=1e-10)
    if inputs[6] is not None:
        assert (got[3][inputs[6]] == 0).all() and (got[4][inputs[6]] == 0).all()


@pytest.mark.parametrize("activation", ACTS)
def test_bag_gradcheck(activation):
    x, w, ids, u, v, _, _ = mixing_inputs(4, 5, 3, 6)  # no frozen rows: their zero gradient is on purpose
    leaves = tuple(t.requires_grad_(True) for t in (x, w, u, v))

    def f(x, w, u, v):
        return bag.mix(x, w, ids, u, v, activation)

    assert torch.autograd.gradcheck(f, leaves, eps=1e-6, atol=1e-8)


@pytest.mark.parametrize("dtype,atol", [(torch.float32, 1e-4), (torch.bfloat16, 0.02)])
def test_bag_float32_and_bfloat16_tables(dtype, atol):
    x, w, ids, u, v, dy, frozen_N = mixing_inputs(16, 24, 32, 50, dtype=torch.float32, frozen=[3])
    got = mix_and_grads(bag.mix, x, w, ids, u.to(dtype), v.to(dtype), dy, "gelu", frozen_N)
    want = mix_and_grads(reference.mix, *(t.double() for t in (x, w)), ids,
                         *(t.to(dtype).double() for t in (u, v)), dy.double(), "gelu", frozen_N)
    assert got[0].shape == want[0].shape
    # bf16 tables: fp32 arithmetic, gradients of the tables rounded to bf16 once
    assert_close_all(got, want, atol=atol, rtol=0.01)


def test_peer_bag_matches_reference_with_growth_and_frozen_experts():
    layer, old_n, mid_n = grown_frozen_peer(dtype=torch.float64)
    x, dy = torch.randn(40, layer.dim, dtype=torch.float64), torch.randn(40, layer.dim, dtype=torch.float64)
    got, want = peer_outputs(layer, "bag", x, dy), peer_outputs(layer, "reference", x, dy)
    assert_same_peer(got, want, atol=1e-12)
    ids = got[2]
    assert ((ids >= old_n) & (ids < mid_n)).any() and not (ids >= mid_n).any()
    frozen = layer.frozen
    assert frozen.any() and (got[1]["expert_u"][frozen] == 0).all() and (got[1]["expert_v"][frozen] == 0).all()


def test_peer_bag_under_cpu_autocast():
    layer = peer(grid=(8, 8), heads=2, top_k=4, key_dim=8, dim=16).train()
    x = torch.randn(10, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y_bag = layer(x)
        layer.kernel = "reference"
        y_ref = layer(x)
    assert torch.allclose(y_bag.float(), y_ref.float(), atol=0.05)
    layer.kernel = "auto"
    y_bag.float().sum().backward()
    assert layer.expert_u.grad is not None and torch.isfinite(layer.expert_u.grad).all()


# ---- dispatch -----------------------------------------------------------------------------------
def test_dispatch_and_flag(monkeypatch):
    monkeypatch.delenv(kernels.ENV_VAR, raising=False)
    layer = peer()
    x = torch.randn(3, layer.dim)
    assert layer.kernel == "auto" and layer._path(x) == "bag"  # CPU: the embedding-bag path
    assert PEER(8, 16, heads=1, top_k=2, key_dim=4, kernel="reference")._path(x) == "reference"
    monkeypatch.setenv(kernels.ENV_VAR, "reference")
    assert layer._path(x) == "reference"
    layer.kernel = "bag"  # an explicit choice beats the environment
    assert layer._path(x) == "bag"
    monkeypatch.setenv(kernels.ENV_VAR, "fast")
    layer.kernel = "auto"
    with pytest.raises(ValueError, match="EXPERTS_KERNEL='fast' is not valid"):
        layer(x)
    with pytest.raises(ValueError, match="kernel='cuda' is not valid"):
        PEER(8, 16, heads=1, top_k=2, key_dim=4, kernel="cuda")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    layer.kernel = "triton"
    # (triton_available is faked: importing triton here, before the interpreter is chosen, would
    # tie this process to compiled kernels; see the tk fixture)
    monkeypatch.setattr(kernels, "triton_available", lambda: False)
    with pytest.raises(RuntimeError, match="needs the triton package"):
        layer(x)
    monkeypatch.setattr(kernels, "triton_available", lambda: True)
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        layer(x)
    with pytest.raises(ValueError, match="float32, bfloat16 and float16"):
        layer.double()(x.double())
    assert "kernel='triton'" in repr(layer)


def test_import_and_forward_without_triton():
    code = ("import sys; sys.modules['triton'] = None\n"
            "import torch, experts\n"
            "from experts import kernels\n"
            "layer = experts.PEER(8, 16, heads=2, top_k=2, key_dim=4)\n"
            "x = torch.randn(3, 8)\n"
            "layer(x).sum().backward()\n"
            "assert not kernels.triton_available() and layer._path(x) == 'bag'\n"
            "assert 'experts.kernels.triton_kernels' not in sys.modules\n")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop(kernels.ENV_VAR, None)
    out = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[1], env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr


# ---- Triton kernels in the interpreter ----------------------------------------------------------
def sorted_definition(s1, s2, k):
    """The first k of all n1*n2 product keys sorted by (score desc, flat id asc)."""
    vals, order = product_scores(s1, s2).sort(dim=-1, descending=True, stable=True)
    return vals[..., :k], order[..., :k]


@pytest.mark.parametrize("d,n1,n2,k", [(2, 6, 7, 3), (16, 150, 33, 5), (3, 4, 4, 4), (16, 16, 16, 1)])
def test_triton_retrieval_matches_reference(tk, d, n1, n2, k):
    g = torch.Generator().manual_seed(d + n1)
    T, H = 19, 2
    q = torch.randn(T, H, 2 * d, generator=g)
    keys1, keys2 = torch.randn(H, n1, d, generator=g), torch.randn(H, n2, d, generator=g)
    offset = torch.randn(H, n1, generator=g).clamp(max=0)  # negative offsets (warming rows) ...
    offset[:, -1] = float("-inf")                          # ... and a dormant row
    if n1 > k:
        offset[:, 0] = float("-inf")
    got = tk.retrieve(q, keys1, keys2, offset, k)
    want = reference.retrieve(q, keys1, keys2, offset, k)
    assert torch.equal(got[1], want[1])
    assert torch.allclose(got[0], want[0], atol=1e-5, rtol=0)
    assert got[0].dtype == q.dtype and got[1].dtype == torch.int64


def test_triton_retrieval_ties_follow_the_documented_order(tk):
    """Integer-valued queries and keys make many exact ties (and exact sums). The kernels return the
    first k of (score desc, flat id asc); torch.topk (the reference) returns the same scores."""
    g = torch.Generator().manual_seed(0)
    T, H, d, n1, n2, k = 12, 2, 2, 9, 8, 5
    q = torch.randint(-1, 2, (T, H, 2 * d), generator=g).float()
    keys1 = torch.randint(-1, 2, (H, n1, d), generator=g).float()
    keys2 = torch.randint(-1, 2, (H, n2, d), generator=g).float()
    offset = torch.zeros(H, n1)
    offset[:, -3:] = float("-inf")  # dormant rows tie with each other at -inf
    s1, s2 = reference.sub_key_scores(q, keys1, keys2, offset)
    want_s, want_ids = sorted_definition(s1, s2, k)
    got_s, got_ids = tk.retrieve(q, keys1, keys2, offset, k)
    assert torch.equal(got_s, want_s) and torch.equal(got_ids, want_ids)
    ref_s, ref_ids = reference.retrieve(q, keys1, keys2, offset, k)
    assert torch.equal(ref_s, got_s)  # same multiset of scores; ids may differ only among ties
    assert torch.equal(product_scores(s1, s2).gather(-1, ref_ids), ref_s)
    # all-equal half scores: the candidate stage alone decides, by flat id
    v1 = torch.zeros(3, 1, 4)
    i1 = torch.tensor([3, 1, 2, 0]).expand(3, 1, 4).int().contiguous()
    scores, ids = tk.candidate_topk(v1, i1, v1.clone(), i1.clone(), 4, 10)
    assert ids[0, 0].tolist() == [0, 1, 2, 3] and (scores == 0).all()  # (i, j) = (0, 0), (0, 1), ...
    # -0.0 and +0.0 tie (ordered by id), like torch; -inf ranks last
    v1 = torch.tensor([[[0.0, -0.0, float("-inf"), -1.0]]])
    scores, ids = tk.candidate_topk(v1, i1[:1], torch.zeros(1, 1, 4), i1[:1].clone(), 4, 10)
    assert ids[0, 0].tolist() == [10, 11, 12, 13] and scores[0, 0].tolist() == [0.0] * 4  # row i = 1 (+0.0)


def test_triton_retrieval_backward(tk):
    g = torch.Generator().manual_seed(1)
    T, H, d, n1, n2, k = 9, 2, 16, 20, 18, 4
    q = torch.randn(T, H, 2 * d, generator=g)
    keys1, keys2 = torch.randn(H, n1, d, generator=g), torch.randn(H, n2, d, generator=g)
    offset = -torch.rand(H, n1, generator=g)
    up = torch.randn(T, H, k, generator=g)
    grads = []
    for fn in (tk.retrieve, reference.retrieve):
        leaves = [t.clone().requires_grad_(True) for t in (q, keys1, keys2)]
        s, _ = fn(leaves[0], leaves[1], leaves[2], offset, k)
        grads.append(torch.autograd.grad((s * up).sum(), leaves))
    for a, b in zip(*grads):
        assert torch.allclose(a, b, atol=1e-5, rtol=0)


def test_triton_retrieval_bfloat16(tk):
    g = torch.Generator().manual_seed(2)
    T, H, d, n1, n2, k = 17, 2, 16, 40, 33, 4
    q = torch.randn(T, H, 2 * d, generator=g).bfloat16()
    keys1, keys2 = torch.randn(H, n1, d, generator=g), torch.randn(H, n2, d, generator=g)
    offset = -torch.rand(H, n1, generator=g)
    s, ids = tk.retrieve(q, keys1, keys2, offset, k)
    # fp32 accumulation of bf16 products = the fp32 reference on bf16-rounded inputs
    s_ref, ids_ref = reference.retrieve(q.float(), keys1.bfloat16().float(), keys2.bfloat16().float(), offset, k)
    assert s.dtype == torch.bfloat16 and torch.equal(ids, ids_ref)
    assert torch.allclose(s.float(), s_ref, atol=0.05, rtol=0.01)


@pytest.mark.parametrize("activation", ACTS)
@pytest.mark.parametrize("T,M,D,N", [(5, 6, 7, 9), (12, 20, 130, 5), (1, 1, 1, 1)])
def test_triton_mix_matches_reference(tk, T, M, D, N, activation):
    inputs = mixing_inputs(T, M, D, N, dtype=torch.float32, frozen=[1] if N > 1 else ())
    got = mix_and_grads(tk.mix, *inputs[:6], activation, inputs[6])
    want = mix_and_grads(reference.mix, *(t.double() for t in inputs[:2]), inputs[2],
                         *(t.double() for t in inputs[3:6]), activation, inputs[6])
    assert_close_all(got, want, atol=2e-4, rtol=1e-5)
    if inputs[6] is not None:
        assert (got[3][inputs[6]] == 0).all() and (got[4][inputs[6]] == 0).all()


def test_triton_mix_bfloat16_tables(tk):
    x, w, ids, u, v, dy, frozen_N = mixing_inputs(12, 10, 20, 7, dtype=torch.float32, frozen=[2])
    xb, ub, vb, dyb = (t.bfloat16() for t in (x, u, v, dy))
    got = mix_and_grads(tk.mix, xb, w, ids, ub, vb, dyb, "gelu", frozen_N)
    want = mix_and_grads(reference.mix, *(t.double() for t in (xb, w)), ids, *(t.double() for t in (ub, vb, dyb)),
                         "gelu", frozen_N)
    assert got[0].shape == (12, 20)
    assert_close_all(got, want, atol=0.05, rtol=0.01)  # outputs and grads rounded to bf16 once


@pytest.mark.parametrize("key_dim,grid,dim", [(4, (6, 5), 8), (32, (20, 17), 24)])
def test_peer_triton_matches_reference_with_growth_and_frozen_experts(tk, key_dim, grid, dim):
    layer, old_n, mid_n = grown_frozen_peer(dim=dim, key_dim=key_dim, grid=grid)
    layer.codebooks.keys1.data[:, 1] = layer.codebooks.keys1.data[:, 2]  # an exact tie between two rows
    x, dy = torch.randn(30, dim), torch.randn(30, dim)
    got, want = peer_outputs(layer, "triton", x, dy), peer_outputs(layer, "reference", x, dy)
    assert_same_peer(got, want, atol=2e-5)
    ids = got[2]
    assert ((ids >= old_n) & (ids < mid_n)).any() and not (ids >= mid_n).any()
    frozen = layer.frozen
    assert (got[1]["expert_u"][frozen] == 0).all() and (got[1]["expert_v"][frozen] == 0).all()


# What the interpreter cannot see (a GPU-only type error, a non-constexpr global, a kernel that does
# not fit): compile every kernel for sm_90 with the launchers' own parameters. triton.compile runs
# the whole pipeline down to ptxas (bundled with triton) and needs no GPU; a fresh process, since
# kernels decorated for the interpreter cannot be compiled.
AOT_SCRIPT = """
import sys
import torch, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from experts.kernels import triton_kernels as tk

def build(kernel, signature, meta):
    meta = dict(meta)
    warps = meta.pop("num_warps")
    signature = dict(signature, **{name: "constexpr" for name in meta})
    return triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=meta),
                          target=GPUTarget("cuda", 90, 32), options={"num_warps": warps})

d, n, k, M, D = 128, 1024, 16, 128, 512  # the GPU target: key_dim 256, 1024^2 experts, top-16, dim 512
for name, dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
    t = "*" + name
    for has_offset in ((True, False) if name == "bf16" else (True,)):
        build(tk._subkey_topk_kernel, dict(q_ptr=t, keys_ptr=t, off_ptr="*fp32", val_ptr="*fp32", idx_ptr="*i32",
              T="i32", n="i32", d="i32", stride_qt="i32", stride_qh="i32"), tk.subkey_meta(d, n, k, dtype, has_offset))
    build(tk._mix_fwd_kernel, dict(x_ptr=t, w_ptr="*fp32", ids_ptr="*i64", u_ptr=t, v_ptr=t, h_ptr="*fp32", y_ptr=t,
          M="i32", D="i32"), tk.mix_meta(M, D, "gelu"))
    build(tk._mix_bwd_token_kernel, dict(dy_ptr=t, w_ptr="*fp32", ids_ptr="*i64", u_ptr=t, v_ptr=t, h_ptr="*fp32",
          dx_ptr=t, dw_ptr="*fp32", dh_ptr="*fp32", a_ptr="*fp32", M="i32", D="i32"),
          dict(tk.mix_meta(M, D, "relu"), NEED_X=True))
    build(tk._expert_grad_kernel, dict(sorted_ptr="*i64", order_ptr="*i64", end_ptr="*i64", frozen_ptr="*u8", x_ptr=t,
          dy_ptr=t, dh_ptr="*fp32", a_ptr="*fp32", du_ptr=t, dv_ptr=t, M="i32", D="i32"),
          tk.expert_grad_meta(D, True, True, True))
build(tk._candidate_topk_kernel, dict(v1_ptr="*fp32", i1_ptr="*i32", v2_ptr="*fp32", i2_ptr="*i32", score_ptr="*fp32",
      id_ptr="*i64", R="i32", n2="i32"), tk.candidate_meta(k))
print("compiled")
"""


def test_triton_kernels_compile_for_sm90_without_a_gpu():
    if not HAS_TRITON:
        pytest.skip("triton is not installed")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("TRITON_INTERPRET", None)
    out = subprocess.run([sys.executable, "-c", AOT_SCRIPT], cwd=Path(__file__).resolve().parents[1], env=env,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0 and "compiled" in out.stdout, out.stderr[-4000:]


# The same checks on a real GPU (compiled kernels) and, in CI, on the CPU through the interpreter:
# a fresh process each time (this module may have set TRITON_INTERPRET=1 for itself). Retrieval is
# checked for exactness against float64 scores of the same stored inputs, which survives ties and
# near-ties that fp32/bf16 summation order may resolve differently: the returned ids must be
# distinct, their true scores must equal the returned ones and the k best true values. Mixing is
# compared with a float64 reference of the same stored values, frozen rows included.
DEVICE_SCRIPT = """
import sys
import torch
from experts.kernels import reference, triton_kernels as tk

dev = sys.argv[1]
T, D, n, H, K, kd = map(int, sys.argv[2:8])
d, M, N = kd // 2, H * K, n * n
g = torch.Generator(device=dev).manual_seed(0)

def randn(*shape, scale=1.0):
    return torch.randn(*shape, generator=g, device=dev) * scale

def rel(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30)).item()

for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 1e-2)):
    q, keys1, keys2 = randn(T, H, kd).to(dtype), randn(H, n, d).to(dtype), randn(H, n, d).to(dtype)
    offset = randn(H, n, scale=0.3)
    offset[:, : n // 4] = float("-inf")  # dormant rows after growth: never retrieved
    scores, ids = tk.retrieve(q, keys1, keys2, offset, K)
    s1, s2 = reference.sub_key_scores(q.double(), keys1.double(), keys2.double(), offset.double())
    true = s1.gather(-1, ids // n) + s2.gather(-1, ids % n)
    best, _ = reference.retrieve(q.double(), keys1.double(), keys2.double(), offset.double(), K)
    scale = best.abs().max().item()
    assert ((ids // n) >= n // 4).all(), "a dormant row was retrieved"
    assert (ids.sort(-1).values.diff(dim=-1) > 0).all(), "an expert retrieved twice by one head"
    assert (true - scores.double()).abs().max().item() <= 10 * tol * scale, ("scores of the ids", dtype)
    assert (scores.double() - best).abs().max().item() <= 10 * tol * scale, ("not the top-k", dtype)

    ids_TM = ids.reshape(T, M)
    ids_TM[:, 0] = ids_TM[:, 1]  # a duplicate slot in every token
    x, u, v, dy = randn(T, D).to(dtype), randn(N, D, scale=0.1).to(dtype), randn(N, D, scale=0.1).to(dtype), randn(T, D)
    w = torch.rand(T, M, generator=g, device=dev)
    frozen = torch.zeros(N, dtype=torch.bool, device=dev)
    frozen[ids_TM[: T // 2, 2]] = True  # some retrieved experts are frozen
    for activation in ("gelu", "relu"):
        outs = []
        for fn, cast in ((tk.mix, lambda t: t), (reference.mix, lambda t: t.double())):
            leaves = [cast(t).detach().requires_grad_(True) for t in (x, w, u, v)]
            y = fn(leaves[0], leaves[1], ids_TM, leaves[2], leaves[3], activation, frozen)
            outs.append([y.detach(), *torch.autograd.grad(y, leaves, cast(dy).to(y.dtype))])
        for name, a, b in zip(("y", "dx", "dw", "du", "dv"), *outs):
            assert a.dtype == (dtype if name in ("y", "dx", "du", "dv") else torch.float32), (name, a.dtype)
            assert rel(a, b) <= tol, (name, dtype, activation, rel(a, b))
        assert (outs[0][3][frozen] == 0).all() and (outs[0][4][frozen] == 0).all(), "a frozen row got gradient"

# the whole layer as training runs it (bf16 autocast, float32 parameters): triton vs reference path;
# a near-tie may route a token differently in bf16, so relative norms, not elementwise
from experts import PEER
torch.manual_seed(0)
layer = PEER(dim=D, num_experts=N, heads=H, top_k=K, key_dim=kd).to(dev)
x = randn(T, D)
results = []
for kernel in ("triton", "reference"):
    layer.kernel = kernel
    layer.zero_grad(set_to_none=True)
    xk = x.clone().requires_grad_(True)
    with torch.autocast(torch.device(dev).type, dtype=torch.bfloat16):
        y = layer(xk)
    y.float().square().mean().backward()
    results.append([y.detach().float(), xk.grad, *(p.grad for p in layer.parameters())])
for a, b in zip(*results):
    err = ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()
    assert torch.isfinite(a).all() and err <= 5e-2, ("layer under autocast", a.shape, err)  # bf16: ~1-2%
print("kernels match the reference on", dev)
"""


def _device_check(device: str, sizes: tuple[int, ...], interpret: bool) -> None:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("TRITON_INTERPRET", None)
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    out = subprocess.run([sys.executable, "-c", DEVICE_SCRIPT, device, *map(str, sizes)],
                         cwd=Path(__file__).resolve().parents[1], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0 and "match the reference" in out.stdout, out.stderr[-4000:]


def test_device_check_script_through_the_interpreter():
    """The GPU check below, at small sizes on the CPU (fp32 and bf16), so CI keeps it working."""
    if not HAS_TRITON:
        pytest.skip("triton is not installed")
    _device_check("cpu", (24, 40, 12, 2, 4, 32), interpret=True)  # T, D, n, H, K, key_dim


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (CI has none; see benchmarks/gpu.sh)")
def test_compiled_kernels_on_cuda_match_the_reference():
    """The GPU target sizes, half the tokens: compiled kernels, fp32 and bf16, on the GPU."""
    if not HAS_TRITON:
        pytest.skip("triton is not installed")
    _device_check("cuda", (4096, 512, 1024, 8, 16, 256), interpret=False)


def test_triton_tests_in_a_subprocess():
    """Runs this module's Triton tests in a fresh process when triton was imported here before
    TRITON_INTERPRET=1 could be set (so the in-process ones skipped)."""
    if not HAS_TRITON:
        pytest.skip("triton is not installed")
    if "triton" not in sys.modules or _interpreted():
        pytest.skip("the Triton tests ran in this process")
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__, "-k",
                          "triton and not subprocess"], cwd=Path(__file__).resolve().parents[1], env=env,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
    assert " passed" in out.stdout and "skipped" not in out.stdout.splitlines()[-1]


def test_triton_self_check_accepts_right_kernels_and_falls_back_from_wrong_ones(tk, monkeypatch):
    """On a device the kernels never ran on, `auto` first checks them against the embedding-bag
    path; a wrong kernel (injected here) makes `auto` fall back with one warning line."""
    from types import SimpleNamespace

    device = torch.device("cpu")  # the interpreter runs the kernels on CPU tensors
    monkeypatch.setattr(kernels, "_AGREES", {})
    assert kernels.triton_agrees(device)
    cuda_like = SimpleNamespace(is_cuda=True, device=device)  # what resolve reads of x
    assert kernels.resolve("auto", cuda_like, torch.zeros(1)) == "triton"

    right_mix = tk.mix
    monkeypatch.setattr(tk, "mix", lambda *args: right_mix(*args) * 1.01)
    monkeypatch.setattr(kernels, "_AGREES", {})
    with pytest.warns(UserWarning, match=r"disagree with the embedding-bag path on cpu \(mixing output differs\)"):
        assert not kernels.triton_agrees(device)
    assert kernels.resolve("auto", cuda_like, torch.zeros(1)) == "bag"
    assert kernels.resolve("triton", cuda_like, torch.zeros(1)) == "triton"  # forcing them still works

    monkeypatch.setattr(tk, "retrieve", lambda *args: (_ for _ in ()).throw(RuntimeError("launch failed")))
    monkeypatch.setattr(kernels, "_AGREES", {})
    with pytest.warns(UserWarning, match="RuntimeError: launch failed"):
        assert not kernels.triton_agrees(device)


@pytest.mark.parametrize("kernel", ["reference", "bag"])
def test_sub_keys_are_scored_and_selected_in_fp32_under_bf16_autocast(kernel):
    """bf16 autocast gives bf16 queries; every path still scores them against the sub-keys in fp32
    (as the Triton kernels do), so routes do not depend on the path through bf16 rounding."""
    from experts.product_keys import product_topk

    torch.manual_seed(0)
    layer = PEER(dim=64, num_experts=64 * 64, heads=4, top_k=8, key_dim=64, kernel=kernel).eval()
    x = torch.randn(512, 64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        q = layer._queries(x)
        scores, ids = layer._route(x)
    assert q.dtype == torch.bfloat16
    cb, d = layer.codebooks, q.shape[-1] // 2
    s1 = torch.einsum("thd,hnd->thn", q[..., :d].float(), cb.keys1.float()) + cb.offset1
    s2 = torch.einsum("thd,hnd->thn", q[..., d:].float(), cb.keys2.float())
    want_scores, want = product_topk(s1, s2, 8)
    assert torch.equal(ids, want)
    assert torch.allclose(scores.float(), want_scores.softmax(-1), atol=1e-2)  # weights from bf16 scores
