"""The reference selective scan and the VIMTR_SCAN dispatch."""
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
