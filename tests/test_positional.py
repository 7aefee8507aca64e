"""The content-blind ``positional`` baseline: which tokens it drops, that it never looks at the image,
the class token, restore, bad parameters, and its FLOPs at the demo's levels."""
import sys

import pytest
import torch

import vimtr
from vimtr.models.token_state import TokenState
from vimtr.reduction import list_methods, reduce, restore

count_flops = sys.modules["vimtr.flops"].flops

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


def tiny(seed=0, **kw):
    torch.manual_seed(seed)
    cfg = dict(depth=6, embed_dim=16, d_state=8, img_size=32, patch_size=4, num_classes=10)  # 64 patches
    return vimtr.create_model("vim_tiny", **{**cfg, **kw}).eval()


def images(model, batch, seed=1):
    return torch.randn(batch, *model.input_size, generator=torch.Generator().manual_seed(seed))


def survivors_by_hand(patches: int, schedule: list[int], pattern: str, stride=None) -> list[int]:
    """The input patches left after the schedule, computed on a plain list: drop the first r, or the
    k-th, 2k-th, ... r·k-th of what is left (k = stride, else len // r)."""
    left = list(range(patches))
    for r in schedule:
        if not r:
            continue
        if pattern == "first":
            left = left[r:]
        else:
            k = stride or len(left) // r
            gone = {j * k - 1 for j in range(1, r + 1)}
            left = [p for i, p in enumerate(left) if i not in gone]
    return left


def final_patches(model, x, cls_between=True):
    """For each image, the input patch behind each final non-class token, in sequence order;
    ``cls_between``: also check that the class token still sits between the patches it started between."""
    with torch.no_grad():
        model(x)
    trace = model.reduction_trace
    c = trace["cls_index"][-1]
    src = trace["source"]  # (B, L, P): one-hot rows for pruned-only reductions, the class row all zero
    assert torch.equal(src[:, c], torch.zeros_like(src[:, c]))
    rows = torch.cat((src[:, :c], src[:, c + 1:]), dim=1)
    assert torch.equal(rows.sum(-1), torch.ones_like(rows.sum(-1)))  # each token one whole patch: nothing merged
    patches = rows.argmax(-1)
    if cls_between:
        start = model.initial_cls_index
        assert (patches[:, :c] < start).all() and (patches[:, c:] >= start).all()
    return patches.tolist()


def test_registered_and_listed():
    assert "positional" in list_methods()
    model = reduce(tiny(), "positional")
    params = model.reduction["params"]
    assert params["pattern"] == "first" and params["stride"] is None and params["cls"] == "order"


@pytest.mark.parametrize("pattern,stride", [("first", None), ("stride", None), ("stride", 3)])
def test_drops_the_pattern_keeps_the_order_and_ignores_the_image(pattern, stride):
    model = tiny()
    schedule = [0, 0, 7, 0, 9, 0]  # blocks 2 and 4
    reduce(model, "positional", r=schedule, pattern=pattern, stride=stride, trace_source=True)
    x = torch.cat((images(model, 2, seed=1), images(model, 1, seed=5) * 3 + 1))  # three unlike images
    got = final_patches(model, x)
    expected = survivors_by_hand(model.num_patches, schedule, pattern, stride)
    assert got == [expected] * 3  # the same tokens for every image, in raster order
    assert expected == sorted(expected) and len(expected) == 64 - 16
    assert model.reduction_trace["tokens"] == [65, 65, 58, 58, 49, 49] == model.reducer.lengths
    if pattern == "first":  # every drop comes before the class token: it moves down one place for each
        assert model.reduction_trace["cls_index"] == [32, 32, 25, 25, 16, 16]


def test_proportional_class_rule_moves_the_class_token_as_rmeeto():
    model = tiny()
    reduce(model, "positional", r=[0, 0, 7, 0, 9, 0], cls="proportional", trace_source=True)
    got = final_patches(model, images(model, 2), cls_between=False)
    assert got == [survivors_by_hand(64, [7, 9], "first")] * 2  # the same tokens kept
    c1 = 32 * 58 // 65
    assert model.reduction_trace["cls_index"] == [32, 32, c1, c1, c1 * 49 // 58, c1 * 49 // 58]


def test_first_pattern_keeps_the_last_patches():
    """With pattern 'first' the survivors are simply the bottom of the image in raster order."""
    model = reduce(tiny(), "positional", r=[0, 0, 5, 0, 11, 0], trace_source=True)
    assert final_patches(model, images(model, 1))[0] == list(range(16, 64))


def test_default_stride_spreads_the_drops_over_the_sequence():
    model = reduce(tiny(), "positional", r=[0, 0, 8, 0, 0, 0], pattern="stride", trace_source=True)
    kept = final_patches(model, images(model, 1))[0]
    dropped = sorted(set(range(64)) - set(kept))
    assert dropped == [7, 15, 23, 31, 39, 47, 55, 63]  # every 8th: 64 // 8


@pytest.mark.parametrize("cls", ["order", "proportional"])
def test_step_keeps_rows_bit_exact_and_the_class_token_in_place(cls):
    """One step on given streams: every surviving row, the class token's included, is the input row
    itself (pruning, not merging), both streams alike; the class token goes one place down per dropped
    token before it (``order``) or to floor(c·(L−r)/L) (``proportional``)."""
    model = reduce(tiny(), "positional", r=[0, 0, 6, 0, 0, 0], pattern="stride", stride=5, cls=cls)
    B, L, C = 2, 65, 16
    g = torch.Generator().manual_seed(0)
    hidden, residual = torch.randn(B, L, C, generator=g), torch.randn(B, L, C, generator=g)
    c = model.initial_cls_index
    model.reducer(0, TokenState(hidden=torch.zeros_like(hidden), residual=None, cls_index=c))
    out = model.reducer(2, TokenState(hidden=hidden.clone(), residual=residual.clone(), cls_index=c,
                                      sizes=torch.ones(B, L, 1)))
    out.materialise()
    # stride 5: the 5th, 10th, ... 30th patch go, all six before the class token (c = 32)
    new_c = c - 6 if cls == "order" else c * (L - 6) // L
    assert out.cls_index == new_c and out.length == L - 6
    assert torch.equal(out.hidden[:, new_c], hidden[:, c]) and torch.equal(out.residual[:, new_c], residual[:, c])
    patch_rows = [i for i in range(L) if i != c]
    kept = [patch_rows[i] for i in survivors_by_hand(64, [6], "stride", 5)]
    out_rows = [i for i in range(L - 6) if i != new_c]
    assert torch.equal(out.hidden[:, out_rows], hidden[:, kept])
    assert torch.equal(out.residual[:, out_rows], residual[:, kept])
    assert torch.equal(out.sizes, torch.ones(B, L - 6, 1))


@pytest.mark.parametrize("params", [{}, {"pattern": "stride"}, {"pattern": "stride", "stride": 2}])
def test_restore_is_bit_identical(params):
    model = tiny()
    x = images(model, 2)
    with torch.no_grad():
        before = model(x)
        reduce(model, "positional", r=4, interval=1, **params)
        reduced = model(x)
        restore(model)
        after = model(x)
    assert not torch.equal(reduced, before)
    assert torch.equal(after, before)


@pytest.mark.parametrize("params,match", [
    ({"pattern": "last"}, "pattern must be one of 'first', 'stride'"),
    ({"cls": "middle"}, "cls must be one of 'order', 'proportional'"),
    ({"pattern": "first", "stride": 2}, "applies to pattern='stride' only"),
    ({"pattern": "stride", "stride": 0}, "stride must be an integer >= 1"),
    ({"pattern": "stride", "stride": True}, "stride must be an integer >= 1"),
    ({"pattern": "stride", "stride": 2.0}, "stride must be an integer >= 1"),
    ({"pattern": "stride", "stride": 9, "r": [0, 0, 8, 0, 0, 0]}, r"stride 9 drops at most 7 of the 64 .* block 2"),
])
def test_bad_parameters_say_what_to_change(params, match):
    params = {"r": 2, **params}
    with pytest.raises(ValueError, match=match):
        reduce(tiny(), "positional", **params)


@pytest.mark.parametrize("name", ["vim_tiny", "vim_small", "vim_base"])
def test_flops_levels_match_random_pruning(name):
    """At 20/30/40% fewer FLOPs (within a point) positional removes exactly the tokens random pruning
    does, at the same blocks: the same schedule and FLOPs as every other method."""
    model = vimtr.create_model(name)
    base = count_flops(model)
    for target in (0.2, 0.3, 0.4):
        for pattern in ("first", "stride"):
            reduce(model, "positional", flops_reduction=target, pattern=pattern)
            achieved, schedule = 1.0 - count_flops(model) / base, list(model.reducer.r)
            assert abs(achieved - target) <= 0.01, (name, target, pattern, achieved)
            reduce(model, "random", flops_reduction=target)
            assert list(model.reducer.r) == schedule and 1.0 - count_flops(model) / base == achieved
    restore(model)
