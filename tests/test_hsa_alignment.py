"""ToP-ViM's pruning-aware hidden-state alignment (``hsa``, ``align=True``): the scan over a pruned sequence
spans the gaps (``vimtr.ops.selective_scan_gapped``), and the gaps are the original positions' differences.

Both halves are held against computations written here: the gapped recurrence as a plain loop, and the
gaps from the patches each surviving token stands for (``trace_source``)."""
import pytest
import torch
import torch.nn.functional as F

import vimtr
from vimtr.ops import scan_backend, selective_scan_gapped, selective_scan_ref


def gapped_loop(u, delta, A, B, C, D, z, bias, steps, reverse):
    """h_t = exp(g_t·Δ_t·A) h_{t−1} + Δ_t·B_t·u_t, y_t = C_t·h_t + D·u_t, gated by SiLU(z): float64, a loop."""
    u, delta, B, C, z = (t.double() for t in (u, delta, B, C, z))
    d = F.softplus(delta + bias.double()[:, None])
    Bn, E, L = u.shape
    order = range(L - 1, -1, -1) if reverse else range(L)
    h = torch.zeros(Bn, E, A.shape[1], dtype=torch.float64)
    y = torch.empty_like(u)
    for t in order:
        g = steps[:, t].double()[:, None, None]
        h = torch.exp(g * d[:, :, t, None] * A.double()) * h + (d[:, :, t] * u[:, :, t])[..., None] * B[:, None, :, t]
        y[:, :, t] = (h * C[:, None, :, t]).sum(-1)
    return (y + u * D.double()[:, None]) * F.silu(z)


def inputs(seed=0, b=2, e=5, n=4, length=11):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    steps = torch.randint(1, 5, (b, length), generator=g).float()
    return dict(u=r(b, e, length), delta=r(b, e, length) - 1, A=-torch.exp(r(e, n) * 0.5), B=r(b, n, length),
                C=r(b, n, length), D=r(e), z=r(b, e, length), bias=r(e) * 0.3), steps


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("reverse", [False, True])
def test_gapped_scan_is_the_gapped_recurrence(backend, reverse):
    x, steps = inputs(seed=int(reverse))
    want = gapped_loop(**x, steps=steps, reverse=reverse)
    sums = torch.zeros(2, 11)
    with scan_backend(backend):
        got = selective_scan_gapped(x["u"], x["delta"], x["A"], x["B"], x["C"], x["D"], x["z"], x["bias"], True,
                                    decay_steps=steps, reverse=reverse, delta_sum_out=sums)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    # Δ itself (not g·Δ) is what the per-token summary adds up
    torch.testing.assert_close(sums, F.softplus(x["delta"] + x["bias"][:, None]).sum(1))
    # all ones: the plain scan
    ones = selective_scan_gapped(x["u"], x["delta"], x["A"], x["B"], x["C"], x["D"], x["z"], x["bias"], True,
                                 decay_steps=torch.ones_like(steps), reverse=reverse)
    plain = selective_scan_ref(x["u"], x["delta"], x["A"], x["B"], x["C"], x["D"], x["z"], x["bias"], True,
                               reverse=reverse)
    torch.testing.assert_close(ones, plain, rtol=1e-5, atol=1e-6)


def small_vim(seed=0):
    torch.manual_seed(seed)
    return vimtr.create_model("vim_tiny", depth=4, embed_dim=32, img_size=48, patch_size=8, num_classes=5).eval()


def test_later_blocks_scan_over_the_original_gaps():
    """After one HSA step before block 2, blocks 2 and 3 get decay steps equal to the original-position gaps
    between neighbouring survivors (read from the patches each token stands for), 1 into the first token."""
    model = small_vim()
    vimtr.reduce(model, "hsa", r=[0, 0, 12, 0], trace_source=True)
    seen = []
    hooks = [model.layers[i].mixer.register_forward_pre_hook(
        lambda m, args, kw: seen.append(kw.get("decay_steps")), with_kwargs=True) for i in range(4)]
    x = torch.randn(2, 3, 48, 48, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    assert seen[0] is not None and all(s.eq(1).all() for s in seen[0] + seen[1])  # nothing pruned yet
    trace = model.reduction_trace
    c = trace["cls_index"][-1]
    source = trace["source"]  # (B, L, P): the patch each survivor is
    patch = source.argmax(-1).float()
    full = patch + (patch >= 18).float()  # patch index -> position in the 37-token sequence (class token at 18)
    full[:, c] = 18
    steps_f, steps_b = seen[2]
    gaps = (full[:, 1:] - full[:, :-1]).clamp(min=1)
    assert torch.equal(steps_f[:, 1:], gaps) and torch.equal(steps_b[:, :-1], gaps)
    assert steps_f[:, 0].eq(1).all() and steps_b[:, -1].eq(1).all() and gaps.gt(1).any()
    assert torch.equal(seen[3][0], steps_f)


def test_align_changes_the_pruned_model_and_without_pruning_changes_nothing():
    model = small_vim(1)
    x = torch.randn(2, 3, 48, 48, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        base = model(x)
        vimtr.reduce(model, "hsa", r=[0, 0, 12, 0], align=True)
        aligned = model(x)
        vimtr.reduce(model, "hsa", r=[0, 0, 12, 0], align=False)
        condensed = model(x)
        vimtr.reduce(model, "hsa", r=[0, 0, 0, 0], align=True)
        unpruned = model(x)
    assert (aligned - condensed).abs().max() > 1e-5  # (float noise here is ~1e-7; the gaps move it ~3e-4)
    torch.testing.assert_close(unpruned, base, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="align must be True"):
        vimtr.reduce(model, "hsa", r=2, align="yes")
