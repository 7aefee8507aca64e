"""Derive a per-block schedule from a FLOPs budget with the analytic counter."""
from __future__ import annotations

from vimtr.flops import count_flops
from vimtr.reduction.base import merge_blocks

TOLERANCE = 0.01  # the achieved reduction must land within one percentage point of the request


def _reduction(model, reducer, r, base) -> float | None:
    try:
        lengths = reducer.simulate(r)
    except ValueError:
        return None
    return 1.0 - count_flops(model, lengths, reducer.applied, reducer, "full") / base


def _schedules(reducer):
    """Every schedule :func:`schedule_for_flops` considers, by growing r: for each constant r at the reducing
    blocks, that r plus one more token at the first 0, 1, ... of them. ``sched(r, extra)`` builds one."""
    depth = reducer.depth
    blocks = merge_blocks(depth, reducer.interval, reducer.odd)
    if not blocks:
        raise ValueError(f"{reducer.name}: interval={reducer.interval} leaves no reducing block in a "
                         f"{depth}-block model")

    def sched(r, extra=0):
        return [(r + (1 if blocks.index(i) < extra else 0)) if i in blocks else 0 for i in range(depth)]

    return blocks, sched


def _base_flops(model, reducer) -> float:
    return count_flops(model, [reducer.num_tokens] * reducer.depth, [0] * reducer.depth, None, "full")


def max_reduction(model, reducer) -> float:
    """The largest ``full`` FLOPs reduction any schedule :func:`schedule_for_flops` considers reaches (0.0 if
    none is valid): requests up to this, plus :data:`TOLERANCE`, can be met."""
    blocks, sched = _schedules(reducer)
    base, best = _base_flops(model, reducer), 0.0
    for r in range(reducer.num_tokens + 1):
        if _reduction(model, reducer, sched(r), base) is None:
            break
        for extra in range(len(blocks)):
            red = _reduction(model, reducer, sched(r, extra), base)
            if red is not None:
                best = max(best, red)
    return best


def schedule_for_flops(model, reducer, target: float) -> list[int]:
    """The schedule (tokens removed per block) whose ``full`` FLOPs reduction is closest to ``target``.

    A constant r at the method's reducing blocks is tried first; the remainder is made up by removing one
    more token at the earliest blocks (which count most), so the result lands within 1 point.
    """
    if isinstance(target, bool) or not isinstance(target, (int, float)) or not 0.0 <= target < 1.0:
        raise ValueError(f"{reducer.name}: flops_reduction must be a fraction in [0, 1), got {target!r}")
    blocks, sched = _schedules(reducer)
    base = _base_flops(model, reducer)
    best, best_gap = None, float("inf")
    r = 0
    while True:
        red = _reduction(model, reducer, sched(r), base)
        if red is None:
            break
        for extra in range(len(blocks)):
            red_e = _reduction(model, reducer, sched(r, extra), base)
            if red_e is not None and abs(red_e - target) < best_gap:
                best, best_gap = sched(r, extra), abs(red_e - target)
        if red > target or r > reducer.num_tokens:
            break
        r += 1
    if best is None or best_gap > TOLERANCE:
        most = max_reduction(model, reducer)
        raise ValueError(f"{reducer.name}: flops_reduction={target} is unreachable with interval="
                         f"{reducer.interval}{' (odd blocks)' if reducer.odd else ''} on this "
                         f"{reducer.depth}-block, {reducer.num_tokens}-token model: the largest reachable is "
                         f"{most:.3f}; lower flops_reduction, or reduce at more blocks (a smaller interval)")
    return best
