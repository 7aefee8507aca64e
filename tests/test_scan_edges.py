"""The fast CPU scan at the edges of its domain, against the reference computed in float64.

tests/test_scan_cpu.py holds the kernel against the reference on Vim-like random inputs; those never take
the softplus input past ~5 nor Δ far from 1, nor run long sequences. Here: the softplus threshold (20, as
the CUDA kernel and ``F.softplus``) and the range below it where log1p(e^-x) is still ~1e-5, Δ from 1e-8
to 1e4, sequences of 4096+ tokens, and state sizes other than the N = 16 the kernel is specialised for.
The reference runs in float64, so what is measured is the kernel's own error, and the tolerances are a few
times that error: tight enough that a softplus threshold of 10 instead of 20 (a relative change of 4.5e-6
at 10) fails. Public entry points only: ``selective_scan_fn`` under ``scan_backend("cpu")``,
``selective_scan_ref``.
"""
import pytest
import torch

from vimtr.ops import scan_backend, selective_scan_fn, selective_scan_ref

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


def fast(*args, **kw):
    with scan_backend("cpu"):
        return selective_scan_fn(*args, **kw)


def ref64(*args, **kw):
    return selective_scan_ref(*(a if a is None else a.double() for a in args), **kw)


def rel_err(got, ref, floor=0.0):
    """max |got − ref| / (|ref| + floor·max|ref|): element-wise relative error, ``floor`` for values near 0."""
    ref = ref.double()
    return ((got.double() - ref).abs() / (ref.abs() + floor * ref.abs().max())).max().item()


def positive_inputs(b, e, l, n, seed):
    """u, B, C > 0 and A = −1: no cancellation anywhere, and with Δ ≥ 8 the decay exp(Δ·A) < 4e-4, so each
    output is close to Δ_t·u_t·Σ_n B·C: its relative error is the relative error of Δ (the softplus)."""
    g = torch.Generator().manual_seed(seed)
    u = torch.rand(b, e, l, generator=g) + 0.5
    B, C = torch.rand(b, n, l, generator=g) + 0.5, torch.rand(b, n, l, generator=g) + 0.5
    return u, -torch.ones(e, n), B, C


# ----------------------------------------------------------------------------------- softplus threshold
@pytest.mark.parametrize("n", [16, 5])
def test_softplus_around_and_above_its_threshold(n):
    """delta + bias swept over [8, 25]: below 20 the kernel computes log(1 + e^x), x + ~4.5e-5 at 10; above 20
    it passes x through, as F.softplus and the CUDA kernel do."""
    b, e, l = 2, 8, 96
    u, A, B, C = positive_inputs(b, e, l, n, seed=0)
    x = torch.linspace(8.0, 25.0, e * l).reshape(1, e, l).repeat(b, 1, 1)
    bias = torch.linspace(-0.5, 0.5, e)
    delta = x - bias[:, None]
    got = fast(u, delta, A, B, C, delta_bias=bias, delta_softplus=True)
    ref = ref64(u, delta, A, B, C, delta_bias=bias, delta_softplus=True)
    # Where the threshold matters most: the outputs whose Δ was 10-11 (measured: ≤ 2.3e-7 everywhere).
    near = (x >= 10) & (x <= 11)
    assert near.sum() > 20
    for where, err in (("all", rel_err(got, ref)), ("softplus input 10-11", rel_err(got[near], ref[near]))):
        assert err < 1e-6, f"{where}: relative error {err:.3g}"


def test_softplus_gradient_around_its_threshold():
    """d softplus/dx = sigmoid(x) below 20 (1 − 4.5e-5 at 10), 1 above: the backward kernel's threshold."""
    b, e, l, n = 1, 6, 64, 16
    u, A, B, C = positive_inputs(b, e, l, n, seed=1)
    x = torch.linspace(8.0, 25.0, e * l).reshape(1, e, l)
    leaf = x.clone().requires_grad_()
    fast(u, leaf, A, B, C, delta_softplus=True).sum().backward()
    leaf64 = x.double().requires_grad_()
    selective_scan_ref(u.double(), leaf64, A.double(), B.double(), C.double(), delta_softplus=True).sum().backward()
    err = rel_err(leaf.grad, leaf64.grad)
    assert err < 1e-6, f"dΔ: relative error {err:.3g}"  # measured: 2.2e-7


# ------------------------------------------------------------------------------------ Δ far from 1
@pytest.mark.parametrize("scale", [1e-8, 1e-4, 1e2, 1e4])
def test_tiny_and_huge_delta_without_softplus(scale):
    """Δ = scale × U(0.5, 1.5): tiny Δ (decay ≈ 1, the state sums every input) and huge Δ (decay underflows to
    0, the state is only the last input). No D: its u·D term would hide the state's contribution."""
    g = torch.Generator().manual_seed(2)
    b, e, l, n = 2, 8, 200, 16
    u, B, C = torch.randn(b, e, l, generator=g), torch.randn(b, n, l, generator=g), torch.randn(b, n, l, generator=g)
    A = -torch.exp(torch.randn(e, n, generator=g) * 0.5)
    delta = (torch.rand(b, e, l, generator=g) + 0.5) * scale
    got, ref = fast(u, delta, A, B, C), ref64(u, delta, A, B, C)
    # Relative to the largest output: single outputs may be sums that cancel (measured: ≤ 1.6e-6).
    err = ((got.double() - ref).abs().max() / ref.abs().max()).item()
    assert err < 5e-6, f"error {err:.3g} of the largest output"


def test_very_negative_softplus_input_gives_tiny_delta():
    """x in [−40, −12]: softplus(x) ≈ e^x, 1e-18 to 1e-5; the kernel keeps its relative accuracy (no
    cancellation in log1p)."""
    b, e, l, n = 1, 8, 64, 16
    u, A, B, C = positive_inputs(b, e, l, n, seed=3)
    A = torch.full_like(A, -1e-3)  # tiny Δ·A: the state accumulates
    x = torch.linspace(-40.0, -12.0, e * l).reshape(1, e, l)
    got = fast(u, x, A, B, C, delta_softplus=True)
    ref = ref64(u, x, A, B, C, delta_softplus=True)
    err = rel_err(got, ref)
    assert err < 1e-5, f"relative error {err:.3g}"  # measured: 1.4e-6


# ------------------------------------------------------------------------------------- long sequences
@pytest.mark.parametrize("n,l", [(16, 4096), (8, 5003)])
def test_long_sequence(n, l):
    """L ≥ 4096 with Vim-like Δ (softplus of N(−2, 1)) and slow decays: errors must not grow along the sequence."""
    g = torch.Generator().manual_seed(4)
    b, e = 1, 4
    u, z = torch.randn(b, e, l, generator=g), torch.randn(b, e, l, generator=g)
    B, C = torch.randn(b, n, l, generator=g), torch.randn(b, n, l, generator=g)
    A = -torch.arange(1, n + 1, dtype=torch.float32).repeat(e, 1) * 0.05  # slow decays: long memory
    delta = torch.randn(b, e, l, generator=g) - 2.0
    bias, D = torch.randn(e, generator=g) * 0.1, torch.randn(e, generator=g)
    args = [u, delta, A, B, C, D, z, bias]
    got = fast(*args, delta_softplus=True, return_last_state=True)
    ref = ref64(*args, delta_softplus=True, return_last_state=True)
    scale = ref[0].abs().max().item()
    torch.testing.assert_close(got[0].double(), ref[0], rtol=1e-5, atol=1e-5 * scale)
    torch.testing.assert_close(got[1].double(), ref[1], rtol=1e-5, atol=1e-5 * ref[1].abs().max().item())
    tail = slice(l - 256, l)  # the end of the sequence is as accurate as the start
    assert (got[0][..., tail].double() - ref[0][..., tail]).abs().max() < 1e-5 * scale


# ------------------------------------------------------------------------------------ other state sizes
@pytest.mark.parametrize("n", [1, 4, 24, 64])
def test_state_sizes_other_than_16_with_gradients(n):
    g = torch.Generator().manual_seed(5)
    b, e, l = 2, 6, 80
    u, z = torch.randn(b, e, l, generator=g), torch.randn(b, e, l, generator=g)
    B, C = torch.randn(b, n, l, generator=g), torch.randn(b, n, l, generator=g)
    A = -torch.exp(torch.randn(e, n, generator=g) * 0.5)
    delta, bias, D = torch.randn(b, e, l, generator=g) * 0.5, torch.randn(e, generator=g) * 0.5 - 1, torch.randn(e, generator=g)
    leaves = [t.clone().requires_grad_() for t in (u, delta, A, B, C, D, z, bias)]
    out = fast(*leaves, delta_softplus=True)
    leaves64 = [t.double().requires_grad_() for t in (u, delta, A, B, C, D, z, bias)]
    out64 = selective_scan_ref(*leaves64, delta_softplus=True)
    scale = out64.abs().max().item()
    torch.testing.assert_close(out.double(), out64.detach(), rtol=1e-5, atol=1e-6 * scale)
    w = torch.randn(out.shape, generator=g)
    (out * w).sum().backward()
    (out64 * w.double()).sum().backward()
    for name, a, r in zip(("u", "delta", "A", "B", "C", "D", "z", "delta_bias"), leaves, leaves64):
        s = r.grad.abs().max().item()
        torch.testing.assert_close(a.grad.double(), r.grad, rtol=1e-4, atol=1e-5 * s, msg=lambda m: f"d{name}: {m}")


@pytest.mark.parametrize("d_state", [4, 24])
def test_model_with_other_state_size_fast_path_matches_reference_path(d_state):
    """A whole Vim with d_state ≠ 16: the fused CPU mixer path against the general path on the reference scan."""
    import vimtr

    torch.manual_seed(0)
    model = vimtr.create_model("vim_tiny", depth=2, embed_dim=32, img_size=32, patch_size=8, d_state=d_state).eval()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        with scan_backend("cpu"):
            got = model.forward_features(x)
        with scan_backend("reference"):
            ref = model.forward_features(x)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
