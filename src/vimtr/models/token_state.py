"""The token state a backbone hands between its blocks, and the hook that may rewrite it.

A backbone's forward loop knows one optional collaborator, ``model.reducer``: before block ``i`` it is
called as ``state = reducer(i, state)``. With no reducer the loop is exactly the official model. Token
reduction methods (``vimtr.reduction``, installed by ``vimtr.reduce``) are reducers; they never touch the weights.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch


@dataclass
class TokenState:
    hidden: torch.Tensor  # (B, L, C): the previous mixer's output (or the embedding before block 0)
    residual: torch.Tensor | None  # (B, L, C) fp32 residual stream; None before block 0
    cls_index: int | None  # where the class token sits now (None for a model without one)
    sizes: torch.Tensor | None = None  # (B, L, 1): how many input patches each token stands for
    source: torch.Tensor | None = None  # (B, L, P): which input patches each token stands for
    aux: dict = field(default_factory=dict)  # what the previous block's mixer exposed on request
    # Set by a backbone whose blocks can fold a reduction step's merge into their first op (the residual
    # add + RMSNorm): a reducer may then return ``hidden``/``residual`` unreduced with the merge in
    # ``pending`` (a :class:`vimtr.reduction.merge.PendingMerge`), and the next block applies it; sizes,
    # source and cls_index are reduced already. Saves a read and a write of both streams per step.
    fuse_merge: bool = False
    pending: object | None = None

    @property
    def length(self) -> int:
        return self.pending.length if self.pending is not None else self.hidden.shape[1]

    def materialise(self) -> "TokenState":
        """Apply a pending merge to ``hidden`` and ``residual`` now (for code that reads them directly)."""
        if self.pending is not None:
            self.hidden, self.residual = self.pending.apply(self.hidden), self.pending.apply(self.residual)
            self.pending = None
        return self


class Reducer(Protocol):
    """What a backbone expects of ``model.reducer``."""

    def wants_aux(self, block_index: int) -> bool:
        """Should block ``block_index``'s mixer expose Δ/B/C (``state.aux``) for the next call?"""

    def __call__(self, block_index: int, state: TokenState) -> TokenState:
        """Called before block ``block_index``; returns the (possibly reduced) state."""
