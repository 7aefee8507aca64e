"""Every reduction method on every backbone family: runs, traces, gradients, restore, bad input, FLOPs targets.

Forwards use tiny configurations (a few dozen tokens); the FLOPs targets use full-size models, which
``reduce`` only needs as objects (no forward is run at full size).
"""
import sys

import pytest
import torch

import vimtr
from vimtr.models.token_state import TokenState
from vimtr.reduction import list_methods, reduce, restore
from vimtr.reduction.api import METHODS as REGISTRY
from vimtr.reduction.base import COMMON_PARAMS

# ``vimtr.flops`` is the function re-exported by the package; the module is reached through sys.modules.
count_flops = sys.modules["vimtr.flops"].flops

METHODS = list_methods()
# Methods whose every patch ends up in exactly one token (no pruning) with their default parameters.
MERGING = {"mtr", "rmeeto", "tome", "evit", "pumer"}


pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py

# One tiny configuration per backbone family: (registered name, overrides).
FAMILIES = {
    "vim": ("vim_tiny", dict(depth=4, embed_dim=16, d_state=8, img_size=32, patch_size=4)),  # 64 patches
    "vim_stride8": ("vim_tiny_stride8", dict(depth=4, embed_dim=16, d_state=8, img_size=48)),  # 25 patches
    "videomamba": ("videomamba_tiny", dict(depth=4, embed_dim=16, d_state=8, img_size=24, patch_size=4)),
    "videomamba_video": ("videomamba_video_tiny", dict(depth=4, embed_dim=16, d_state=8, num_frames=2,
                                                       img_size=32, patch_size=8)),  # 2 frames x 16 patches
}


def tiny(family="vim", seed=0):
    name, kw = FAMILIES[family]
    torch.manual_seed(seed)
    return vimtr.create_model(name, num_classes=10, **kw)


def images(model, batch, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, *model.input_size, generator=g)


def r_for(model):
    """A constant r that every method accepts at every block of a tiny ``model`` (interval 1: 3 steps)."""
    return max(1, model.num_patches * getattr(model, "num_frames", 1) // 12)


# --------------------------------------------------------------------------------------------- running
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", METHODS)
def test_runs_in_eval_with_full_trace(method, family):
    model = tiny(family).eval()
    reduce(model, method, r=r_for(model), interval=1, trace_source=True)
    x = images(model, 2)
    with torch.no_grad():
        logits = model(x)
    assert logits.shape == (2, 10) and torch.isfinite(logits).all()
    trace = model.reduction_trace
    assert set(trace) >= {"tokens", "cls_index", "sizes", "source"}
    assert trace["tokens"] == model.reducer.lengths  # the plan and the forward agree
    assert trace["tokens"][-1] < trace["tokens"][0]
    L = trace["tokens"][-1]
    assert trace["sizes"].shape == (2, L)
    P = model.reducer.num_tokens - 1
    assert trace["source"].shape == (2, L, P)
    c = trace["cls_index"][-1]
    assert 0 <= c < L and trace["sizes"][:, c].eq(1).all()
    assert not trace["source"][:, c].any()  # the class token stands for no patch: it is the class token
    per_patch = trace["source"].sum(dim=1)  # how many final tokens each patch lives in
    if method in MERGING:
        assert per_patch.eq(1).all()
        assert trace["sizes"].sum(dim=1).eq(P + 1).all()
    else:
        assert per_patch.le(1).all()


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", METHODS)
def test_trains_with_gradients_through_merged_values(method, family):
    model = tiny(family).train()
    reduce(model, method, r=r_for(model), interval=1)
    x = images(model, 2).requires_grad_()
    loss = model(x).logsumexp(dim=-1).sum()
    loss.backward()
    assert "source" not in model.reduction_trace  # only with trace_source=True
    assert model.reduction_trace["tokens"] == model.reducer.lengths
    for p in (model.patch_embed.proj.weight, model.cls_token, model.layers[0].mixer.in_proj.weight):
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0
    assert x.grad.abs().sum() > 0


def one_step(method, r, hidden, residual_state=None, **params):
    """Run ``method``'s reduction step of r tokens at block 2 of a tiny model on given hidden/residual states."""
    model = tiny()
    reduce(model, method, r=r, **params)  # interval 2, depth 4: block 2 is the one reducing block
    B, L, C = hidden.shape
    g = torch.Generator().manual_seed(3)
    aux = {"delta_f": torch.rand(B, 2 * C, L, generator=g), "delta_b": torch.rand(B, 2 * C, L, generator=g)}
    residual = torch.randn(B, L, C, generator=g) if residual_state is None else residual_state
    c = model.initial_cls_index
    model.reducer(0, TokenState(hidden=torch.zeros_like(hidden), residual=None, cls_index=c))  # starts a forward
    state = TokenState(hidden=hidden, residual=residual, cls_index=c, sizes=torch.ones(B, L, 1), aux=aux)
    return model, model.reducer(2, state)


@pytest.mark.parametrize("method", METHODS)
def test_gradients_reach_every_merged_token_and_no_pruned_one(method):
    """Merging is differentiable: every token merged away still gets a gradient; a pruned one gets none."""
    hidden = torch.randn(2, 65, 16, generator=torch.Generator().manual_seed(0)).requires_grad_()
    model, out = one_step(method, 8, hidden)
    out.hidden.sum().backward()
    reached = hidden.grad.abs().sum(-1) > 0  # (B, L)
    pruned = {"utr": 8 - 8 // 2, "random": 8, "hsa": 8, "positional": 8}.get(method, 0)  # UTR: half of r merged (ToR_SSM's r // 2)
    assert reached.sum(1).tolist() == [65 - pruned] * 2


@pytest.mark.parametrize("residual,pruned", [("merge", 0), ("hybrid", 4)])
def test_utr_residual_stream_is_merged_not_pruned_by_default(residual, pruned):
    """ToR_SSM's default: hidden states hybrid (prune + merge), the residual stream merged only."""
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(2, 65, 16, generator=g)
    res = torch.randn(2, 65, 16, generator=g).requires_grad_()
    _, out = one_step("utr", 8, hidden, res, residual=residual)
    out.residual.sum().backward()
    assert ((res.grad.abs().sum(-1) > 0).sum(1) == 65 - pruned).all()
    assert out.residual.shape == out.hidden.shape == (2, 57, 16)


def test_evit_fused_token_is_the_score_weighted_mean_with_gradients():
    """EViT fuses the r+1 least class-like tokens into their softmax(score)-weighted mean, appended last; as
    in EViT the weights are not detached, so the class token (never fused) gets a gradient through them."""
    T, C = 64, 16
    hidden = torch.randn(2, T + 1, C, generator=torch.Generator().manual_seed(0)).requires_grad_()
    model, out = one_step("evit", 6, hidden)
    c = model.initial_cls_index
    assert out.length == T + 1 - 6 and out.cls_index == c * (T + 1 - 6) // (T + 1)
    rest = torch.cat((hidden[:, :c], hidden[:, c + 1:]), dim=1)
    score = torch.nn.functional.cosine_similarity(rest, hidden[:, c:c + 1], dim=-1)
    low = score.argsort(dim=-1)[:, :7]  # the r + 1 fused tokens
    w = torch.softmax(score.gather(1, low), dim=-1).unsqueeze(-1)
    expected = (rest.gather(1, low.unsqueeze(-1).expand(-1, -1, C)) * w).sum(1)
    torch.testing.assert_close(out.hidden[:, -1], expected)
    assert out.sizes[:, -1].eq(7).all()
    out.hidden[:, -1].sum().backward()
    assert hidden.grad[:, c].abs().sum() > 0


# --------------------------------------------------------------------------------------------- restore
@pytest.mark.parametrize("method", METHODS)
def test_restore_is_bit_identical(method):
    model = tiny().eval()
    x = images(model, 2)
    with torch.no_grad():
        before = model(x)
        reduce(model, method, r=4, interval=1)
        reduced = model(x)
        restore(model)
        after = model(x)
    assert not torch.equal(reduced, before)
    assert torch.equal(after, before)
    assert model.reducer is None and not hasattr(model, "reduction") and not hasattr(model, "reduction_trace")


def test_reduce_twice_replaces_the_reduction():
    model, fresh = tiny().eval(), tiny().eval()
    x = images(model, 2)
    reduce(model, "tome", r=3)
    reduce(model, "evit", r=5)
    reduce(fresh, "evit", r=5)
    assert model.reduction["method"] == "evit" and model.reducer.name == "evit"
    with torch.no_grad():
        assert torch.equal(model(x), fresh(x))
    assert model.reduction_trace["tokens"] == fresh.reducer.lengths


@pytest.mark.parametrize("method", METHODS)
def test_batch_independence(method):
    model = tiny().eval()
    reduce(model, method, r=5, interval=1)
    x = images(model, 3)
    with torch.no_grad():
        batch = model(x)
        alone = model(x[1:2])
    torch.testing.assert_close(alone, batch[1:2], rtol=0, atol=1e-5)


def test_random_is_seeded_and_deterministic():
    model = tiny().eval()
    x = images(model, 2)

    def sources(seed):
        reduce(model, "random", r=5, seed=seed, trace_source=True)
        with torch.no_grad():
            out = model(x)
        return out, model.reduction_trace["source"]

    out0, src0 = sources(0)
    out0b, src0b = sources(0)
    again, src_again = model(x).detach(), model.reduction_trace["source"]  # same reducer, next forward
    out1, src1 = sources(1)
    assert torch.equal(out0, out0b) and torch.equal(src0, src0b)
    assert torch.equal(again, out0) and torch.equal(src_again, src0)
    assert not torch.equal(src0, src1)
    assert model.reduction["params"]["seed"] == 1


def test_default_schedule_is_flops_reduction_03_at_rmeeto_blocks():
    model = vimtr.create_model("vim_tiny")
    for method in set(METHODS) - {"rmeeto"}:  # R-MeeTo's own default is its paper's r
        reduce(model, method)
        assert model.reducer.requested_flops_reduction == 0.3, method
        r = model.reducer.r
        assert [i for i, v in enumerate(r) if v] == list(range(2, 24, 2)), (method, r)


# --------------------------------------------------------------------------------------------- bad input
def test_unknown_method_lists_the_valid_ones():
    with pytest.raises(ValueError) as err:
        reduce(tiny(), "tome2")
    for name in METHODS:
        assert name in str(err.value)


@pytest.mark.parametrize("method", METHODS)
def test_unknown_parameter_lists_the_valid_ones(method):
    with pytest.raises(TypeError) as err:
        reduce(tiny(), method, r=2, bogus=1)
    msg = str(err.value)
    assert "bogus" in msg
    for p in COMMON_PARAMS + tuple(REGISTRY[method].PARAMS):
        assert p in msg, (p, msg)


@pytest.mark.parametrize("method,params", [("evit", {"score": "attn"}), ("evit", {"fuse": 1}),
                                           ("utr", {"prune_ratio": 1.5}), ("utr", {"feature": "x"}),
                                           ("utr", {"residual": "prune"}), ("random", {"seed": 0.5}),
                                           ("pumer", {"metric": "keys"}), ("pumer", {"ordered": 1}),
                                           ("pumer", {"weighted": "no"}), ("pumer", {"pairing": "sorted"}),
                                           ("hsa", {"score": "attn"}), ("hsa", {"mirror": 0}),
                                           ("hsa", {"cls_position": "first"})])
def test_bad_parameter_values(method, params):
    with pytest.raises(ValueError, match=method):
        reduce(tiny(), method, r=2, **params)


@pytest.mark.parametrize("method", sorted(set(METHODS) - {"rmeeto"}))
def test_schedule_removing_too_many_tokens(method):
    model = tiny()  # 65 tokens entering block 2
    r = [0] * len(model.layers)
    r[2] = 70
    with pytest.raises(ValueError, match=r"removes 70 tokens at block 2.*65 tokens"):
        reduce(model, method, r=r)
    with pytest.raises(ValueError, match="block"):
        reduce(model, method, r=[0, 0, 40, 30])  # fits at block 2 for some methods, never at block 3


def test_rmeeto_caps_an_oversized_r_as_the_official_code():
    """R-MeeTo caps r at (L−1)//2 per step (the official behaviour), but an r larger than the block's
    patch tokens is a mistake, not something to cap."""
    model = tiny()
    reduce(model, "rmeeto", r=[0, 0, 60, 0])
    assert model.reducer.lengths == [65, 65, 33, 33]
    with pytest.raises(ValueError, match="removes 70 tokens at block 2"):
        reduce(model, "rmeeto", r=[0, 0, 70, 0])


@pytest.mark.parametrize("method", METHODS)
def test_schedule_checks(method):
    model = tiny()
    with pytest.raises(ValueError, match=r"r\[0\]"):
        reduce(model, method, r=[1, 0, 0, 0])
    with pytest.raises(ValueError, match="4"):
        reduce(model, method, r=[0, 1])  # one entry per block
    with pytest.raises(ValueError):
        reduce(model, method, r=-1)
    for bad in (-0.1, 1.0, 1.5):
        with pytest.raises(ValueError, match="flops_reduction"):
            reduce(model, method, flops_reduction=bad)
    with pytest.raises(ValueError, match="unreachable"):
        reduce(model, method, flops_reduction=0.95)
    with pytest.raises(ValueError, match="not both"):
        reduce(model, method, r=2, flops_reduction=0.2)
    assert model.reducer is None  # a failed reduce leaves the model unreduced


def test_reduce_refuses_modules_it_cannot_patch():
    with pytest.raises(TypeError, match="Linear"):
        reduce(torch.nn.Linear(3, 3), "tome")
    with pytest.raises(TypeError):
        restore(torch.nn.Linear(3, 3))


# --------------------------------------------------------------------------------------------- FLOPs
@pytest.fixture(scope="module")
def full_size_models():
    return {name: vimtr.create_model(name) for name in ("vim_tiny", "vim_small", "vim_base")}


@pytest.mark.parametrize("name", ["vim_tiny", "vim_small", "vim_base"])
@pytest.mark.parametrize("method", METHODS)
def test_flops_reduction_lands_on_target(full_size_models, name, method):
    model = full_size_models[name]
    restore(model)
    base = count_flops(model)
    for target in (0.2, 0.3, 0.4):
        reduce(model, method, flops_reduction=target)
        achieved = 1.0 - count_flops(model) / base
        assert abs(achieved - target) <= 0.01, (name, method, target, achieved)
        assert model.reducer.lengths[-1] < model.reducer.num_tokens
    restore(model)
    assert count_flops(model) == base


# --------------------------------------------------------------------------------------------- MTR's ablations
def ablation_state(seed=0, B=2, T=64, C=16, N=8):
    """A reduction step's input with every aux key a score can read (class token in the middle)."""
    g = torch.Generator().manual_seed(seed)
    L = T + 1
    aux = {"delta_f": torch.rand(B, 2 * C, L, generator=g), "delta_b": torch.rand(B, 2 * C, L, generator=g)}
    for k in ("B_f", "B_b", "C_f", "C_b"):
        aux[k] = torch.randn(B, L, N, generator=g)
    return (torch.randn(B, L, C, generator=g), torch.randn(B, L, C, generator=g), aux)


def expected_score(score, hidden, aux, c):
    """The ablation scores written out independently, class token removed (B, T)."""
    if score == "delta":
        s = (aux["delta_f"] + aux["delta_b"]).mean(1)
    elif score in ("B", "C"):
        s = aux[f"{score}_f"].norm(dim=-1) + aux[f"{score}_b"].norm(dim=-1)
    else:
        s = torch.nn.functional.cosine_similarity(hidden, hidden[:, c:c + 1], dim=-1)
    return torch.cat((s[:, :c], s[:, c + 1:]), dim=1)


@pytest.mark.parametrize("score", ["delta", "B", "C", "cls"])
@pytest.mark.parametrize("order", [True, False])
def test_mtr_score_picks_the_least_important_as_sources(score, order):
    """Whatever the score, the r least important tokens are merged away; with order=False the survivors come
    in descending importance, otherwise in their original order."""
    hidden, residual, aux = ablation_state()
    model = tiny()
    reduce(model, "mtr", r=6, score=score, order=order)
    reducer = model.reducer
    c = model.initial_cls_index
    state = TokenState(hidden=hidden, residual=residual, cls_index=c, sizes=torch.ones(2, 65, 1), aux=aux)
    plan = reducer.plan(2, state, 6)
    s = expected_score(score, hidden, aux, c)
    least = s.argsort(dim=1)[:, :6]
    for b in range(2):
        assert set(plan.src[b].tolist()) == set(least[b].tolist())
    kept_scores = s.gather(1, plan.keep)
    if order:
        assert (plan.keep[:, 1:] > plan.keep[:, :-1]).all()
    else:
        assert (kept_scores[:, 1:] <= kept_scores[:, :-1]).all()
        assert not (plan.keep[:, 1:] > plan.keep[:, :-1]).all()  # random scores: not sorted by position
    assert plan.cls_pos == c * (65 - 6) // 65


def test_mtr_order_false_merges_the_same_groups_only_laid_out_differently():
    hidden, residual, aux = ablation_state(seed=4)
    c = tiny().initial_cls_index

    def run(order):
        model = tiny()
        reduce(model, "mtr", r=7, order=order)
        model.reducer(0, TokenState(hidden=torch.zeros_like(hidden), residual=None, cls_index=c))
        model.reducer.trace_source = True
        state = TokenState(hidden=hidden.clone(), residual=residual.clone(), cls_index=c,
                           sizes=torch.ones(2, 65, 1), aux=aux)
        state.source = model.reducer._initial_source(state)
        return model.reducer(2, state)

    a, b = run(True), run(False)
    assert a.length == b.length == 58 and a.cls_index == b.cls_index
    for i in range(2):
        rows_a = {tuple(r.nonzero().flatten().tolist()): v for r, v in zip(a.source[i], a.hidden[i])}
        rows_b = {tuple(r.nonzero().flatten().tolist()): v for r, v in zip(b.source[i], b.hidden[i])}
        assert rows_a.keys() == rows_b.keys()  # the same groups of patches (the class token's is empty)
        for k in rows_a:
            torch.testing.assert_close(rows_a[k], rows_b[k])
    assert not torch.equal(a.source, b.source)  # but in another order


@pytest.mark.parametrize("params,match", [({"score": "attn"}, "score must be one of"),
                                          ({"order": "yes"}, "order must be"),
                                          ({"score": "B", "pool": "channel_max"}, "channel_max"),
                                          ({"keep_ratio": 1.0}, "keep_ratio")])
def test_mtr_bad_ablation_values(params, match):
    with pytest.raises(ValueError, match=match):
        reduce(tiny(), "mtr", r=2, **params)


def test_mtr_cls_score_reads_no_aux_and_b_c_read_only_their_keys():
    model = tiny()
    for score, keys in (("cls", set()), ("B", {"B_f", "B_b"}), ("C", {"C_f", "C_b"})):
        reduce(model, "mtr", r=2, interval=1, score=score)
        wanted = model.reducer.requests(1)
        assert set(wanted) == keys, (score, wanted)
