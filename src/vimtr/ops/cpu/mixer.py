"""Vim's bidirectional Mamba mixer up to ``out_proj`` on the CPU kernels: :func:`bimamba_inner_cpu`, the
CPU implementation of :func:`vimtr.ops.bimamba_inner_fn` (float32).

The same maths as :func:`vimtr.ops.reference.bimamba_inner_ref`, laid out for the kernels as mamba_ssm's
fused path lays it out: every (B, E, L) tensor is stored as (E, B·L), so each projection is one matmul on
views and each channel's row is contiguous for the kernels. Both convolutions are one kernel pass (the
backward direction's anti-causal instead of flipping the sequence) and the backward scan runs reversed,
so nothing is flipped or copied. Both scans run without z; the gate is applied once to their sum,
(y_f + y_b)·SiLU(z)·½, the official (y_f·SiLU(z) + y_b·SiLU(z)) / 2 up to float rounding.

Two forms, by grad mode, with the same values bit for bit (so a model's output does not depend on it):

* inference: the big intermediates live in a per-thread workspace (fresh multi-MB tensors at every call
  cost page faults: glibc hands freed top-of-heap memory back to the OS; 1.2 ms more per conv call), the
  reverse scan accumulates into the forward one's output and applies the gate and the ½ on the way;
* autograd: the same kernels through their autograd forms, and ``gated_sum_cpu`` doing the sum and the
  gate with the very arithmetic of the inference form's output gate.
"""
from __future__ import annotations

import threading

import torch

from vimtr.ops.cpu import scan as _scan
from vimtr.ops.cpu.conv import causal_conv1d_bidir_cpu

__all__ = ["bimamba_inner_cpu"]


def bimamba_inner_cpu(hidden, in_proj_weight, in_proj_bias, conv_weight, conv_bias, x_proj_weight, dt_proj_weight,
                      dt_proj_bias, A, D, conv_b_weight, conv_b_bias, x_proj_b_weight, dt_proj_b_weight,
                      dt_proj_b_bias, A_b, D_b, divide_out=False, delta_sum_out=None, return_aux=False):
    """:func:`vimtr.ops.reference.bimamba_inner_ref` for float32 CPU tensors (arguments and results alike;
    y is a (B, L, E) view of channel-major storage, which ``out_proj`` reads without a copy)."""
    Bn, L, _ = hidden.shape
    if delta_sum_out is not None:
        _scan.check_delta_sum("bimamba_inner_cpu", delta_sum_out, (Bn, L))
    tensors = (hidden, in_proj_weight, in_proj_bias, conv_weight, conv_bias, x_proj_weight, dt_proj_weight,
               dt_proj_bias, A, D, conv_b_weight, conv_b_bias, x_proj_b_weight, dt_proj_b_weight, dt_proj_b_bias,
               A_b, D_b)
    grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
    directions = ((conv_weight, conv_bias, x_proj_weight, dt_proj_weight, dt_proj_bias, A, D, False),
                  (conv_b_weight, conv_b_bias, x_proj_b_weight, dt_proj_b_weight, dt_proj_b_bias, A_b, D_b, True))
    run = _with_autograd if grad else _inference
    y, aux = run(hidden, in_proj_weight, in_proj_bias, directions, 0.5 if divide_out else 1.0, delta_sum_out,
                 return_aux)
    return (y, aux) if return_aux else y


def _channel_major(Bn, L):
    def view(t2):  # (E', B·L) storage seen as (B, E', L)
        return t2.view(-1, Bn, L).transpose(0, 1)
    return view


def _in_proj(hidden, weight, bias, out=None):
    """in_proj as (2E, B·L): x and z rows contiguous per channel."""
    M = hidden.shape[0] * hidden.shape[1]
    xz2 = torch.mm(weight, hidden.reshape(M, -1).t(), out=out)
    if bias is not None:
        xz2 = xz2.add_(bias[:, None]) if out is not None else xz2 + bias[:, None]
    return xz2


def _projections(c, x_proj_weight, dt_proj_weight, A, bel, E, M, out=None):
    """x_proj and dt_proj of a direction's conv output c: (delta, B, C) as (B, ·, L) views."""
    R, N = dt_proj_weight.shape[1], A.shape[1]
    x_dbl = torch.mm(x_proj_weight, c.transpose(0, 1).reshape(E, M))  # (R + 2N, B·L), c's storage as it is
    delta = bel(torch.mm(dt_proj_weight, x_dbl[:R], out=out))
    return delta, bel(x_dbl[R:R + N]), bel(x_dbl[R + N:])


def _inference(hidden, w_in, b_in, directions, scale, delta_sum_out, return_aux):
    Bn, L, _ = hidden.shape
    E, M = w_in.shape[0] // 2, Bn * L
    bel = _channel_major(Bn, L)
    ws = _workspace(5 * E * M)
    xz2, cf2, cb2, dl2 = (ws[i * E * M:(i + k) * E * M].view(k * E, M) for i, k in ((0, 2), (2, 1), (3, 1), (4, 1)))
    y2 = hidden.new_empty(E, M)  # returned: not in the workspace, which the next call overwrites
    xz = bel(_in_proj(hidden, w_in, b_in, out=xz2))  # (B, 2E, L), rows contiguous
    x, z = xz[:, :E], xz[:, E:]
    (cw, cb, *_), (cw_b, cb_b, *_) = directions
    c_f, c_b = causal_conv1d_bidir_cpu(x, cw, cb, cw_b, cb_b, out_f=bel(cf2), out_b=bel(cb2))
    aux = {}
    for tag, c, (_, _, x_proj_w, dt_proj_w, dt_proj_b, A, D, reverse) in (("f", c_f, directions[0]),
                                                                           ("b", c_b, directions[1])):
        delta, Bm, Cm = _projections(c, x_proj_w, dt_proj_w, A, bel, E, M, out=dl2)
        delta_used = bel(hidden.new_empty(E, M)) if return_aux else None
        # The forward direction writes y; the reverse one adds to it, then gates and halves the sum.
        _scan.selective_scan_cpu(c, delta, A, Bm, Cm, D, delta_bias=dt_proj_b, delta_softplus=True, reverse=reverse,
                                 delta_sum_out=delta_sum_out, out=bel(y2), accumulate=reverse,
                                 out_scale=scale if reverse else 1.0, out_gate=z if reverse else None,
                                 delta_out=delta_used)
        if return_aux:
            aux.update({f"delta_{tag}": delta_used, f"B_{tag}": Bm.transpose(1, 2), f"C_{tag}": Cm.transpose(1, 2)})
    return y2.t().view(Bn, L, E), aux


def _with_autograd(hidden, w_in, b_in, directions, scale, delta_sum_out, return_aux):
    Bn, L, _ = hidden.shape
    E, M = w_in.shape[0] // 2, Bn * L
    bel = _channel_major(Bn, L)
    xz = bel(_in_proj(hidden, w_in, b_in))
    x, z = xz[:, :E], xz[:, E:]
    (cw, cb, *_), (cw_b, cb_b, *_) = directions
    c_f, c_b = causal_conv1d_bidir_cpu(x, cw, cb, cw_b, cb_b, channel_major=True)
    ys, aux = [], {}
    for tag, c, (_, _, x_proj_w, dt_proj_w, dt_proj_b, A, D, reverse) in (("f", c_f, directions[0]),
                                                                           ("b", c_b, directions[1])):
        delta, Bm, Cm = _projections(c, x_proj_w, dt_proj_w, A, bel, E, M)
        ys.append(_scan.selective_scan_cpu(c, delta, A, Bm, Cm, D, delta_bias=dt_proj_b, delta_softplus=True,
                                           reverse=reverse, delta_sum_out=delta_sum_out))
        if return_aux:  # Δ itself, as the scan computed it (the scan's delta_out= is forward-only)
            aux.update({f"delta_{tag}": _scan.scan_delta_cpu(delta.detach(), dt_proj_b.detach()),
                        f"B_{tag}": Bm.transpose(1, 2), f"C_{tag}": Cm.transpose(1, 2)})
    y = _scan.gated_sum_cpu(ys[0], ys[1], z, scale)  # (B, E, L), channel-major storage
    return y.transpose(1, 2), aux


_WORKSPACE = threading.local()


def _workspace(numel: int) -> torch.Tensor:
    """A float32 CPU buffer of at least ``numel`` elements, one per thread, kept for the next call (grown,
    never shrunk: Vim-S at batch 32 holds ~100 MB). Only for intermediates that never leave a call."""
    buf = getattr(_WORKSPACE, "buf", None)
    if buf is None or buf.numel() < numel:
        _WORKSPACE.buf = buf = None  # free the old one first
        with torch.inference_mode(False):  # a normal tensor: usable both in and out of inference mode
            _WORKSPACE.buf = buf = torch.empty(numel, dtype=torch.float32)
    return buf[:numel]
