"""Sparse memory finetuning (Lin et al. 2025, "Continual learning via sparse memory finetuning"):
rank the experts a batch retrieved by how much more the batch uses them than background data does,
and let only the top t of them learn.

``RetrievalStats`` counts, per expert, the retrievals of the current step (term frequency) and, over
background steps, in how many steps an expert was retrieved (document frequency) and how often in
all (the background distribution). ``tfidf_scores`` is the paper's ranking,
``tf_i * log((|B| + 1) / (df_i + 1))``; ``kl_scores`` the follow-ups' per-expert KL contribution
``p_i * log(p_i / q_i)`` of the step's retrieval distribution p against the smoothed background q.
Shape suffix: N experts.
"""

from __future__ import annotations

import torch


def tfidf_scores(tf_N: torch.Tensor, df_N: torch.Tensor, batches: int) -> torch.Tensor:
    """TF-IDF of every expert: retrievals in the step times log((|B| + 1) / (df + 1)), |B| background steps."""
    idf_N = torch.log((batches + 1.0) / (df_N.double() + 1.0))
    return tf_N.double() * idf_N


def kl_scores(tf_N: torch.Tensor, background_N: torch.Tensor) -> torch.Tensor:
    """Each expert's term of KL(p || q): p the step's retrieval distribution, q the background's with
    add-one smoothing (an expert the background never retrieved is not infinitely surprising);
    0 where the step did not retrieve the expert."""
    p_N = tf_N.double() / tf_N.sum().clamp_min(1)
    q_N = (background_N.double() + 1.0) / (background_N.sum() + background_N.numel())
    return torch.where(tf_N > 0, p_N * torch.log(p_N / q_N), torch.zeros_like(p_N))


def select_top(scores_N: torch.Tensor, t: int, candidates_N: torch.Tensor) -> torch.Tensor:
    """Ids of the (at most) t highest-scoring candidates, ties broken by the lower id (deterministic)."""
    ids = torch.nonzero(candidates_N, as_tuple=False).reshape(-1)
    if ids.numel() <= t:
        return ids
    # stable sort on -score keeps id order among equal scores
    order = torch.sort(-scores_N[ids], stable=True).indices[:t]
    return torch.sort(ids[order]).values


class RetrievalStats:
    """Per-expert retrieval counts of one layer: the current step's (``tf_N``), and the background's
    (``df_N`` steps that retrieved each expert, ``count_N`` retrievals, ``batches`` steps)."""

    def __init__(self, num_experts: int):
        self.tf_N = torch.zeros(num_experts, dtype=torch.int64)
        self.df_N = torch.zeros(num_experts, dtype=torch.int64)
        self.count_N = torch.zeros(num_experts, dtype=torch.int64)
        self.batches = 0

    def grow_to(self, num_experts: int) -> None:
        """New experts (growth) start with no retrievals anywhere."""
        for name in ("tf_N", "df_N", "count_N"):
            old = getattr(self, name)
            if old.numel() < num_experts:
                setattr(self, name, torch.cat([old, old.new_zeros(num_experts - old.numel())]))

    def record(self, ids: torch.Tensor) -> None:
        """Add the expert ids of a forward pass (any shape) to the current step."""
        self.grow_to(int(ids.max()) + 1 if ids.numel() else 0)
        self.tf_N += torch.bincount(ids.reshape(-1).cpu(), minlength=self.tf_N.numel())

    def add_background(self, tf_N: torch.Tensor) -> None:
        """Count one step's retrievals `tf_N` as a background batch."""
        self.grow_to(tf_N.numel())
        n = tf_N.numel()
        self.df_N[:n] += (tf_N > 0).long()
        self.count_N[:n] += tf_N.long()
        self.batches += 1

    def merge_background(self, other: "RetrievalStats") -> None:
        """Add `other`'s background counts to these (an experience's steps joining the background)."""
        self.grow_to(other.df_N.numel())
        other.grow_to(self.df_N.numel())
        self.df_N += other.df_N
        self.count_N += other.count_N
        self.batches += other.batches

    def state_dict(self) -> dict:
        return {"tf": self.tf_N.clone(), "df": self.df_N.clone(), "count": self.count_N.clone(),
                "batches": self.batches}

    def load_state_dict(self, state: dict) -> None:
        self.tf_N, self.df_N = state["tf"].clone(), state["df"].clone()
        self.count_N, self.batches = state["count"].clone(), int(state["batches"])
