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

from vimtr.reduction.base import TokenReducer
from vimtr.reduction.merge import Plan, proportional_cls_pos, split_cls


class EViT(TokenReducer):
    name = "evit"
    PARAMS = {"score": "cls", "fuse": True}

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
        # The fused token is "the best inattentive token, with the others merged into it", appended last;
        # its value is the softmax(score)-weighted mean of the group (weights keep their gradient, as EViT),
        # so the plan carries those weights for this step's means instead of the sizes.
        keep = torch.cat((top, rest[:, :1]), dim=1)
        dst = torch.full_like(rest[:, 1:], T - n_fused)
        w = torch.ones_like(s).scatter(1, rest, torch.softmax(s.gather(1, rest), dim=-1)).unsqueeze(-1)
        weight = w if state.cls_index is None else torch.cat(
            (w[:, :state.cls_index], torch.ones_like(w[:, :1]), w[:, state.cls_index:]), dim=1)
        return Plan(keep=keep, src=rest[:, 1:], dst=dst, cls_pos=cls_pos, weight=weight)

    def overhead_macs(self, length, r):
        C = self.embed_dim
        # normalising the rows, the dot products with the class token, the fused weighted sum
        return 3 * length * C + (r + 1) * C
