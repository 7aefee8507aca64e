"""EViT (Liang et al., "Not All Patches are What You Need", ICLR 2022; youweiliang/evit) ported to Vision Mamba.

EViT keeps the k patch tokens the class token attends to most and fuses the rest ("inattentive" tokens)
into one token, their sum weighted by the class-attention probabilities. Mamba has no attention, so:

- score (``score="cls"``, default): cosine similarity of each token to the class token in the previous
  mixer output, the closest thing to EViT's class attention a Mamba block exposes (MTR's ablation, as
  summarised by a third party, also scores tokens by "[CLS]-token similarity"; its exact form is not
  known). ``score="clip"`` is the importance of UTR's EViT port for Mamba (wuyushuwys/ToR_SSM
  ``pom.py``/``mamba_wrap.py``: ReLU-clamped mixer output summed over channels; the channel mean is used
  here, same ranking, a scale fit for the softmax below);
- a step that removes r tokens keeps the top T−r−1 of the T patch tokens and fuses the other r+1 into one
  token, so the sequence loses exactly r;
- fused token = Σ wᵢ·xᵢ with w = softmax of the scores over the fused tokens (hidden and residual streams
  alike). EViT's weights are the class-attention probabilities of those tokens, not renormalised, so its
  fused token is shrunk by the small attention mass they held; a cosine score has no such mass to
  reproduce, and vimtr renormalises the weights to sum to 1 so that the fused token is a weighted mean of
  its members, like every merge here. Like EViT, the weights are not detached: in training the gradient
  reaches the scores too;
- placement (EViT: kept tokens in descending-score order, the fused token appended): the kept tokens
  stay in their **original order** (order matters to a scan) and the fused token is appended at the end
  of the patch sequence, where EViT puts it;
- class token: kept, never fused; re-inserted at floor(pos·(L−r)/L) (R-MeeTo's rule, as MTR), so a first
  class token stays first, as in EViT, and Vim's middle one stays central;
- ``fuse=False``: drop the inattentive tokens instead (EViT without fusion; UTR's port never fuses), then
  the top T−r tokens are kept.

Sizes and source maps treat the fused token as the merge of all its members.

Parameters: ``score="cls"``, ``fuse=True``. Default schedule (every baseline): the reducing blocks of
R-MeeTo (interval 2), r derived from ``flops_reduction=0.3``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from vimtr.reduce.base import TokenReducer
from vimtr.reduce.merge import Plan, proportional_cls_pos, split_cls


class EViT(TokenReducer):
    name = "evit"
    PARAMS = {"score": "cls", "fuse": True}
    _fusion = None  # (indices, weights) of the fused tokens, from plan() to __call__ within one step

    def check_params(self):
        if self.params["score"] not in ("cls", "clip"):
            raise ValueError(f"evit: score must be 'cls' or 'clip', got {self.params['score']!r}")
        if not isinstance(self.params["fuse"], bool):
            raise ValueError(f"evit: fuse must be True or False, got {self.params['fuse']!r}")

    def score(self, state) -> torch.Tensor:
        """Class-free scores (B, T); higher = kept."""
        cls, rest = split_cls(state.hidden, state.cls_index)
        if self.params["score"] == "clip":
            return rest.float().clamp(min=0).mean(dim=-1)
        if cls is None:
            raise ValueError("evit: score='cls' needs a model with a class token; use score='clip'")
        # F.normalize (with its epsilon) rather than merge.normalise_rows: the scores carry gradients into
        # the fused token, and an all-zero row must not turn them into NaN.
        return (F.normalize(rest.float(), dim=-1) * F.normalize(cls.float(), dim=-1)).sum(-1)

    def plan(self, block, state, r):
        s = self.score(state)
        T = s.shape[1]
        n_fused = r + 1 if self.params["fuse"] else r
        order = s.detach().argsort(dim=-1, descending=True)
        top, rest = order[:, : T - n_fused].sort(dim=1).values, order[:, T - n_fused:]
        cls_pos = proportional_cls_pos(state.cls_index, state.length, r)
        if not self.params["fuse"]:
            return Plan(keep=top, cls_pos=cls_pos)
        # The fused token is carried by the plan as "the best inattentive token, with the others merged
        # into it", appended last: sizes and sources then come out right. Its value (a score-weighted mean,
        # not apply_plan's size-weighted one) is written by __call__.
        keep = torch.cat((top, rest[:, :1]), dim=1)
        dst = torch.full_like(rest[:, 1:], T - n_fused)
        self._fusion = (rest, torch.softmax(s.gather(1, rest), dim=-1).unsqueeze(-1))
        return Plan(keep=keep, src=rest[:, 1:], dst=dst, cls_pos=cls_pos)

    def __call__(self, block, state):
        self._fusion = None  # only a plan() made during this very step may be used below
        before = state
        state = super().__call__(block, state)
        fusion, self._fusion = self._fusion, None  # and never kept past it (it holds a graph in training)
        if fusion is None:
            return state
        idx, w = fusion
        # The fused token is the last non-class row of the output.
        pos = state.length - 1 - (state.cls_index is not None and state.cls_index == state.length - 1)
        for attr in ("hidden", "residual"):
            x = getattr(before, attr)
            if x is None:
                continue
            _, rest = split_cls(x, before.cls_index)
            fused = (rest.gather(1, idx.unsqueeze(-1).expand(-1, -1, rest.shape[-1])) * w).sum(1, keepdim=True)
            y = getattr(state, attr)
            setattr(state, attr, torch.cat((y[:, :pos], fused.to(y.dtype), y[:, pos + 1:]), dim=1))
        return state

    def overhead_macs(self, length, r):
        C = self.embed_dim
        # normalising the rows, the dot products with the class token, the fused weighted sum
        return 3 * length * C + (r + 1) * C
