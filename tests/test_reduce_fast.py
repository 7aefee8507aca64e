"""The reduction step's faster forms give the very same plans and values as the straightforward ones."""
import pytest
import torch

from vimtr.reduction.merge import (Plan, _FlatPlan, _normalised_sets, apply_plan, bipartite_plan, full_indices, importance_plan,
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


# ---------------------------------------------------------------- a merge folded into the next block's add + RMSNorm
def _pending(plan, cls_index, B, L, weight):
    """The step's row map, as apply_to_state hands it to the next block (factors in float32)."""
    from vimtr.reduction.merge import row_map
    return row_map(_FlatPlan.of(plan, cls_index, B, L, "cpu"), weight, torch.empty(0))


@pytest.mark.parametrize("cls_index", [None, 0, 4])
@pytest.mark.parametrize("merges", [True, False])
def test_fused_merge_add_rmsnorm_equals_merging_each_stream_first(cls_index, merges):
    from vimtr.ops import add_rms_norm_ref
    from vimtr.ops.cpu import add_rms_norm_cpu
    g = torch.Generator().manual_seed(11)
    B, L, D = 2, 10, 24
    hidden, residual = torch.randn(B, L, D, generator=g), torch.randn(B, L, D, generator=g) * 3
    sizes = torch.randint(1, 5, (B, L, 1), generator=g).float()
    keep = torch.tensor([[0, 2, 3, 5, 8], [1, 2, 4, 6, 7]])
    plan = Plan(keep=keep, src=torch.tensor([[1, 4, 6, 7], [0, 3, 5, 8]]) if merges else None,
                dst=torch.tensor([[0, 2, 2, 4], [1, 1, 1, 1]]) if merges else None,  # 4 sources into one row
                cls_pos=None if cls_index is None else 2)
    if cls_index is None:
        hidden, residual, sizes = hidden[:, :9], residual[:, :9], sizes[:, :9]
    weight = torch.rand(B, 9 if cls_index is None else L, 1, generator=g) + 0.5
    for w in (sizes[:, :hidden.shape[1]], weight, None):
        merge = _pending(plan, cls_index, B, hidden.shape[1], w)
        w_norm = torch.rand(D, generator=g) + 0.5
        r_fused, n_fused = add_rms_norm_cpu(hidden, residual, w_norm, 1e-5, row_map=merge)
        r_ref, n_ref = add_rms_norm_ref(merge.apply(hidden), merge.apply(residual), w_norm, 1e-5)
        assert r_fused.shape == r_ref.shape == (B, keep.shape[1] + (cls_index is not None), D)
        torch.testing.assert_close(r_fused, r_ref, rtol=1e-6, atol=1e-5)
        torch.testing.assert_close(n_fused, n_ref, rtol=1e-6, atol=1e-5)
        if not merges:  # pure gathers: the same additions, the same bits
            assert torch.equal(r_fused, r_ref)


def test_fused_merge_falls_back_to_the_eager_merge_where_gradients_flow():
    from vimtr.ops import add_rms_norm_ref
    from vimtr.ops.cpu import add_rms_norm_cpu
    g = torch.Generator().manual_seed(12)
    hidden = torch.randn(1, 9, 8, generator=g, requires_grad=True)
    residual = torch.randn(1, 9, 8, generator=g)
    plan = Plan(keep=torch.tensor([[0, 2, 3, 5, 7, 8]]), src=torch.tensor([[1, 4, 6]]), dst=torch.tensor([[0, 3, 3]]))
    merge = _pending(plan, None, 1, 9, None)
    w = torch.ones(8)
    r1, n1 = add_rms_norm_cpu(hidden, residual, w, 1e-5, row_map=merge)
    r2, n2 = add_rms_norm_cpu(merge.apply(hidden), merge.apply(residual), w, 1e-5)
    assert torch.equal(r1, r2) and torch.equal(n1, n2)
    (g1,) = torch.autograd.grad(n1.sum(), hidden)
    (g2,) = torch.autograd.grad(add_rms_norm_ref(merge.apply(hidden), merge.apply(residual), w, 1e-5)[1].sum(), hidden)
    torch.testing.assert_close(g1, g2)


@pytest.mark.parametrize("method,params", [("rmeeto", {"r": 8}), ("mtr", {"flops_reduction": 0.3}),
                                           ("tome", {"flops_reduction": 0.3}), ("evit", {"flops_reduction": 0.3}),
                                           ("utr", {"flops_reduction": 0.3}), ("random", {"flops_reduction": 0.3})])
def test_models_with_fused_merges_match_the_eager_reduction(method, params, one_thread):
    import vimtr
    from vimtr.ops import scan_backend
    torch.manual_seed(0)
    model = vimtr.reduce(vimtr.create_model("vim_tiny", depth=6, img_size=96).eval(), method, trace_source=True,
                         **params)
    x = torch.randn(2, *model.input_size)
    with torch.inference_mode(), scan_backend("cpu"):
        fused = model(x)
        trace = model.reduction_trace
        model.fuse_merges = False
        eager = model(x)
    assert trace["tokens"] == model.reduction_trace["tokens"]
    assert trace["cls_index"] == model.reduction_trace["cls_index"]
    assert torch.equal(trace["sizes"], model.reduction_trace["sizes"])
    assert torch.equal(trace["source"], model.reduction_trace["source"])
    torch.testing.assert_close(fused, eager, rtol=1e-5, atol=1e-5)


def test_a_pending_merge_reports_the_reduced_length_and_materialises():
    from vimtr.models.token_state import TokenState
    from vimtr.reduction.merge import apply_to_state
    g = torch.Generator().manual_seed(13)
    h, r = torch.randn(2, 9, 4, generator=g), torch.randn(2, 9, 4, generator=g)
    plan = Plan(keep=torch.tensor([[0, 2, 3, 5, 7], [1, 2, 4, 6, 7]]), src=torch.tensor([[1, 4, 6], [0, 3, 5]]),
                dst=torch.tensor([[0, 2, 2], [0, 1, 1]]), cls_pos=2)
    state = lambda fuse: TokenState(hidden=h, residual=r, cls_index=4, sizes=torch.ones(2, 9, 1), fuse_merge=fuse)
    lazy, eager = apply_to_state(state(True), plan), apply_to_state(state(False), plan)
    assert lazy.pending is not None and eager.pending is None
    assert lazy.length == eager.length == 6 and lazy.hidden is h
    lazy.materialise()
    assert lazy.pending is None and torch.equal(lazy.hidden, eager.hidden) and torch.equal(lazy.residual, eager.residual)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_a_reducer_asks_the_next_mixer_for_what_it_reads(backend, one_thread):
    """MTR asks (TokenState.requests) for Δ's channel sums only, R-MeeTo (Δ metric) for everything; the
    mixer before each reduction step exposes exactly that, on every backend, and no other mixer anything."""
    import vimtr
    from vimtr.ops import scan_backend
    torch.manual_seed(0)
    model = vimtr.create_model("vim_tiny", depth=4, img_size=32, patch_size=8, embed_dim=32).eval()
    seen = []
    for method, params in (("mtr", {"r": 3}), ("rmeeto", {"r": 3, "metric": "delta"})):
        vimtr.reduce(model, method, interval=2, **params)
        reducer = model.reducer

        def spy(i, state, reducer=reducer):
            if state.aux:
                seen.append((method, i, frozenset(state.aux)))
            state = reducer(i, state)
            return state

        spy.finish = reducer.finish
        model.reducer = spy
        with torch.no_grad(), scan_backend(backend):
            model(torch.randn(2, 3, 32, 32))
        vimtr.restore(model)
    assert seen == [("mtr", 2, frozenset({"delta_sum", "delta_channels"})),
                    ("rmeeto", 2, frozenset({"delta_f", "delta_b", "B_f", "B_b", "C_f", "C_b", "delta_sum",
                                             "delta_channels"}))]
