"""R-MeeTo (Shi et al., arXiv 2412.12496; NUS-HPC-AI-Lab/R-MeeTo ``image_task/R_MeeTo/merge.py``).

Order-preserving bipartite token merging at the start of blocks 2, 4, ..., 22 (``interval=2``):
- metric: the previous block's mixer output (``metric="x"``), class token removed, rows L2-normalised;
- set A = even positions, set B = odd positions; each A token's best (``kth``) B match by ``distance``;
- the r best-matched A tokens merge into their matches: size-weighted mean, destination included;
- ``ordered=True``: survivors keep their original order; the class token is re-inserted at
  floor(pos·(L−r)/L); hidden and residual streams merged with the same sizes; r capped at (L−1)//2.
  (Held by tests/test_golden.py and tests/test_method_decisions.py: groups, class position, weighted means.)

Default schedule: the paper's r (5 for Tiny-width models, 11 for wider ones), constant per event.
``compare=c`` reproduces the official code's last-merge-block rule (the last merging block cuts the
sequence to 197 − 11·c tokens), which released checkpoints such as Vim-Ti r=5 were trained with;
``compare=None`` (default) is constant r, the method as published.

Video models (VideoMamba K400; R-MeeTo ``video_task/models``: ``R_MeeTo_Mamba`` + ``R_MeeTo_merge.py``):
the same ordered merge on the 1 + T·HW frame-major tokens with the class token first (index 0, where the
proportional rule keeps it), the hidden and residual streams merged with the pre-merge sizes, r capped at
(L−1)//2. What differs from the image code: the schedule is always a constant r at blocks 2, 4, ...
(the video model has no ``compare`` override, so ``compare`` is refused), the matching always takes the
best match (no ``choose``) and sums (no ``merge_mode``), and the default r is 88, the value of
R-MeeTo's K400 checkpoints (CKPT.md: VideoMamba-Ti/S/M r=88 leave 601/601/249 tokens).

``metric`` ``"b"``/``"c"``/``"delta"`` use the previous mixer's B, C or Δ with both directions averaged
*in token order*; the official code flips the backward tensors along the feature axis instead (a
quirk, digest §7.7), which vimtr does not copy.
"""
from __future__ import annotations


from vimtr.reduction.base import TokenReducer
from vimtr.reduction.merge import bipartite_plan


class RMeeTo(TokenReducer):
    name = "rmeeto"
    PARAMS = {"ordered": True, "metric": "x", "distance": "cosine", "kth": 1, "prune": False, "compare": None}
    _METRICS = ("x", "b", "c", "delta")

    def check_params(self):
        p = self.params
        if p["metric"] not in self._METRICS:
            raise ValueError(f"rmeeto: metric must be one of {self._METRICS}, got {p['metric']!r}")
        if p["distance"] not in ("cosine", "l1", "l2"):
            raise ValueError(f"rmeeto: distance must be 'cosine', 'l1' or 'l2', got {p['distance']!r}")
        if not isinstance(p["kth"], int) or p["kth"] < 1:
            raise ValueError(f"rmeeto: kth must be an int >= 1 (1 = best match), got {p['kth']!r}")
        if p["compare"] is not None and (not isinstance(p["compare"], int) or p["compare"] < 0):
            raise ValueError(f"rmeeto: compare must be None or an int >= 0, got {p['compare']!r}")
        if p["compare"] is not None and self.video:
            raise ValueError("rmeeto: compare (the image code's last-merge-block override) does not exist in "
                             "R-MeeTo's video model, which merges a constant r at every merging block; drop it")
        self.needs_aux = p["metric"] != "x"

    def default_schedule(self):
        if self.video:
            return 88, None
        return (5 if self.embed_dim <= 192 else 11), None

    def max_remove(self, length: int) -> int:
        return (length - 1) // 2

    def effective_r(self, block, length, r):
        if r > length - 1:  # more than the block's patch tokens: a mistake, not something to cap
            raise ValueError(f"rmeeto: the schedule removes {r} tokens at block {block}, but that block has "
                             f"only {length - 1} patch tokens (R-MeeTo caps r at (L-1)//2 = "
                             f"{self.max_remove(length)}); lower r or flops_reduction")
        c = self.params["compare"]
        if c is not None and self.depth - block <= self.interval:
            r = length - (197 - 11 * c)  # the official last-merge-block override, literally
        return min(r, self.max_remove(length))  # the official cap, not an error

    def _metric(self, state):
        m = self.params["metric"]
        if m == "x":
            return state.hidden
        aux = state.aux
        if m == "delta":
            return ((aux["delta_f"] + aux["delta_b"]) / 2).transpose(1, 2)
        key = m.upper()
        return (aux[f"{key}_f"] + aux[f"{key}_b"]) / 2

    def plan(self, block, state, r):
        p = self.params
        return bipartite_plan(self._metric(state), r, p["distance"], p["kth"], p["ordered"], p["prune"],
                              state.cls_index, state.length, metric_has_cls=state.cls_index is not None)

    def overhead_macs(self, length, r):
        # R-MeeTo's own accounting (calculate_flops_designer_ToMe, metric X): norm + A·B scores + merge.
        C = self.embed_dim
        return 6 * length * C + 2 * C * (length / 2) ** 2 + r * C
