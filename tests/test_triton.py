"""The Triton selective scan, run in Triton's interpreter on CPU tensors, against ``selective_scan_ref``.

No GPU is needed: with ``TRITON_INTERPRET=1`` set when the kernels are first loaded, Triton executes them
in numpy. The module fixture sets it for this module only (the kernels stay interpreted for the rest of the
process, which nothing else uses on CPU). Shapes are tiny (the interpreter is slow) but cover what the GPU
meets: odd lengths, lengths shorter than, equal to and several times a chunk, channel counts that do not
fill the last block of channels, dstate 16 (Vim) and a non-power-of-two one, both scan directions.

Tolerances: "relative error r" means |ours − ref| ≤ r·|ref| + r·max|ref| elementwise (the second term keeps
elements near zero from making a relative error meaningless). fp32: 1e-5 forward, 1e-4 gradients; fp16 and
bf16: the tolerances of mamba_ssm's own tests/ops/test_selective_scan.py.
"""
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from vimtr.errors import UsageError
from vimtr.ops import selective_scan_ref

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module", autouse=True)
def interpreter(one_thread):
    from vimtr.ops.triton import scan

    old = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        scan._load_kernels()
        if not scan.interpreted():
            pytest.skip("the Triton kernels were loaded compiled earlier in this process; run this file alone")
        yield
    finally:
        if old is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = old


def _triton():
    from vimtr.ops.triton import kernel_config, selective_scan_triton
    return selective_scan_triton, kernel_config


def assert_rel(ours, ref, tol, what):
    ours, ref = ours.detach().float(), ref.detach().float()
    assert ours.shape == ref.shape, f"{what}: shape {tuple(ours.shape)} != {tuple(ref.shape)}"
    assert torch.isfinite(ref).all(), f"{what}: the reference itself is not finite (a bad test input)"
    assert torch.isfinite(ours).all(), f"{what}: {int((~torch.isfinite(ours)).sum())} non-finite elements"
    scale = ref.abs().max().item()
    bad = (ours - ref).abs() > tol * ref.abs() + tol * scale
    assert not bad.any(), (f"{what}: {int(bad.sum())} of {bad.numel()} elements off by more than {tol:g} relative; "
                           f"max |diff| {(ours - ref).abs().max().item():.3g}, max |ref| {scale:.3g}")


def make_inputs(batch=2, dim=8, dstate=16, length=37, dtype=torch.float32, seed=0, optional=True):
    """Inputs in the ranges Vim's mixer produces: Δ before softplus around -8..0 (Δ ≈ 3e-4..0.7) plus a
    bias, A = -exp(·)."""
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(batch, dim, length, generator=g).to(dtype)
    delta = (torch.randn(batch, dim, length, generator=g) * 1.5 - 4.0).to(dtype)
    A = -torch.exp(torch.rand(dim, dstate, generator=g) * 2.5)
    B = torch.randn(batch, dstate, length, generator=g).to(dtype)
    C = torch.randn(batch, dstate, length, generator=g).to(dtype)
    D = torch.randn(dim, generator=g) if optional else None
    z = torch.randn(batch, dim, length, generator=g).to(dtype) if optional else None
    bias = torch.rand(dim, generator=g) * 0.5 if optional else None
    return [u, delta, A, B, C, D, z, bias]


def flip(x):
    return None if x is None else x.flip(-1)


def reference(u, delta, A, B, C, D, z, bias, softplus=True, reverse=False):
    """selective_scan_ref, on flipped copies for ``reverse`` (what reverse=True is defined to equal)."""
    if reverse:
        out, last = selective_scan_ref(flip(u), flip(delta), A, flip(B), flip(C), D, flip(z), bias, softplus, True)
        return flip(out), last
    return selective_scan_ref(u, delta, A, B, C, D, z, bias, softplus, True)


def run_both(inputs, softplus=True, reverse=False, grad=False, seed=1):
    """(ours, ref) outputs, last states and, with ``grad``, the gradients of every input that has one."""
    scan, _ = _triton()
    ours_in = [x if x is None else x.clone().requires_grad_(grad) for x in inputs]
    ref_in = [x if x is None else x.clone().requires_grad_(grad) for x in inputs]
    out, last = scan(*ours_in, delta_softplus=softplus, return_last_state=True, reverse=reverse)
    out_r, last_r = reference(*ref_in, softplus=softplus, reverse=reverse)
    res = {"out": (out, out_r), "last": (last, last_r)}
    if grad:
        g = torch.Generator().manual_seed(seed)
        dout = torch.randn(out.shape, generator=g).to(out.dtype)
        dlast = torch.randn(last.shape, generator=g)
        torch.autograd.backward([out, last], [dout, dlast])
        torch.autograd.backward([out_r, last_r], [dout, dlast])
        for name, a, b in zip(("u", "delta", "A", "B", "C", "D", "z", "delta_bias"), ours_in, ref_in):
            if a is not None:
                assert a.grad is not None and a.grad.dtype == b.grad.dtype, name
                res["d" + name] = (a.grad, b.grad)
    return res


# ------------------------------------------------------------------------------------------ forward
# Both forward kernels ("seq": one position per step, the compiled default; "chunked": associative scans
# over chunks). "seq" costs ~20 ms per position in the interpreter, so it takes the cheaper cases.
@pytest.mark.parametrize("fwd_kernel,dstate,length,reverse,config", [
    ("chunked", 16, 37, False, None),           # Vim's dstate, odd length over two chunks
    ("chunked", 16, 37, True, (4, 8, 1)),       # reversed; 5 chunks of 8, three channel blocks
    ("chunked", 6, 32, False, (4, 16, 1)),      # dstate not a power of two; length a multiple of the chunk
    ("chunked", 6, 1, True, None),              # one token
    ("seq", 16, 37, True, (8, 8, 1)),           # two channel blocks, the last one partial
    ("seq", 6, 20, False, None),
])
def test_forward_matches_reference(fwd_kernel, dstate, length, reverse, config):
    _, kernel_config = _triton()
    inputs = make_inputs(dim=11, dstate=dstate, length=length)  # 11 channels: the last block is partial
    with kernel_config(fwd=config, bwd=config, fwd_kernel=fwd_kernel):
        res = run_both(inputs, reverse=reverse)
    assert res["out"][0].dtype == torch.float32 and res["last"][0].shape == (2, 11, dstate)
    assert_rel(*res["out"], 1e-5, "out")
    assert_rel(*res["last"], 1e-5, "last_state")


def test_forward_without_optional_inputs():
    """No D, z, delta_bias or softplus: Δ taken as given (what the mixer passes when it computes Δ itself
    for MTR's auxiliary outputs)."""
    inputs = make_inputs(length=23, optional=False)
    inputs[1] = F.softplus(inputs[1])
    res = run_both(inputs, softplus=False)
    assert_rel(*res["out"], 1e-5, "out")
    assert_rel(*res["last"], 1e-5, "last_state")


@pytest.mark.parametrize("fwd_kernel,reverse", [("chunked", False), ("chunked", True), ("seq", True)])
def test_delta_sum_out_adds_the_channel_sum_in_token_order(fwd_kernel, reverse):
    scan, kernel_config = _triton()
    u, delta, A, B, C, D, z, bias = make_inputs(dim=11, length=29)
    start = torch.randn(2, 29)
    acc = start.clone()
    with kernel_config(fwd=(4, 8, 1) if fwd_kernel == "chunked" else (8, 8, 1), fwd_kernel=fwd_kernel):
        # several channel blocks, each adding its part
        out = scan(u, delta, A, B, C, D, z, bias, delta_softplus=True, reverse=reverse, delta_sum_out=acc)
        acc2, given = torch.zeros(2, 29), F.softplus(delta)
        scan(u, given, A, B, C, delta_sum_out=acc2)  # no bias, no softplus: Δ as given
    expected = start + F.softplus(delta + bias[:, None]).sum(1)
    assert_rel(acc, expected, 1e-5, "delta_sum_out")
    assert_rel(out, reference(u, delta, A, B, C, D, z, bias, reverse=reverse)[0], 1e-5, "out")
    assert_rel(acc2, given.sum(1), 1e-5, "delta_sum_out without softplus")


def test_softplus_keeps_tiny_timescales_exact():
    """Trained Vim channels have Δ down to ~1e-5 (softplus of -11): plain log(1 + e^x) would be off by up to
    1e-3 relative there; the per-token Δ sum (MTR's importance) sees it directly."""
    scan, _ = _triton()
    u, delta, A, B, C, D, z, _ = make_inputs(length=9)
    raw = torch.linspace(-12.0, -7.0, 2 * 8 * 9).view(2, 8, 9)
    acc = torch.zeros(2, 9)
    scan(u, raw, A, B, C, D, z, None, True, delta_sum_out=acc)
    assert_rel(acc, F.softplus(raw).sum(1), 1e-6, "delta_sum_out of tiny Δ")


@pytest.mark.parametrize("fwd_kernel", ["seq", "chunked"])
def test_reverse_reads_strided_views_in_place(fwd_kernel):
    """The mixer hands over channel-last views ((B, L, E) storage seen as (B, E, L)) and B, C as views of
    one projection; the kernels take any strides, both directions."""
    scan, kernel_config = _triton()
    u, delta, A, B, C, D, z, bias = make_inputs(dim=8, length=19)
    views = [x.transpose(1, 2).contiguous().transpose(1, 2) for x in (u, delta, z)]
    bc = torch.cat([B, C], 1).transpose(1, 2).contiguous().transpose(1, 2)  # (B, 2N, L) view of (B, L, 2N)
    Bv, Cv = bc[:, :16], bc[:, 16:]
    assert not views[0].is_contiguous() and not Bv.is_contiguous()
    for reverse in (False, True):
        with kernel_config(fwd_kernel=fwd_kernel):
            out = scan(views[0], views[1], A, Bv, Cv, D, views[2], bias, True, reverse=reverse)
        assert_rel(out, reference(u, delta, A, B, C, D, z, bias, reverse=reverse)[0], 1e-5, f"out reverse={reverse}")


def test_empty_inputs_and_no_grad_save_nothing(monkeypatch):
    """Nothing to scan (an empty batch or sequence) gives the reference's empty results; under no_grad the
    forward saves no chunk states even for inputs that require gradients (eval with trainable weights)."""
    scan, _ = _triton()
    from vimtr.ops.triton import scan as scan_mod
    empty = make_inputs(length=0)
    acc = torch.ones(2, 0)
    out, last = scan(*empty, delta_softplus=True, return_last_state=True, reverse=True, delta_sum_out=acc)
    assert out.shape == (2, 8, 0) and torch.equal(last, torch.zeros(2, 8, 16))
    saved = []
    original = scan_mod._forward
    monkeypatch.setattr(scan_mod, "_forward", lambda *a: saved.append(a[10]) or original(*a))
    inputs = make_inputs(length=5)
    inputs[0].requires_grad_()
    with torch.no_grad():
        scan(*inputs, delta_softplus=True)
    scan(*inputs, delta_softplus=True)
    assert saved == [False, True]


# ----------------------------------------------------------------------------------------- backward
@pytest.mark.parametrize("fwd_kernel,dstate,length,reverse,config", [
    ("chunked", 16, 37, False, None),
    ("chunked", 16, 37, True, (4, 8, 1)),
    ("chunked", 6, 16, False, (2, 16, 1)),
    ("seq", 6, 21, True, None),               # the states the backward starts from, saved by "seq"
    ("seq", 16, 19, False, (16, 8, 1)),
])
def test_gradients_match_reference(fwd_kernel, dstate, length, reverse, config):
    _, kernel_config = _triton()
    inputs = make_inputs(dim=11, dstate=dstate, length=length, seed=dstate + length)
    with kernel_config(fwd=config, bwd=config, fwd_kernel=fwd_kernel):
        res = run_both(inputs, reverse=reverse, grad=True)
    assert set(res) == {"out", "last", "du", "ddelta", "dA", "dB", "dC", "dD", "dz", "ddelta_bias"}
    for name, (ours, ref) in res.items():
        assert_rel(ours, ref, 1e-5 if name in ("out", "last") else 1e-4, name)


def test_gradients_without_optional_inputs_and_other_chunkings():
    """No D, z or bias; a forward chunking different from the backward's (the forward then saves its
    states at the backward's chunk boundaries)."""
    _, kernel_config = _triton()
    inputs = make_inputs(dim=5, length=30, optional=False, seed=3)
    inputs[1] = F.softplus(inputs[1])  # Δ > 0 as the recurrence needs when the scan applies no softplus
    with kernel_config(fwd=(8, 32, 1), bwd=(2, 8, 1)):
        res = run_both(inputs, softplus=False, grad=True)
    assert set(res) == {"out", "last", "du", "ddelta", "dA", "dB", "dC"}
    for name, (ours, ref) in res.items():
        assert_rel(ours, ref, 1e-5 if name in ("out", "last") else 1e-4, name)


def test_gradient_of_the_output_alone_and_of_a_subset():
    scan, _ = _triton()
    u, delta, A, B, C, D, z, bias = make_inputs(length=13)
    u.requires_grad_()
    A.requires_grad_()
    scan(u, delta, A, B, C, D, z, bias, True).sum().backward()
    u2, A2 = u.detach().clone().requires_grad_(), A.detach().clone().requires_grad_()
    selective_scan_ref(u2, delta, A2, B, C, D, z, bias, True).sum().backward()
    assert_rel(u.grad, u2.grad, 1e-4, "du")
    assert_rel(A.grad, A2.grad, 1e-4, "dA")


# ------------------------------------------------------------------------------ half precision inputs
# mamba_ssm tests/ops/test_selective_scan.py: (rtol, atol) for the output, du ×2, dΔ rtol ×5 / atol ×10,
# weights (A, D, delta_bias, z) max((1e-3, 1e-3), (rtol, atol)), A's atol ×5.
HALF_TOL = {torch.float16: (3e-3, 5e-3), torch.bfloat16: (3e-2, 5e-2)}


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_inputs_within_mamba_tolerances(dtype):
    rtol, atol = HALF_TOL[dtype]
    rtolw, atolw = max(1e-3, rtol), max(1e-3, atol)
    inputs = make_inputs(dim=8, length=37, dtype=dtype, seed=7)
    inputs[1] = (inputs[1].float() * 0.2 + 0.5).to(dtype)  # mamba's test: Δ in [0, 0.5), A in (-0.5, 0]
    inputs[2] = inputs[2] / 20
    res = run_both(inputs, reverse=dtype == torch.bfloat16, grad=True)
    assert res["out"][0].dtype == dtype and res["du"][0].dtype == dtype and res["dB"][0].dtype == dtype
    tol = {"out": (rtol, atol), "last": (rtol, atol), "du": (rtol * 2, atol * 2), "ddelta": (rtol * 5, atol * 10),
           "dA": (rtolw, atolw * 5), "dB": (rtol, atol), "dC": (rtol, atol), "dD": (rtolw, atolw),
           "dz": (rtolw, atolw), "ddelta_bias": (rtolw, atolw)}
    for name, (ours, ref) in res.items():
        torch.testing.assert_close(ours.float(), ref.float(), rtol=tol[name][0], atol=tol[name][1], msg=name)


def test_mixed_dtypes_compute_in_fp32():
    """bf16 activations with fp32 B and C (what autocast leaves after a float32 projection) and half
    precision parameters: fp32 inside, the output in u's dtype, each gradient in its input's dtype."""
    scan, _ = _triton()
    u, delta, A, B, C, D, z, bias = make_inputs(length=17)
    ub, db, zb = u.bfloat16(), delta.bfloat16(), z.bfloat16()
    Dh = D.half().requires_grad_()
    out = scan(ub, db, A, B, C, Dh, zb, bias, True)
    assert out.dtype == torch.bfloat16
    ref = selective_scan_ref(ub.float(), db.float(), A, B, C, Dh.float(), zb.float(), bias, True)
    torch.testing.assert_close(out.float(), ref, rtol=1e-2, atol=1e-2)
    out.float().sum().backward()
    assert Dh.grad.dtype == torch.float16


# ----------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("mutate,names", [
    (lambda x: x.__setitem__(0, x[0].double()), ("u", "float64", "VIMTR_SCAN=reference")),
    (lambda x: x.__setitem__(3, x[3][:, None]), ("B", "grouped")),
    (lambda x: x.__setitem__(4, x[4][0].t().contiguous()[:8]), ("C", "time-invariant")),
    (lambda x: x.__setitem__(2, x[2].to(torch.complex64)), ("A", "complex")),
    (lambda x: x.__setitem__(6, x[6][..., :-1]), ("z", "(2, 8, 37)")),
    (lambda x: x.__setitem__(7, x[7][:3]), ("delta_bias", "(8,)")),
])
def test_unsupported_inputs_raise_naming_the_tensor(mutate, names):
    scan, _ = _triton()
    inputs = make_inputs()
    mutate(inputs)
    with pytest.raises(UsageError) as err:
        scan(*inputs, delta_softplus=True)
    for word in names:
        assert word in str(err.value)


def test_delta_sum_out_and_device_checks():
    scan, _ = _triton()
    from vimtr.ops.triton import available, unsupported
    inputs = make_inputs()
    with pytest.raises(UsageError, match="delta_sum_out must be a float32 tensor of shape"):
        scan(*inputs, delta_sum_out=torch.zeros(2, 37, dtype=torch.float64))
    assert available("cpu") and not available("meta")
    meta = [x.to("meta") for x in inputs]
    assert "needs a CUDA device" in unsupported(*meta)
    assert unsupported(*inputs) is None


def test_without_the_interpreter_cpu_tensors_are_refused_then_run_once_it_is_set():
    """A fresh process: without TRITON_INTERPRET the scan is not available on CPU and the error says what
    to do. Then the variable is set late, after torch, timm and triton were imported (as in any process
    where timm came first, this test session included): the kernels must still run interpreted, both
    forward kernels and the backward, and match the reference."""
    code = ("import os, sys, torch, timm, triton\n"
            "from vimtr.ops import selective_scan_ref\n"
            "from vimtr.ops.triton import available, kernel_config, selective_scan_triton\n"
            "from vimtr.errors import UsageError\n"
            "assert not available('cpu')\n"
            "x = torch.zeros(1, 2, 3); A = -torch.ones(2, 4); Bm = torch.zeros(1, 4, 3)\n"
            "try:\n    selective_scan_triton(x, x, A, Bm, Bm)\nexcept UsageError as e:\n    print(e)\n"
            "print('kernels loaded:', 'vimtr.ops.triton.scan_kernels' in sys.modules)\n"
            "os.environ['TRITON_INTERPRET'] = '1'\n"
            "g = torch.Generator().manual_seed(0)\n"
            "a = [torch.randn(2, 5, 11, generator=g), torch.rand(2, 5, 11, generator=g), -torch.rand(5, 4, generator=g),"
            " torch.randn(2, 4, 11, generator=g), torch.randn(2, 4, 11, generator=g), torch.randn(5, generator=g),"
            " torch.randn(2, 5, 11, generator=g), torch.rand(5, generator=g)]\n"
            "ref = selective_scan_ref(*a, True)\n"
            "for k in ('seq', 'chunked'):\n"
            "    u = a[0].clone().requires_grad_()\n"
            "    with kernel_config(fwd_kernel=k):\n"
            "        out = selective_scan_triton(u, *a[1:], True)\n"
            "    out.sum().backward()\n"
            "    u2 = a[0].clone().requires_grad_(); selective_scan_ref(u2, *a[1:], True).sum().backward()\n"
            "    print(k, float((out - ref).abs().max() / ref.abs().max()),"
            " float((u.grad - u2.grad).abs().max() / u2.grad.abs().max()))\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.path.join(ROOT, "src")
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    lines = res.stdout.strip().splitlines()
    assert "TRITON_INTERPRET=1" in lines[0] and "CPU tensor" in lines[0]
    assert lines[1] == "kernels loaded: False"  # refusing loaded nothing
    for line, kernel in zip(lines[2:], ("seq", "chunked")):
        name, out_err, grad_err = line.split()
        assert name == kernel and float(out_err) < 1e-5 and float(grad_err) < 1e-4, line


# ---------------------------------------------------------------------------------- the interpreter
def test_vectorised_interpreter_scan_is_bit_identical_to_tritons_own():
    """vimtr's speed-up of the interpreter's generic scan changes no value: the same kernel through
    Triton's element-by-element scan gives the same bits."""
    from triton.runtime import interpreter as tri_interp

    from vimtr.ops.triton.interpreter import _scan_by_steps, replaced
    scan, kernel_config = _triton()
    inputs = make_inputs(batch=1, dim=3, dstate=4, length=11, seed=5)
    assert tri_interp.ScanOps.generic_scan is _scan_by_steps
    with kernel_config(fwd=(4, 8, 1), fwd_kernel="chunked"):
        fast = scan(*inputs, delta_softplus=True, reverse=True, return_last_state=True)
        original = tri_interp.ScanOps.__dict__["generic_scan"]
        tri_interp.ScanOps.generic_scan = replaced["generic_scan"]
        try:
            slow = scan(*inputs, delta_softplus=True, reverse=True, return_last_state=True)
        finally:
            tri_interp.ScanOps.generic_scan = original
    assert torch.equal(fast[0], slow[0]) and torch.equal(fast[1], slow[1])


def test_kernels_compile_for_a_gpu_without_one():
    """The interpreter runs the kernels as Python; this compiles them to sm_90 code with Triton's own
    compiler and bundled ptxas (no GPU or driver needed), both sides of every constexpr branch, so code
    that cannot lower to a GPU fails here and not on the first GPU that runs it."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.path.join(ROOT, "src")
    res = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "triton_offline_compile.py")], env=env,
                         capture_output=True, text=True, timeout=600)
    if res.returncode != 0 and "ptxas" in res.stderr and "No such file" in res.stderr:
        pytest.skip("this Triton build ships no ptxas")
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.count("compiled ") == 6


# ------------------------------------------------------------------------------------ benchmarks/gpu.py
def _run_gpu_script(*args, timeout=600):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(PYTHONPATH=os.path.join(ROOT, "src"), CUDA_VISIBLE_DEVICES="")  # CPU here, on any machine
    return subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "gpu.py"), *args], env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_gpu_script_without_cuda_says_so_in_one_line_and_exits_0(tmp_path):
    res = _run_gpu_script("--out", str(tmp_path / "gpu.json"))
    assert res.returncode == 0, res.stderr
    lines = res.stdout.strip().splitlines()
    assert len(lines) == 1 and "no CUDA device" in lines[0], res.stdout
    assert not (tmp_path / "gpu.json").exists()


def test_gpu_script_dry_run_exercises_every_section(tmp_path):
    """``--dry-run-cpu``: every section of the GPU script runs on CPU in the interpreter (tiny shapes), so
    its code has run before a GPU is spent on it; its correctness checks must pass there too."""
    import json
    out = tmp_path / "gpu.json"
    res = _run_gpu_script("--dry-run-cpu", "--out", str(out))
    assert res.returncode == 0, res.stderr[-3000:]
    data = json.loads(out.read_text())
    sections = ("golden", "kernel_check", "sweep", "retrain", "throughput", "profile", "targets")
    for name in sections:
        assert name in data and "error" not in data[name], (name, data.get(name))
    assert data["environment"]["mode"] == "dry-run-cpu" and data["backends"]["triton"] == "usable"
    assert data["golden"]["cpu"]["p1"]["ok"]
    check = data["kernel_check"]
    assert all(check[k]["ok"] for k in ("fp32_forward", "fp32_reverse", "bf16_forward", "bf16_reverse")), check
    for red in ("none", "rmeeto_r5", "rmeeto_r11", "mtr_30"):  # whole models: Triton scan vs reference loop
        assert check["models"][red]["rel_err"] < 1e-5 and check["models"][red]["same_tokens"], check["models"]
    assert check["models"]["mtr_30"]["tokens"][-1] < check["models"]["mtr_30"]["tokens"][0]  # really reduced
    assert [r["kernel"] for r in data["sweep"]["forward"]] == ["seq", "chunked"] and data["sweep"]["best"]
    for key in ("triton/none", "triton/rmeeto_r11", "reference/none"):
        assert data["retrain"][key]["median_s"] > 0, data["retrain"]
    cells = data["throughput"]["cells"]
    assert {c["reduction"] for c in cells} == {"none", "rmeeto_r5", "rmeeto_r11", "mtr_30"}
    assert all(c["triton"]["images_per_s"] > 0 and c["reference"]["images_per_s"] > 0 for c in cells)
    assert len(data["throughput"]["derived"]) == 4
    # the model's scans really ran on the Triton kernels, not on a fallback
    assert any("SelectiveScanTriton" in row["name"] for row in data["profile"]["top"]), data["profile"]["top"]
    assert "dry run" in data["targets"]["note"]


# ------------------------------------------------------------------------- through the dispatch (the model)
def _tiny_vim(seed=0):
    import vimtr
    torch.manual_seed(seed)
    return vimtr.create_model("vim_tiny", depth=3, embed_dim=16, img_size=32, patch_size=8, num_classes=5).eval()


def test_model_through_vimtr_scan_triton_matches_the_reference_path():
    """VIMTR_SCAN=triton: the whole mixer takes the Triton path (token-order conv, reverse scans, no flips)
    and gives the official (flip-based, plain PyTorch) computation's logits, unreduced and MTR-reduced (which
    reads the Δ sums the Triton scans add up), and the same gradients."""
    import vimtr
    from vimtr.ops import scan_backend
    from vimtr.ops.triton import mixer as triton_mixer

    model = _tiny_vim()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    calls = []
    original = triton_mixer.selective_scan_triton
    try:
        triton_mixer.selective_scan_triton = lambda *a, **k: calls.append(k["reverse"]) or original(*a, **k)
        for method in (None, "mtr"):
            if method:
                vimtr.reduce(model, method, r=[0, 0, 4])
            with torch.no_grad(), scan_backend("reference"):
                ref = model(x)
            with torch.no_grad(), scan_backend("triton"):
                ours = model(x)
            assert_rel(ours, ref, 1e-5, f"logits ({method or 'unreduced'})")
            if method:
                assert model.reduction_trace["tokens"] == [17, 17, 13]
    finally:
        triton_mixer.selective_scan_triton = original
    assert calls and set(calls) == {False, True}  # both directions went through the kernels, reverse in place
    grads = []
    for backend in ("reference", "triton"):
        model.zero_grad()
        with scan_backend(backend):
            model(x).square().sum().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    for name, g in grads[0].items():
        assert_rel(grads[1][name], g, 1e-4, f"grad {name}")


def test_auto_falls_back_to_the_reference_for_inputs_the_kernels_refuse(monkeypatch):
    """Under auto, a device the Triton kernels serve still sends float64 inputs to the reference (a right
    answer, not an error); VIMTR_SCAN=triton raises the kernels' message naming the tensor."""
    from vimtr.ops import dispatch, selective_scan_fn

    monkeypatch.setattr(dispatch, "resolve_scan", lambda device: ("triton", dispatch._triton_scan()))
    args = [t.double() if isinstance(t, torch.Tensor) else t for t in make_inputs(dim=4, length=9)]
    ref = selective_scan_ref(*args, delta_softplus=True)
    with dispatch.scan_backend("auto"):
        out = selective_scan_fn(*args, delta_softplus=True)
    assert out.dtype == torch.float64 and torch.equal(out, ref)
    with dispatch.scan_backend("triton"), pytest.raises(UsageError, match="u"):
        selective_scan_fn(*args, delta_softplus=True)
