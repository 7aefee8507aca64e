"""Baselines checked against their sources' algorithms, re-implemented here independently on the same tensors.

ToMe: facebookresearch/ToMe ``tome/merge.py`` (``bipartite_soft_matching`` + ``merge_wavg`` +
``merge_source``), written out below from its semantics, then compared group by group with vimtr's
``tome`` over several steps, with and without a class token.
"""
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


def vimtr_tome_steps(x, r, steps, cls_index, **params):
    """vimtr's ToMe reducer run ``steps`` times on ``x`` (no block in between: the merged tokens are the next
    metric, as in :func:`tome_reference`); returns the final state."""
    family = "videomamba_tiny" if cls_index == 0 else "vim_tiny"  # only the reducer's rules are used
    model = vimtr.create_model(family, depth=steps + 1, embed_dim=8, d_state=4, img_size=16, patch_size=4)
    reduce(model, "tome", r=[0] * (steps + 1), trace_source=True, **params)
    reducer = model.reducer
    reducer.applied = [0] + [r] * steps
    state = reducer(0, TokenState(hidden=x.clone(), residual=x.clone(), cls_index=cls_index))
    for i in range(1, steps + 1):
        state = reducer(i, state)
    return state


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
