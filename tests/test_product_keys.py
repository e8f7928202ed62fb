import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import experts.product_keys as pk
from experts.product_keys import ProductKeys, check_top_k, product_scores, product_topk, split_ids


@settings(max_examples=60, deadline=None, database=None)  # no .hypothesis/ folder in the repo
@given(n1=st.integers(1, 12), n2=st.integers(1, 12), lead=st.integers(1, 4), k_frac=st.floats(0.0, 1.0),
       seed=st.integers(0, 2**31 - 1))
def test_product_topk_is_exact(n1, n2, lead, k_frac, seed):
    k = 1 + int(k_frac * (min(n1, n2) - 1))
    g = torch.Generator().manual_seed(seed)
    s1 = torch.randn(lead, 3, n1, generator=g, dtype=torch.float64)
    s2 = torch.randn(lead, 3, n2, generator=g, dtype=torch.float64)
    scores, ids = product_topk(s1, s2, k)
    brute_scores, brute_ids = product_scores(s1, s2).topk(k, dim=-1)
    assert ids.dtype == torch.int64 and ids.shape == (lead, 3, k)
    assert torch.equal(scores, brute_scores)  # same sums, same descending order
    assert torch.equal(ids.sort(-1).values, brute_ids.sort(-1).values)
    i, j = split_ids(ids, n2)
    assert torch.equal(scores, s1.gather(-1, i) + s2.gather(-1, j))


def test_flat_id_is_row_times_n2_plus_column():
    s1 = torch.tensor([0.0, 5.0, 1.0])          # best row 1
    s2 = torch.tensor([0.0, 0.0, 0.0, 9.0])     # best column 3
    scores, ids = product_topk(s1, s2, 1)
    assert ids.item() == 1 * 4 + 3 and scores.item() == 14.0
    assert product_scores(s1, s2)[1 * 4 + 3] == 14.0


def test_gradient_matches_brute_force():
    g = torch.Generator().manual_seed(0)
    s1 = torch.randn(5, 7, generator=g, dtype=torch.float64, requires_grad=True)
    s2 = torch.randn(5, 6, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(5, 3, generator=g, dtype=torch.float64)
    grad_fast = torch.autograd.grad((product_topk(s1, s2, 3)[0] * w).sum(), (s1, s2))
    grad_ref = torch.autograd.grad((product_scores(s1, s2).topk(3, dim=-1).values * w).sum(), (s1, s2))
    for a, b in zip(grad_fast, grad_ref):
        assert torch.allclose(a, b)


@pytest.mark.parametrize("k,n1,n2", [(5, 4, 8), (5, 8, 4), (0, 4, 4)])
def test_bad_top_k_refused(k, n1, n2):
    with pytest.raises(ValueError, match="top_k"):
        product_topk(torch.randn(2, n1), torch.randn(2, n2), k)
    with pytest.raises(ValueError, match="top_k"):
        check_top_k(k, n1, n2)


def test_mismatched_leading_dims_refused():
    with pytest.raises(ValueError, match="leading dims"):
        product_topk(torch.randn(2, 4), torch.randn(3, 4), 2)


def test_codebook_layout_and_offset_buffer():
    keys = ProductKeys(heads=3, n1=4, n2=5, key_dim=6)
    assert keys.keys1.shape == (3, 4, 3) and keys.keys2.shape == (3, 5, 3)
    assert keys.grid == (4, 5)
    assert torch.equal(keys.offset1, torch.zeros(3, 4))
    assert "offset1" in keys.state_dict() and "offset1" not in dict(keys.named_parameters())
    with pytest.raises(ValueError, match="key_dim must be even"):
        ProductKeys(heads=1, n1=4, n2=4, key_dim=5)


def test_offset_enters_scores_and_masks_rows():
    torch.manual_seed(0)
    keys = ProductKeys(heads=2, n1=4, n2=3, key_dim=4).double()
    q = torch.randn(10, 2, 4, dtype=torch.float64)
    base = keys.all_scores(q)
    keys.offset1[:, 1] = -1e9  # row 1 dormant: its n2 experts can never be retrieved
    masked = keys.all_scores(q)
    row1 = torch.arange(1 * 3, 2 * 3)
    assert torch.allclose(masked[..., row1], base[..., row1] - 1e9)
    _, ids = keys.topk(q, 3)
    assert not torch.isin(ids, row1).any()
    scores, ids = keys.topk(q, 3)
    assert torch.equal(scores, masked.gather(-1, ids))


def test_appending_a_row_keeps_old_ids():
    """The id layout is append-only: a new first-codebook row gets ids n1*n2 .. n1*n2 + n2 - 1."""
    torch.manual_seed(0)
    old = ProductKeys(heads=2, n1=3, n2=4, key_dim=4).double()
    new = ProductKeys(heads=2, n1=4, n2=4, key_dim=4).double()
    with torch.no_grad():
        new.keys1[:, :3] = old.keys1
        new.keys2.copy_(old.keys2)
    q = torch.randn(6, 2, 4, dtype=torch.float64)
    assert torch.equal(new.all_scores(q)[..., :12], old.all_scores(q))


def test_forward_path_never_materialises_all_scores(monkeypatch):
    def boom(*args):
        raise AssertionError("product_scores called")

    monkeypatch.setattr(pk, "product_scores", boom)
    keys = ProductKeys(heads=2, n1=64, n2=64, key_dim=8)
    scores, ids = keys.topk(torch.randn(5, 2, 8), 4)
    assert ids.shape == (5, 2, 4) and int(ids.max()) < 64 * 64


@pytest.mark.parametrize("k", [1, 2, 3, 5, 8, 16, 33])
def test_candidate_pairs_are_those_that_can_reach_the_top_k(k):
    pairs = [(a, b) for lo, hi, m in pk._candidate_groups(k) for a in range(lo, hi) for b in range(m)]
    assert pairs == [(a, b) for a in range(k) for b in range(k) if (a + 1) * (b + 1) <= k]
    a_P, b_P = pk._candidate_ranks(k)
    assert list(zip(a_P.tolist(), b_P.tolist())) == pairs
    top1, top2 = torch.randn(4, k).sort(-1, descending=True).values, torch.randn(4, k).sort(-1, descending=True).values
    assert torch.equal(pk._candidates(top1, top2), top1[:, a_P] + top2[:, b_P])


def test_ties_and_dormant_rows_keep_the_exact_top_k_scores():
    g = torch.Generator().manual_seed(0)
    s1 = torch.randint(0, 3, (50, 2, 12), generator=g).float()  # many ties
    s2 = torch.randint(0, 3, (50, 2, 12), generator=g).float()
    s1[..., -4:] = float("-inf")  # dormant rows, as after growth
    for k in (1, 4, 8, 12):
        scores, ids = product_topk(s1, s2, k)
        assert torch.equal(scores, product_scores(s1, s2).topk(k, dim=-1).values)
        i, j = split_ids(ids, 12)
        assert torch.equal(scores, s1.gather(-1, i) + s2.gather(-1, j))
        assert all(len(set(row)) == k for row in ids.reshape(-1, k).tolist())  # k distinct experts
