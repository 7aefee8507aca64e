"""The CPU mixer (vimtr.ops.cpu.mixer, what BiMamba runs on CPU) and its kernels (vimtr.ops.cpu.conv, the
scan's out=/accumulate=/delta_out= extensions): values against the flip path, bit-equality across grad
modes, gradients, bad input. No timings here."""
import pytest
import torch


from vimtr.models.layers import BiMamba
from vimtr.ops import causal_conv1d_ref, scan_backend, selective_scan_ref
from vimtr.ops import causal_conv1d_bidir_ref
from vimtr.ops.cpu import causal_conv1d_bidir_cpu, gated_sum_cpu, scan_delta_cpu, selective_scan_cpu

from conftest import scan_inputs

pytestmark = pytest.mark.usefixtures("one_thread")


def _runs_cpu_mixer(m, h):
    """Whether the mixer's op runs the CPU kernel (vimtr.ops.cpu.bimamba_inner_cpu) for h (with a copy of
    the mixer in h's dtype)."""
    import copy

    import vimtr.ops.cpu as cpu
    m = m if h.dtype == torch.float32 else copy.deepcopy(m).to(h.dtype)
    calls, orig = [], cpu.bimamba_inner_cpu
    cpu.bimamba_inner_cpu = lambda *a, **k: calls.append(1) or orig(*a, **k)
    try:
        with torch.no_grad():
            m(h)
    finally:
        cpu.bimamba_inner_cpu = orig
    return bool(calls)


def _mixer(divide_out=True, seed=0, d=32):
    torch.manual_seed(seed)
    m = BiMamba(d, divide_out=divide_out)
    with torch.no_grad():  # non-trivial conv biases and D so every term shows
        for p in (m.conv1d.bias, m.conv1d_b.bias, m.D, m.D_b):
            p.normal_()
    return m


@pytest.mark.parametrize("divide_out", [True, False])
def test_cpu_path_matches_flip_path(divide_out):
    m, h = _mixer(divide_out), torch.randn(3, 17, 32)
    with torch.no_grad():
        with scan_backend("reference"):
            ref, ref_aux = m(h, want_aux=True)
        with scan_backend("cpu"):
            assert _runs_cpu_mixer(m, h)
            out, aux = m(h, want_aux=True)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    assert aux.keys() == ref_aux.keys() | {"delta_sum", "delta_channels"}
    assert aux["delta_channels"] == m.d_inner
    torch.testing.assert_close(aux["delta_sum"], (ref_aux["delta_f"] + ref_aux["delta_b"]).sum(1),
                               rtol=1e-5, atol=1e-5)
    for k in ref_aux.keys() - {"delta_channels"}:  # (every backend gives every key; this one is the count E)
        assert aux[k].shape == ref_aux[k].shape, k
        torch.testing.assert_close(aux[k], ref_aux[k], rtol=1e-5, atol=1e-6)


def test_cpu_path_is_bit_identical_across_grad_modes():
    m, h = _mixer(), torch.randn(2, 11, 32)
    with scan_backend("cpu"):
        with torch.inference_mode():
            a, aux_a = m(h, want_aux=True)
        with torch.no_grad():  # the workspace made under inference_mode must work here too
            b, aux_b = m(h, want_aux=True)
        c, aux_c = m(h, want_aux=True)
    assert torch.equal(a, b) and torch.equal(b, c.detach())
    for k in aux_a:
        if k == "delta_channels":
            assert aux_a[k] == aux_b[k] == aux_c[k] == m.d_inner
            continue
        assert torch.equal(aux_a[k], aux_b[k]) and torch.equal(aux_b[k], aux_c[k].detach()), k


def test_cpu_path_gradients_match_flip_path():
    m, h0 = _mixer(seed=3), torch.randn(2, 13, 32)
    grads = []
    for backend in ("reference", "cpu"):
        m.zero_grad()
        h = h0.clone().requires_grad_()
        with scan_backend(backend):
            out, _ = m(h)
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        grads.append([h.grad] + [p.grad.clone() for p in m.parameters()])
    for g_ref, g in zip(*grads):
        torch.testing.assert_close(g, g_ref, rtol=1e-4, atol=1e-5 * max(1.0, g_ref.abs().max().item()))


def test_named_aux_keys_skip_delta_and_the_kernel_sums_match_the_reference_delta():
    m, h = _mixer(seed=4), torch.randn(2, 9, 32)
    with torch.no_grad(), scan_backend("cpu"):
        _, full = m(h, want_aux=True)
        _, some = m(h, want_aux=frozenset({"delta_sum", "delta_channels"}))
        _, grad_some = m(h.requires_grad_(), want_aux=frozenset({"delta_sum", "delta_channels"}))
    assert "delta_f" not in some and "delta_b" not in some
    assert torch.equal(some["delta_sum"], full["delta_sum"])
    assert torch.equal(grad_some["delta_sum"], full["delta_sum"])
    with torch.no_grad(), scan_backend("reference"):
        _, ref = m(h, want_aux=True)
    # The kernels' per-token sums against Σ_e (Δ_f + Δ_b) of the reference path's own Δ tensors (computed by
    # plain torch, both directions in token order); the CPU path's Δ tensors against the reference's too.
    torch.testing.assert_close(some["delta_sum"], (ref["delta_f"] + ref["delta_b"]).sum(1), rtol=1e-5, atol=1e-5)
    for key in ("delta_f", "delta_b"):
        torch.testing.assert_close(full[key], ref[key], rtol=1e-5, atol=1e-6)


def test_other_backends_and_dtypes_take_the_flip_path():
    m, h = _mixer(), torch.randn(1, 5, 32)
    with scan_backend("reference"):
        assert not _runs_cpu_mixer(m, h)
    with scan_backend("cpu"):
        assert not _runs_cpu_mixer(m, h.double())


# ---------------------------------------------------------------------------------------- the conv
@pytest.mark.parametrize("k", [4, 2, 1])
def test_conv_bidir_matches_flipped_causal_conv(k):
    g = torch.Generator().manual_seed(k)
    xz = torch.randn(10, 3, 19, generator=g).transpose(0, 1)  # (B, 2E, L) stored as (2E, B, L)
    x = xz[:, :5]
    wf, wb = torch.randn(5, 1, k, generator=g), torch.randn(5, 1, k, generator=g)
    bf, bb = torch.randn(5, generator=g), torch.randn(5, generator=g)
    cf, cb = causal_conv1d_bidir_cpu(x, wf, bf, wb, bb)
    torch.testing.assert_close(cf, causal_conv1d_ref(x, wf, bf), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(cb, causal_conv1d_ref(x.flip(-1), wb, bb).flip(-1), rtol=1e-5, atol=1e-6)
    rf, rb = causal_conv1d_bidir_ref(x, wf, None, wb, None, activation=False)
    cf, cb = causal_conv1d_bidir_cpu(x, wf, None, wb, None, activation=False, channel_major=True)
    assert cf.transpose(0, 1).is_contiguous()
    torch.testing.assert_close(cf, rf, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(cb, rb, rtol=1e-5, atol=1e-6)


def test_conv_bidir_gradients_and_bad_input():
    x = torch.randn(2, 4, 9, dtype=torch.float64, requires_grad=True)
    w = [torch.randn(4, 1, 4, dtype=torch.float64, requires_grad=True) for _ in range(2)]
    b = [torch.randn(4, dtype=torch.float64, requires_grad=True) for _ in range(2)]
    # float64 takes the torch path; float32 the kernel, whose backward differentiates that path
    assert torch.autograd.gradcheck(lambda *a: causal_conv1d_bidir_cpu(*a), (x, w[0], b[0], w[1], b[1]))
    x32 = x.detach().float().requires_grad_()
    args32 = [t.detach().float().requires_grad_() for t in (w[0], b[0], w[1], b[1])]
    sum(c.sum() for c in causal_conv1d_bidir_cpu(x32, *args32)).backward()
    ref = [t.detach().clone().requires_grad_() for t in (x32, *args32)]
    sum(c.sum() for c in causal_conv1d_bidir_ref(*ref)).backward()
    for got, want in zip((x32, *args32), ref):
        torch.testing.assert_close(got.grad, want.grad, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="forward-only"):
        causal_conv1d_bidir_cpu(x32, *args32, out_f=torch.empty(2, 4, 9))
    with pytest.raises(ValueError, match="batch, dim, seqlen"):
        causal_conv1d_bidir_cpu(torch.randn(4, 9), *args32)
    with pytest.raises(ValueError, match="weights"):
        causal_conv1d_bidir_cpu(torch.randn(2, 3, 9), *args32)
    with torch.no_grad(), pytest.raises(ValueError, match="dense"):
        causal_conv1d_bidir_cpu(x32, *args32, out_f=torch.empty(2, 4, 18)[..., ::2])


@pytest.mark.parametrize("k,activation,bias,only_f,threads", [(4, True, True, False, 1), (4, True, False, False, 2),
                                                                 (2, False, True, True, 2), (1, True, True, False, 1)])
def test_conv_bidir_kernel_backward_matches_autograd_through_the_reference(k, activation, bias, only_f, threads,
                                                                         monkeypatch):
    """The numba backward against autograd through torch's conv: random upstream gradients, x a strided
    slice (as in the mixer), one output unused, one or two threads (per-thread weight-gradient sums)."""
    g = torch.Generator().manual_seed(k + 10 * threads)
    xz = torch.randn(12, 3, 23, generator=g).transpose(0, 1)  # (B, 2E, L) stored as (2E, B, L)
    x = xz[:, :6].requires_grad_()  # a leaf view with (B, E, L) strides (3·... , 1·..., 1)
    params = [torch.randn(6, 1, k, generator=g), torch.randn(6, generator=g) if bias else None,
              torch.randn(6, 1, k, generator=g), torch.randn(6, generator=g) if bias else None]
    params = [p.requires_grad_() if p is not None else None for p in params]
    gf, gb = torch.randn(3, 6, 23, generator=g), torch.randn(3, 6, 23, generator=g)
    ref = [t.detach().clone().requires_grad_() if t is not None else None for t in (x, *params)]
    import vimtr.ops.cpu.runtime as runtime
    monkeypatch.setattr(runtime, "MIN_WORK_PER_THREAD", 1)  # split even this small input between threads
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        cf, cb = causal_conv1d_bidir_cpu(x, *params, activation=activation)
        ((cf * gf).sum() + (0 if only_f else (cb * gb).sum())).backward()
    finally:
        torch.set_num_threads(old)
    rf, rb = causal_conv1d_bidir_ref(*ref, activation=activation)
    ((rf * gf).sum() + (0 if only_f else (rb * gb).sum())).backward()
    for got, want in zip((x, *params), ref):
        if got is not None:
            torch.testing.assert_close(got.grad, want.grad, rtol=1e-5, atol=1e-5)


def test_conv_bidir_kernel_backward_gives_the_reference_gradients():
    g = torch.Generator().manual_seed(5)
    args = [torch.randn(2, 4, 11, generator=g), torch.randn(4, 1, 4, generator=g), torch.randn(4, generator=g),
            torch.randn(4, 1, 4, generator=g), torch.randn(4, generator=g)]
    grads = []
    for conv in (causal_conv1d_bidir_cpu, causal_conv1d_bidir_ref):
        leaves = [a.clone().requires_grad_() for a in args]
        cf, cb = conv(*leaves)
        (cf.square().sum() + cb.sin().sum()).backward()
        grads.append([t.grad for t in leaves])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------- scan: out=, accumulate=, delta_out=
@pytest.mark.parametrize("n", [16, 3])
def test_scan_out_accumulate_and_delta_out(n):
    x, x2 = scan_inputs(2, 6, 15, n, seed=1, layout="channel_major"), scan_inputs(2, 6, 15, n, seed=2, layout="channel_major")
    flipped = {k: (v.flip(-1) if k in ("u", "delta", "z", "B", "C") else v) for k, v in x2.items()}
    y_f = selective_scan_ref(**x, delta_softplus=True)
    y_b = selective_scan_ref(**flipped, delta_softplus=True).flip(-1)
    out = torch.empty(6, 2, 15).transpose(0, 1)
    d_f, d_b = torch.empty(2, 6, 15), torch.empty(2, 15, 6).transpose(1, 2)
    with torch.no_grad():
        got = selective_scan_cpu(**x, delta_softplus=True, out=out, delta_out=d_f)
        assert got is out
        plain = selective_scan_cpu(**x, delta_softplus=True)
        assert torch.equal(out, plain)
        selective_scan_cpu(**x2, delta_softplus=True, reverse=True, out=out, accumulate=True, out_scale=0.5,
                           delta_out=d_b)
        y_b_fast = selective_scan_cpu(**x2, delta_softplus=True, reverse=True)
    assert torch.equal(out, (plain + y_b_fast) / 2)  # bit for bit the mixer's (y_f + y_b) / 2
    torch.testing.assert_close(out, (y_f + y_b) / 2, rtol=1e-5, atol=1e-5)
    for d, xx in ((d_f, x), (d_b, x2)):
        want = torch.nn.functional.softplus(xx["delta"] + xx["delta_bias"][:, None])
        torch.testing.assert_close(d, want, rtol=1e-6, atol=1e-7)
        assert torch.equal(scan_delta_cpu(xx["delta"], xx["delta_bias"]), d)


@pytest.mark.parametrize("n", [16, 3])
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("gate_layout", ["channel_major", "contiguous", "channel_last"])
def test_scan_out_gate_is_gated_sum_bit_for_bit(n, reverse, gate_layout):
    x = scan_inputs(2, 6, 15, n, seed=7, layout="channel_major")
    x.pop("z")
    g = torch.randn(6, 2, 15).transpose(0, 1)
    g = {"channel_major": g, "contiguous": g.contiguous(),
         "channel_last": g.transpose(1, 2).contiguous().transpose(1, 2)}[gate_layout]
    with torch.no_grad():
        y = selective_scan_cpu(**x, delta_softplus=True, reverse=reverse)
        first = torch.randn(6, 2, 15).transpose(0, 1)
        out = first.clone()
        selective_scan_cpu(**x, delta_softplus=True, reverse=reverse, out=out, accumulate=True, out_scale=0.5,
                           out_gate=g)
        assert torch.equal(out, gated_sum_cpu(first, y, g, 0.5))
        torch.testing.assert_close(out, (first + y) * torch.nn.functional.silu(g) * 0.5, rtol=1e-6, atol=1e-6)
        plain = torch.empty(2, 6, 15)
        selective_scan_cpu(**x, delta_softplus=True, reverse=reverse, out=plain, out_gate=g)
        torch.testing.assert_close(plain, y * torch.nn.functional.silu(g), rtol=1e-6, atol=1e-6)


def test_gated_sum_gradients_and_bad_input():
    g = torch.Generator().manual_seed(8)
    a, b, z = (torch.randn(2, 3, 5, dtype=torch.float64, generator=g).requires_grad_() for _ in range(3))
    assert torch.autograd.gradcheck(lambda a, b, z: gated_sum_cpu(a, b, z, 0.5), (a, b, z))
    with torch.no_grad():
        ref = (a + b) * torch.nn.functional.silu(z)
    torch.testing.assert_close(gated_sum_cpu(a, b, z), ref, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="gated_sum_cpu"):
        gated_sum_cpu(a.float(), b, z)
    with pytest.raises(ValueError, match="gated_sum_cpu"):
        gated_sum_cpu(a, b[:, :, :4], z)
    e = torch.empty(2, 0, 5)
    assert gated_sum_cpu(e, e, e).shape == (2, 0, 5)


def test_scan_extensions_reject_bad_use():
    x = scan_inputs(2, 6, 15, 16, seed=3, layout="channel_major")
    with pytest.raises(ValueError, match="accumulate=True needs out="):
        selective_scan_cpu(**x, accumulate=True)
    with pytest.raises(ValueError, match="shape"):
        selective_scan_cpu(**x, out=torch.empty(2, 6, 14))
    with pytest.raises(TypeError, match="float32"):
        selective_scan_cpu(**x, out=torch.empty(2, 6, 15, dtype=torch.float64))
    with pytest.raises(ValueError, match="dense"):
        selective_scan_cpu(**x, delta_out=torch.empty(2, 6, 30)[..., ::2])
    with pytest.raises(TypeError, match="float32 or float64 inputs"):
        selective_scan_cpu(**{k: v.half() for k, v in x.items()}, out=torch.empty(2, 6, 15))
    xg = {k: v.clone().requires_grad_() for k, v in x.items()}
    with pytest.raises(ValueError, match="forward-only"):
        selective_scan_cpu(**xg, out=torch.empty(2, 6, 15))
    with pytest.raises(ValueError, match="forward-only"):
        selective_scan_cpu(**xg, out_gate=torch.empty(2, 6, 15))
    with pytest.raises(ValueError, match="out_gate"):
        selective_scan_cpu(**x, out_gate=torch.empty(2, 6, 14))
    with pytest.raises(ValueError, match="float32/float64"):
        scan_delta_cpu(x["delta"].half())


def test_scan_extensions_on_empty_shapes():
    x = scan_inputs(2, 6, 15, 16, seed=4, layout="channel_major")
    x["A"], x["B"], x["C"] = x["A"][:, :0], x["B"][:, :0], x["C"][:, :0]
    out = torch.ones(2, 6, 15)
    d = torch.empty(2, 6, 15)
    with torch.no_grad():
        selective_scan_cpu(**x, delta_softplus=True, out=out, accumulate=True, out_scale=0.5, delta_out=d)
    y = selective_scan_ref(**x, delta_softplus=True)
    torch.testing.assert_close(out, (1 + y) * 0.5)
    gate, out2 = torch.randn(2, 6, 15), torch.ones(2, 6, 15)
    with torch.no_grad():
        selective_scan_cpu(**x, delta_softplus=True, out=out2, accumulate=True, out_scale=0.5, out_gate=gate)
    torch.testing.assert_close(out2, (1 + y) * torch.nn.functional.silu(gate) * 0.5)


def test_delta_sum_out_is_the_same_for_any_thread_count():
    x = scan_inputs(3, 50, 40, 16, seed=5, layout="channel_major")  # 50 channels: groups of 16 that do not divide the rows evenly
    sums = []
    for threads in (1, 2, 3):
        old = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            s = torch.zeros(3, 40)
            with torch.no_grad():
                selective_scan_cpu(**x, delta_softplus=True, delta_sum_out=s)
                selective_scan_cpu(**x, delta_softplus=True, reverse=True, delta_sum_out=s)
            s2 = torch.zeros(3, 40)
            scan_delta_cpu(x["delta"], x["delta_bias"], delta_sum_out=s2)
            scan_delta_cpu(x["delta"], x["delta_bias"], delta_sum_out=s2)
        finally:
            torch.set_num_threads(old)
        sums.append(s)
        assert torch.equal(s, s2)
    assert torch.equal(sums[0], sums[1]) and torch.equal(sums[0], sums[2])
    d = torch.nn.functional.softplus(x["delta"] + x["delta_bias"][:, None])
    torch.testing.assert_close(sums[0], 2 * d.sum(1), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="delta_sum_out"):
        selective_scan_cpu(**x, delta_sum_out=torch.zeros(3, 41))


# ------------------------------------------------------------------------------ residual add + norm
def test_add_rmsnorm_matches_torch_and_has_gradients():
    from vimtr.ops import add_rms_norm_ref
    from vimtr.ops.cpu import add_rms_norm_cpu
    g = torch.Generator().manual_seed(6)
    h, r, w = torch.randn(2, 7, 24, generator=g), torch.randn(2, 7, 24, generator=g), torch.randn(24, generator=g)
    for res in (r, None):
        got, want = add_rms_norm_cpu(h, res, w, 1e-5), add_rms_norm_ref(h, res, w, 1e-5)
        assert torch.equal(got[0], want[0])
        torch.testing.assert_close(got[1], want[1], rtol=1e-5, atol=1e-5)
    ins = [t.clone().requires_grad_() for t in (h, r, w)]
    ref = [t.clone().requires_grad_() for t in (h, r, w)]
    for fn, args in ((add_rms_norm_cpu, ins), (add_rms_norm_ref, ref)):
        a, b = fn(*args, 1e-5)
        (a.sum() + (b * torch.linspace(-1, 1, b.numel()).view_as(b)).sum()).backward()
    for x, y in zip(ins, ref):
        torch.testing.assert_close(x.grad, y.grad, rtol=1e-5, atol=1e-5)
    assert add_rms_norm_cpu(h.double(), None, w.double(), 1e-5)[1].dtype == torch.float64  # torch fallback


@pytest.mark.parametrize("only", [0, 1, 2])
def test_add_rmsnorm_gradients_when_one_input_trains(only):
    """A frozen layer below: only the norm weight (or only one stream) needs a gradient; the residual output
    then does not depend on what trains and must not break the backward."""
    from vimtr.ops import add_rms_norm_ref
    from vimtr.ops.cpu import add_rms_norm_cpu
    g = torch.Generator().manual_seed(7)
    base = [torch.randn(2, 5, 16, generator=g), torch.randn(2, 5, 16, generator=g), torch.randn(16, generator=g)]
    grads = []
    for fn in (add_rms_norm_cpu, add_rms_norm_ref):
        args = [t.clone().requires_grad_(i == only) for i, t in enumerate(base)]
        res, normed = fn(*args, 1e-5)
        (res.sum() + (normed * torch.linspace(-1, 1, normed.numel()).view_as(normed)).sum()).backward()
        grads.append(args[only].grad)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-5)


def test_conv_bidir_backward_when_one_direction_trains():
    g = torch.Generator().manual_seed(8)
    args = [torch.randn(2, 4, 9, generator=g), torch.randn(4, 1, 4, generator=g), torch.randn(4, generator=g),
            torch.randn(4, 1, 4, generator=g), torch.randn(4, generator=g)]
    w_b = args[3].clone().requires_grad_()
    cf, cb = causal_conv1d_bidir_cpu(args[0], args[1], args[2], w_b, args[4])
    (cf.sum() + cb.square().sum()).backward()  # the forward output depends on nothing that trains
    w_ref = args[3].clone().requires_grad_()
    ref_f, ref_b = causal_conv1d_bidir_ref(args[0], args[1], args[2], w_ref, args[4])
    ref_b.square().sum().backward()
    torch.testing.assert_close(w_b.grad, w_ref.grad, rtol=1e-5, atol=1e-5)


def test_reduced_model_with_frozen_first_blocks_trains_on_the_cpu_path():
    """Fine-tuning with the embedding and the first blocks frozen: the gradients of what trains match
    the reference path's."""
    import re

    import vimtr
    from vimtr.models.vim import VisionMamba
    torch.manual_seed(0)
    model = VisionMamba(img_size=16, patch_size=4, depth=4, embed_dim=16, in_chans=1, num_classes=3,
                        drop_path_rate=0.0)
    model = vimtr.reduce(model, "rmeeto", r=3, interval=2).train()
    for name, p in model.named_parameters():
        p.requires_grad_(not re.match(r"(patch_embed|pos_embed|cls_token|layers\.[01]\.)", name))
    x = torch.randn(2, 1, 16, 16)
    grads = []
    for backend in ("reference", "cpu"):
        model.zero_grad()
        with scan_backend(backend):
            model(x).square().sum().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys() and "layers.2.norm.weight" in grads[0]
    for name, want in grads[0].items():
        torch.testing.assert_close(grads[1][name], want, rtol=1e-4, atol=1e-5 * max(1.0, want.abs().max().item()),
                                   msg=name)


def test_cpu_autocast_takes_the_reference_mixer_and_agrees():
    """Under CPU autocast (vimtr bench --dtype bf16, eval --amp bf16 on CPU) the mixer's matmuls run in bf16,
    which the float32 kernels cannot take: the dispatch sends it to the reference path, whose logits then
    agree with fp32 to bf16's precision."""
    import vimtr
    torch.manual_seed(0)
    model = vimtr.create_model("vim_tiny", depth=2, embed_dim=32, img_size=32, patch_size=8, num_classes=7).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        full = model(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            half = model(x)
    assert half.dtype == torch.bfloat16
    torch.testing.assert_close(half.float(), full, rtol=0.05, atol=0.05)
