"""The fast CPU selective scan (vimtr.ops.cpu.scan) against the reference: values, gradients, bad input.

No timings here (benchmarks/scan.py has them). The first run compiles the numba kernels (a few seconds);
numba caches them on disk for later runs.
"""
import math

import pytest
import torch
import torch.nn.functional as F


from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vimtr.ops import resolve_scan, scan_backend, selective_scan_fn, selective_scan_ref
from vimtr.ops.cpu import selective_scan_cpu

from conftest import scan_inputs

NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")


def _close(out, ref, rtol=1e-5):
    """Element-wise within rtol, with an absolute floor of rtol times the output's scale."""
    scale = max(1.0, ref.abs().max().item()) if ref.numel() else 1.0
    torch.testing.assert_close(out, ref, rtol=rtol, atol=rtol * scale)


def _call(fn, x, use, **kw):
    args = {k: (v if k in use or k in ("u", "delta", "A", "B", "C") else None) for k, v in x.items()}
    return fn(**args, **kw)


# ------------------------------------------------------------------------------------------ forward
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(b=st.integers(1, 3), e=st.integers(1, 24), l=st.integers(1, 40), n=st.sampled_from([1, 3, 8, 16, 16, 17]),
       use=st.sets(st.sampled_from(["D", "z", "delta_bias"])), softplus=st.booleans(), last=st.booleans(),
       channel_last=st.booleans(), seed=st.integers(0, 10_000))
def test_forward_matches_reference_fp32(b, e, l, n, use, softplus, last, channel_last, seed):
    x = scan_inputs(b, e, l, n, seed=seed, layout="channel_last" if channel_last else "contiguous")
    if not softplus:  # without softplus, keep Δ positive as a real Δ is (negative Δ is tested below)
        x["delta"], x["delta_bias"] = x["delta"].abs(), x["delta_bias"].abs()
    kw = {"delta_softplus": softplus, "return_last_state": last}
    got, ref = _call(selective_scan_cpu, x, use, **kw), _call(selective_scan_ref, x, use, **kw)
    if last:
        (got, got_last), (ref, ref_last) = got, ref
        assert got_last.shape == (b, e, n) and got_last.dtype == torch.float32
        _close(got_last, ref_last)
    assert got.shape == ref.shape and got.dtype == ref.dtype
    _close(got, ref)


def test_forward_vim_sized_rows_match_reference():
    # The N = 16 kernel (compiled with N fixed) on Vim-like values, with Δ from softplus and the gate.
    x = scan_inputs(2, 32, 197, 16, seed=1)
    _close(selective_scan_cpu(**x, delta_softplus=True), selective_scan_ref(**x, delta_softplus=True))


@pytest.mark.parametrize("n", [16, 5])
def test_forward_outside_mamba_domain(n):
    # A > 0 and Δ < 0 make exp(Δ·A) > 1: those rows take the kernel's general exp (no overflow here).
    x = scan_inputs(2, 6, 30, n, seed=2)
    x["A"] = x["A"] * torch.where(torch.rand(x["A"].shape) < 0.3, -1.0, 1.0) * 0.3
    x["delta"] = x["delta"] * 0.3  # mixed signs, no softplus
    _close(selective_scan_cpu(**x), selective_scan_ref(**x), rtol=2e-5)


def test_forward_non_finite_values_propagate_like_reference():
    x = scan_inputs(2, 4, 20, 16, seed=3)
    x["u"][0, 1, 5] = float("nan")
    x["delta"][1, 2, 7] = float("inf")
    x["A"][3, 4] = float("nan")
    got = selective_scan_cpu(**x, delta_softplus=True)
    ref = selective_scan_ref(**x, delta_softplus=True)
    assert torch.equal(torch.isfinite(got), torch.isfinite(ref))
    fin = torch.isfinite(ref)
    _close(got[fin], ref[fin])


def test_forward_overflow_gives_inf_like_reference():
    # exp(Δ·A) overflows float32: the reference's states become inf; so must ours (not a large finite number).
    x = scan_inputs(1, 2, 6, 16, seed=4)
    x["A"] = x["A"].abs() * 60.0
    x["delta"] = torch.full_like(x["delta"], 2.0)
    got = selective_scan_cpu(x["u"], x["delta"], x["A"], x["B"], x["C"], return_last_state=True)[1]
    ref = selective_scan_ref(x["u"], x["delta"], x["A"], x["B"], x["C"], return_last_state=True)[1]
    assert torch.equal(torch.isfinite(got), torch.isfinite(ref))
    assert not torch.isfinite(ref).all()


def test_forward_large_negative_decay_underflows_to_zero():
    x = scan_inputs(1, 3, 10, 16, seed=5)
    x["A"] = x["A"] * 1e4  # exp(Δ·A) far below the smallest float32
    _close(selective_scan_cpu(**x, delta_softplus=True), selective_scan_ref(**x, delta_softplus=True))


@pytest.mark.parametrize("shape", [(0, 4, 5, 16), (2, 0, 5, 16), (2, 4, 0, 16), (2, 4, 5, 0)])
def test_forward_empty_shapes(shape):
    b, e, l, n = shape
    x = scan_inputs(b, e, l, n)
    got, got_last = selective_scan_cpu(**x, delta_softplus=True, return_last_state=True)
    ref, ref_last = selective_scan_ref(**x, delta_softplus=True, return_last_state=True)
    assert got.shape == ref.shape and got_last.shape == ref_last.shape
    _close(got, ref)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_is_upcast(dtype):
    x = {k: v.to(dtype) for k, v in scan_inputs(2, 8, 25, 16, seed=6).items()}
    got = selective_scan_cpu(**x, delta_softplus=True)
    ref = selective_scan_ref(**x, delta_softplus=True)  # also computes in float32 and casts back
    assert got.dtype == dtype
    torch.testing.assert_close(got.float(), ref.float(), rtol=1e-2, atol=1e-2)


def test_float64_is_computed_in_float64():
    x = scan_inputs(2, 5, 30, 16, dtype=torch.float64, seed=7)
    got = selective_scan_cpu(**x, delta_softplus=True)
    assert got.dtype == torch.float64
    # the reference computes in float32 whatever the input: compare at float32 accuracy...
    _close(got, selective_scan_ref(**x, delta_softplus=True))
    # ... and against a float64 evaluation of the same recurrence, exactly (up to summation order)
    d = F.softplus(x["delta"] + x["delta_bias"][:, None])
    h = torch.zeros(2, 5, 16, dtype=torch.float64)
    ys = []
    for t in range(30):
        h = torch.exp(d[..., t, None] * x["A"]) * h + (d[..., t] * x["u"][..., t])[..., None] * x["B"][:, None, :, t]
        ys.append((h * x["C"][:, None, :, t]).sum(-1))
    want = (torch.stack(ys, -1) + x["D"][:, None] * x["u"]) * F.silu(x["z"])
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_thread_count_does_not_change_the_forward():
    x = scan_inputs(3, 40, 50, 16, seed=8)
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = selective_scan_cpu(**x, delta_softplus=True)
        torch.set_num_threads(2)
        two = selective_scan_cpu(**x, delta_softplus=True)
    finally:
        torch.set_num_threads(old)
    assert torch.equal(one, two)  # rows are independent: bitwise equal


def test_dispatch_uses_this_kernel():
    x = scan_inputs(1, 4, 9, 16)
    with scan_backend("cpu"):
        assert resolve_scan(torch.device("cpu"))[0] == "cpu"
        out = selective_scan_fn(**x, delta_softplus=True)
    assert torch.equal(out, selective_scan_cpu(**x, delta_softplus=True))


@pytest.mark.parametrize("n,channel_last", [(16, True), (5, False)])
def test_reverse_equals_flipped_scan(n, channel_last):
    x = scan_inputs(2, 10, 23, n, seed=14, layout="channel_last" if channel_last else "contiguous")
    got, got_last = selective_scan_cpu(**x, delta_softplus=True, return_last_state=True, reverse=True)
    flipped = {k: (v.flip(-1) if k in ("u", "delta", "z", "B", "C") else v) for k, v in x.items()}
    ref, ref_last = selective_scan_ref(**flipped, delta_softplus=True, return_last_state=True)
    _close(got, ref.flip(-1))
    _close(got_last, ref_last)


def test_output_follows_a_transposed_inputs_layout():
    x = scan_inputs(2, 12, 9, 16, seed=15, layout="channel_last")  # u is a transposed (B, L, E) tensor
    out = selective_scan_cpu(**x, delta_softplus=True)
    assert out.transpose(1, 2).is_contiguous()
    _close(out, selective_scan_ref(**x, delta_softplus=True))
    assert selective_scan_cpu(**{k: v.contiguous() for k, v in x.items()}).is_contiguous()


# ----------------------------------------------------------------------------------------- backward
@pytest.mark.parametrize("n,use,softplus,last", [
    (4, ("D", "z", "delta_bias"), True, True),
    (3, (), False, False),
    (16, ("D", "z"), True, False),
    (2, ("delta_bias",), True, True),
])
def test_gradcheck_float64(n, use, softplus, last):
    x = scan_inputs(2, 3, 5, n, dtype=torch.float64, seed=9)
    if not softplus:
        x["delta"], x["delta_bias"] = x["delta"].abs(), x["delta_bias"].abs()
    names = [k for k in NAMES if k in ("u", "delta", "A", "B", "C") or k in use]
    inputs = tuple(x[k].detach().clone().requires_grad_() for k in names)

    def fn(*args):
        res = selective_scan_cpu(**dict(zip(names, args)), delta_softplus=softplus, return_last_state=last)
        return res if last else (res,)

    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("channel_last", [False, True])
def test_gradients_match_reference_autograd_fp32(channel_last):
    x = scan_inputs(2, 12, 33, 16, seed=10, layout="channel_last" if channel_last else "contiguous")
    grads = []
    for fn in (selective_scan_cpu, selective_scan_ref):
        leaves = {k: v.detach().clone().requires_grad_() for k, v in x.items()}
        # the views the kernel sees are non-contiguous when channel_last: build them from the leaves
        args = {k: (v.transpose(1, 2).contiguous().transpose(1, 2) if channel_last and v.dim() == 3 else v)
                for k, v in leaves.items()}
        out, last = fn(**args, delta_softplus=True, return_last_state=True)
        w = torch.randn(out.shape, generator=torch.Generator().manual_seed(0))
        ((out * w).sum() + last.square().sum()).backward()
        grads.append({k: v.grad for k, v in leaves.items()})
    for k in NAMES:
        _close(grads[0][k], grads[1][k], rtol=2e-5)


def test_reverse_gradients_match_flipped_reference():
    x = scan_inputs(2, 6, 15, 16, seed=16, layout="channel_last")
    grads = []
    for rev in (True, False):
        leaves = {k: v.detach().clone().requires_grad_() for k, v in x.items()}
        if rev:
            out, last = selective_scan_cpu(**leaves, delta_softplus=True, return_last_state=True, reverse=True)
        else:
            flipped = {k: (v.flip(-1) if k in ("u", "delta", "z", "B", "C") else v) for k, v in leaves.items()}
            out, last = selective_scan_ref(**flipped, delta_softplus=True, return_last_state=True)
            out = out.flip(-1)
        w = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
        ((out * w).sum() + last.sum()).backward()
        grads.append({k: v.grad for k, v in leaves.items()})
    for k in NAMES:
        _close(grads[0][k], grads[1][k], rtol=2e-5)


def test_gradcheck_float64_reverse():
    x = scan_inputs(1, 2, 5, 3, dtype=torch.float64, seed=17)
    names = list(NAMES)
    inputs = tuple(x[k].detach().clone().requires_grad_() for k in names)

    def fn(*args):
        return selective_scan_cpu(**dict(zip(names, args)), delta_softplus=True, return_last_state=True,
                                  reverse=True)

    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-7, rtol=1e-5)


def test_gradients_only_for_inputs_that_require_them():
    x = scan_inputs(2, 4, 7, 16, seed=11)
    grads = []
    for fn in (selective_scan_cpu, selective_scan_ref):
        a = x["A"].detach().clone().requires_grad_()
        out = fn(**{**x, "A": a}, delta_softplus=True)
        grads.append(torch.autograd.grad(out.sum(), [a])[0])
    _close(grads[0], grads[1], rtol=2e-5)


def test_backward_outside_mamba_domain_matches_reference():
    x = scan_inputs(2, 5, 20, 16, seed=12)
    x["A"] = x["A"] * torch.where(torch.rand(x["A"].shape) < 0.3, -1.0, 1.0) * 0.3
    x["delta"] = x["delta"] * 0.3
    grads = []
    for fn in (selective_scan_cpu, selective_scan_ref):
        leaves = {k: v.detach().clone().requires_grad_() for k, v in x.items()}
        fn(**leaves).square().sum().backward()
        grads.append(leaves)
    for k in NAMES:
        _close(grads[0][k].grad, grads[1][k].grad, rtol=5e-5)


# -------------------------------------------------------------------------------------------- bad input
def test_rejects_non_float_and_complex_dtypes():
    x = scan_inputs(1, 2, 3, 4)
    with pytest.raises(TypeError, match="u must be a real floating-point"):
        selective_scan_cpu(**{**x, "u": x["u"].to(torch.int32)})
    with pytest.raises(TypeError, match="A must be a real floating-point.*complex"):
        selective_scan_cpu(**{**x, "A": x["A"].to(torch.complex64)})
    with pytest.raises(TypeError, match="B must be a torch.Tensor"):
        selective_scan_cpu(**{**x, "B": x["B"].tolist()})


def test_rejects_other_devices():
    x = scan_inputs(1, 2, 3, 4)
    with pytest.raises(ValueError, match="delta is on meta"):
        selective_scan_cpu(**{**x, "delta": x["delta"].to("meta")})


@pytest.mark.parametrize("name,bad,expect", [
    ("u", torch.zeros(2, 3), r"u must have shape \(batch, dim, seqlen\)"),
    ("delta", torch.zeros(1, 2, 4), r"delta must have shape \(batch, dim, seqlen\) = \(1, 2, 3\)"),
    ("A", torch.zeros(3, 4), r"A must have shape \(dim, dstate\) = \(2, N\)"),
    ("B", torch.zeros(1, 3, 4), r"B must have shape \(batch, dstate, seqlen\) = \(1, 4, 3\)"),
    ("C", torch.zeros(1, 4), r"C must have shape"),
    ("D", torch.zeros(3), r"D must have shape \(dim,\) = \(2,\)"),
    ("z", torch.zeros(1, 2, 3, 1), r"z must have shape"),
    ("delta_bias", torch.zeros(2, 1), r"delta_bias must have shape"),
])
def test_rejects_mis_shaped_inputs(name, bad, expect):
    x = scan_inputs(1, 2, 3, 4)
    with pytest.raises(ValueError, match=expect):
        selective_scan_cpu(**{**x, name: bad})


def test_non_contiguous_and_expanded_inputs():
    x = scan_inputs(2, 6, 11, 16, seed=13)
    # expanded (stride-0) u and a B that is every other column of a wider tensor
    x["u"] = torch.randn(1, 6, 11).expand(2, 6, 11)
    x["B"] = torch.randn(2, 16, 22)[..., ::2]
    _close(selective_scan_cpu(**x, delta_softplus=True), selective_scan_ref(**x, delta_softplus=True))
    assert math.isfinite(selective_scan_cpu(**x, delta_softplus=True).sum().item())
