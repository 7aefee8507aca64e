"""The reference selective scan and the VIMTR_SCAN dispatch."""
import os

import pytest
import torch
import torch.nn.functional as F

from vimtr import ops
from vimtr.ops import causal_conv1d_ref, selective_scan_fn, selective_scan_ref


def _inputs(b=2, e=3, n=4, l=6, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=dtype)
    return dict(u=r(b, e, l), delta=r(b, e, l) * 0.5, A=-torch.rand(e, n, generator=g, dtype=dtype) - 0.1,
                B=r(b, n, l), C=r(b, n, l), D=r(e), z=r(b, e, l), delta_bias=r(e) * 0.1)


def _naive(u, delta, A, B, C, D, z, delta_bias):
    """The recurrence written out scalar by scalar: an independent check of the vectorised reference."""
    delta = F.softplus(delta + delta_bias[:, None])
    out = torch.zeros_like(u)
    for b in range(u.shape[0]):
        for e in range(u.shape[1]):
            h = torch.zeros(A.shape[1], dtype=u.dtype)
            for t in range(u.shape[2]):
                h = torch.exp(delta[b, e, t] * A[e]) * h + delta[b, e, t] * B[b, :, t] * u[b, e, t]
                out[b, e, t] = (h * C[b, :, t]).sum() + D[e] * u[b, e, t]
    return out * F.silu(z)


def test_reference_matches_the_written_out_recurrence():
    x = _inputs()
    torch.testing.assert_close(selective_scan_ref(**x, delta_softplus=True), _naive(**x))


def test_reference_last_state_and_optional_arguments():
    x = _inputs(dtype=torch.float32)
    out, last = selective_scan_ref(x["u"], x["delta"], x["A"], x["B"], x["C"], return_last_state=True)
    assert out.shape == x["u"].shape and last.shape == (2, 3, 4)
    # No D, no z, no softplus: y_t = Σ C h; with delta = 0 nothing is ever written into the state.
    zero = selective_scan_ref(x["u"], torch.zeros_like(x["u"]), x["A"], x["B"], x["C"])
    assert torch.equal(zero, torch.zeros_like(zero))


def test_reference_gradcheck():
    x = {k: v.requires_grad_() for k, v in _inputs(l=5).items()}
    assert torch.autograd.gradcheck(lambda *a: selective_scan_ref(*a, delta_softplus=True),
                                    tuple(x[k] for k in ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")))


def test_causal_conv_is_causal():
    x = torch.randn(1, 4, 10)
    w, b = torch.randn(4, 1, 4), torch.randn(4)
    y = causal_conv1d_ref(x, w, b)
    x2 = x.clone()
    x2[..., 6:] += 1
    assert torch.equal(causal_conv1d_ref(x2, w, b)[..., :6], y[..., :6])


def test_dispatch_env_and_function(monkeypatch):
    x = _inputs(dtype=torch.float32)
    monkeypatch.setenv("VIMTR_SCAN", "reference")
    assert ops.get_scan_backend() == "reference"
    assert ops.resolve_scan(torch.device("cpu"))[0] == "reference"
    torch.testing.assert_close(selective_scan_fn(**x, delta_softplus=True),
                               selective_scan_ref(**x, delta_softplus=True))
    with ops.scan_backend("auto"):
        assert ops.get_scan_backend() == "auto"
    assert ops.get_scan_backend() == "reference"
    monkeypatch.setenv("VIMTR_SCAN", "bogus")
    with pytest.raises(ValueError, match="VIMTR_SCAN='bogus'"):
        ops.get_scan_backend()
    with pytest.raises(ValueError, match="unknown"):
        ops.set_scan_backend("fast")


def test_cuda_backend_on_cpu_says_why(monkeypatch):
    monkeypatch.setenv("VIMTR_SCAN", "cuda")
    with pytest.raises(RuntimeError, match="VIMTR_SCAN=cuda"):
        ops.resolve_scan(torch.device("cpu"))


# ------------------------------------------------------------------------- the generic extensions
def test_reference_reverse_is_the_flipped_scan_and_delta_sum_out_adds_in_token_order():
    x = _inputs(dtype=torch.float32, l=9)
    flipped = {k: (v.flip(-1) if k in ("u", "delta", "z", "B", "C") else v) for k, v in x.items()}
    out, last = selective_scan_ref(**x, delta_softplus=True, return_last_state=True, reverse=True)
    want, want_last = selective_scan_ref(**flipped, delta_softplus=True, return_last_state=True)
    assert torch.equal(out, want.flip(-1)) and torch.equal(last, want_last)
    delta = F.softplus(x["delta"] + x["delta_bias"][:, None])
    for reverse in (False, True):
        sums = torch.ones(2, 9)  # the op adds: what was there stays
        selective_scan_ref(**x, delta_softplus=True, reverse=reverse, delta_sum_out=sums)
        torch.testing.assert_close(sums, 1 + delta.sum(1))


def test_dispatch_passes_the_extensions_to_every_backend():
    x = _inputs(dtype=torch.float32, l=7)
    for backend in ("reference", "cpu"):
        sums = torch.zeros(2, 7)
        with ops.scan_backend(backend):
            out = selective_scan_fn(**x, delta_softplus=True, reverse=True, delta_sum_out=sums)
        want = selective_scan_ref(**x, delta_softplus=True, reverse=True)
        torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(sums, F.softplus(x["delta"] + x["delta_bias"][:, None]).sum(1))


# ------------------------------------------------------------------------------ Triton, plugged in
def test_triton_backend_without_the_kernels_says_so(monkeypatch):
    from vimtr.ops import dispatch
    monkeypatch.setitem(dispatch._modules, "triton", None)  # as in a build without vimtr.ops.triton
    assert "triton" in ops.BACKENDS
    with ops.scan_backend("triton"), pytest.raises(RuntimeError, match="not available in this build"):
        ops.resolve_scan(torch.device("cpu"))


def test_a_triton_module_plugs_into_the_dispatch(monkeypatch):
    """What vimtr.ops.triton will provide: selective_scan_triton is called for the scan; ops it lacks fall back to
    their references; CPU tensors are refused unless TRITON_INTERPRET=1."""
    import types

    from vimtr.ops import dispatch
    calls = []

    def selective_scan_triton(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                              return_last_state=False, reverse=False, delta_sum_out=None):
        calls.append(reverse)
        return selective_scan_ref(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state,
                                  reverse=reverse, delta_sum_out=delta_sum_out)

    def available(device):  # the contract of vimtr.ops.triton.available
        return device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"

    fake = types.SimpleNamespace(selective_scan_triton=selective_scan_triton, available=available,
                                 unsupported=lambda *args: None)
    monkeypatch.setitem(dispatch._modules, "triton", fake)
    x = _inputs(dtype=torch.float32)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with ops.scan_backend("triton"):
        with pytest.raises(RuntimeError, match="CUDA tensors"):
            selective_scan_fn(**x)
        monkeypatch.setenv("TRITON_INTERPRET", "1")
        assert ops.resolve_scan(torch.device("cpu"))[0] == "triton"
        out = selective_scan_fn(**x, delta_softplus=True, reverse=True)
        h, w = torch.randn(2, 5, 8), torch.rand(8)
        norm = ops.add_rms_norm_fn(h, None, w, 1e-5)  # no add_rms_norm_triton: the reference
    assert calls == [True]
    torch.testing.assert_close(out, selective_scan_ref(**x, delta_softplus=True, reverse=True))
    assert all(torch.equal(a, b) for a, b in zip(norm, ops.add_rms_norm_ref(h, None, w, 1e-5)))


# ---------------------------------------------------------------------------------- row maps
def test_row_map_keeps_and_averages_rows_and_rejects_bad_maps():
    x = torch.arange(2 * 4 * 3, dtype=torch.float32).view(2, 4, 3)
    # sequence 0: rows 0 and 2, row 1 averaged into output row 0 with weight ½; sequence 1: rows 5, 7.
    rm = ops.RowMap(keep=torch.tensor([0, 2, 5, 7]), src=torch.tensor([1]), dst=torch.tensor([0]),
                    factor=torch.tensor([0.5]), batch=2)
    out = rm.apply(x)
    assert rm.length == 2 and out.shape == (2, 2, 3)
    assert torch.equal(out[0, 0], (x[0, 0] + x[0, 1]) / 2) and torch.equal(out[1], x[1, [1, 3]])
    with pytest.raises(ValueError, match="all three or none"):
        ops.RowMap(keep=torch.tensor([0]), src=torch.tensor([1]))
    with pytest.raises(ValueError, match="B·T"):
        ops.RowMap(keep=torch.tensor([0, 1, 2]), batch=2)
    with pytest.raises(ValueError, match="batch 2"):
        rm.apply(x[:1])


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_add_rms_norm_fn_with_a_row_map_equals_mapping_first(backend):
    g = torch.Generator().manual_seed(3)
    h, r, w = torch.randn(2, 6, 16, generator=g), torch.randn(2, 6, 16, generator=g), torch.rand(16, generator=g)
    rm = ops.RowMap(keep=torch.tensor([0, 3, 5, 6, 7, 10]), src=torch.tensor([1, 4, 11]), dst=torch.tensor([0, 1, 5]),
                    factor=torch.tensor([0.5, 0.25, 0.5]), batch=2)
    with ops.scan_backend(backend):
        res, normed = ops.add_rms_norm_fn(h, r, w, 1e-5, row_map=rm)
        with pytest.raises(ValueError, match="residual is None"):
            ops.add_rms_norm_fn(h, None, w, 1e-5, row_map=rm)
    want_res, want_normed = ops.add_rms_norm_ref(rm.apply(h), rm.apply(r), w, 1e-5)
    torch.testing.assert_close(res, want_res, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(normed, want_normed, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- the mixer op
def _mixer_args(seed=0, d=16, n=4):
    """bimamba_inner_fn's arguments from a freshly built mixer (non-trivial conv biases and D)."""
    from vimtr.models.layers import BiMamba
    torch.manual_seed(seed)
    m = BiMamba(d, d_state=n)
    with torch.no_grad():
        for p in (m.conv1d.bias, m.conv1d_b.bias, m.D, m.D_b):
            p.normal_()
    weights = (m.in_proj.weight, m.in_proj.bias, m.conv1d.weight, m.conv1d.bias, m.x_proj.weight, m.dt_proj.weight,
               m.dt_proj.bias, -torch.exp(m.A_log), m.D, m.conv1d_b.weight, m.conv1d_b.bias, m.x_proj_b.weight,
               m.dt_proj_b.weight, m.dt_proj_b.bias, -torch.exp(m.A_b_log), m.D_b)
    return m, weights


@pytest.mark.parametrize("grad", [False, True])
def test_bimamba_inner_fn_cpu_equals_reference_with_delta_sum_and_aux(grad):
    m, w = _mixer_args()
    h = torch.randn(2, 11, 16)
    got = {}
    for backend in ("reference", "cpu"):
        sums = torch.zeros(2, 11)
        with ops.scan_backend(backend), torch.set_grad_enabled(grad):
            y, aux = ops.bimamba_inner_fn(h, *w, divide_out=True, delta_sum_out=sums, return_aux=True)
        got[backend] = (y, aux, sums)
    (y_r, aux_r, s_r), (y_c, aux_c, s_c) = got["reference"], got["cpu"]
    assert y_c.shape == y_r.shape == (2, 11, 32)
    torch.testing.assert_close(y_c, y_r, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(s_c, s_r, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(s_r, (aux_r["delta_f"] + aux_r["delta_b"]).sum(1), rtol=1e-6, atol=1e-5)
    assert aux_c.keys() == aux_r.keys() == {"delta_f", "delta_b", "B_f", "B_b", "C_f", "C_b"}
    for k in aux_r:
        torch.testing.assert_close(aux_c[k], aux_r[k], rtol=1e-5, atol=1e-6)
    out = ops.bimamba_inner_fn(h, *w)  # neither extension: the output alone
    assert isinstance(out, torch.Tensor) and out.shape == (2, 11, 32)
