"""HSA: the token pruning of ToP-ViM (Zhan et al., "Exploring Token Pruning in Vision State Space Models",
NeurIPS 2024, arXiv 2409.18962; code ZLKong/ToP-ViM ``vim/models_mamba.py`` and
``mamba-1p1p1/mamba_ssm/modules/mamba_simple.py``, read at 6fd6282), which MTR's comparison calls HSA
(hidden-state alignment).

The paper (its abstract, section titles, table captions and reviews could be read, not the method section)
prunes tokens by an importance that "aggregates clipped channel values" (its Eq. 9; Table 4 ablates the
clipping against the l1 and l2 norms and unclipped values), keeps the survivors in their scan order, and adds
a *pruning-aware hidden-state alignment*: a selective-scan kernel that, guided by a position map of the
pruned tokens, keeps the SSM's hidden states of the remaining tokens aligned with their original
neighbourhoods. One step removing r tokens, as vimtr runs it (at the start of a block, on the previous
mixer's output, the point where the released code prunes):

1. importance (``score="clip"``): the previous mixer output, ReLU-clipped, averaged over channels; class token
   excluded;
2. the T−r most important patch tokens survive, in their original order (the released code sorts the kept
   indices); the other r are dropped from both streams;
3. the class token is kept and re-inserted at floor(pos·(L−r)/L) (R-MeeTo's rule, as MTR; for Vim's middle
   class token this is the middle of the survivors, where the released code puts it).

**The alignment** (``align=True``, default): after a step, every later block's scans span the gaps the pruned
tokens left: a kept token's state update decays over all the original positions since the previous kept one,
h_t = exp(g_t·Δ_t·A) h_{t−1} + Δ_t·B_t·u_t with g_t the gap (:func:`vimtr.ops.selective_scan_gapped`; the
backward scan likewise with the gap to the next kept token), so a kept token's hidden state decays as it
did among its original neighbours. The paper's method section could not be read; this is the reading of
"pruned positions keep their gap in the scan through a position map" that its summary and reviews support
(the digest ``landscape.md``), with each pruned position's Δ taken as the kept token's own (a pruned token
has no Δ once it is gone). The released code does not contain the alignment kernel: its active path runs
the stock scan on the condensed sequence, ``align=False`` (the paper's "w/o alignment", its Table 5).
The aligned scans run as a composition of the backend's scan kernel (u/g and g·Δ), not a fused kernel.

Where the released code differs from the paper, vimtr follows the paper and offers the code's behaviour:
- ``score``: ``"clip"`` (default, the paper's Eq. 9 reading); ``"raw"``: unclipped values, the released code's
  active line (its ``clamp(min=0)`` is commented out) and the paper's "w/o Clip" ablation; ``"l1"`` / ``"l2"``:
  the norms of the paper's Table 4. The code reads the backward scan's SSM output (``xai_b``, d_inner
  channels, before the output projection); vimtr's mixer exposes neither direction's SSM output, so every
  score reads the mixer output (both scans, after the projection) instead;
- ``mirror=True``: the released code uses ``xai_b`` in the backward scan's order, never flipped back, so token
  t is scored with token L−1−t's value; ``mirror=True`` reproduces that indexing (on vimtr's score);
- ``cls_position="middle"``: the released code re-inserts the class token at the middle of the kept tokens
  (right for Vim's middle class token, wrong for a first one); ``"proportional"`` (default): R-MeeTo's rule;
- schedule: the released code prunes 20% of the patch tokens (kept count made odd) after blocks 5, 10, 15
  (Vim-S; Vim-Ti logs: 10, 20); :func:`released_schedule` gives that schedule as an ``r`` list. The default
  schedule is every baseline's (R-MeeTo's reducing blocks, r from ``flops_reduction=0.3``), so that methods
  compare at equal FLOPs;
- the released code protects the class token (−inf score) in the first sample of a batch only; vimtr takes
  it out of the ranking for every sample.

ToP-ViM fine-tunes after pruning; MTR compares against it training-free, as vimtr runs it.
"""
from __future__ import annotations

import math

import torch

from vimtr.reduction.base import TokenReducer
from vimtr.reduction.merge import Plan, proportional_cls_pos, split_cls

SCORES = ("clip", "raw", "l1", "l2")


def released_schedule(depth: int, num_tokens: int, keep_ratio: float = 0.8, start: int = 5, gap: int = 5,
                      stop: int | None = 20) -> list[int]:
    """The released ToP-ViM code's schedule as an ``r`` list (tokens removed before each block).

    It prunes after blocks ``start``, ``start + gap``, ... (counted from 1, below ``stop``), i.e. before the
    blocks of those indices; each time it keeps ceil((N−1)·keep_ratio) patch tokens made odd, minus one (so
    that the class token sits exactly in the middle). Vim-S (197 tokens, the defaults): 40, 32, 24 tokens
    before blocks 5, 10, 15."""
    r, length = [0] * depth, num_tokens
    for block in range(1, depth):
        if block >= start and (block - start) % gap == 0 and (stop is None or block < stop):
            kept = math.ceil((length - 1) * keep_ratio)
            kept += kept % 2 == 0
            r[block] = length - kept
            length = kept
    return r


class HSA(TokenReducer):
    name = "hsa"
    PARAMS = {"score": "clip", "mirror": False, "cls_position": "proportional", "align": True}

    def check_params(self):
        p = self.params
        if p["score"] not in SCORES:
            raise ValueError(f"hsa: score must be one of {', '.join(map(repr, SCORES))} (clipped channel values, "
                             f"unclipped, l1 or l2 norm), got {p['score']!r}")
        if not isinstance(p["mirror"], bool):
            raise ValueError(f"hsa: mirror must be True or False, got {p['mirror']!r}")
        if p["cls_position"] not in ("proportional", "middle"):
            raise ValueError(f"hsa: cls_position must be 'proportional' or 'middle', got {p['cls_position']!r}")
        if not isinstance(p["align"], bool):
            raise ValueError(f"hsa: align must be True (the paper's hidden-state alignment) or False (the released "
                             f"code), got {p['align']!r}")
        self.aligns_scan = p["align"]

    def score(self, state) -> torch.Tensor:
        """Importance of every token (B, L), class token included; higher = kept."""
        h = state.hidden.float()
        kind = self.params["score"]
        if kind == "clip":
            s = h.clamp(min=0).mean(dim=-1)
        elif kind == "raw":
            s = h.mean(dim=-1)
        else:
            s = h.norm(p=1 if kind == "l1" else 2, dim=-1)
        return s.flip(-1) if self.params["mirror"] else s

    def plan(self, block, state, r):
        with torch.no_grad():
            _, s = split_cls(self.score(state).unsqueeze(-1), state.cls_index)
            s = s.squeeze(-1)
            T = s.shape[1]
            keep = s.argsort(dim=-1, descending=True)[:, : T - r].sort(dim=1).values
        if state.cls_index is None:
            cls_pos = None
        elif self.params["cls_position"] == "middle":
            cls_pos = (T - r) // 2
        else:
            cls_pos = proportional_cls_pos(state.cls_index, state.length, r)
        return Plan(keep=keep, cls_pos=cls_pos)

    def overhead_macs(self, length, r):
        # clipping (or a norm) and the channel mean
        return 2 * length * self.embed_dim
