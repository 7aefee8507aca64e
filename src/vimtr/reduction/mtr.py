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


class MTR(TokenReducer):
    name = "mtr"
    needs_aux = True
    PARAMS = {"keep_ratio": 0.5, "feature": "hidden", "pool": "none", "weighted": False, "prune": False,
              "distance": "cosine"}

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
        self.weighted = bool(p["weighted"])
        # With the channel mean, the mixer's channel sums of Δ suffice (the two (B, E, L) Δ are not written).
        self.aux_keys = None if p["pool"] == "channel_max" else frozenset({"delta_sum"})

    def score(self, state) -> torch.Tensor:
        return delta_importance(state.aux, self.params["pool"])

    def plan(self, block, state, r):
        _, s = split_cls(self.score(state).unsqueeze(-1), state.cls_index)
        feats = state.hidden if self.params["feature"] == "hidden" else state.residual
        T = s.shape[1]
        n_keep = min(int(self.params["keep_ratio"] * T), T - r - 1)
        plan = importance_plan(s.squeeze(-1), r, T - r - n_keep, feats, self.params["prune"],
                               self.params["distance"], features_cls_index=state.cls_index)
        plan.cls_pos = proportional_cls_pos(state.cls_index, state.length, r)
        return plan

    def overhead_macs(self, length, r):
        E, C = 2 * self.embed_dim, self.embed_dim
        n_tgt = max(length - r - int(self.params["keep_ratio"] * length), 1)
        # channel mean of Δ, normalising the features, source×target cosine scores, the merge itself
        return 2 * length * E + 3 * length * C + r * n_tgt * C + r * C
