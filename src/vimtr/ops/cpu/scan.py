"""The fast CPU selective scan: :func:`selective_scan_cpu`, with the signature, semantics and gradients of
:func:`vimtr.ops.reference.selective_scan_ref`, plus the two helpers the CPU mixer needs under autograd
(:func:`scan_delta_cpu`, :func:`gated_sum_cpu`).

Dtypes: float32 and float64 are computed natively (float64 in float64, unlike the reference, which
computes everything in float32). float16/bfloat16 are upcast to float32, as the reference does, and the
output is cast back. Integer, bool and complex inputs raise ``TypeError``; non-CPU tensors, wrong ranks or
shapes raise ``ValueError`` naming the argument and the expected shape. Inputs are read in place in any
layout (strided views included). Compiled kernels are cached on disk by numba: the first call in a fresh
environment spends a few seconds compiling (``vimtr warmup`` does it at install time).
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from numba import njit

from vimtr.ops.cpu import scan_backward, scan_forward
from vimtr.ops.cpu.rows import emit_gated_row, load_row
from vimtr.ops.cpu.runtime import dense, out_like, run_rows, span
from vimtr.ops.reference import selective_scan_ref

__all__ = ["gated_sum_cpu", "scan_delta_cpu", "selective_scan_cpu"]

_NATIVE = (torch.float32, torch.float64)


class _SelectiveScanCPU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, delta_softplus, reverse, delta_sum_out):
        out, last = scan_forward.forward(u, delta, A, B, C, D, z, delta_bias, delta_softplus, reverse,
                                         delta_sum_out=delta_sum_out)
        ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias)
        ctx.delta_softplus, ctx.reverse = delta_softplus, reverse
        return out, last

    @staticmethod
    def backward(ctx, dout, dlast):
        if dout is None:
            dout = torch.zeros_like(ctx.saved_tensors[0])
        grads = scan_backward.backward(ctx.saved_tensors, ctx.delta_softplus, ctx.reverse, dout, dlast)
        grads = tuple(g if need else None for g, need in zip(grads, ctx.needs_input_grad))
        return grads + (None, None, None)


# ------------------------------------------------------------------------------------------ checking
def _check(u, delta, A, B, C, D, z, delta_bias):
    named = {"u": u, "delta": delta, "A": A, "B": B, "C": C, "D": D, "z": z, "delta_bias": delta_bias}
    for name, x in named.items():
        if x is None:
            if name in ("u", "delta", "A", "B", "C"):
                raise TypeError(f"selective_scan_cpu: {name} is required, got None")
            continue
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"selective_scan_cpu: {name} must be a torch.Tensor, got {type(x).__name__}")
        if x.device.type != "cpu":
            raise ValueError(f"selective_scan_cpu: {name} is on {x.device}; this kernel takes CPU tensors only "
                             "(use vimtr.ops.selective_scan_fn, which picks the backend by device)")
        if x.is_complex() or not x.is_floating_point():
            raise TypeError(f"selective_scan_cpu: {name} must be a real floating-point tensor, got {x.dtype}"
                            + (" (complex A is not supported)" if x.is_complex() else ""))
    if u.dim() != 3:
        raise ValueError(f"selective_scan_cpu: u must have shape (batch, dim, seqlen), got {tuple(u.shape)}")
    batch, E, L = u.shape
    if A.dim() != 2 or A.shape[0] != E:
        raise ValueError(f"selective_scan_cpu: A must have shape (dim, dstate) = ({E}, N), got {tuple(A.shape)}")
    N = A.shape[1]
    want = {"delta": (batch, E, L), "B": (batch, N, L), "C": (batch, N, L), "z": (batch, E, L),
            "D": (E,), "delta_bias": (E,)}
    what = {"delta": "(batch, dim, seqlen)", "B": "(batch, dstate, seqlen)", "C": "(batch, dstate, seqlen)",
            "z": "(batch, dim, seqlen)", "D": "(dim,)", "delta_bias": "(dim,)"}
    for name, shape in want.items():
        x = named[name]
        if x is not None and tuple(x.shape) != shape:
            raise ValueError(f"selective_scan_cpu: {name} must have shape {what[name]} = {shape}, "
                             f"got {tuple(x.shape)}")


def _check_out(name, x, shape, dtype):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"selective_scan_cpu: {name} must be a torch.Tensor, got {type(x).__name__}")
    if x.device.type != "cpu":
        raise ValueError(f"selective_scan_cpu: {name} is on {x.device}; it must be a CPU tensor")
    if x.dtype != dtype:
        raise TypeError(f"selective_scan_cpu: {name} must be {dtype} (the compute dtype; out= and delta_out= "
                        f"need float32 or float64 inputs), got {x.dtype}")
    if tuple(x.shape) != shape:
        raise ValueError(f"selective_scan_cpu: {name} must have shape (batch, dim, seqlen) = {shape}, "
                         f"got {tuple(x.shape)}")
    if not dense(x):
        raise ValueError(f"selective_scan_cpu: {name} must be a dense tensor (any dimension order, no gaps or "
                         f"broadcast strides), got strides {x.stride()}")


def check_delta_sum(fn, x, shape):
    """``delta_sum_out`` must be a float32 (or float64) CPU tensor of shape (batch, seqlen)."""
    if (not isinstance(x, torch.Tensor) or x.device.type != "cpu" or x.dtype not in _NATIVE
            or tuple(x.shape) != shape):
        what = f"{tuple(x.shape)} {x.dtype} on {x.device}" if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"{fn}: delta_sum_out must be a float32 CPU tensor of shape (batch, seqlen) = {shape}, "
                         f"got {what}")


# ------------------------------------------------------------------------------------------ the scan
def selective_scan_cpu(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                       return_last_state=False, reverse=False, delta_sum_out=None, *, out=None, accumulate=False,
                       out_scale=1.0, delta_out=None, out_gate=None):
    """Selective scan on CPU tensors; same signature, semantics and gradients as ``selective_scan_ref``.

    Returns ``out`` (u's dtype and shape; in u's memory layout when u is a dense view such as a transposed
    (B, L, E) tensor, contiguous otherwise), or ``(out, last_state)`` with ``last_state`` (batch, dim,
    dstate) in the compute dtype (float64 for float64 u, float32 otherwise) when ``return_last_state``.

    ``reverse`` and ``delta_sum_out`` are the op's generic extensions (see :mod:`vimtr.ops`): scan from the
    last token (``last_state`` is then the state after token 0), and add Σ over channels of the Δ used
    at each token to a (batch, seqlen) tensor (summed in groups of 16 channels, each in channel order,
    then over groups: the same bits for any thread count). Both work with gradients.

    Forward-only extensions for the CPU mixer (inference; they raise ``ValueError`` when a gradient
    would be needed), for float32/float64 inputs:

    * ``out``: a dense (batch, dim, seqlen) tensor of the compute dtype, any memory layout, to write the
      result into (and return). It must not overlap any input.
    * ``accumulate=True``: ``out = (out + result) · out_scale`` instead of ``out = result · out_scale``:
      the mixer writes the forward direction, then accumulates the reverse one with ``out_scale=0.5``,
      which is exactly its ``(y_f + y_b) / 2``.
    * ``delta_out``: a dense (batch, dim, seqlen) tensor that receives Δ as the scan used it (after
      delta_bias and softplus), in token order also with ``reverse``.
    * ``out_gate``: a dense (batch, dim, seqlen) tensor g of the compute dtype: the output becomes
      ``((out if accumulate else 0) + result) · SiLU(g) · out_scale``: the mixer gates the sum of its two
      directions once this way; :func:`gated_sum_cpu` is the same arithmetic under autograd, bit for bit.
    """
    _check(u, delta, A, B, C, D, z, delta_bias)
    dtype_in = u.dtype
    cdt = torch.float64 if dtype_in == torch.float64 else torch.float32
    shape = tuple(u.shape)
    extended = out is not None or delta_out is not None or out_gate is not None
    if delta_sum_out is not None:
        check_delta_sum("selective_scan_cpu", delta_sum_out, (shape[0], shape[2]))
    if out is not None:
        _check_out("out", out, shape, cdt)
    elif accumulate:
        raise ValueError("selective_scan_cpu: accumulate=True needs out= (the tensor to accumulate into)")
    if delta_out is not None:
        _check_out("delta_out", delta_out, shape, cdt)
    if out_gate is not None:
        _check_out("out_gate", out_gate, shape, cdt)
    if extended and dtype_in != cdt:
        raise TypeError(f"selective_scan_cpu: out= and delta_out= need float32 or float64 inputs, got u {dtype_in}")
    args = [x if x is None else x.to(cdt) for x in (u, delta, A, B, C, D, z, delta_bias)]
    needs_grad = torch.is_grad_enabled() and any(x is not None and x.requires_grad for x in args)
    if extended and needs_grad:
        raise ValueError("selective_scan_cpu: out=, accumulate=, delta_out= and out_gate= are forward-only; call it under "
                         "torch.no_grad() / inference_mode, or without them when gradients are needed")
    if 0 in u.shape or A.shape[1] == 0:
        return _empty_scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state, reverse,
                           delta_sum_out, out, accumulate, out_scale, delta_out, out_gate, cdt)
    softplus = bool(delta_softplus)
    if needs_grad:
        res, last = _SelectiveScanCPU.apply(*args, softplus, bool(reverse), delta_sum_out)
    else:
        res, last = scan_forward.forward(*args, softplus, bool(reverse), out=out, accumulate=bool(accumulate),
                                         out_scale=float(out_scale), delta_out=delta_out,
                                         delta_sum_out=delta_sum_out, out_gate=out_gate)
    res = res.to(dtype_in)
    return (res, last) if return_last_state else res


def _empty_scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state, reverse, delta_sum_out,
                out, accumulate, out_scale, delta_out, out_gate, cdt):
    """Nothing to scan (empty batch, channels, sequence or state): the reference is exact and free; the
    extensions are applied with torch ops."""
    y, last = selective_scan_ref(u, delta, A, B, C, D=D, z=z, delta_bias=delta_bias, delta_softplus=delta_softplus,
                                 return_last_state=True, reverse=reverse, delta_sum_out=delta_sum_out)
    if out is None and delta_out is None and out_gate is None:
        return (y, last) if return_last_state else y
    d = delta.to(cdt) + (0 if delta_bias is None else delta_bias.to(cdt)[:, None])
    d = F.softplus(d) if delta_softplus else d
    if delta_out is not None:
        delta_out.copy_(d)
    if accumulate:
        y = out + y
    y = y * (F.silu(out_gate) * out_scale) if out_gate is not None else y * out_scale
    if out is not None:
        y = out.copy_(y)
    return (y, last) if return_last_state else y


def scan_delta_cpu(delta, delta_bias=None, delta_softplus=True, delta_sum_out=None):
    """Δ exactly as :func:`selective_scan_cpu` computes it (delta + delta_bias, then softplus), forward only,
    in delta's layout when delta is dense: what its ``delta_out=`` writes, for callers that need Δ while
    the scan itself runs under autograd. float32/float64 (B, E, L) CPU tensors. ``delta_sum_out``: a
    (B, L) tensor Σ_e Δ is added to, exactly as the scan adds it."""
    if delta.dim() != 3 or delta.device.type != "cpu" or delta.dtype not in _NATIVE:
        raise ValueError(f"scan_delta_cpu: delta must be a float32/float64 (batch, dim, seqlen) CPU tensor, "
                         f"got {tuple(delta.shape)} {delta.dtype} on {delta.device}")
    Bn, E, L = delta.shape
    if delta_bias is not None and tuple(delta_bias.shape) != (E,):
        raise ValueError(f"scan_delta_cpu: delta_bias must be ({E},), got {tuple(delta_bias.shape)}")
    if delta_sum_out is not None:
        check_delta_sum("scan_delta_cpu", delta_sum_out, (Bn, L))
    if delta.numel() == 0:
        return out_like(delta)
    return scan_forward.delta_only(delta, delta_bias, delta_softplus, delta_sum_out)


# ------------------------------------------------------------------------------- gated sum (autograd)
@njit(nogil=True, error_model="numpy", cache=True)
def _gated_sum_rows(lo, hi, E, L, bf, sb, gf, sg, of, so, scale):
    bb = np.empty(L, of.dtype)
    gb = np.empty(L, of.dtype)
    for i in range(lo, hi):
        b = i // E
        e = i - b * E
        load_row(bf, sb[0] + b * sb[1] + e * sb[2], sb[3], bb)
        load_row(gf, sg[0] + b * sg[1] + e * sg[2], sg[3], gb)
        emit_gated_row(of, so[0] + b * so[1] + e * so[2], so[3], bb, gb, True, scale)


def _gated_sum_kernel(a, b, g, scale):
    out = out_like(a)
    out.copy_(a)
    bf, sb = span(b)
    gf, sg = span(g)
    of, so = span(out)
    Bn, E, L = a.shape
    sc = of.dtype.type(scale)
    run_rows(lambda lo, hi, chunk: _gated_sum_rows(lo, hi, E, L, bf, sb, gf, sg, of, so, sc), Bn * E, Bn * E * L)
    return out


class _GatedSum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a, b, g, scale):
        ctx.save_for_backward(a, b, g)
        ctx.scale = scale
        return _gated_sum_kernel(a.detach(), b.detach(), g.detach(), scale)

    @staticmethod
    def backward(ctx, grad):
        a, b, g = ctx.saved_tensors
        sg = torch.sigmoid(g)
        gs = grad * ctx.scale
        dab = gs * (g * sg)
        dg = gs * (a + b) * (sg * (1 + g * (1 - sg))) if ctx.needs_input_grad[2] else None
        return (dab if ctx.needs_input_grad[0] else None, dab if ctx.needs_input_grad[1] else None, dg, None)


def gated_sum_cpu(a, b, g, scale=1.0):
    """(a + b) · SiLU(g) · scale for float32/float64 (batch, dim, seqlen) CPU tensors of one dtype, with
    gradients; bit for bit what ``selective_scan_cpu(..., out=a, accumulate=True, out_gate=g,
    out_scale=scale)`` writes when the scan's result is b (the same compiled arithmetic)."""
    ts = (a, b, g)
    if (any(not isinstance(t, torch.Tensor) or t.device.type != "cpu" or t.dtype != a.dtype for t in ts)
            or a.dtype not in _NATIVE or a.dim() != 3 or b.shape != a.shape or g.shape != a.shape):
        raise ValueError("gated_sum_cpu: a, b, g must be float32/float64 CPU tensors of one dtype and one "
                         "(batch, dim, seqlen) shape, got "
                         + ", ".join(f"{tuple(t.shape)} {t.dtype}" if isinstance(t, torch.Tensor) else type(t).__name__
                                     for t in ts))
    if a.numel() == 0:
        return (a + b) * (F.silu(g) * scale)
    if torch.is_grad_enabled() and any(t.requires_grad for t in ts):
        return _GatedSum.apply(a, b, g, float(scale))
    return _gated_sum_kernel(a, b, g, float(scale))
