"""MTR: training-free token reduction for Vision Mamba (Ma et al., arXiv 2507.14042).

At a reduction step (before block i, i.e. right after block i−1):
1. importance s_t = mean over channels of (Δ_fwd + Δ_bwd) of block i−1's mixer, the backward Δ
   flipped back to token order (reused from the mixer, no second pass); higher = more important;
2. the class-free tokens are sorted by s into three groups: **keep** (the most important
   ``keep_ratio`` of them), **source** (the r least important) and **target** (the rest);
3. each source merges into its most similar target (cosine on ``feature``); keep tokens are untouched;
4. survivors return to their original order; the class token is kept and re-inserted at
   floor(pos·(L−r)/L) (the same rule as R-MeeTo, so it stays central); the residual stream is reduced
   with the same map.

What the paper leaves open (no public code; digest ``mtr.md`` §6) and what vimtr chose:
- schedule: the reducing blocks of R-MeeTo (2, 4, ..., 22), r derived from ``flops_reduction=0.3``
  by default, so methods compare at equal FLOPs;
- group sizes: ``keep_ratio=0.5`` (the top half is kept, sources come from the lower half);
- similarity feature: ``feature="hidden"`` (the block's mixer output), or ``"residual"``;
- score pooling: ``pool="none"`` (the digest's formula); ``"channel_max"`` (max over channels instead
  of mean) and ``"token_max"`` (1-D max-pool, kernel 3, over the token scores) are the "max-pooling"
  readings the digest lists;
- merge: plain mean of source(s) and target, as the paper's "average of the two vectors"
  (``weighted=False``); ``weighted=True`` uses token sizes;
- ``prune=True`` drops the sources instead (the paper's ablation).

The paper's ablations (what a secondary summary of the paper reports, digest ``mtr.md`` §5; the numbers
themselves were not recoverable), as parameters:
- ``score``: the importance. ``"delta"`` (default): Δ as above, which the paper finds clearly best;
  ``"B"`` / ``"C"``: the L2 norm over the state dimension of the input matrix B_t / output matrix C_t
  of the previous mixer, summed over the two scans (the backward one in token order), which the paper
  finds worse than Δ (B "also carries useful signal"); ``"cls"``: cosine similarity of each token to the
  class token in the previous mixer output, which the paper finds poor (adjacent tokens of a scan are
  alike, so similarity says little about importance). Higher is more important in every case;
- ``prune=True``: drop the source group instead of merging it, which the paper finds worse (merging loses
  less information);
- ``order=False``: no reordering: the survivors are laid out in importance order (most important first;
  ties by position) instead of their original order; the paper presents reordering as the fix for Mamba's
  sensitivity to token order (its Fig. 1a), without a number that could be recovered.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from vimtr.reduction.base import TokenReducer
from vimtr.reduction.merge import importance_plan, proportional_cls_pos, split_cls


def delta_importance(aux: dict, pool: str = "none") -> torch.Tensor:
    """MTR's importance per token (B, L) from a mixer's aux: Δ summed over the two scans (the backward
    one already in token order), then averaged over channels (or max / max-pooled, see ``pool``).

    With the channel mean, the mixer's ``delta_sum`` (that channel sum, added up by the scans themselves)
    suffices: no (B, E, L) add and mean here (they were a third of MTR's reduction step)."""
    if pool != "channel_max" and "delta_sum" in aux:
        s = aux["delta_sum"] / aux["delta_channels"]
    else:
        delta = aux["delta_f"] + aux["delta_b"]  # (B, E, L)
        s = delta.amax(dim=1) if pool == "channel_max" else delta.mean(dim=1)
    if pool == "token_max":
        s = F.max_pool1d(s.unsqueeze(1), kernel_size=3, stride=1, padding=1).squeeze(1)
    return s


SCORES = ("delta", "B", "C", "cls")


def state_norm_importance(aux: dict, which: str) -> torch.Tensor:
    """The ``"B"``/``"C"`` ablation score (B, L): ‖X_t‖ over the state dimension for both scans, summed
    (the mixer hands both in token order, (B, L, N) each)."""
    return aux[f"{which}_f"].float().norm(dim=-1) + aux[f"{which}_b"].float().norm(dim=-1)


def cls_similarity(hidden: torch.Tensor, cls_index: int) -> torch.Tensor:
    """The ``"cls"`` ablation score (B, L): cosine similarity of every token to the class token (itself: 1)."""
    h = F.normalize(hidden.float(), dim=-1)
    return (h * h[:, cls_index: cls_index + 1]).sum(-1)


class MTR(TokenReducer):
    name = "mtr"
    needs_aux = True
    PARAMS = {"keep_ratio": 0.5, "feature": "hidden", "pool": "none", "weighted": False, "prune": False,
              "distance": "cosine", "score": "delta", "order": True}

    def __init__(self, model, **params):
        self.d_state = model.layers[0].mixer.d_state  # for the B/C scores' cost, before the schedule is made
        super().__init__(model, **params)

    def check_params(self):
        p = self.params
        if not 0.0 <= float(p["keep_ratio"]) < 1.0:
            raise ValueError(f"mtr: keep_ratio must be in [0, 1), got {p['keep_ratio']!r}")
        if p["feature"] not in ("hidden", "residual"):
            raise ValueError(f"mtr: feature must be 'hidden' or 'residual', got {p['feature']!r}")
        if p["pool"] not in ("none", "channel_max", "token_max"):
            raise ValueError(f"mtr: pool must be 'none', 'channel_max' or 'token_max', got {p['pool']!r}")
        if p["distance"] not in ("cosine", "l1", "l2"):
            raise ValueError(f"mtr: distance must be 'cosine', 'l1' or 'l2', got {p['distance']!r}")
        score = p["score"].upper() if isinstance(p["score"], str) and p["score"] in ("b", "c") else p["score"]
        if score not in SCORES:
            raise ValueError(f"mtr: score must be one of {', '.join(map(repr, SCORES))} (Δ, the norms of B_t or "
                             f"C_t, class-token similarity), got {p['score']!r}")
        p["score"] = score
        if score != "delta" and p["pool"] == "channel_max":
            raise ValueError(f"mtr: pool='channel_max' is a reading of the Δ score; score={score!r} has no channel "
                             "axis to take the max over (use pool='none' or 'token_max')")
        if score == "cls" and self.cls_start is None:
            raise ValueError("mtr: score='cls' needs a model with a class token; use score='delta', 'B' or 'C'")
        if not isinstance(p["order"], bool):
            raise ValueError(f"mtr: order must be True (original order) or False (importance order), got "
                             f"{p['order']!r}")
        self.weighted = bool(p["weighted"])
        self.needs_aux = score != "cls"
        # With the channel mean, the mixer's channel sums of Δ suffice (the two (B, E, L) Δ are not written).
        if score == "delta":
            self.aux_keys = None if p["pool"] == "channel_max" else frozenset({"delta_sum"})
        elif score in ("B", "C"):
            self.aux_keys = frozenset({f"{score}_f", f"{score}_b"})
        else:
            self.aux_keys = None

    def score(self, state) -> torch.Tensor:
        """Importance of every token, class token included (B, L); higher = more important."""
        score = self.params["score"]
        if score == "delta":
            return delta_importance(state.aux, self.params["pool"])
        s = cls_similarity(state.hidden, state.cls_index) if score == "cls" else state_norm_importance(state.aux, score)
        if self.params["pool"] == "token_max":
            s = F.max_pool1d(s.unsqueeze(1), kernel_size=3, stride=1, padding=1).squeeze(1)
        return s

    def plan(self, block, state, r):
        _, s = split_cls(self.score(state).unsqueeze(-1), state.cls_index)
        s = s.squeeze(-1)
        feats = state.hidden if self.params["feature"] == "hidden" else state.residual
        T = s.shape[1]
        n_keep = min(int(self.params["keep_ratio"] * T), T - r - 1)
        plan = importance_plan(s, r, T - r - n_keep, feats, self.params["prune"],
                               self.params["distance"], features_cls_index=state.cls_index)
        if not self.params["order"]:
            plan = importance_order(plan, s)
        plan.cls_pos = proportional_cls_pos(state.cls_index, state.length, r)
        return plan

    def overhead_macs(self, length, r):
        E, C = 2 * self.embed_dim, self.embed_dim
        n_tgt = max(length - r - int(self.params["keep_ratio"] * length), 1)
        # the score (Δ: channel mean; B/C: two norms over the state; cls: normalising and one dot product),
        # normalising the features, source×target cosine scores, the merge itself
        score = {"delta": 2 * length * E, "B": 4 * length * self.d_state, "C": 4 * length * self.d_state,
                 "cls": 3 * length * C}[self.params["score"]]
        return score + 3 * length * C + r * n_tgt * C + r * C


def importance_order(plan, score: torch.Tensor):
    """``plan`` with its survivors laid out by descending ``score`` (B, T) instead of by position (ties: by
    position); merge destinations follow their targets to their new places."""
    s_keep = score.gather(1, plan.keep)
    perm = s_keep.argsort(dim=1, descending=True, stable=True)  # new position -> old position
    plan.keep = plan.keep.gather(1, perm)
    if plan.dst is not None:
        plan.dst = perm.argsort(dim=1).gather(1, plan.dst)  # old position -> new position
    plan.flat = None  # any precomputed row indices were for the old layout
    return plan
