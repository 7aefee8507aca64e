"""The reducer every method builds on: schedule handling, validation, the trace. Methods add a plan."""
from __future__ import annotations

import torch

from vimtr.models.token_state import AUX_KEYS, TokenState
from vimtr.reduction.merge import Plan, apply_to_state

COMMON_PARAMS = ("r", "interval", "odd", "flops_reduction", "trace_source")


def merge_blocks(depth: int, interval: int, odd: bool) -> list[int]:
    """R-MeeTo's rule, used by every method: block i reduces when i > 0 and i % interval == 0
    (``odd``: (i + 1) % interval == 0). Depth 24, interval 2 gives blocks 2, 4, ..., 22."""
    return [i for i in range(1, depth) if (i + int(odd)) % interval == 0]


class TokenReducer:
    """A reduction method: ``plan`` says what to do at one step; this class does everything else.

    Subclasses set ``name``, ``PARAMS`` (their own parameters with defaults), ``needs_aux`` (whether
    the plan reads Δ/B/C of the previous block's mixer), and implement :meth:`plan`. The schedule is
    a list ``self.r`` with the number of tokens to remove at the start of each block.
    """

    name = ""
    PARAMS: dict = {}
    needs_aux = False
    aligns_scan = False  # True: track original positions so that later scans span the gaps (ToP-ViM's HSA)
    weighted = True  # size-weighted means (False: plain means)

    def __init__(self, model, *, r=None, interval=2, odd=False, flops_reduction=None, trace_source=False,
                 **params):
        self.depth = len(model.layers)
        self.num_tokens = self._initial_tokens(model)
        self.cls_start = model.initial_cls_index
        self.embed_dim = model.embed_dim
        # Video models (VideoMamba K400: class token first, T·HW frame-major tokens) may have their own rules.
        self.video = hasattr(model, "temporal_pos_embedding")
        self.trace_source = bool(trace_source)
        self.params = {**self.PARAMS, **params}
        self.check_params()
        if not isinstance(interval, int) or isinstance(interval, bool) or interval < 1:
            raise ValueError(f"{self.name}: interval must be an integer >= 1, got {interval!r}")
        self.interval, self.odd = interval, bool(odd)
        if r is not None and flops_reduction is not None:
            raise ValueError(f"{self.name}: give either r=... or flops_reduction=..., not both")
        if r is None and flops_reduction is None:
            r, flops_reduction = self.default_schedule()
        self.requested_flops_reduction = flops_reduction
        if flops_reduction is not None:
            from vimtr.reduction.schedule import schedule_for_flops  # avoids a cycle: schedule uses flops

            self.r = schedule_for_flops(model, self, flops_reduction)
        else:
            self.r = self.expand_r(r)
        self.lengths = self.simulate(self.r)  # validates the schedule too

    # ------------------------------------------------------------------ hooks for subclasses
    def default_schedule(self):
        """(r, flops_reduction) used when neither is given. Documented per method."""
        return None, 0.3

    def check_params(self):
        pass

    def max_remove(self, length: int) -> int:
        """The most tokens one step may remove from a sequence of ``length`` (class token included)."""
        return length - 2  # keep the class token and at least one patch token

    def effective_r(self, block: int, length: int, r: int) -> int:
        """The r actually applied (R-MeeTo caps it); raise if the request is impossible."""
        if r > self.max_remove(length):
            raise ValueError(f"{self.name}: the schedule removes {r} tokens at block {block}, but that block "
                             f"has {length} tokens (class token included) and at most "
                             f"{self.max_remove(length)} can go; lower r or flops_reduction")
        return r

    def plan(self, block: int, state: TokenState, r: int) -> Plan:
        raise NotImplementedError

    def overhead_macs(self, length: int, r: int) -> float:
        """Multiply-accumulates one reduction step costs (for the FLOPs counter)."""
        return 0.0

    # ------------------------------------------------------------------ schedule
    def _initial_tokens(self, model) -> int:
        return getattr(model, "num_tokens", model.num_patches + 1)

    def expand_r(self, r) -> list[int]:
        if isinstance(r, bool) or not isinstance(r, (int, list, tuple)):
            raise TypeError(f"{self.name}: r must be an int (tokens per reducing block) or a list of "
                            f"{self.depth} ints (tokens removed at the start of each block), got {r!r}")
        if isinstance(r, int):
            if r < 0:
                raise ValueError(f"{self.name}: r must be >= 0, got {r}")
            blocks = merge_blocks(self.depth, self.interval, self.odd)
            return [r if i in blocks else 0 for i in range(self.depth)]
        r = list(r)
        if len(r) != self.depth or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in r):
            raise ValueError(f"{self.name}: a list r must hold {self.depth} non-negative ints (one per block), "
                             f"got {r}")
        if r[0] != 0:
            raise ValueError(f"{self.name}: r[0] must be 0: reduction happens between blocks, and block 0 "
                             "has no previous block to read")
        return r

    def simulate(self, r: list[int]) -> list[int]:
        """Token count entering each block (after its reduction step); raises on an impossible schedule."""
        length, out, self.applied = self.num_tokens, [], []
        for i, ri in enumerate(r):
            ri = self.effective_r(i, length, ri) if ri else 0
            ri = max(ri, 0)
            self.applied.append(ri)
            length -= ri
            out.append(length)
        return out

    # ------------------------------------------------------------------ the hook
    aux_keys: frozenset | None = None  # the aux keys the plan reads, if not all (the mixer may skip others)

    def requests(self, block: int) -> frozenset:
        """What block ``block``'s mixer should expose in ``aux`` (names from
        :data:`vimtr.models.token_state.AUX_KEYS`): what the next reduction step's plan reads, if there is one."""
        if self.needs_aux and block + 1 < self.depth and self.applied[block + 1] > 0:
            return self.aux_keys or AUX_KEYS
        return frozenset()

    def __call__(self, block: int, state: TokenState) -> TokenState:
        state.materialise()  # plans read hidden: a merge still pending (no block ran since) goes in first
        if block == 0:
            B, L = state.hidden.shape[:2]
            state.sizes = torch.ones(B, L, 1, device=state.hidden.device, dtype=torch.float32)
            if self.trace_source:
                state.source = self._initial_source(state)
            if self.aligns_scan:  # the blocks' scans then span the gaps removed tokens leave (TokenState)
                state.positions = torch.arange(L, device=state.hidden.device, dtype=torch.float32).expand(B, L)
            self._tokens, self._cls = [], []
        r = self.applied[block]
        if r > 0:
            state = apply_to_state(state, self.plan(block, state, r), weighted=self.weighted)
        self._tokens.append(state.length)
        self._cls.append(state.cls_index)
        state.requests = self.requests(block)
        return state

    def _initial_source(self, state: TokenState) -> torch.Tensor:
        """(B, L, P) one-hot map from tokens to input patches; the class token's row is all zero."""
        B, L = state.hidden.shape[:2]
        P = L - (state.cls_index is not None)
        eye = torch.eye(P, device=state.hidden.device)
        if state.cls_index is not None:
            c = state.cls_index
            eye = torch.cat((eye[:c], eye.new_zeros(1, P), eye[c:]), dim=0)
        return eye.unsqueeze(0).expand(B, L, P).contiguous()

    def finish(self, model, state: TokenState):
        trace = {"tokens": list(self._tokens), "cls_index": list(self._cls), "sizes": state.sizes.squeeze(-1)}
        if self.trace_source:
            trace["source"] = state.source
        model.reduction_trace = trace

    def describe(self) -> dict:
        return {"method": self.name, "params": {"r": list(self.r), "interval": self.interval, "odd": self.odd,
                                                "trace_source": self.trace_source, **self.params}}
