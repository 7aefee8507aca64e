"""The pieces every reduction method shares, written once.

Every method, at a reduction step, describes what to do with the class-free sequence (the class
token is taken out first and put back afterwards) as a :class:`Plan`:

- ``keep`` (B, T'): which tokens survive, in output order;
- ``src`` / ``dst`` (B, r): tokens merged away and the output position each one is merged into
  (``None`` for pure pruning);
- ``cls_pos``: where the class token is re-inserted in the output;
- optionally ``weight``, per-token weights for this step's means instead of the sizes (EViT's
  score-weighted fusion), and ``residual``, a different plan for the residual stream (UTR merges there
  what it prunes from the hidden stream).

:func:`apply_plan` carries out a plan on any per-token tensor: hidden states, the residual stream,
sizes and sources all go through the same map, so they never disagree.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from vimtr.models.token_state import TokenState
from vimtr.ops import RowMap


@dataclass
class Plan:
    keep: torch.Tensor  # (B, T') long, indices into the class-free sequence
    src: torch.Tensor | None = None  # (B, r) long, indices into the class-free sequence
    dst: torch.Tensor | None = None  # (B, r) long, positions in ``keep`` (the output) they merge into
    cls_pos: int | None = None  # class-token index in the output (None: model without class token)
    weight: torch.Tensor | None = None  # (B, L, 1), class slot included: weights for the means, not sizes
    residual: "Plan | None" = None  # the plan for the residual stream, if it differs
    # (keep, src, dst) already as rows of the flattened streams (what _FlatPlan would compute from
    # full_indices), when the planner made them on the way; only valid while keep/src/dst are not changed.
    flat: tuple | None = None


def split_cls(x: torch.Tensor, cls_index: int | None):
    """(B, L, C) -> (class row (B, 1, C) or None, the other rows (B, L-1, C))."""
    if cls_index is None:
        return None, x
    return x[:, cls_index: cls_index + 1], torch.cat((x[:, :cls_index], x[:, cls_index + 1:]), dim=1)


def _gather(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """x (B, L, C), idx (B, n) -> x[b, idx[b, i], :] as (B, n, C).

    Written as one ``index_select`` of whole rows on the flattened (B·L, C) tensor: the same values as
    ``x.gather(1, idx expanded to C)``, but a row copy per index instead of an indexed load per element
    (gather was 38% of R-MeeTo's reduction step on Vim-S, batch 8)."""
    B, L, C = x.shape
    return _rows(x.reshape(B * L, C), _flat(idx, L)).view(B, idx.shape[1], C)


def _flat(idx: torch.Tensor, length: int) -> torch.Tensor:
    """(B, n) per-sequence token indices -> (B·n,) row indices of the flattened (B·length, C) tensor."""
    offsets = torch.arange(idx.shape[0], device=idx.device).mul_(length).unsqueeze(1)
    return (idx + offsets).reshape(-1)


def _rows(x2: torch.Tensor, flat: torch.Tensor) -> torch.Tensor:
    return x2.index_select(0, flat)


def _expand(idx: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(B, n) token indices -> (B, n, C) for gather/scatter along the token axis of ``like``."""
    return idx.unsqueeze(-1).expand(-1, -1, like.shape[-1])


def full_indices(plan: Plan, cls_index: int | None):
    """The plan's (keep, src, dst) in full-sequence terms, class token included: ``keep`` indexes the
    input and lists the output in order (the class token at ``cls_pos``), ``dst`` are output positions.
    One gather then reduces a stream, with no copy to take the class token out and put it back."""
    if cls_index is None:
        return plan.keep, plan.src, plan.dst
    c, p = cls_index, plan.cls_pos
    keep = plan.keep + (plan.keep >= c)
    keep = torch.cat((keep[:, :p], keep.new_full((keep.shape[0], 1), c), keep[:, p:]), dim=1)
    src = None if plan.src is None else plan.src + (plan.src >= c)
    dst = None if plan.dst is None else plan.dst + (plan.dst >= p)
    return keep, src, dst


def apply_plan(x: torch.Tensor, plan: Plan, cls_index: int | None, weight: torch.Tensor | None = None,
               normalise: bool = True, indices=None) -> torch.Tensor:
    """Carry out ``plan`` on x (B, L, C), class token included at ``cls_index``.

    Merged tokens become the ``weight``-weighted mean of the destination and every source merged into
    it (destination included, as ToMe's and R-MeeTo's ``scatter_reduce``); ``weight`` (B, L, 1) is the
    token sizes for a size-weighted mean, or None for a plain mean. With ``normalise=False`` the
    weighted values are summed and not divided (for sizes and source maps). ``indices``: the plan's
    :func:`full_indices`, when the caller reduces several streams with one plan.
    """
    B, L, _ = x.shape
    fp = _FlatPlan(indices if indices is not None else full_indices(plan, cls_index), B, L, x.device)
    return _apply(x, fp, weight, normalise)


class _FlatPlan:
    """A plan's indices as rows of the flattened (B·L, C) streams, computed once for all the streams a
    step reduces, with the merge weights' per-source factor cached per weight tensor."""

    def __init__(self, indices, B: int, L: int, device, flat=None):
        keep, src, dst = indices if flat is None else (None, None, None)
        self.B, self.L = B, L
        self.merges = src is not None and src.shape[1] > 0
        if flat is not None:
            self.keep, self.src, self.dst = flat
            self.T = self.keep.shape[0] // B
            self.merges = self.src.shape[0] > 0
        else:
            self.T = keep.shape[1]
            self.keep = _flat(keep, L)
            if self.merges:
                self.src, self.dst = _flat(src, L), _flat(dst, self.T)
        self._factors = {}

    @classmethod
    def of(cls, plan: Plan, cls_index: int | None, B: int, L: int, device) -> "_FlatPlan":
        if plan.flat is not None:
            return cls(None, B, L, device, flat=plan.flat)
        return cls(full_indices(plan, cls_index), B, L, device)

    def factor(self, weight: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
        """wᵢ / W for each merged source row (W: the total weight of its destination)."""
        key = (None if weight is None else id(weight), like.dtype)
        if key not in self._factors:
            n = self.B * self.L
            w2 = like.new_ones(n, 1) if weight is None else weight.to(like.dtype).reshape(n, 1)
            w_src = _rows(w2, self.src)
            total = _rows(w2, self.keep).index_add_(0, self.dst, w_src).index_select(0, self.dst)
            self._factors[key] = w_src / total
        return self._factors[key]


def _apply(x: torch.Tensor, fp: _FlatPlan, weight, normalise: bool) -> torch.Tensor:
    B, L, C = x.shape
    T = fp.T
    # Everything on the flattened (B·L, C) rows: index_select / index_add_ move whole rows (see _gather).
    x2 = x.reshape(B * L, C)
    out = _rows(x2, fp.keep)  # (B·T, C), a new tensor
    if not fp.merges:
        return out.view(B, T, C)
    if not normalise:  # sizes and source maps: plain sums
        return out.index_add_(0, fp.dst, _rows(x2, fp.src)).view(B, T, C)
    # Weighted mean written as dst + Σ wᵢ(xᵢ − dst) / W (W = total weight): the same value as
    # Σ wᵢxᵢ / W, but exact when the merged tokens are identical (every difference is then 0).
    # Only the destination rows change: one pass over the output instead of three.
    diff = (_rows(x2, fp.src) - out.index_select(0, fp.dst)) * fp.factor(weight, x)
    return out.index_add_(0, fp.dst, diff).view(B, T, C)


def row_map(fp: "_FlatPlan", weight: torch.Tensor | None, like: torch.Tensor) -> RowMap:
    """The step's map for hidden and residual as a :class:`vimtr.ops.RowMap`, for the next block to apply
    inside its add + RMSNorm (see :func:`apply_to_state`): the same rows and weights as :func:`_apply`.
    ``like``: the stream whose dtype the merge factors are computed in (the fp32 residual)."""
    if not fp.merges:
        return RowMap(keep=fp.keep, batch=fp.B)
    return RowMap(keep=fp.keep, src=fp.src, dst=fp.dst, factor=fp.factor(weight, like).reshape(-1), batch=fp.B)


def apply_to_state(state: TokenState, plan: Plan, weighted: bool = True) -> TokenState:
    """Reduce every stream of ``state`` with the same plan (hidden and residual: weighted means).

    With ``state.fuse_merge`` and one plan for both streams, hidden and residual are left as they are and
    the map goes into ``pending`` for the next block (a :class:`vimtr.ops.RowMap`): its add + RMSNorm is
    linear in both streams, so mapping their sum equals summing the maps (up to float rounding), and the
    CPU kernel gathers and averages the rows as it reads them instead of a pass over each stream."""
    state.materialise()
    ci = state.cls_index
    weight = plan.weight if plan.weight is not None else (state.sizes if weighted else None)
    B, L, _ = state.hidden.shape
    fp = _FlatPlan.of(plan, ci, B, L, state.hidden.device)
    sizes = _apply(state.sizes, fp, None, False)
    if fp.merges and weight is state.sizes and weight.dtype == state.hidden.dtype:
        # The new sizes are each destination's total weight, computed by the very ops factor() would
        # repeat (keep rows + index_add_ of the source rows): reuse them.
        fp._factors[(id(weight), weight.dtype)] = _rows(weight.reshape(-1, 1), fp.src) / _rows(sizes.reshape(-1, 1), fp.dst)
    pending = None
    if state.fuse_merge and state.residual is not None and plan.residual is None:
        hidden, residual, pending = state.hidden, state.residual, row_map(fp, weight, state.residual)
    else:
        hidden = _apply(state.hidden, fp, weight, True)
        if state.residual is None:
            residual = None
        else:
            rfp = _FlatPlan.of(plan.residual, ci, B, L, state.hidden.device) if plan.residual else fp
            residual = _apply(state.residual, rfp, weight, True)
    source = None if state.source is None else _apply(state.source, fp, None, False)
    positions = None  # a surviving token keeps its original position (a merged one: its destination's)
    if state.positions is not None:
        positions = _rows(state.positions.reshape(B * L, 1), fp.keep).view(B, fp.T)
    return TokenState(hidden=hidden, residual=residual, cls_index=plan.cls_pos if ci is not None else None,
                      sizes=sizes, source=source, aux={}, fuse_merge=state.fuse_merge, pending=pending,
                      positions=positions)


def proportional_cls_pos(cls_index: int | None, length: int, r: int) -> int | None:
    """R-MeeTo's rule: the class token goes to floor(pos·(L−r)/L), L counting the class token."""
    return None if cls_index is None else (cls_index * (length - r)) // length


def similarity(a: torch.Tensor, b: torch.Tensor, distance: str = "cosine") -> torch.Tensor:
    """Scores (higher = more alike) between rows of a (B, Ta, C) and b (B, Tb, C), both L2-normalised.

    ``cosine`` is the dot product of normalised rows; ``l1``/``l2`` are negative distances between
    the normalised rows (R-MeeTo's definitions).
    """
    if distance == "cosine":
        return a @ b.transpose(-1, -2)
    if distance == "l1":
        return -torch.cdist(a, b, p=1)
    if distance == "l2":
        return -torch.cdist(a, b, p=2)
    raise ValueError(f"distance must be 'cosine', 'l1' or 'l2', got {distance!r}")


def normalise_rows(x: torch.Tensor) -> torch.Tensor:
    # No epsilon, as R-MeeTo: an all-zero metric row would be NaN there too, and never occurs in practice.
    return x / x.norm(dim=-1, keepdim=True)


def _class_free_rows(T: int, cls_index: int | None, device) -> torch.Tensor:
    """Full-sequence row of each class-free position 0..T-1 (the class token at ``cls_index`` skipped)."""
    pos = torch.arange(T, device=device)
    return pos if cls_index is None else pos + (pos >= cls_index)


def _normalised_sets(metric: torch.Tensor, cls_index: int | None):
    """Set A (even class-free positions) and set B (odd ones) of ``metric`` (B, L, C), rows L2-normalised,
    as two new contiguous fp32 tensors. ``cls_index``: ``metric`` holds a class token there, skipped.

    Each set is at most two strided views of ``metric`` (the rows before and after the class token),
    divided by their norms straight into the output: no gathered copy, no class-free copy, and the
    division writes each row once (bit-identical to normalising a gathered copy: the norm reduces the
    same contiguous row, and the division is elementwise; ``test_reduce_fast`` checks it)."""
    m = metric.float()  # no copy when already fp32
    Bn, _, C = m.shape
    if cls_index is None:
        views = ((m[:, 0::2],), (m[:, 1::2],))
    else:  # class-free position p is row p before the class token, row p + 1 after it
        c, odd = cls_index, cls_index % 2
        views = ((m[:, 0:c:2], m[:, c + 1 + odd::2]), (m[:, 1:c:2], m[:, c + 2 - odd::2]))
    sets = []
    for parts in views:
        out = m.new_empty(Bn, sum(v.shape[1] for v in parts), C)
        i = 0
        for v in parts:
            n = v.shape[1]
            if n:
                torch.div(v, v.norm(dim=-1, keepdim=True), out=out[:, i:i + n])
            i += n
        sets.append(out)
    return sets


def bipartite_plan(metric: torch.Tensor, r: int, distance: str = "cosine", kth: int = 1, ordered: bool = True,
                   prune: bool = False, cls_index: int | None = None, length: int | None = None,
                   metric_has_cls: bool = False) -> Plan:
    """ToMe/R-MeeTo bipartite soft matching on a class-free metric (B, T, C).

    ``metric_has_cls=True``: ``metric`` is the whole sequence (B, T + 1, C) with the class token at
    ``cls_index``; the two sets are then gathered from it directly (the same rows, normalised the same
    way, without first copying the class-free sequence and then the strided sets).

    Set A = even positions, set B = odd positions. Each A token finds its ``kth`` best B match; the r
    A tokens with the highest scores merge into their matches (or are dropped with ``prune``).
    ``ordered=True`` keeps the survivors in their original order (a merged token sits at its
    destination's position); otherwise unmerged A tokens come first (by score), then B (R-MeeTo's
    unordered variant). The class token is re-inserted by R-MeeTo's proportional rule.
    """
    with torch.no_grad():
        a, b = _normalised_sets(metric, cls_index if metric_has_cls else None)
        scores = similarity(a, b, distance)
        if kth == 1:
            node_max, node_idx = scores.max(dim=-1)
        else:
            k = min(kth, scores.shape[-1])
            top_v, top_i = scores.topk(k, dim=-1)
            node_max, node_idx = top_v[..., k - 1], top_i[..., k - 1]
        edge_idx = node_max.argsort(dim=-1, descending=True)
        if ordered and not prune and cls_index is not None and edge_idx.device.type == "cpu":
            return _ordered_plan_cpu(edge_idx, node_idx, r, b.shape[1], cls_index, length)
        unm_a, src_a = edge_idx[:, r:], edge_idx[:, :r]  # positions within set A
        dst_b = node_idx.gather(1, src_a)  # positions within set B
        n_a, n_b = a.shape[1], b.shape[1]
        Bn = a.shape[0]
        # Translate set positions to sequence indices: A[i] = 2i, B[j] = 2j+1.
        b_seq = (2 * torch.arange(n_b, device=metric.device) + 1).expand(Bn, n_b)
        unm_seq = 2 * unm_a
        if ordered:
            keep, _ = torch.cat((unm_seq, b_seq), dim=1).sort(dim=1)
            # The output position of B token j: how many kept tokens precede it. Kept tokens are sorted,
            # so it is the rank of 2j+1 in ``keep``.
            dst_pos = torch.searchsorted(keep, (2 * dst_b + 1).contiguous())
            pos_rule_len, pos_rule_r = length, r
        else:
            keep = torch.cat((unm_seq, b_seq), dim=1)
            dst_pos = (n_a - r) + dst_b
            pos_rule_len, pos_rule_r = n_a, r  # R-MeeTo inserts the class token among unmerged A tokens
        cls_pos = None
        if cls_index is not None:  # held by test_reduce_properties (expected_trace), test_method_decisions (rmeeto)
            cls_pos = (cls_index * (pos_rule_len - pos_rule_r)) // pos_rule_len
        if prune:
            return Plan(keep=keep, cls_pos=cls_pos)
        return Plan(keep=keep, src=2 * src_a, dst=dst_pos, cls_pos=cls_pos)


_ORDERED_KERNEL = None


def _ordered_kernel():
    """The index bookkeeping of an ordered bipartite plan with a class token, compiled (numba, CPU).

    From the torch ``argsort`` of the A tokens' best scores (``edge_idx``, so ties break exactly as
    there) and their best B match (``node_idx``), one pass per sequence writes the plan's class-free
    ``keep``/``src``/``dst`` (the same values as the torch path: kept tokens in order, each merged A
    token's destination is the rank of its B token among the kept ones) and the flattened full-sequence
    rows ``full_indices`` + ``_FlatPlan`` would derive from them. It replaces ~30 small torch ops (a
    gather, a cat, a sort, a searchsorted, the class-token insertion, three flattenings), each a few
    microseconds and, inside the model's forward, 10-20 (cold caches)."""
    global _ORDERED_KERNEL
    if _ORDERED_KERNEL is None:
        import numpy as np
        from numba import njit

        @njit(cache=True, nogil=True)
        def kernel(edge_idx, node_idx, r, c, p, keep, src, dst, fkeep, fsrc, fdst):
            B, n_a = edge_idx.shape
            n_keep = keep.shape[1]
            T = n_keep + r  # class-free length
            L, T_out = T + 1, n_keep + 1  # with the class token: input and output lengths
            merged = np.zeros(n_a, np.bool_)
            pos = np.empty(T, np.int64)
            for b in range(B):
                merged[:] = False
                for i in range(r):
                    merged[edge_idx[b, i]] = True
                k = 0
                for q in range(T):  # kept class-free positions, in order; pos: their output rank
                    if q % 2 == 1 or not merged[q // 2]:
                        keep[b, k] = q
                        pos[q] = k
                        k += 1
                row_in, row_out = b * L, b * T_out
                for j in range(T_out):  # the class token goes to output position p
                    if j == p:
                        f = c
                    else:
                        f = keep[b, j if j < p else j - 1]
                        f += f >= c
                    fkeep[row_out + j] = row_in + f
                for i in range(r):
                    a = edge_idx[b, i]
                    s_ = 2 * a
                    d = pos[2 * node_idx[b, a] + 1]
                    src[b, i] = s_
                    dst[b, i] = d
                    fsrc[b * r + i] = row_in + s_ + (s_ >= c)
                    fdst[b * r + i] = row_out + d + (d >= p)

        _ORDERED_KERNEL = kernel
    return _ORDERED_KERNEL


def _ordered_plan_cpu(edge_idx: torch.Tensor, node_idx: torch.Tensor, r: int, n_b: int, cls_index: int,
                      length: int) -> Plan:
    Bn, n_a = edge_idx.shape
    T = n_a + n_b
    n_keep = T - r
    cls_pos = (cls_index * (length - r)) // length
    sizes = [Bn * n_keep, Bn * r, Bn * r, Bn * (n_keep + 1), Bn * r, Bn * r]
    keep, src, dst, fkeep, fsrc, fdst = torch.empty(sum(sizes), dtype=torch.long).split(sizes)  # one allocation
    keep, src, dst = keep.view(Bn, n_keep), src.view(Bn, r), dst.view(Bn, r)
    _ordered_kernel()(edge_idx.numpy(), node_idx.numpy(), r, cls_index, cls_pos, keep.numpy(), src.numpy(),
                      dst.numpy(), fkeep.numpy(), fsrc.numpy(), fdst.numpy())
    return Plan(keep=keep, src=src, dst=dst, cls_pos=cls_pos, flat=(fkeep, fsrc, fdst))


def importance_plan(score: torch.Tensor, n_src: int, n_tgt: int, features: torch.Tensor | None,
                    prune: bool = False, distance: str = "cosine", features_cls_index: int | None = None) -> Plan:
    """Importance-grouped merging (MTR, UTR): class-free ``score`` (B, T), higher = more important.

    The ``n_src`` least important tokens are the sources, the next ``n_tgt`` the targets, the rest are
    kept. Each source merges into its most similar target (``features``, cosine). Survivors keep
    their original order. The caller sets ``cls_pos``. ``features_cls_index``: ``features`` is the
    whole sequence (B, T + 1, C) with the class token there (only the source and target rows are
    read and normalised, no class-free copy is made).
    """
    with torch.no_grad():
        T = score.shape[1]
        order = score.argsort(dim=-1, descending=True)
        n_keep = T - n_src - n_tgt
        src = order[:, T - n_src:]
        keep, _ = order[:, : T - n_src].sort(dim=1)
        if prune or n_src == 0:
            return Plan(keep=keep)
        tgt = order[:, n_keep: T - n_src]
        f = features.float()
        if features_cls_index is not None:
            rows = _class_free_rows(T, features_cls_index, f.device)
            src_rows, tgt_rows = rows[src], rows[tgt]
        else:
            src_rows, tgt_rows = src, tgt
        # Row-wise normalisation commutes with taking rows: normalise only the rows compared.
        sim = similarity(normalise_rows(_gather(f, src_rows)), normalise_rows(_gather(f, tgt_rows)), distance)
        best = tgt.gather(1, sim.argmax(dim=-1))  # sequence index of each source's target
        dst_pos = torch.searchsorted(keep, best.contiguous())
        return Plan(keep=keep, src=src, dst=dst_pos)
