"""A row map: which input rows make each output row of a token sequence, as one gather plus weighted
averages. The add + RMSNorm op takes one to shorten both streams on the way in (see
:func:`vimtr.ops.add_rms_norm_fn`); it says nothing about how the rows were chosen.

Rows are those of the flattened (B·L, C) input and the flattened (B·T, C) output::

    out[t] = x[keep[t]] + Σ_{i: dst[i] = t} factor[i] · (x[src[i]] − x[keep[t]])

i.e. output row t starts from input row ``keep[t]`` and moves towards each source row averaged into it,
by that source's factor (w_i / W for a weighted mean of the row and its sources with total weight W).
Written as differences, identical rows average to themselves exactly. Sources are added in index order.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class RowMap:
    keep: torch.Tensor  # (B·T,) long: the input row each output row starts from
    src: torch.Tensor | None = None  # (r,) long: input rows averaged into an output row (None: none)
    dst: torch.Tensor | None = None  # (r,) long: the output row each source goes into
    factor: torch.Tensor | None = None  # (r,) float: each source's weight in that average
    batch: int = 1  # B: the output has keep.numel() // B rows per sequence

    def __post_init__(self):
        if self.keep.dim() != 1 or self.keep.numel() % self.batch:
            raise ValueError(f"RowMap: keep must be a 1-D tensor of B·T row indices (B = {self.batch}), got "
                             f"shape {tuple(self.keep.shape)}")
        merged = [t is not None for t in (self.src, self.dst, self.factor)]
        if any(merged) and not all(merged):
            raise ValueError("RowMap: src, dst and factor go together (all three or none)")
        if all(merged) and not (self.src.dim() == self.dst.dim() == self.factor.dim() == 1
                                and self.src.shape == self.dst.shape == self.factor.shape):
            raise ValueError(f"RowMap: src, dst and factor must be 1-D of one length, got {tuple(self.src.shape)}, "
                             f"{tuple(self.dst.shape)}, {tuple(self.factor.shape)}")

    @property
    def length(self) -> int:
        """Rows per sequence in the output (T)."""
        return self.keep.numel() // self.batch

    @property
    def merges(self) -> bool:
        return self.src is not None and self.src.numel() > 0

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """The map carried out on x (B, L, C) with torch ops: (B, T, C), differentiable, any device."""
        B, L, C = x.shape
        if B != self.batch:
            raise ValueError(f"RowMap: made for batch {self.batch}, applied to a tensor of shape {tuple(x.shape)}")
        x2 = x.reshape(B * L, C)
        out = x2.index_select(0, self.keep)  # a new tensor
        if self.merges:
            diff = (x2.index_select(0, self.src) - out.index_select(0, self.dst)) * self.factor.to(x.dtype)[:, None]
            out.index_add_(0, self.dst, diff)
        return out.view(B, self.length, C)
