"""The reduction step's faster forms give the very same plans and values as the straightforward ones."""
import pytest
import torch

from vimtr.reduce.merge import (Plan, _FlatPlan, _normalised_sets, apply_plan, bipartite_plan, full_indices, importance_plan,
                                normalise_rows, split_cls)


def _old_apply(x, plan, cls_index, weight=None, normalise=True):
    """apply_plan as it was written with gather/scatter_add along the token axis (the reference)."""
    keep, src, dst = full_indices(plan, cls_index)
    ex = lambda i, like: i.unsqueeze(-1).expand(-1, -1, like.shape[-1])
    g = lambda t, i: t.gather(1, ex(i, t))
    out = g(x, keep)
    if src is None or src.shape[1] == 0:
        return out
    if not normalise:
        return out.scatter_add(1, ex(dst, out), g(x, src))
    w = torch.ones_like(x[..., :1]) if weight is None else weight
    w_src = g(w, src)
    total = g(w, keep).scatter_add(1, dst.unsqueeze(-1), w_src).gather(1, dst.unsqueeze(-1))
    diff = (g(x, src) - out.gather(1, ex(dst, out))) * (w_src / total)
    return out.scatter_add(1, ex(dst, out), diff)


@pytest.mark.parametrize("cls_index", [0, 7, 12, None])
def test_bipartite_plan_on_the_whole_sequence_is_the_same_plan(cls_index):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 13, 8, generator=g)
    x[:, 3] = x[:, 5]  # ties
    for r in (0, 3, 6):
        for ordered in (True, False):
            _, free = split_cls(x, cls_index)
            a = bipartite_plan(free, r, ordered=ordered, cls_index=cls_index, length=13)
            b = bipartite_plan(x if cls_index is not None else free, r, ordered=ordered, cls_index=cls_index,
                               length=13, metric_has_cls=cls_index is not None)
            for f in ("keep", "src", "dst"):
                assert torch.equal(getattr(a, f), getattr(b, f)), f
            assert a.cls_pos == b.cls_pos


@pytest.mark.parametrize("cls_index", [0, 6, 11])
def test_importance_plan_reading_the_whole_sequence_is_the_same_plan(cls_index):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 12, 8, generator=g)
    score = torch.randn(2, 11, generator=g)
    _, free = split_cls(x, cls_index)
    a = importance_plan(score, 3, 4, free)
    b = importance_plan(score, 3, 4, x, features_cls_index=cls_index)
    for f in ("keep", "src", "dst"):
        assert torch.equal(getattr(a, f), getattr(b, f)), f


def test_apply_plan_equals_gather_scatter_form():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 10, 6, generator=g)
    sizes = torch.randint(1, 4, (2, 10, 1), generator=g).float()
    keep = torch.tensor([[0, 2, 3, 5, 8], [1, 2, 4, 6, 7]])
    src = torch.tensor([[1, 4, 6, 7], [0, 3, 5, 8]])
    dst = torch.tensor([[0, 2, 2, 4], [0, 1, 1, 1]])  # duplicate destinations
    plan = Plan(keep=keep, src=src, dst=dst, cls_pos=2)
    for weight in (None, sizes):
        assert torch.equal(apply_plan(x, plan, 4, weight), _old_apply(x, plan, 4, weight))
    assert torch.equal(apply_plan(sizes, plan, 4, normalise=False), _old_apply(sizes, plan, 4, normalise=False))
    pruned = Plan(keep=keep, cls_pos=0)
    assert torch.equal(apply_plan(x, pruned, 9), _old_apply(x, pruned, 9))


@pytest.mark.parametrize("cls_index", [None, 0, 1, 6, 7, 12, 13])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_normalised_sets_read_from_strided_views_equal_normalised_gathered_copies(cls_index, dtype):
    g = torch.Generator().manual_seed(4)
    for L in (13, 14):
        if cls_index is not None and cls_index >= L:
            continue
        x = (torch.randn(3, L, 40, generator=g) * 7).to(dtype)
        _, free = split_cls(x, cls_index)
        free = free.float()
        a, b = _normalised_sets(x, cls_index)
        assert a.is_contiguous() and b.is_contiguous()
        assert torch.equal(a, normalise_rows(free[:, 0::2].contiguous()))
        assert torch.equal(b, normalise_rows(free[:, 1::2].contiguous()))


def _torch_ordered_plan(metric, r, cls_index, length):
    """bipartite_plan's ordered path as written with torch ops (argsort, gather, cat + sort, searchsorted)."""
    _, free = split_cls(metric, cls_index)
    m = normalise_rows(free.float())
    node_max, node_idx = (m[:, ::2] @ m[:, 1::2].transpose(-1, -2)).max(dim=-1)
    edge_idx = node_max.argsort(dim=-1, descending=True)
    unm_a, src_a = edge_idx[:, r:], edge_idx[:, :r]
    dst_b = node_idx.gather(1, src_a)
    n_b = m.shape[1] // 2
    b_seq = (2 * torch.arange(n_b) + 1).expand(m.shape[0], n_b)
    keep, _ = torch.cat((2 * unm_a, b_seq), dim=1).sort(dim=1)
    dst = torch.searchsorted(keep, (2 * dst_b + 1).contiguous())
    return Plan(keep=keep, src=2 * src_a, dst=dst, cls_pos=(cls_index * (length - r)) // length)


@pytest.mark.parametrize("cls_index", [0, 1, 6, 7, 12])
@pytest.mark.parametrize("L", [13, 14, 197])
def test_compiled_ordered_plan_equals_torch_ops_with_ties(cls_index, L):
    g = torch.Generator().manual_seed(5)
    x = torch.randn(4, L, 16, generator=g)
    x[:, 2] = x[:, 4]  # duplicated tokens: equal best scores (argsort ties) and equal candidate matches
    x[:, 3] = x[:, 5]
    x[1] = x[1, :1]  # a whole sequence of one token: every score ties
    x[2, 6:] = x[2, 5:6]
    for r in sorted({0, 1, 3, (L - 1) // 2}):
        ref = _torch_ordered_plan(x, r, cls_index, L)
        plan = bipartite_plan(x, r, cls_index=cls_index, length=L, metric_has_cls=True)
        assert plan.flat is not None
        for f in ("keep", "src", "dst"):
            assert torch.equal(getattr(plan, f), getattr(ref, f)), (f, r)
        assert plan.cls_pos == ref.cls_pos
        fast = _FlatPlan.of(plan, cls_index, 4, L, None)
        slow = _FlatPlan(full_indices(ref, cls_index), 4, L, None)
        assert fast.T == slow.T and fast.merges == slow.merges
        assert torch.equal(fast.keep, slow.keep)
        if r:
            assert torch.equal(fast.src, slow.src) and torch.equal(fast.dst, slow.dst)
