"""The token state a backbone hands between its blocks, and the hook that may rewrite it.

A backbone's forward loop knows one optional collaborator, ``model.reducer``: before block ``i`` it is
called as ``state = reducer(i, state)``. With no reducer the loop is exactly the official model. Token
reduction methods (``vimtr.reduce``) are reducers; they never touch the weights.
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

    @property
    def length(self) -> int:
        return self.hidden.shape[1]


class Reducer(Protocol):
    """What a backbone expects of ``model.reducer``."""

    def wants_aux(self, block_index: int) -> bool:
        """Should block ``block_index``'s mixer expose Δ/B/C (``state.aux``) for the next call?"""

    def __call__(self, block_index: int, state: TokenState) -> TokenState:
        """Called before block ``block_index``; returns the (possibly reduced) state."""
