"""Positional pruning: drop a fixed spatial pattern of patch tokens, the same for every image (content-blind).

The baseline that says how much of a method's accuracy position alone explains: on an image whose
corners are always background (a digit centred on a blank canvas), dropping the first tokens in raster
order keeps what the informed methods fight for. Every image loses the same tokens, whatever it shows.

At each reducing block, of the T patch tokens (class token excluded, in their current order, which
survivors keep: the raster order of what is left):

- ``pattern="first"`` (default): the first r;
- ``pattern="stride"``: every k-th, the k-th, 2k-th, … r·k-th token (indices k−1, 2k−1, …), with
  ``k = stride`` when given (the step must have r·k ≤ T), else the largest k that fits, T // r, which
  spreads the r drops over the whole sequence.

The class token is kept where it stands among the survivors (``cls="order"``, default): one place down
for each dropped token that was before it, as if nothing but the dropped tokens had gone. ``cls="proportional"``
re-inserts it at floor(pos·(L−r)/L) instead (R-MeeTo's rule, which MTR and ``random`` use). The two agree
when the drops are spread around the class token (``stride``; MTR's, random's), but not for ``first``,
whose drops all come before it: there R-MeeTo's rule moves the class token ~r/2 places away from the
patches it sat between, and on the fragile bundled ``vim_digits`` that alone takes the accuracy at 30%
fewer FLOPs from 98.61% to 28.33% (``docs/demo.md``). The baseline is meant to show what position alone
keeps, so by default it keeps the class token's place.
Nothing is computed to choose the tokens, so a step costs no FLOPs beyond the smaller blocks: at a
``flops_reduction`` it removes exactly the tokens ``random`` does. Default schedule (every baseline): the
reducing blocks of R-MeeTo (interval 2), r derived from ``flops_reduction=0.3``.
"""
from __future__ import annotations

import torch

from vimtr.reduction.base import TokenReducer
from vimtr.reduction.merge import Plan, proportional_cls_pos

PATTERNS = ("first", "stride")
CLS_RULES = ("order", "proportional")


class Positional(TokenReducer):
    name = "positional"
    PARAMS = {"pattern": "first", "stride": None, "cls": "order"}

    def check_params(self):
        pattern, stride = self.params["pattern"], self.params["stride"]
        if self.params["cls"] not in CLS_RULES:
            raise ValueError(f"positional: cls must be one of {', '.join(map(repr, CLS_RULES))}, got "
                             f"{self.params['cls']!r}")
        if pattern not in PATTERNS:
            raise ValueError(f"positional: pattern must be one of {', '.join(map(repr, PATTERNS))}, got {pattern!r}")
        if stride is not None:
            if pattern != "stride":
                raise ValueError(f"positional: stride={stride!r} applies to pattern='stride' only; pattern "
                                 f"{pattern!r} drops the first r tokens")
            if isinstance(stride, bool) or not isinstance(stride, int) or stride < 1:
                raise ValueError(f"positional: stride must be an integer >= 1 (or None: T // r at each step), "
                                 f"got {stride!r}")

    def effective_r(self, block: int, length: int, r: int) -> int:
        r = super().effective_r(block, length, r)
        stride, patches = self.params["stride"], length - (self.cls_start is not None)
        if stride is not None and r * stride > patches:
            raise ValueError(f"positional: stride {stride} drops at most {patches // stride} of the {patches} patch "
                             f"tokens at block {block}, but the schedule removes {r} there; lower stride (or "
                             f"leave it None), r or flops_reduction")
        return r

    def dropped(self, patches: int, r: int) -> torch.Tensor:
        """Indices (r,) of the class-free tokens one step drops from a sequence of ``patches``."""
        if self.params["pattern"] == "first":
            return torch.arange(r)
        k = self.params["stride"] or patches // r
        return torch.arange(1, r + 1) * k - 1

    def plan(self, block, state, r):
        B, L = state.hidden.shape[:2]
        T = L - (state.cls_index is not None)
        dropped = self.dropped(T, r)
        keep = torch.ones(T, dtype=torch.bool)
        keep[dropped] = False
        keep = keep.nonzero().squeeze(1).to(state.hidden.device).expand(B, -1)
        c = state.cls_index
        if c is None or self.params["cls"] == "proportional":
            return Plan(keep=keep, cls_pos=proportional_cls_pos(c, L, r))
        # Class-free index i sits before the class token when i < c: each such drop moves it one place down.
        return Plan(keep=keep, cls_pos=c - int((dropped < c).sum()))
