"""PuMer's vision-side token merging, as the UTR authors adapted it to Mamba.

Sources: PuMer (Cao et al., "PuMer: Pruning and Merging Tokens for Efficient Vision Language Models",
ACL 2023; csarron/PuMer ``src/pumer/model/{reducer.py,vilt/vit_vilt.py}``) and its Mamba port in UTR's
code (wuyushuwys/ToR_SSM ``src/pom/modules/{pom.py,tome.py,mamba_wrap.py}``, strategy ``pumer``), which
MTR's comparison names as a baseline.

PuMer reduces the image tokens of a vision-language transformer in two ways: *text-informed pruning*
(keep the image tokens the text attends to most) and *modality-aware merging* (ToMe's bipartite soft
matching within the image tokens, on the attention keys). A vision-only model has no text, so only the
merging carries over, and that is what ToR_SSM's ``pumer`` does. One step removing r tokens:

1. metric: the previous block's mixer output, ReLU-clipped (ToR_SSM ``metrics='clip'``: the wrapped layer's
   output hidden states ``clamp(min=0)``), class token removed, rows L2-normalised;
2. set A = even positions, set B = odd positions; each A token finds its most similar B token (cosine) and
   the r best-matched A tokens merge into their matches;
3. merge: the plain mean of a destination and the tokens merged into it at this step (ToR_SSM and PuMer
   both call ``merge_wavg`` without sizes, so every step starts from size 1);
4. order: ToR_SSM scatters the merged tokens back to their original positions (``unmerge``) and drops the
   emptied rows, so the survivors keep their original order, a merged token at its destination's place;
   the class token (language Mamba has none) is re-inserted at floor(pos·(L−r)/L), R-MeeTo's rule;
5. the residual stream is reduced with the same map (ToR_SSM runs the same strategy on it).

Parameters, with the source each default follows and the alternative:
- ``metric="clip"`` (ToR_SSM); ``"hidden"``: the unclipped mixer output, the closest thing to PuMer's own
  metric (the attention keys, which Mamba has not);
- ``ordered=True`` (ToR_SSM); ``False``: PuMer's (and ToMe's) own layout ``[unmerged A, B]``, the unmerged
  A tokens by position, the class token re-inserted among them by R-MeeTo's unordered rule
  floor(pos·(|A|−r)/|A|), as ``tome``;
- ``weighted=False`` (PuMer and ToR_SSM: plain means); ``True``: size-weighted means (ToMe with sizes);
- ``pairing="match"``: each merged A token goes to its own best match, as ToMe and PuMer do;
  ``"released"``: ToR_SSM's pairing. Its ``bipartite_soft_matching`` gathers the destinations in match-score
  order (``dst_idx = node_idx.gather(src_idx)``) and only then sorts the sources by position
  (``src_idx.sort``), so the i-th source *by position* goes to the destination of the i-th *best edge*: the
  same tokens are removed and the same tokens receive them, but mostly the wrong ones into which.

Where vimtr departs from the released code: ToR_SSM finds the emptied rows by testing every row for all
zeros (``merge_values.abs().sum(-1) != 0``), which would also drop a genuine all-zero token and then fail
to reshape; vimtr keeps the plan's indices. ToR_SSM normalises without an epsilon, so an all-negative
(all-zero after clipping) row gives NaN scores; vimtr normalises with one (such a row then matches nothing
better than anything else). r is limited to (L−1)//2 per step like ToR_SSM's ``min(r, t // 2)``, but
raising instead of capping silently.

Default schedule (every baseline): the reducing blocks of R-MeeTo (interval 2), r derived from
``flops_reduction=0.3``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from vimtr.reduction.base import TokenReducer
from vimtr.reduction.merge import Plan, proportional_cls_pos, split_cls
from vimtr.reduction.rmeeto import RMeeTo


class PuMer(TokenReducer):
    name = "pumer"
    PARAMS = {"metric": "clip", "ordered": True, "weighted": False, "pairing": "match"}

    max_remove = RMeeTo.max_remove  # (L−1)//2: every merged A token needs a B token

    def check_params(self):
        p = self.params
        if p["metric"] not in ("clip", "hidden"):
            raise ValueError(f"pumer: metric must be 'clip' (ReLU-clipped mixer output, ToR_SSM) or 'hidden' "
                             f"(unclipped), got {p['metric']!r}")
        for key in ("ordered", "weighted"):
            if not isinstance(p[key], bool):
                raise ValueError(f"pumer: {key} must be True or False, got {p[key]!r}")
        if p["pairing"] not in ("match", "released"):
            raise ValueError(f"pumer: pairing must be 'match' (each source to its best match) or 'released' "
                             f"(ToR_SSM's sources-by-position pairing), got {p['pairing']!r}")
        self.weighted = p["weighted"]

    def plan(self, block, state, r):
        _, h = split_cls(state.hidden, state.cls_index)
        c, L = state.cls_index, state.length
        with torch.no_grad():
            metric = h.float().clamp(min=0) if self.params["metric"] == "clip" else h.float()
            m = F.normalize(metric, dim=-1)  # with an epsilon: a clipped row may be all zero
            a, b = m[:, 0::2], m[:, 1::2]
            node_max, node_idx = (a @ b.transpose(-1, -2)).max(dim=-1)
            edge = node_max.argsort(dim=-1, descending=True)
            src_a, unm_a = edge[:, :r], edge[:, r:]
            dst_b = node_idx.gather(1, src_a)
            if self.params["pairing"] == "released":  # ToR_SSM sorts the sources after pairing them
                src_a = src_a.sort(dim=1).values
            n_a, n_b = a.shape[1], b.shape[1]
            b_seq = (2 * torch.arange(n_b, device=m.device) + 1).expand(m.shape[0], n_b)
            if self.params["ordered"]:
                keep = torch.cat((2 * unm_a, b_seq), dim=1).sort(dim=1).values
                # keep is sorted: a destination's output position is its rank there
                dst = torch.searchsorted(keep, (2 * dst_b + 1).contiguous())
                cls_pos = proportional_cls_pos(c, L, r)
            else:
                keep = torch.cat((2 * unm_a.sort(dim=1).values, b_seq), dim=1)
                dst = (n_a - r) + dst_b
                cls_pos = None if c is None else (c * (n_a - r)) // n_a
        return Plan(keep=keep, src=2 * src_a, dst=dst, cls_pos=cls_pos)

    def overhead_macs(self, length, r):
        # R-MeeTo's accounting of the same matching (norm, A·B scores, merge) plus the clipping
        return RMeeTo.overhead_macs(self, length, r) + length * self.embed_dim
