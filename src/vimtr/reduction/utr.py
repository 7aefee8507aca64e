"""UTR: unified token reduction for SSMs (Zhan et al., "Rethinking Token Reduction for State Space Models",
EMNLP 2024; code wuyushuwys/ToR_SSM ``src/pom/modules/{mamba_wrap,pom,tome}.py``, read at 2e9fc62).

Written for language Mamba (reduction after chosen layers); here it runs at the start of the reducing
blocks on the previous mixer output, which is where ToR_SSM's ``PoMMamba`` wrapper reads it (the wrapped
layer's output hidden states, before the next residual add). One step removing r tokens:

1. importance: the ReLU-clipped mixer output summed over channels (ToR_SSM ``metrics='clip'``:
   ``hidden.clamp(min=0).sum(-1)``), class token excluded;
2. classification: the floor(T/2) most important tokens form the target set, the others the candidate
   set (ToR_SSM's ``mid_point = T // 2`` split);
3. matching: each candidate finds its most similar target (cosine on ``feature``); the r candidates with
   the highest similarity are removed (ToMe-style top-r edges), the other candidates stay;
4. hybrid reduction: of the r removed tokens the floor((1−``prune_ratio``)·r) most important are merged
   into their matches (size-weighted mean, destination included), the rest are pruned. ``prune_ratio=0.5``
   is ToR_SSM's hard-coded ``k = r // 2`` merged of r (its ``hybrid`` strategy); 0 is its ``merge_only``,
   1 its ``prune_only``;
5. residual stream (``residual="merge"``, ToR_SSM's evaluation default ``residual_strategy='merge_only'``):
   all r removed tokens are merged into their matches, none pruned; ``residual="hybrid"`` reduces it like
   the hidden states;
6. survivors keep their original order (ToR_SSM scatters them back to their original positions and drops
   the emptied rows); the class token is kept and re-inserted at floor(pos·(L−r)/L) (R-MeeTo's rule, as
   MTR; language Mamba has no class token, so the source is silent).

Where vimtr departs from the released code (the paper body could not be read here; its abstract and
Figure 2 caption, as quoted by reviews, describe "token importance classification" into a more and a less
important set, then merging/pruning of the connected tokens):
- ToR_SSM sorts the *normalised metric per channel* (``metric.sort(dim=1)``) to build the two sets, and
  then applies the resulting indices to a parity split (``x[..., ::2, :]``); vimtr splits by the
  importance score, as the paper describes;
- ToR_SSM picks what to merge per channel (``src.topk(k, dim=1)`` over the removed tokens' values, each
  channel separately); a token-level plan cannot express that, so vimtr picks whole tokens by the same
  importance score;
- rows are normalised with an epsilon (a clipped row can be all zero), and r is limited to (L−1)//2 per
  step like ToR_SSM's ``min(r, t // 2)`` cap, but raising instead of capping silently.

Sizes and source maps follow the hidden-state plan: pruned patches drop out of them (with
``residual="merge"`` the residual stream still carries them, as in ToR_SSM).

Parameters: ``prune_ratio=0.5``, ``feature="clip"`` (ToR_SSM matches on the clipped states; ``"hidden"``:
the raw mixer output), ``residual="merge"``. Default schedule (every baseline): the reducing blocks of
R-MeeTo (interval 2), r derived from ``flops_reduction=0.3``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from vimtr.reduction.base import TokenReducer
from vimtr.reduction.merge import Plan, _gather, proportional_cls_pos, similarity, split_cls
from vimtr.reduction.rmeeto import RMeeTo


class UTR(TokenReducer):
    name = "utr"
    PARAMS = {"prune_ratio": 0.5, "feature": "clip", "residual": "merge"}

    def check_params(self):
        p = self.params
        if isinstance(p["prune_ratio"], bool) or not isinstance(p["prune_ratio"], (int, float)) \
                or not 0.0 <= p["prune_ratio"] <= 1.0:
            raise ValueError(f"utr: prune_ratio must be a fraction in [0, 1], got {p['prune_ratio']!r}")
        if p["feature"] not in ("clip", "hidden"):
            raise ValueError(f"utr: feature must be 'clip' or 'hidden', got {p['feature']!r}")
        if p["residual"] not in ("merge", "hybrid"):
            raise ValueError(f"utr: residual must be 'merge' or 'hybrid', got {p['residual']!r}")

    max_remove = RMeeTo.max_remove  # (L−1)//2, ToR_SSM's cap

    def plan(self, block, state, r):
        _, h = split_cls(state.hidden, state.cls_index)
        with torch.no_grad():
            clipped = h.float().clamp(min=0)
            score = clipped.sum(dim=-1)
            f = F.normalize(clipped if self.params["feature"] == "clip" else h.float(), dim=-1)
            T = score.shape[1]
            order = score.argsort(dim=-1, descending=True)
            tgt, cand = order[:, : T // 2], order[:, T // 2:]
            node_max, node_idx = similarity(_gather(f, cand), _gather(f, tgt)).max(dim=-1)
            edge = node_max.argsort(dim=-1, descending=True)
            src = cand.gather(1, edge[:, :r])
            dst = tgt.gather(1, node_idx.gather(1, edge[:, :r]))
            keep = torch.cat((cand.gather(1, edge[:, r:]), tgt), dim=1).sort(dim=1).values
            # Output position of each destination: keep is sorted, so it is the destination's rank there.
            dst_pos = torch.searchsorted(keep, dst.contiguous())
            n_merge = int((1.0 - float(self.params["prune_ratio"])) * r + 1e-6)
            merged = score.gather(1, src).argsort(dim=-1, descending=True)[:, :n_merge]
        cls_pos = proportional_cls_pos(state.cls_index, state.length, r)
        residual = None
        if self.params["residual"] == "merge" and n_merge < r:  # the residual stream merges all r
            residual = Plan(keep=keep, src=src, dst=dst_pos, cls_pos=cls_pos)
        return Plan(keep=keep, src=src.gather(1, merged), dst=dst_pos.gather(1, merged), cls_pos=cls_pos,
                    residual=residual)

    def overhead_macs(self, length, r):
        C, T = self.embed_dim, length - 1
        # clipping + channel sum, normalising the features, candidate×target cosine scores, the merges
        # (hidden and residual streams)
        return 3 * length * C + (T - T // 2) * (T // 2) * C + 2 * r * C
