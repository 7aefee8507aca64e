"""Random pruning: drop r non-class tokens chosen uniformly at random (the floor every informed method must beat).

One step removing r tokens draws a uniformly random r-subset of the T patch tokens (``torch.randperm``)
and drops it; survivors keep their original order; the class token is kept and re-inserted at
floor(pos·(L−r)/L) (R-MeeTo's rule, as MTR).

Determinism (vimtr's choices; there is no source to follow):
- the generator is a CPU ``torch.Generator`` re-seeded with ``seed`` at block 0 of every forward, so a
  forward depends only on the seed and the input, the same on every device and in every call;
- one subset is drawn per step and shared by the whole batch: per-sample draws from one generator would
  make a sample's tokens depend on its batch (its place in it, and the batch size), and a sample would
  no longer give the same output alone and in a batch.

Parameters: ``seed=0``. Default schedule (every baseline): the reducing blocks of R-MeeTo (interval 2),
r derived from ``flops_reduction=0.3``.
"""
from __future__ import annotations

import torch

from vimtr.reduction.base import TokenReducer
from vimtr.reduction.merge import Plan, proportional_cls_pos


class RandomPrune(TokenReducer):
    name = "random"
    PARAMS = {"seed": 0}

    def __init__(self, model, **params):
        super().__init__(model, **params)
        self._generator = torch.Generator()  # CPU: the same draws whatever device the model is on

    def check_params(self):
        seed = self.params["seed"]
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"random: seed must be an int, got {seed!r}")

    def __call__(self, block, state):
        if block == 0:
            self._generator.manual_seed(self.params["seed"])
        return super().__call__(block, state)

    def plan(self, block, state, r):
        B, L = state.hidden.shape[:2]
        T = L - (state.cls_index is not None)
        keep = torch.randperm(T, generator=self._generator)[r:].sort().values
        keep = keep.to(state.hidden.device).expand(B, -1)
        return Plan(keep=keep, cls_pos=proportional_cls_pos(state.cls_index, L, r))
