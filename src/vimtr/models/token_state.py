"""The token state a backbone hands between its blocks, and the hook that may rewrite it.

A backbone's forward loop knows one optional collaborator, ``model.reducer``: before block ``i`` it is
called as ``state = reducer(i, state)``. With no reducer the loop is exactly the official model. Token
reduction methods (``vimtr.reduction``, installed by ``vimtr.reduce``) are reducers; they never touch the
weights. A reducer asks for what it needs from the next block through the state: ``requests`` names what
that block's mixer should expose in ``aux``; ``pending`` is a row map for the next block to apply.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch

# What a mixer can expose in ``aux``, in token order (see vimtr.models.layers.BiMamba.forward):
# Δ per direction (B, E, L), B and C per direction (B, L, N), and Σ over channels of both Δ (B, L).
AUX_KEYS = frozenset({"delta_f", "delta_b", "B_f", "B_b", "C_f", "C_b", "delta_sum"})


@dataclass
class TokenState:
    hidden: torch.Tensor  # (B, L, C): the previous mixer's output (or the embedding before block 0)
    residual: torch.Tensor | None  # (B, L, C) fp32 residual stream; None before block 0
    cls_index: int | None  # where the class token sits now (None for a model without one)
    sizes: torch.Tensor | None = None  # (B, L, 1): how many input patches each token stands for
    source: torch.Tensor | None = None  # (B, L, P): which input patches each token stands for
    aux: dict = field(default_factory=dict)  # what the previous block's mixer exposed on request
    requests: frozenset = frozenset()  # what the next block's mixer should expose in aux (AUX_KEYS)
    # Set by a backbone whose blocks take a row map into their first op (the residual add + RMSNorm): a
    # reducer may then return ``hidden``/``residual`` as they are with the map in ``pending`` (a
    # :class:`vimtr.ops.RowMap`), and the next block applies it on the way; sizes, source and cls_index are
    # reduced already. Saves a read and a write of both streams per reduction step.
    fuse_merge: bool = False
    pending: object | None = None
    # (B, L) float: where each token sat in the original sequence, kept by a reducer that wants the blocks'
    # scans to span the gaps removed tokens left (ToP-ViM's hidden-state alignment); None: no gaps.
    positions: torch.Tensor | None = None

    def decay_steps(self):
        """(steps_f, steps_b), each (B, L): how many original positions the forward scan's update into token
        t spans (positions[t] − positions[t−1]) and the backward scan's (positions[t+1] − positions[t]);
        at least 1 (a class token re-inserted between kept tokens makes its own neighbour step 1). None
        without ``positions``."""
        if self.positions is None:
            return None
        gaps = (self.positions[:, 1:] - self.positions[:, :-1]).clamp(min=1)
        one = gaps.new_ones(gaps.shape[0], 1)
        return torch.cat((one, gaps), dim=1), torch.cat((gaps, one), dim=1)

    @property
    def length(self) -> int:
        return self.pending.length if self.pending is not None else self.hidden.shape[1]

    def materialise(self) -> "TokenState":
        """Apply a pending row map to ``hidden`` and ``residual`` now (for code that reads them directly)."""
        if self.pending is not None:
            self.hidden, self.residual = self.pending.apply(self.hidden), self.pending.apply(self.residual)
            self.pending = None
        return self


class Reducer(Protocol):
    """What a backbone expects of ``model.reducer``."""

    def __call__(self, block_index: int, state: TokenState) -> TokenState:
        """Called before block ``block_index``; returns the (possibly reduced) state, with ``requests``
        set to what block ``block_index``'s mixer should expose for the next call."""
