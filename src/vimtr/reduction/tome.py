"""ToMe: bipartite soft matching as published for ViTs (Bolya et al., ICLR 2023; facebookresearch/ToMe
``tome/merge.py``), run naively on Vision Mamba, i.e. without restoring token order.

At a reduction step (before block i, i.e. right after block i−1):
1. metric: the previous block's mixer output (ToMe uses the attention keys; Mamba has none, and this is
   what R-MeeTo's ``metric="x"`` uses), rows L2-normalised;
2. set A = even positions, set B = odd positions; each A token finds its most similar B token (cosine) and
   the r best-matched A tokens merge into their matches;
3. merge: size-weighted mean, destination included (ToMe's ``merge_wavg``); hidden and residual streams
   with the same map. Mamba has no attention logits, so ToMe's proportional attention has no analogue;
4. output order is ToMe's concatenation ``[unmerged A, B]`` — **not** the original order; that is the point
   of this baseline.

Parameters (ToMe's own behaviour is ``cls_in_matching=True``, with ``order="index"`` when the model has a
class token and ``order="score"`` when it has none):

- ``order="index"`` (default): the unmerged A tokens keep their relative (index) order, as ToMe's
  ``class_token=True`` path (``unm_idx.sort``, the one every timm ViT takes). ``order="score"``: they stay
  in descending order of their best match, as ToMe's ``class_token=False`` path. On a sequence without a
  class token ToMe therefore uses ``"score"``; the default differs there, so that one layout serves every
  model: the groups of a first step are the same either way, but the layout decides the next step's
  even/odd split, so over several steps the groups drift apart (``tests/test_baselines.py``).
- ``cls_in_matching=False`` (default): the class token is taken out before the split, A/B are the even/odd
  positions of the class-free sequence (as R-MeeTo does, so the rule is the same for a first and a middle
  class token), and the class token is re-inserted at floor(pos·(|A|−r)/|A|) among the unmerged A tokens,
  R-MeeTo's rule for its unordered merge (a first class token stays first; Vim's middle one moves to the
  end of the unmerged-A block at the first step, then drifts proportionally).
  ``cls_in_matching=True``: ToMe's own rule: the class token keeps its place in the sequence, so it counts
  in the even/odd split (ToMe's is at index 0, in A), it never merges (its row of scores, or its column if it
  falls in B, is −inf) and it lands where the concatenation puts it. The default differs because ToMe's rule
  needs a class token at index 0 under ``order="index"``: a middle class token's place among the sorted
  unmerged A tokens depends on the sample, and vimtr tracks one class-token index per batch. So
  ``cls_in_matching=True`` with ``order="index"`` refuses a class token elsewhere than at index 0; with
  ``order="score"`` the class token is the last unmerged A token (or stays in the B block), which is the
  same for every sample.

r is limited to (L−1)//2 per step (ToMe's "at most 50%" with the class token protected); ToMe caps a
larger r silently, vimtr raises so that a schedule never means something else than it says. Default
schedule (every baseline): the reducing blocks of R-MeeTo (interval 2: blocks 2, 4, ...), r derived from
``flops_reduction=0.3``.
"""
from __future__ import annotations

import torch

from vimtr.reduction.base import TokenReducer
from vimtr.reduction.merge import Plan, bipartite_plan, normalise_rows, split_cls
from vimtr.reduction.rmeeto import RMeeTo

ORDERS = ("index", "score")


class ToMe(TokenReducer):
    name = "tome"
    PARAMS: dict = {"order": "index", "cls_in_matching": False}

    overhead_macs = RMeeTo.overhead_macs  # same work as R-MeeTo's metric "x": norm, A·B scores, the merge

    def check_params(self):
        p = self.params
        if p["order"] not in ORDERS:
            raise ValueError(f"tome: order must be 'index' (unmerged tokens by position, ToMe with a class "
                             f"token) or 'score' (by match score, ToMe without one), got {p['order']!r}")
        if not isinstance(p["cls_in_matching"], bool):
            raise ValueError(f"tome: cls_in_matching must be True or False, got {p['cls_in_matching']!r}")
        if p["cls_in_matching"] and p["order"] == "index" and self.cls_start not in (None, 0):
            raise ValueError(f"tome: cls_in_matching=True with order='index' is ToMe's layout for a class token at "
                             f"index 0; this model's class token is at {self.cls_start}, where its place among the "
                             "sorted tokens would differ from sample to sample. Use cls_in_matching=False (vimtr's "
                             "rule) or order='score'")

    def max_remove(self, length: int) -> int:
        # (L−1)//2: every merged A token needs a B token to go to. With the class token in the matching, a
        # 3-token sequence may have the class token as its only B token: nothing can merge then.
        if self.params["cls_in_matching"] and length < 4:
            return 0
        return RMeeTo.max_remove(self, length)

    def plan(self, block, state, r):
        if self.params["cls_in_matching"] and state.cls_index is not None:
            return self._plan_cls_in_matching(state, r)
        _, metric = split_cls(state.hidden, state.cls_index)
        plan = bipartite_plan(metric, r, ordered=False, cls_index=state.cls_index, length=state.length)
        if self.params["order"] == "index":
            # bipartite_plan's unordered output lists the unmerged A tokens by score (R-MeeTo); ToMe with a class
            # token sorts them by index. Destinations index the B block behind them: sorting leaves them valid.
            n_unm = plan.keep.shape[1] - (metric.shape[1] // 2)
            plan.keep[:, :n_unm] = plan.keep[:, :n_unm].sort(dim=1).values
        return plan

    def _plan_cls_in_matching(self, state, r) -> Plan:
        """ToMe's matching over the whole sequence, the class token protected where it stands."""
        c = state.cls_index
        with torch.no_grad():
            m = normalise_rows(state.hidden.float())
            a, b = m[:, 0::2], m[:, 1::2]
            scores = a @ b.transpose(-1, -2)
            if c % 2 == 0:
                scores[:, c // 2, :] = -torch.inf  # never merged (ToMe's scores[..., 0, :] = -inf)
            else:
                scores[:, :, c // 2] = -torch.inf  # never merged into
            node_max, node_idx = scores.max(dim=-1)
            edge = node_max.argsort(dim=-1, descending=True)
            unm, src = edge[:, r:], edge[:, :r]
            if self.params["order"] == "index":
                unm = unm.sort(dim=1).values
            n_unm, n_b = unm.shape[1], b.shape[1]
            # The class token's output position: an A class token's −inf score puts it last when sorted by score
            # and first when sorted by index (only allowed at index 0); a B class token stays in the B block.
            cls_out = (0 if self.params["order"] == "index" else n_unm - 1) if c % 2 == 0 else n_unm + c // 2
            out = torch.cat((2 * unm, (2 * torch.arange(n_b, device=m.device) + 1).expand(m.shape[0], n_b)), dim=1)
            keep = torch.cat((out[:, :cls_out], out[:, cls_out + 1:]), dim=1)
            keep = keep - (keep > c).long()  # full-sequence index -> class-free index
            src_full = 2 * src
            dst_out = n_unm + node_idx.gather(1, src)  # output position of each source's B token
        return Plan(keep=keep, src=src_full - (src_full > c).long(), dst=dst_out - (dst_out > cls_out).long(),
                    cls_pos=cls_out)
