"""Properties of every reduction method over random small models, batches, parameters and schedules.

Expected token counts and class-token positions are recomputed here from the documented rules, not read
from the reducer; plans are checked as partitions of the sequence; order-keeping methods are checked to
keep order, end to end where the source map can show it (pruning) and at the plan level otherwise.
"""
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import vimtr
from vimtr.models.token_state import TokenState
from vimtr.reduction import list_methods, reduce, restore
from vimtr.reduction.merge import Plan, apply_plan, apply_to_state, bipartite_plan, importance_plan, split_cls

METHODS = list_methods()
PROPS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])


pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


# Parameter variants worth exploring per method (the first is the default).
VARIANTS = {
    "mtr": [{}, {"prune": True}, {"keep_ratio": 0.0, "weighted": True}, {"score": "B"}, {"score": "C"},
            {"score": "cls"}, {"order": False}, {"score": "cls", "order": False, "prune": True}],
    "rmeeto": [{}, {"ordered": False}, {"prune": True}],
    "tome": [{}, {"order": "score"}, {"cls_in_matching": True}, {"cls_in_matching": True, "order": "score"}],
    "evit": [{}, {"fuse": False}, {"score": "clip"}],
    "utr": [{}, {"prune_ratio": 0.0}, {"prune_ratio": 1.0, "feature": "hidden"}, {"residual": "hybrid"}],
    "random": [{}, {"seed": 7}],
    "pumer": [{}, {"metric": "hidden"}, {"ordered": False}, {"weighted": True, "pairing": "released"}],
    "hsa": [{}, {"score": "raw", "mirror": True}, {"score": "l2", "cls_position": "middle"}, {"score": "l1"}],
    "positional": [{}, {"cls": "proportional"}, {"pattern": "stride", "cls": "proportional"}],
}


def cap(method, length, params=None):
    """Tokens one step may remove: bipartite methods at most (L−1)//2 (each merged A token needs its own
    B token); the others keep the class token and one patch. ToMe with the class token in its matching
    leaves a 3-token sequence alone (its class token may be the only B token)."""
    if method == "tome" and (params or {}).get("cls_in_matching") and length < 4:
        return 0
    return (length - 1) // 2 if method in ("rmeeto", "tome", "utr", "pumer") else length - 2


def tome_own_cls(params):
    return bool(params.get("cls_in_matching"))


def needs_first_cls(method, params):
    """ToMe's own class-token rule with index order is defined for a class token at index 0 only."""
    return method == "tome" and tome_own_cls(params) and params.get("order", "index") == "index"


def unordered(method, params):
    return method == "tome" or (method in ("rmeeto", "pumer") and not params.get("ordered", True))


def prunes(method, params):
    """Does this variant drop patches (so a patch may appear in no final token)?"""
    return ((method == "mtr" and params.get("prune")) or (method == "rmeeto" and params.get("prune"))
            or (method == "evit" and not params.get("fuse", True))
            or (method == "utr" and params.get("prune_ratio", 0.5) > 0) or method in ("random", "hsa", "positional"))


def keeps_order(method, params):
    """Survivors in their original order (MTR's order=False lays them out by importance instead)."""
    return not unordered(method, params) and not (method == "mtr" and params.get("order") is False)


def expected_trace(method, params, length, cls, r):
    """(tokens entering each block, class-token index there) from the documented rules."""
    tokens, cls_index = [], []
    for ri in r:
        if ri:
            if method == "tome" and tome_own_cls(params):  # ToMe's: the class token is in the even/odd split
                n_a = (length + 1) // 2  # even positions of the whole sequence
                if params.get("order", "index") == "index":
                    assert cls == 0  # the only class-token place this rule accepts: it stays first
                elif cls % 2 == 0:  # an A token with a −inf score: the last unmerged A token
                    cls = n_a - ri - 1
                else:  # a B token: stays in the B block, behind the unmerged A tokens
                    cls = (n_a - ri) + cls // 2
            elif method == "hsa" and params.get("cls_position") == "middle":  # the middle of the survivors
                cls = (length - 1 - ri) // 2
            elif method == "positional" and params.get("cls", "order") == "order":  # the first r patches go:
                cls -= min(ri, cls)  # the class token moves down by those that were before it
            elif unordered(method, params):  # R-MeeTo's unordered rule: among the |A| = ceil(T/2) A tokens
                n_a = length // 2
                cls = cls * (n_a - ri) // n_a
            else:  # floor(pos·(L−r)/L)
                cls = cls * (length - ri) // length
            length -= ri
        tokens.append(length)
        cls_index.append(cls)
    return tokens, cls_index


# --------------------------------------------------------------------------------------------- models
@st.composite
def models(draw):
    family = draw(st.sampled_from(["vim", "videomamba", "video", "stride8"]))
    depth = draw(st.integers(2, 4))
    common = dict(depth=depth, embed_dim=draw(st.sampled_from([8, 16])), d_state=4, num_classes=5)
    if family == "video":
        g = draw(st.integers(1, 3))
        kw = dict(name="videomamba_video_tiny", num_frames=2, img_size=8 * g, patch_size=8)
    elif family == "stride8":
        g = draw(st.integers(2, 4))
        kw = dict(name="vim_tiny_stride8", img_size=16 + 8 * (g - 1))
    else:
        g = draw(st.integers(2, 6))
        kw = dict(name="vim_tiny" if family == "vim" else "videomamba_tiny", img_size=4 * g, patch_size=4)
    torch.manual_seed(draw(st.integers(0, 3)))
    return vimtr.create_model(**kw, **common).eval()


def variants_for(model, method):
    """The method's variants this model accepts (ToMe's own class-token rule needs it at index 0)."""
    return [v for v in VARIANTS[method] if not (needs_first_cls(method, v) and model.initial_cls_index != 0)]


def draw_schedule(data, method, depth, length, params=None):
    """Either ``(r, interval, odd)`` (int r at the R-MeeTo blocks) or a per-block list, always feasible."""
    if data.draw(st.booleans(), label="int schedule"):
        interval, odd = data.draw(st.integers(1, 3), label="interval"), data.draw(st.booleans(), label="odd")
        blocks = [i for i in range(1, depth) if (i + odd) % interval == 0]

        def fits(r):
            L = length
            for i in blocks:
                if r > cap(method, L, params):
                    return False
                L -= r
            return True

        r_max = 0
        while r_max < length and fits(r_max + 1):  # bounded: with no reducing block every r fits
            r_max += 1
        r = data.draw(st.integers(0, r_max), label="r")
        return dict(r=r, interval=interval, odd=odd), [r if i in blocks else 0 for i in range(depth)]
    r, L = [0], length
    for _ in range(1, depth):
        ri = data.draw(st.integers(0, max(cap(method, L, params), 0)), label="r_i")
        r.append(ri)
        L -= ri
    return dict(r=r), r


# --------------------------------------------------------------------------------------------- end to end
@PROPS
@given(model=models(), method=st.sampled_from(METHODS), data=st.data())
def test_schedule_class_token_sources_order_and_restore(model, method, data):
    params = data.draw(st.sampled_from(variants_for(model, method)), label="params")
    batch = data.draw(st.integers(1, 3), label="batch")
    L0 = model.num_tokens if hasattr(model, "num_tokens") else model.num_patches + 1
    P, cls0 = L0 - 1, model.initial_cls_index
    sched, r = draw_schedule(data, method, len(model.layers), L0, params)
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**16), label="input seed"))
    x = torch.randn(batch, *model.input_size, generator=g)
    with torch.no_grad():
        original = model(x)
        reduce(model, method, trace_source=True, **sched, **params)
        model(x)
        trace = model.reduction_trace
        restore(model)
        restored = model(x)
    assert torch.equal(restored, original)

    tokens, cls_index = expected_trace(method, params, L0, cls0, r)
    assert trace["tokens"] == tokens
    assert trace["cls_index"] == cls_index
    source, sizes, c = trace["source"], trace["sizes"], cls_index[-1]
    assert source.shape == (batch, tokens[-1], P) and sizes.shape == (batch, tokens[-1])
    # The class token is the class token: it stands for no patch and never grew.
    assert not source[:, c].any() and sizes[:, c].eq(1).all()
    rows = torch.cat((source[:, :c], source[:, c + 1:]), dim=1)
    assert torch.equal(torch.cat((sizes[:, :c], sizes[:, c + 1:]), dim=1), rows.sum(-1))  # sizes count patches
    per_patch = rows.sum(dim=1)
    if prunes(method, params):
        assert per_patch.le(1).all() and rows.sum(-1).ge(1).all()
    else:  # merging loses nothing: every patch lives in exactly one token
        assert per_patch.eq(1).all() and sizes.sum(1).eq(P + 1).all()

    if keeps_order(method, params):
        # Tokens that stand for one patch (all of them for pure pruning) appear in increasing patch order.
        singles = rows.sum(-1) == 1
        patch = rows.argmax(-1)
        for b in range(batch):
            p = patch[b][singles[b]]
            assert (p[1:] > p[:-1]).all()
        if method == "evit" and params.get("fuse", True):  # EViT's fused tokens are appended at the end
            for b in range(batch):
                multi = (~singles[b]).nonzero().flatten()
                assert multi.numel() == 0 or multi[0] >= singles[b].sum()


@settings(max_examples=25, deadline=None)
@given(model=models(), method=st.sampled_from(METHODS), data=st.data())
def test_planned_lengths_follow_the_schedule(model, method, data):
    """Without a forward: the reducer's planned lengths and applied r are the schedule's."""
    params = data.draw(st.sampled_from(variants_for(model, method)), label="params")
    L0 = model.num_tokens if hasattr(model, "num_tokens") else model.num_patches + 1
    sched, r = draw_schedule(data, method, len(model.layers), L0, params)
    reduce(model, method, **sched, **params)
    assert model.reducer.lengths == expected_trace(method, params, L0, model.initial_cls_index, r)[0]
    assert model.reducer.applied == r
    assert model.reduction["params"]["r"] == r


# --------------------------------------------------------------------------------------------- plans
def synthetic_state(batch, length, cls_index, channels, equal=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    if equal:  # one token repeated; dyadic values (k/8) so that sums of size multiples are exact
        row = torch.randint(-16, 17, (batch, 1, channels), generator=g).float() / 8
        row[..., 0] = 1.0  # never an all-zero row (cosine needs a norm)
        hidden = row.expand(batch, length, channels).contiguous()
        residual = hidden.clone() * 2
    else:
        hidden = torch.randn(batch, length, channels, generator=g)
        residual = torch.randn(batch, length, channels, generator=g)
    sizes = torch.randint(1, 6, (batch, length, 1), generator=g).float()
    if cls_index is not None:
        sizes[:, cls_index] = 1
    E = 2 * channels
    aux = {"delta_f": torch.rand(batch, E, length, generator=g), "delta_b": torch.rand(batch, E, length, generator=g)}
    for key in ("B_f", "B_b", "C_f", "C_b"):  # what MTR's B/C ablation scores read
        aux[key] = torch.randn(batch, length, 4, generator=g)
    return TokenState(hidden=hidden, residual=residual, cls_index=cls_index, sizes=sizes, aux=aux)


def reducer_for(method, params, channels=8, depth=3):
    name = "videomamba_tiny" if needs_first_cls(method, params) else "vim_tiny"
    model = vimtr.create_model(name, depth=depth, embed_dim=channels, d_state=4, img_size=16, patch_size=4)
    reduce(model, method, r=[0] * depth, **params)
    return model.reducer


@st.composite
def plan_cases(draw):
    method = draw(st.sampled_from(METHODS))
    params = draw(st.sampled_from(VARIANTS[method]))
    length = draw(st.integers(4 if tome_own_cls(params) else 3, 40))
    cls_index = 0 if needs_first_cls(method, params) else draw(st.integers(0, length - 1))
    r = draw(st.integers(1, cap(method, length, params)))  # length >= 3 (4): every method can remove one
    batch = draw(st.integers(1, 3))
    return method, params, length, cls_index, r, batch


def check_partition(plan: Plan, T: int, r: int):
    """keep, merged sources and pruned tokens partition the T class-free tokens; r of them go."""
    B = plan.keep.shape[0]
    assert plan.keep.shape[1] == T - r
    n_src = 0 if plan.src is None else plan.src.shape[1]
    for b in range(B):
        kept = plan.keep[b].tolist()
        src = [] if plan.src is None else plan.src[b].tolist()
        assert len(set(kept)) == len(kept) and len(set(src)) == len(src)
        assert not set(kept) & set(src) and set(kept) | set(src) <= set(range(T))
    if n_src:
        assert plan.dst.shape == plan.src.shape
        assert plan.dst.min() >= 0 and plan.dst.max() < T - r


@settings(max_examples=25, deadline=None)
@given(case=plan_cases())
def test_every_method_plans_a_valid_step(case):
    method, params, length, cls_index, r, batch = case
    reducer = reducer_for(method, params)
    state = synthetic_state(batch, length, cls_index, 8, seed=length)
    plan = reducer.plan(2, state, r)
    T = length - 1
    check_partition(plan, T, r)
    if not prunes(method, params):
        assert plan.src.shape[1] == r  # every removed token is merged somewhere
    rule = expected_trace(method, params, length, cls_index, [r])[1][0]
    assert plan.cls_pos == rule
    if unordered(method, params) and not tome_own_cls(params):  # [unmerged A, every B in order] (ToMe, PuMer)
        n_b = T // 2
        a, b_part = plan.keep[:, : T - r - n_b], plan.keep[:, T - r - n_b:]
        assert (a % 2 == 0).all()
        if method == "pumer" or (method == "tome" and params.get("order", "index") == "index"):
            # unmerged A tokens by position (R-MeeTo's unordered merge and ToMe's order="score": by match score)
            assert (a[:, 1:] > a[:, :-1]).all()
        assert torch.equal(b_part, (2 * torch.arange(n_b) + 1).expand(batch, -1))
        assert (plan.dst >= T - r - n_b).all() and (plan.src % 2 == 0).all()
    elif method == "evit" and params.get("fuse", True):  # kept tokens in order, then the fused one
        assert (plan.keep[:, 1:-1] > plan.keep[:, :-2]).all() and (plan.dst == T - r - 1).all()
    elif keeps_order(method, params):
        assert (plan.keep[:, 1:] > plan.keep[:, :-1]).all()
    elif method == "mtr":  # order=False: survivors by descending importance
        _, s = split_cls(reducer.score(state).unsqueeze(-1), cls_index)
        kept = s.squeeze(-1).gather(1, plan.keep)
        assert (kept[:, 1:] <= kept[:, :-1]).all()


@settings(max_examples=25, deadline=None)
@given(T=st.integers(2, 40), data=st.data())
def test_bipartite_plan_orders_and_matches(T, data):
    """R-MeeTo's ordered matching: survivors sorted, sources from set A (even), destinations in set B (odd);
    a merged token sits at its destination's position."""
    r = data.draw(st.integers(0, T // 2))
    metric = torch.randn(2, T, 6, generator=torch.Generator().manual_seed(T))
    plan = bipartite_plan(metric, r, cls_index=0, length=T + 1)
    check_partition(plan, T, r)
    assert (plan.keep[:, 1:] > plan.keep[:, :-1]).all()
    assert (plan.src % 2 == 0).all()
    assert (plan.keep.gather(1, plan.dst) % 2 == 1).all()  # merged into a B token
    # Every B token survives, so the merged token keeps the destination's place in the sequence.
    assert ((plan.keep % 2 == 1).sum(1) == T // 2).all()
    unordered_plan = bipartite_plan(metric, r, ordered=False, cls_index=0, length=T + 1)
    for b in range(2):  # the same matching, only laid out differently
        assert set(plan.keep[b].tolist()) == set(unordered_plan.keep[b].tolist())
        assert torch.equal(plan.src[b], unordered_plan.src[b])
        assert torch.equal(plan.keep[b, plan.dst[b]], unordered_plan.keep[b, unordered_plan.dst[b]])


@settings(max_examples=20, deadline=None)
@given(T=st.integers(3, 40), data=st.data())
def test_importance_plan_keeps_the_important_and_the_order(T, data):
    n_src = data.draw(st.integers(1, T - 2))
    n_tgt = data.draw(st.integers(1, T - n_src))
    g = torch.Generator().manual_seed(T)
    score, feats = torch.randn(2, T, generator=g), torch.randn(2, T, 5, generator=g)
    plan = importance_plan(score, n_src, n_tgt, feats)
    check_partition(plan, T, n_src)
    assert (plan.keep[:, 1:] > plan.keep[:, :-1]).all()
    assert (score.gather(1, plan.src).max(1).values <= score.gather(1, plan.keep).min(1).values).all()


# --------------------------------------------------------------------------------------------- identical tokens
@settings(max_examples=25, deadline=None)
@given(case=plan_cases())
def test_merging_identical_tokens_is_exact(case):
    """Tokens that are all equal stay exactly that token, whatever is merged into what (any sizes)."""
    method, params, length, cls_index, r, batch = case
    reducer = reducer_for(method, params)
    state = synthetic_state(batch, length, cls_index, 8, equal=True, seed=length)
    token = state.hidden[:, :1]
    plan = reducer.plan(2, state, r)
    out = apply_to_state(state, plan, weighted=reducer.weighted)
    assert torch.equal(out.hidden, token.expand_as(out.hidden))
    assert torch.equal(out.residual, 2 * token.expand_as(out.residual))
    # Through the reducer itself (EViT's score-weighted fusion, UTR's merge-only residual): EViT's weights
    # sum to 1 only up to rounding, so there the result is equal to within an ulp or two.
    reducer.applied = [0, 0, r]  # one step of r at block 2, outside a model
    reducer(0, TokenState(hidden=state.hidden.clone(), residual=None, cls_index=cls_index))  # starts a forward
    out = reducer(2, synthetic_state(batch, length, cls_index, 8, equal=True, seed=length))
    assert out.length == length - r
    torch.testing.assert_close(out.hidden, token.expand_as(out.hidden), rtol=1e-6, atol=0)
    torch.testing.assert_close(out.residual, 2 * token.expand_as(out.residual), rtol=1e-6, atol=0)


@settings(max_examples=15, deadline=None)
@given(T=st.integers(2, 30), seed=st.integers(0, 100))
def test_merging_equal_tokens_with_general_values_is_within_an_ulp(T, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 1, 7, generator=g).expand(2, T + 1, 7).contiguous()
    sizes = torch.randint(1, 9, (2, T + 1, 1), generator=g).float()
    plan = bipartite_plan(torch.randn(2, T, 4, generator=g), T // 2, cls_index=0, length=T + 1)
    out = apply_plan(x, plan, 0, sizes)
    torch.testing.assert_close(out, x[:, : out.shape[1]], rtol=4e-7, atol=0)
