"""Residual add + RMSNorm in one numba pass over the rows (CPU, float32): what every Vim block starts with.

    residual' = residual + hidden          (or hidden itself in the first block)
    normed    = residual' · (mean(residual'²) + eps)^-½ · weight

torch needs five passes and five allocations for this (add, pow, mean, two multiplies); on Vim-Ti at
batch 8 they were ~4% of a forward with the fast scan. Forward values come from the kernel also when a
gradient is needed (the backward differentiates the torch formula, recomputed), so a model's output does
not depend on the grad mode. The mean is summed in a different order than torch's: results agree to
float32 rounding, not bit for bit.
"""
from __future__ import annotations

import math

import numpy as np
import torch
from numba import njit

from vimtr.ops.scan_cpu import _FM_KERNEL, _run_rows

__all__ = ["add_rmsnorm_cpu", "add_rmsnorm_ref"]


@njit(nogil=True, fastmath=_FM_KERNEL, error_model="numpy", cache=True)
def _add_rmsnorm(lo, hi, h, r, has_r, w, eps, r_out, n_out):
    D = h.shape[1]
    zero = h.dtype.type(0)
    one = h.dtype.type(1)
    inv_d = one / h.dtype.type(D)
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
        ss = zero
        for j in range(D):
            ss += ro[j] * ro[j]
        scale = one / math.sqrt(ss * inv_d + eps)
        no = n_out[i]
        for j in range(D):
            no[j] = ro[j] * scale * w[j]


def add_rmsnorm_ref(hidden, residual, weight, eps):
    """The torch formula (Block + RMSNorm of vimtr.models.layers), differentiable."""
    res = hidden.float() if residual is None else residual + hidden.float()
    normed = res * torch.rsqrt(res.pow(2).mean(-1, keepdim=True) + eps) * weight.float()
    return res, normed.to(hidden.dtype)


def _kernel(hidden, residual, weight, eps):
    shape = hidden.shape
    D = shape[-1]
    h = hidden.detach().reshape(-1, D).contiguous()
    r = residual.detach().reshape(-1, D).contiguous() if residual is not None else h
    r_out = torch.empty(h.shape, dtype=torch.float32)
    n_out = torch.empty(h.shape, dtype=torch.float32)
    args = (h.numpy(), r.numpy(), residual is not None, weight.detach().contiguous().numpy(), np.float32(eps),
            r_out.numpy(), n_out.numpy())
    _run_rows(lambda lo, hi, chunk: _add_rmsnorm(lo, hi, *args), h.shape[0], h.numel())
    return r_out.view(shape), n_out.view(shape)


class _AddRMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, residual, weight, eps):
        ctx.save_for_backward(hidden, residual, weight)
        ctx.eps = eps
        return _kernel(hidden, residual, weight, eps)

    @staticmethod
    def backward(ctx, g_res, g_norm):
        hidden, residual, weight = ctx.saved_tensors
        inputs = [t.detach().requires_grad_(need) if t is not None else None
                  for t, need in zip((hidden, residual, weight), ctx.needs_input_grad)]
        with torch.enable_grad():
            res, normed = add_rmsnorm_ref(inputs[0], inputs[1], inputs[2], ctx.eps)
            pairs = [(o, g) for o, g in ((res, g_res), (normed, g_norm)) if g is not None]
            wanted = [t for t in inputs if t is not None and t.requires_grad]
            got = iter(torch.autograd.grad([o for o, _ in pairs], wanted, [g for _, g in pairs], allow_unused=True))
        return tuple(next(got) if t is not None and t.requires_grad else None for t in inputs) + (None,)


def add_rmsnorm_cpu(hidden, residual, weight, eps: float):
    """(residual + hidden, RMSNorm of it) for float32 CPU tensors (B, L, D) (``residual`` None: hidden
    starts the residual stream); other dtypes/devices take :func:`add_rmsnorm_ref`. Gradients flow."""
    if (hidden.dtype != torch.float32 or weight.dtype != torch.float32 or hidden.device.type != "cpu"
            or (residual is not None and (residual.dtype != torch.float32 or residual.shape != hidden.shape))
            or tuple(weight.shape) != (hidden.shape[-1],) or hidden.numel() == 0):
        return add_rmsnorm_ref(hidden, residual, weight, eps)
    tensors = [t for t in (hidden, residual, weight) if t is not None]
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return _AddRMSNorm.apply(hidden, residual, weight, float(eps))
    return _kernel(hidden, residual, weight, float(eps))
