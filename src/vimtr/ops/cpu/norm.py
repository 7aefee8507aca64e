"""Residual add + RMSNorm in one numba pass over the rows (CPU, float32): what every Vim block starts with.

    residual' = residual + hidden          (or hidden itself in the first block)
    normed    = residual' · (mean(residual'²) + eps)^-½ · weight

torch needs five passes and five allocations for this (add, pow, mean, two multiplies); on Vim-Ti at
batch 8 they were ~4% of a forward with the fast scan. Forward values come from the kernel also when a
gradient is needed (the backward differentiates the torch formula, recomputed), so a model's output does
not depend on the grad mode. The mean is summed in a different order than torch's: results agree to
float32 rounding, not bit for bit.

With a row map (:class:`vimtr.ops.RowMap`), the kernel builds each output row from the input rows the
map names, as it reads them:

    x         = residual + hidden                                  (every input row, read once)
    residual' = x[keep[t]] + Σ_i f_i · (x[src_i] − x[keep[t]])      (sources averaged into output row t)
    normed    = RMSNorm(residual')

the map applied to the sum of the two streams instead of to each (equal up to rounding: the map is
linear and the same for both), so both streams are read once and only the output rows written, instead
of a gather pass over each stream before the add. Sources are added in ``index_add_``'s order.
"""
from __future__ import annotations

import math

import numpy as np
import torch
from numba import njit

from vimtr.ops.cpu.recompute import grads_via_reference
from vimtr.ops.cpu.runtime import FM_KERNEL, run_rows
from vimtr.ops.reference import add_rms_norm_ref

__all__ = ["add_rms_norm_cpu"]


@njit(nogil=True, fastmath=FM_KERNEL, error_model="numpy", cache=True, inline="always")
def _rmsnorm_row(ro, w, eps, no):
    """no = ro · (mean(ro²) + eps)^-½ · w for one row."""
    one = ro.dtype.type(1)
    inv_d = one / ro.dtype.type(ro.shape[0])
    ss = ro.dtype.type(0)
    for j in range(ro.shape[0]):
        ss += ro[j] * ro[j]
    scale = one / math.sqrt(ss * inv_d + eps)
    for j in range(ro.shape[0]):
        no[j] = ro[j] * scale * w[j]


@njit(nogil=True, fastmath=FM_KERNEL, error_model="numpy", cache=True)
def _add_rmsnorm(lo, hi, h, r, has_r, w, eps, r_out, n_out):
    D = h.shape[1]
    for i in range(lo, hi):
        hi_ = h[i]
        ro = r_out[i]
        if has_r:
            ri = r[i]
            for j in range(D):
                ro[j] = ri[j] + hi_[j]
        else:
            for j in range(D):
                ro[j] = hi_[j]
        _rmsnorm_row(ro, w, eps, n_out[i])


@njit(nogil=True, fastmath=FM_KERNEL, error_model="numpy", cache=True)
def _mapped_add_rmsnorm(lo, hi, h, r, keep, ptr, srcs, facs, w, eps, r_out, n_out):
    D = h.shape[1]
    for t in range(lo, hi):
        k = keep[t]
        hk, rk, ro = h[k], r[k], r_out[t]
        for j in range(D):
            ro[j] = rk[j] + hk[j]
        for q in range(ptr[t], ptr[t + 1]):
            hs, rs, f = h[srcs[q]], r[srcs[q]], facs[q]
            for j in range(D):
                ro[j] += ((rs[j] + hs[j]) - (rk[j] + hk[j])) * f
        _rmsnorm_row(ro, w, eps, n_out[t])


@njit(nogil=True, cache=True)
def _by_destination(src, dst, fac, n_out, ptr, srcs, facs):
    """Group the merged source rows by output row (CSR ``ptr``, zeroed by the caller), keeping their order
    within a row."""
    for i in range(dst.shape[0]):
        ptr[dst[i] + 1] += 1
    for t in range(n_out):
        ptr[t + 1] += ptr[t]
    fill = ptr[:-1].copy()
    for i in range(dst.shape[0]):
        q = fill[dst[i]]
        srcs[q], facs[q] = src[i], fac[i]
        fill[dst[i]] = q + 1


def _map_kernel(hidden, residual, weight, eps, row_map):
    B, _, D = hidden.shape
    h = hidden.detach().reshape(-1, D).contiguous()
    r = residual.detach().reshape(-1, D).contiguous()
    keep, src, dst, fac = row_map.keep, row_map.src, row_map.dst, row_map.factor
    n_out = keep.shape[0]
    ptr = np.zeros(n_out + 1, np.int64)
    if not row_map.merges:
        srcs, facs = np.empty(0, np.int64), np.empty(0, np.float32)
    else:
        srcs, facs = np.empty(src.shape[0], np.int64), np.empty(src.shape[0], np.float32)
        _by_destination(src.numpy(), dst.numpy(), fac.detach().float().contiguous().numpy(), n_out, ptr, srcs, facs)
    r_out = torch.empty(n_out, D, dtype=torch.float32)
    n_o = torch.empty(n_out, D, dtype=torch.float32)
    args = (h.numpy(), r.numpy(), keep.numpy(), ptr, srcs, facs, weight.detach().contiguous().numpy(),
            np.float32(eps), r_out.numpy(), n_o.numpy())
    run_rows(lambda lo, hi, chunk: _mapped_add_rmsnorm(lo, hi, *args), n_out, n_out * D)
    return r_out.view(B, n_out // B, D), n_o.view(B, n_out // B, D)


def _kernel(hidden, residual, weight, eps):
    shape = hidden.shape
    D = shape[-1]
    h = hidden.detach().reshape(-1, D).contiguous()
    r = residual.detach().reshape(-1, D).contiguous() if residual is not None else h
    r_out = torch.empty(h.shape, dtype=torch.float32)
    n_out = torch.empty(h.shape, dtype=torch.float32)
    args = (h.numpy(), r.numpy(), residual is not None, weight.detach().contiguous().numpy(), np.float32(eps),
            r_out.numpy(), n_out.numpy())
    run_rows(lambda lo, hi, chunk: _add_rmsnorm(lo, hi, *args), h.shape[0], h.numel())
    return r_out.view(shape), n_out.view(shape)


class _AddRMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, residual, weight, eps):
        ctx.save_for_backward(hidden, residual, weight)
        ctx.eps = eps
        return _kernel(hidden, residual, weight, eps)

    @staticmethod
    def backward(ctx, g_res, g_norm):
        return grads_via_reference(lambda h, r, w: add_rms_norm_ref(h, r, w, ctx.eps), ctx.saved_tensors,
                                   ctx.needs_input_grad, (g_res, g_norm)) + (None,)


def _kernel_fits(hidden, residual, weight) -> bool:
    """float32 CPU tensors of matching shapes, not empty: what the compiled kernels take."""
    return (hidden.dtype == torch.float32 and weight.dtype == torch.float32 and hidden.device.type == "cpu"
            and (residual is None or (residual.dtype == torch.float32 and residual.shape == hidden.shape))
            and tuple(weight.shape) == (hidden.shape[-1],) and hidden.numel() > 0)


def _needs_grad(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def add_rms_norm_cpu(hidden, residual, weight, eps: float, row_map=None):
    """(residual + hidden, RMSNorm of it) for float32 CPU tensors (B, L, D) (``residual`` None: hidden
    starts the residual stream); other dtypes/devices take :func:`add_rms_norm_ref`. Gradients flow.
    ``row_map``: shorten both streams first (see the module docstring); folded into the kernel in
    inference, applied with torch ops first where gradients are needed or the kernel does not apply."""
    if row_map is not None:
        if residual is not None and _kernel_fits(hidden, residual, weight) and not _needs_grad(hidden, residual, weight):
            return _map_kernel(hidden, residual, weight, float(eps), row_map)
        if residual is None:
            raise ValueError("add_rms_norm: a row_map needs both streams (residual is None)")
        hidden, residual = row_map.apply(hidden), row_map.apply(residual)
    if not _kernel_fits(hidden, residual, weight):
        return add_rms_norm_ref(hidden, residual, weight, eps)
    if _needs_grad(hidden, residual, weight):
        return _AddRMSNorm.apply(hidden, residual, weight, float(eps))
    return _kernel(hidden, residual, weight, float(eps))
