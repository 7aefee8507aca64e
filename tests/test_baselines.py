"""Baselines checked against their sources' algorithms, re-implemented here independently on the same tensors.

ToMe: facebookresearch/ToMe ``tome/merge.py`` (``bipartite_soft_matching`` + ``merge_wavg`` +
``merge_source``), written out below from its semantics, then compared group by group with vimtr's
``tome`` over several steps, with and without a class token.

PuMer: ToR_SSM's ``pumer`` strategy (``pom.py`` + its ``bipartite_soft_matching``/``merge_wavg``/``unmerge``).
HSA: the released ToP-ViM pruning step (``vim/models_mamba.py``).
"""
import math

import pytest
import torch

import vimtr
from vimtr.models.token_state import TokenState
from vimtr.reduction import reduce

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


# --------------------------------------------------------------------------------------------- ToMe
def tome_reference(x, size, source, r, class_token):
    """One ToMe step as facebookresearch/ToMe does it, on a metric that is the tokens themselves.

    Sets A/B are the even/odd positions of the whole sequence; a class token (index 0) is in A with a −inf
    score; the r A tokens with the best match merge into it (sums of size·x and of sizes, then the ratio;
    sources by max); the output is [unmerged A, B], the unmerged A tokens sorted by index only when there is
    a class token."""
    m = x / x.norm(dim=-1, keepdim=True)
    scores = m[:, 0::2] @ m[:, 1::2].transpose(1, 2)
    if class_token:
        scores[:, 0, :] = float("-inf")
    best, match = scores.max(dim=-1)
    ranked = best.argsort(dim=-1, descending=True)
    unmerged, merged = ranked[:, r:], ranked[:, :r]
    if class_token:
        unmerged = unmerged.sort(dim=-1).values
    into = match.gather(1, merged)

    def merge(t, mode):
        k = t.shape[-1]
        even, odd = t[:, 0::2], t[:, 1::2]
        kept = even.gather(1, unmerged[..., None].expand(-1, -1, k))
        moved = even.gather(1, merged[..., None].expand(-1, -1, k))
        odd = odd.scatter_reduce(1, into[..., None].expand(-1, -1, k), moved, reduce=mode)
        return torch.cat((kept, odd), dim=1)

    total = merge(x * size, "sum")
    size = merge(size, "sum")
    return total / size, size, merge(source, "amax")


def groups(source, offset=0, cls_row=None):
    """Per sample, the list (in sequence order) of the sets of input positions each token stands for.
    vimtr's source maps have no column for the class token (``offset=1`` shifts patch columns past it) and
    give it an empty row (``cls_row``: it stands for input position 0)."""
    out = []
    for b in range(source.shape[0]):
        rows = []
        for i, row in enumerate(source[b]):
            s = {int(j) + offset for j in row.nonzero().flatten()}
            rows.append({0} if (cls_row is not None and i == cls_row and not s) else s)
        out.append(rows)
    return out


def vimtr_steps(method, x, r, steps, cls_index, residual=None, **params):
    """vimtr's ``method`` reducer run for ``steps`` steps removing ``r`` (an int, or one per step) on ``x``
    (no block in between: the reduced tokens are the next step's input, as in the references here); returns
    the final state."""
    family = "videomamba_tiny" if cls_index == 0 else "vim_tiny"  # only the reducer's rules are used
    model = vimtr.create_model(family, depth=steps + 1, embed_dim=8, d_state=4, img_size=16, patch_size=4)
    reduce(model, method, r=[0] * (steps + 1), trace_source=True, **params)
    reducer = model.reducer
    reducer.applied = [0] + (list(r) if isinstance(r, (list, tuple)) else [r] * steps)
    res = x.clone() if residual is None else residual.clone()
    state = reducer(0, TokenState(hidden=x.clone(), residual=res, cls_index=cls_index))
    for i in range(1, steps + 1):
        state = reducer(i, state)
    return state


def vimtr_tome_steps(x, r, steps, cls_index, **params):
    return vimtr_steps("tome", x, r, steps, cls_index, **params)


def tome_reference_steps(x, r, steps, class_token):
    B, T, _ = x.shape
    size, source = torch.ones(B, T, 1), torch.eye(T).expand(B, T, T)
    for _ in range(steps):
        x, size, source = tome_reference(x, size, source, r, class_token)
    return x, size, source


def tokens(seed, B=2, T=196, C=32):
    return torch.randn(B, T, C, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("seed", [0, 1])
def test_tome_order_score_is_tome_without_a_class_token(seed):
    """No class token: ToMe keeps the unmerged tokens in score order; vimtr's order="score" is exactly that,
    step after step: the same groups in the same order, the same sizes and values."""
    x = tokens(seed)
    ref_x, ref_size, ref_source = tome_reference_steps(x, 16, 3, class_token=False)
    state = vimtr_tome_steps(x, 16, 3, None, order="score")
    assert groups(state.source) == groups(ref_source)
    assert torch.equal(state.sizes, ref_size)
    torch.testing.assert_close(state.hidden, ref_x, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(state.residual, ref_x, rtol=1e-5, atol=1e-6)


def test_tome_default_order_matches_tome_one_step_then_drifts_without_a_class_token():
    """The default (unmerged tokens by index) merges the same groups as ToMe at one step, laid out differently;
    the layout sets the next step's even/odd split, so after three steps the groups are no longer ToMe's."""
    x = tokens(2)
    _, _, ref1 = tome_reference_steps(x, 16, 1, class_token=False)
    one = vimtr_tome_steps(x, 16, 1, None)
    for ours, ref in zip(groups(one.source), groups(ref1)):
        assert sorted(map(sorted, ours)) == sorted(map(sorted, ref))
    assert groups(one.source) != groups(ref1)  # same groups, another order
    _, _, ref3 = tome_reference_steps(x, 16, 3, class_token=False)
    three = vimtr_tome_steps(x, 16, 3, None)
    for ours, ref in zip(groups(three.source), groups(ref3)):
        assert sorted(map(sorted, ours)) != sorted(map(sorted, ref))


@pytest.mark.parametrize("seed", [0, 3])
def test_tome_cls_in_matching_is_tome_with_a_first_class_token(seed):
    """Class token at index 0: ToMe counts it in set A with a −inf score and sorts the unmerged A tokens;
    vimtr's cls_in_matching=True (order="index") gives the same groups, order, sizes and values."""
    x = tokens(seed, T=197)
    x[:, 0] = x[:, 1]  # the class token's best match would be perfect: only its protection keeps it unmerged
    ref_x, ref_size, ref_source = tome_reference_steps(x, 16, 3, class_token=True)
    state = vimtr_tome_steps(x, 16, 3, 0, cls_in_matching=True)
    assert state.cls_index == 0
    assert groups(state.source, offset=1, cls_row=0) == groups(ref_source)
    assert torch.equal(state.sizes, ref_size)
    torch.testing.assert_close(state.hidden, ref_x, rtol=1e-5, atol=1e-6)


def test_tome_default_splits_the_class_token_out_first():
    """vimtr's default takes the class token out before the even/odd split, so with a first class token its
    sets are not ToMe's and neither are the groups (the class token itself stays first)."""
    x = tokens(0, T=197)
    _, _, ref_source = tome_reference_steps(x, 16, 2, class_token=True)
    state = vimtr_tome_steps(x, 16, 2, 0)
    assert state.cls_index == 0
    ours, ref = groups(state.source, offset=1, cls_row=0), groups(ref_source)
    for o, f in zip(ours, ref):
        assert o[0] == f[0] == {0}
        assert set(map(frozenset, o)) != set(map(frozenset, f))


def test_tome_cls_in_matching_refuses_a_middle_class_token_with_index_order():
    model = vimtr.create_model("vim_tiny", depth=4, embed_dim=8, d_state=4, img_size=16, patch_size=4)
    with pytest.raises(ValueError, match="index 0"):
        reduce(model, "tome", r=2, cls_in_matching=True)
    reduce(model, "tome", r=2, cls_in_matching=True, order="score")  # defined: the class token goes last of A
    with pytest.raises(ValueError, match="order must be"):
        reduce(model, "tome", r=2, order="position")
    with pytest.raises(ValueError, match="cls_in_matching"):
        reduce(model, "tome", r=2, cls_in_matching="yes")


# --------------------------------------------------------------------------------------------- PuMer
def tor_ssm_pumer_reference(x, r, released_pairing):
    """One step of ToR_SSM's ``pumer`` (no class token): matching on the ReLU-clipped tokens, even/odd sets,
    the r best edges merged as plain means (``merge_wavg`` without sizes), then ``unmerge`` back to the
    original positions and the emptied (all-zero) rows dropped. ``released_pairing``: ToR_SSM sorts the
    sources by position after pairing them with their destinations (as released); else each source goes to
    its own match."""
    B, T, C = x.shape
    m = x.clamp(min=0)
    m = m / m.norm(dim=-1, keepdim=True)
    best, match = (m[:, 0::2] @ m[:, 1::2].transpose(1, 2)).max(dim=-1)
    ranked = best.argsort(dim=-1, descending=True)
    unmerged, merged = ranked[:, r:].sort(dim=-1).values, ranked[:, :r]
    into = match.gather(1, merged)
    if released_pairing:
        merged = merged.sort(dim=-1).values

    def merge(t):
        even, odd = t[:, 0::2], t[:, 1::2]
        moved = even.gather(1, merged[..., None].expand(-1, -1, t.shape[-1]))
        return even.gather(1, unmerged[..., None].expand(-1, -1, t.shape[-1])), \
            odd.scatter_reduce(1, into[..., None].expand(-1, -1, t.shape[-1]), moved, reduce="sum")

    (kept, odd), (_, count) = merge(x), merge(torch.ones(B, T, 1))
    out = torch.zeros(B, T, C)
    out[:, 1::2] = odd / count
    out.scatter_(1, (2 * unmerged)[..., None].expand(-1, -1, C), kept)
    return out[out.abs().sum(-1) != 0].reshape(B, T - r, C)


@pytest.mark.parametrize("pairing", ["match", "released"])
def test_pumer_is_tor_ssm_pumer(pairing):
    """No class token (ToR_SSM's setting): vimtr's pumer gives ToR_SSM's output, step after step, in both
    pairings (``released`` pairs the i-th source by position with the i-th best edge's destination)."""
    x = tokens(6, T=128)
    ref = x
    for _ in range(3):
        ref = tor_ssm_pumer_reference(ref, 12, released_pairing=pairing == "released")
    state = vimtr_steps("pumer", x, 12, 3, None, pairing=pairing)
    torch.testing.assert_close(state.hidden, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(state.residual, ref, rtol=1e-5, atol=1e-6)
    assert state.sizes.sum(1).eq(128).all()  # every input token lives in exactly one output token
    other = vimtr_steps("pumer", x, 12, 3, None, pairing="released" if pairing == "match" else "match")
    assert not torch.allclose(other.hidden, ref)  # the pairing matters


def test_pumer_keeps_order_and_the_class_token():
    x = tokens(7, T=197)
    state = vimtr_steps("pumer", x, [11, 11], 2, 98)
    assert state.cls_index == (98 * 186 // 197) * 175 // 186
    c = state.cls_index
    assert torch.equal(state.hidden[:, c], x[:, 98]) and not state.source[:, c].any()
    rows = torch.cat((state.source[:, :c], state.source[:, c + 1:]), dim=1)
    for b in range(2):  # the tokens that stand for one patch are in patch order
        single = rows[b][rows[b].sum(-1) == 1].argmax(-1)
        assert (single[1:] > single[:-1]).all() and len(single) > 100


# --------------------------------------------------------------------------------------------- HSA
def top_vim_reference(hidden, residual, y_b, keep_ratio=0.8):
    """One pruning step of the released ToP-ViM code (Vim, middle class token at N // 2): the importance is
    the backward scan's SSM output ``y_b`` (B, E, N) summed over channels *in the scan's order* (never
    flipped back), the class token's is −inf (the release does that for the first sample only; here for
    every sample), ceil((N−1)·keep_ratio) made odd tokens are kept: that many minus one patch tokens, sorted
    by index, with the class token in the middle of them."""
    B, N, C = hidden.shape
    score = y_b.sum(dim=1)
    c = N // 2
    score[:, c] = float("-inf")
    n_keep = math.ceil((N - 1) * keep_ratio)
    n_keep += n_keep % 2 == 0
    top = score.topk(n_keep - 1, dim=1).indices.sort(dim=-1).values
    half = top.shape[1] // 2

    def take(t):
        rows = lambda idx: t.gather(1, idx[..., None].expand(-1, -1, t.shape[-1]))  # noqa: E731
        return torch.cat((rows(top[:, :half]), t[:, c:c + 1], rows(top[:, half:])), dim=1)

    return take(hidden), take(residual)


def test_hsa_released_options_are_the_released_pruning_step():
    """score='raw', mirror=True, cls_position='middle' on the schedule of ``released_schedule`` reproduce the
    released code's three pruning steps on Vim-S's 197 tokens, with the backward SSM output stood in by what
    vimtr's mixer exposes (the mixer output, in the backward scan's order)."""
    from vimtr.reduction.hsa import released_schedule

    g = torch.Generator().manual_seed(8)
    hidden, residual = torch.randn(2, 197, 16, generator=g), torch.randn(2, 197, 16, generator=g)
    r = [v for v in released_schedule(24, 197) if v]
    assert r == [40, 32, 24]
    ref_h, ref_r = hidden, residual
    for _ in r:
        ref_h, ref_r = top_vim_reference(ref_h, ref_r, ref_h.flip(1).transpose(1, 2))
    state = vimtr_steps("hsa", hidden, r, 3, 98, residual=residual, score="raw", mirror=True,
                        cls_position="middle")
    assert torch.equal(state.hidden, ref_h) and torch.equal(state.residual, ref_r)
    assert state.cls_index == 101 // 2


def test_hsa_default_keeps_the_highest_clipped_activations_in_order():
    g = torch.Generator().manual_seed(9)
    hidden = torch.randn(2, 65, 16, generator=g)
    state = vimtr_steps("hsa", hidden, [20], 1, 32)
    rest = torch.cat((hidden[:, :32], hidden[:, 33:]), dim=1)
    expected = rest.clamp(min=0).mean(-1).topk(44, dim=1).indices.sort(dim=1).values
    got = torch.cat((state.hidden[:, :state.cls_index], state.hidden[:, state.cls_index + 1:]), dim=1)
    assert torch.equal(got, rest.gather(1, expected[..., None].expand(-1, -1, 16)))
    assert state.cls_index == 32 * 45 // 65 and torch.equal(state.hidden[:, state.cls_index], hidden[:, 32])
