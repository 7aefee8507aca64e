"""ToMe: bipartite soft matching as published for ViTs (Bolya et al., ICLR 2023; facebookresearch/ToMe
``tome/merge.py``), run naively on Vision Mamba, i.e. without restoring token order.

At a reduction step (before block i, i.e. right after block i−1):
1. metric: the previous block's mixer output (ToMe uses the attention keys; Mamba has none, and this is
   what R-MeeTo's ``metric="x"`` uses), class token removed, rows L2-normalised;
2. set A = even positions, set B = odd positions (counted after the class token is taken out, as
   R-MeeTo does, so the rule is the same for a first and a middle class token); each A token finds its
   most similar B token (cosine) and the r best-matched A tokens merge into their matches;
3. merge: size-weighted mean, destination included (ToMe's ``merge_wavg``); hidden and residual streams
   with the same map. Mamba has no attention logits, so ToMe's proportional attention has no analogue;
4. output order is ToMe's concatenation ``[unmerged A, B]``. With a class token ToMe sorts the unmerged
   A tokens by index (``unm_idx.sort``, the ``class_token=True`` path every timm ViT takes), so they keep
   their relative order; B tokens (with whatever merged into them) follow in their own order. The
   sequence as a whole is therefore **not** in the original order; that is the point of this baseline.

Class token (the rule is vimtr's; ToMe's own class token is at index 0, protected by a −inf score, and its
``unm_idx`` sort keeps it at 0): the class token never merges and is re-inserted at
floor(pos·(|A|−r)/|A|) among the unmerged A tokens, R-MeeTo's rule for its unordered ("no order") merge.
A class token at index 0 (VideoMamba) therefore stays at 0, exactly as in ToMe; Vim's middle class
token moves to the end of the unmerged-A block at the first step and then drifts proportionally.

r is limited to (L−1)//2 per step (ToMe's "at most 50%" with the class token protected); ToMe caps a
larger r silently, vimtr raises so that a schedule never means something else than it says.

Parameters: none of its own. Default schedule (every baseline): the reducing blocks of R-MeeTo (interval
2: blocks 2, 4, ...), r derived from ``flops_reduction=0.3``.
"""
from __future__ import annotations

from vimtr.reduction.base import TokenReducer
from vimtr.reduction.merge import bipartite_plan, split_cls
from vimtr.reduction.rmeeto import RMeeTo


class ToMe(TokenReducer):
    name = "tome"
    PARAMS: dict = {}

    max_remove = RMeeTo.max_remove  # (L−1)//2: every merged A token needs a distinct B token to go to
    overhead_macs = RMeeTo.overhead_macs  # same work as R-MeeTo's metric "x": norm, A·B scores, the merge

    def plan(self, block, state, r):
        _, metric = split_cls(state.hidden, state.cls_index)
        plan = bipartite_plan(metric, r, ordered=False, cls_index=state.cls_index, length=state.length)
        # bipartite_plan's unordered output lists the unmerged A tokens by score (R-MeeTo); ToMe sorts them
        # by index. Destinations index the B block behind them, so sorting the A block leaves them valid.
        n_unm = plan.keep.shape[1] - (metric.shape[1] // 2)
        plan.keep[:, :n_unm] = plan.keep[:, :n_unm].sort(dim=1).values
        return plan
