"""Both of Vim's depthwise convolutions (causal and anti-causal, + bias + SiLU) in one numba pass, CPU.

Vim's backward direction convolves the flipped sequence causally and flips the result back, which is an
anti-causal convolution of the sequence as it is::

    c_f[t] = silu(b_f + Σ_j w_f[j] · x[t − (K−1) + j])      (causal, the forward direction)
    c_b[t] = silu(b_b + Σ_j w_b[j] · x[t + (K−1) − j])      (anti-causal, = flip(causal(flip(x))))

:func:`causal_conv1d_bidir_cpu` computes both from one read of x (rows with any strides, e.g. a slice of
the ``in_proj`` output) into output tensors of any layout the caller chose, without the flips, the
separate SiLU pass and oneDNN's per-call overhead. Gradients flow through a kernel of its own (the
mirror image of the forward); float32 only, other dtypes take the torch reference.
"""
from __future__ import annotations

import numpy as np
import torch
from numba import njit

from vimtr.ops.cpu.rows import load_row, store_row
from vimtr.ops.cpu.runtime import FM_KERNEL, dense, run_rows, sigmoid, span, threads_for
from vimtr.ops.reference import causal_conv1d_bidir_ref, conv_weights

__all__ = ["causal_conv1d_bidir_cpu"]


@njit(nogil=True, fastmath=FM_KERNEL, error_model="numpy", cache=True)
def _preactivations(xb, wf, bf, wb, bb, e, L, cf, cb):
    """Channel e's two convolutions before the SiLU, from its row xb padded with K-1 zeros on each side."""
    K = wf.shape[1]
    for t in range(L):
        cf[t] = bf[e]
        cb[t] = bb[e]
    for j in range(K):
        # Shifted windows as slices: LLVM vectorises these loops, not ones indexing xb[t + j] (numba's
        # negative-index wraparound on a sum it cannot prove non-negative blocks it; 3x measured).
        w1 = wf[e, j]
        w2 = wb[e, j]
        s1 = xb[j:j + L]
        s2 = xb[2 * (K - 1) - j:2 * (K - 1) - j + L]
        for t in range(L):
            cf[t] += w1 * s1[t]
        for t in range(L):
            cb[t] += w2 * s2[t]


@njit(nogil=True, fastmath=FM_KERNEL, error_model="numpy", cache=True)
def _conv_bidir(lo, hi, L, x, sx, wf, bf, wb, bb, of, so, ob, sob, silu):
    """Rows [lo, hi) of (B, E, L); row i is (b, e) = divmod(i, E). s* = (base, batch, channel, token)."""
    E, K = wf.shape
    dtype = wf.dtype
    zero = dtype.type(0)
    xb = np.zeros(L + 2 * (K - 1), dtype)  # the row with K-1 zeros on each side
    cf = np.empty(L, dtype)
    cb = np.empty(L, dtype)
    for i in range(lo, hi):
        b = i // E
        e = i - b * E
        x0 = sx[0] + b * sx[1] + e * sx[2]
        load_row(x, x0, sx[3], xb[K - 1:K - 1 + L])
        _preactivations(xb, wf, bf, wb, bb, e, L, cf, cb)
        if silu:
            for t in range(L):
                v = cf[t]
                cf[t] = v * sigmoid(v)
            for t in range(L):
                v = cb[t]
                cb[t] = v * sigmoid(v)
        store_row(of, so[0] + b * so[1] + e * so[2], so[3], cf)
        store_row(ob, sob[0] + b * sob[1] + e * sob[2], sob[3], cb)
        for t in range(K - 1):  # the padding stays zero for the next row
            xb[t] = zero


@njit(nogil=True, fastmath=FM_KERNEL, error_model="numpy", cache=True)
def _conv_bidir_backward(lo, hi, chunk, L, x, sx, wf, bf, wb, bb, gf, sgf, gb, sgb, silu, dx, dwf, dbf, dwb,
                         dbb):
    """Gradients of :func:`_conv_bidir` for rows [lo, hi): dx (contiguous (B, E, L)) per row; the weight
    and bias gradients summed into this chunk's dwf[chunk], dbf[chunk], ... (channels recur across the
    batch, so each thread sums its own). With xb[k] = x[k − (K−1)] and dp the pre-activation gradient
    zero-padded alike, the forward's pf[t] = Σ_j wf[j]·xb[t + j] gives dx[t] = Σ_j wf[j]·dpf[t + 2(K−1) − j]:
    the backward is the mirror image of the forward (and likewise for the anti-causal direction)."""
    E, K = wf.shape
    dtype = wf.dtype
    one = dtype.type(1)
    P = L + 2 * (K - 1)
    xb = np.zeros(P, dtype)
    dpf = np.zeros(P, dtype)  # zero padding on both sides stays zero: only [K-1, K-1+L) is written
    dpb = np.zeros(P, dtype)
    pf = np.empty(L, dtype)
    pb = np.empty(L, dtype)
    gt = np.empty(L, dtype)
    dxb = np.empty(L, dtype)
    for i in range(lo, hi):
        b = i // E
        e = i - b * E
        load_row(x, sx[0] + b * sx[1] + e * sx[2], sx[3], xb[K - 1:K - 1 + L])
        _preactivations(xb, wf, bf, wb, bb, e, L, pf, pb)  # again: the forward kept only the outputs
        for direction in range(2):
            p = pf if direction == 0 else pb
            dp = dpf[K - 1:K - 1 + L] if direction == 0 else dpb[K - 1:K - 1 + L]
            g, sg = (gf, sgf) if direction == 0 else (gb, sgb)
            if g.size == 0:  # this output had no gradient
                for t in range(L):
                    dp[t] = 0
                continue
            load_row(g, sg[0] + b * sg[1] + e * sg[2], sg[3], gt)
            if silu:
                for t in range(L):
                    sgm = sigmoid(p[t])
                    dp[t] = gt[t] * sgm * (one + p[t] * (one - sgm))
            else:
                for t in range(L):
                    dp[t] = gt[t]
        for t in range(L):
            dxb[t] = 0
        acc_f = dtype.type(0)
        acc_b = dtype.type(0)
        for t in range(L):
            acc_f += dpf[K - 1 + t]
            acc_b += dpb[K - 1 + t]
        dbf[chunk, e] += acc_f
        dbb[chunk, e] += acc_b
        for j in range(K):
            w1 = wf[e, j]
            w2 = wb[e, j]
            r1 = dpf[2 * (K - 1) - j:2 * (K - 1) - j + L]
            r2 = dpb[j:j + L]
            for t in range(L):
                dxb[t] += w1 * r1[t] + w2 * r2[t]
            s1 = xb[j:j + L]
            s2 = xb[2 * (K - 1) - j:2 * (K - 1) - j + L]
            a1 = dtype.type(0)
            a2 = dtype.type(0)
            for t in range(L):
                a1 += dpf[K - 1 + t] * s1[t]
                a2 += dpb[K - 1 + t] * s2[t]
            dwf[chunk, e, j] += a1
            dwb[chunk, e, j] += a2
        o = (b * E + e) * L
        for t in range(L):
            dx[o + t] = dxb[t]
        for t in range(K - 1):  # x's padding stays zero for the next row
            xb[t] = 0


def _parameters(w_f, b_f, w_b, b_b, E):
    """The kernels' (wf, bf, wb, bb) numpy arrays: (E, K) weights, (E,) biases (zeros where None)."""
    zeros = torch.zeros(E)
    return tuple((t if t is not None else zeros).detach().contiguous().numpy() for t in (w_f, b_f, w_b, b_b))


def _kernel_forward(x, w_f, b_f, w_b, b_b, activation, out_f, out_b):
    Bn, E, L = x.shape
    wf, bf, wb, bb = _parameters(w_f, b_f, w_b, b_b, E)
    xf, sx = span(x)
    of, so = span(out_f)
    ob, sob = span(out_b)

    def call(lo, hi, chunk):
        _conv_bidir(lo, hi, L, xf, sx, wf, bf, wb, bb, of, so, ob, sob, bool(activation))

    run_rows(call, Bn * E, Bn * E * L * w_f.shape[1] // 4)
    return out_f, out_b


def _kernel_backward(x, w_f, b_f, w_b, b_b, activation, g_f, g_b):
    """(dx, dw_f (E, K), db_f, dw_b, db_b) from the kernel; a missing g_* counts as zero."""
    Bn, E, L = x.shape
    wfn, bf, wbn, bb = _parameters(w_f, b_f, w_b, b_b, E)  # w_* arrive (E, K), as _ConvBidir.apply got them
    K = wfn.shape[1]
    xf, sx = span(x)
    (gff, sgf), (gbf, sgb) = [span(g) if g is not None else (np.empty(0, np.float32), np.zeros(4, np.int64))
                              for g in (g_f, g_b)]
    rows, work = Bn * E, Bn * E * L * K // 2
    nt = threads_for(rows, work)
    dx = torch.empty(Bn, E, L)
    parts = [np.zeros((nt, E, K), np.float32), np.zeros((nt, E), np.float32),
             np.zeros((nt, E, K), np.float32), np.zeros((nt, E), np.float32)]
    dxf = dx.view(-1).numpy()

    def call(lo, hi, chunk):
        _conv_bidir_backward(lo, hi, chunk, L, xf, sx, wfn, bf, wbn, bb, gff, sgf, gbf, sgb, bool(activation),
                             dxf, *parts)

    used = run_rows(call, rows, work)
    assert used == nt  # the partial sums were sized for this many chunks
    dwf, dbf, dwb, dbb = (torch.from_numpy(p.sum(axis=0)) for p in parts)
    return dx, dwf, dbf, dwb, dbb


def _new_out(x, channel_major):
    Bn, E, L = x.shape
    return torch.empty(E, Bn, L).transpose(0, 1) if channel_major else torch.empty(Bn, E, L)


class _ConvBidir(torch.autograd.Function):
    """The kernel's values forward, and its mirror-image kernel backward (:func:`_conv_bidir_backward`,
    checked against autograd through :func:`causal_conv1d_bidir_ref` in the tests). Autograd through
    oneDNN's depthwise conv, recomputed, was 12% of a re-training step of the bundled model."""

    @staticmethod
    def forward(ctx, x, w_f, b_f, w_b, b_b, activation, channel_major):
        ctx.save_for_backward(x, w_f, b_f, w_b, b_b)
        ctx.activation = activation
        ctx.set_materialize_grads(False)  # an unused output's gradient arrives as None: no zeros to read
        return _kernel_forward(x, w_f, b_f, w_b, b_b, activation, _new_out(x, channel_major),
                               _new_out(x, channel_major))

    @staticmethod
    def backward(ctx, g_f, g_b):
        x, w_f, b_f, w_b, b_b = ctx.saved_tensors
        dx, dwf, dbf, dwb, dbb = _kernel_backward(x, w_f, b_f, w_b, b_b, ctx.activation, g_f, g_b)
        need = ctx.needs_input_grad
        f, b = g_f is not None, g_b is not None  # an unused output's parameters get None, as in autograd
        return (dx if need[0] else None, dwf.view_as(w_f) if need[1] and f else None,
                dbf if need[2] and f and b_f is not None else None, dwb.view_as(w_b) if need[3] and b else None,
                dbb if need[4] and b and b_b is not None else None, None, None)


def causal_conv1d_bidir_cpu(x, w_f, b_f, w_b, b_b, activation: bool = True, out_f=None, out_b=None,
                            channel_major: bool = False):
    """x (B, E, L) -> (c_f, c_b), each (B, E, L): the causal conv with (w_f, b_f) and the anti-causal one
    with (w_b, b_b) (weights (E, 1, K) as ``nn.Conv1d`` stores them, or (E, K); biases (E,) or None),
    SiLU applied when ``activation``.

    Outputs: ``out_f`` / ``out_b``, dense float32 (B, E, L) tensors of any layout to write into (they
    must not overlap x; forward-only), else new tensors, stored as (E, B, L) with ``channel_major``
    (the layout of Vim's CPU mixer path) or contiguous. Gradients flow (a kernel backward). float32 CPU
    inputs run the kernel; anything else takes :func:`causal_conv1d_bidir_ref`.
    """
    if x.dim() != 3:
        raise ValueError(f"causal_conv1d_bidir_cpu: x must be (batch, dim, seqlen), got {tuple(x.shape)}")
    Bn, E, L = x.shape
    w_f, w_b = conv_weights(w_f, E), conv_weights(w_b, E)
    if w_f.shape != w_b.shape:
        raise ValueError(f"causal_conv1d_bidir_cpu: w_f {tuple(w_f.shape)} and w_b {tuple(w_b.shape)} differ")
    for name, bias in (("b_f", b_f), ("b_b", b_b)):
        if bias is not None and tuple(bias.shape) != (E,):
            raise ValueError(f"causal_conv1d_bidir_cpu: {name} must be ({E},), got {tuple(bias.shape)}")
    for name, o in (("out_f", out_f), ("out_b", out_b)):
        if o is not None and tuple(o.shape) != (Bn, E, L):
            raise ValueError(f"causal_conv1d_bidir_cpu: {name} must be {(Bn, E, L)}, got {tuple(o.shape)}")
    tensors = [t for t in (x, w_f, b_f, w_b, b_b, out_f, out_b) if t is not None]
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
    if needs_grad and (out_f is not None or out_b is not None):
        raise ValueError("causal_conv1d_bidir_cpu: out_f=/out_b= are forward-only; leave them out when "
                         "gradients are needed")
    fast = all(t.device.type == "cpu" and t.dtype == torch.float32 for t in tensors) and x.numel() > 0
    if not fast:
        c_f, c_b = causal_conv1d_bidir_ref(x, w_f, b_f, w_b, b_b, activation)
        if out_f is not None:
            c_f = out_f.copy_(c_f)
        if out_b is not None:
            c_b = out_b.copy_(c_b)
        return c_f, c_b
    if needs_grad:
        return _ConvBidir.apply(x, w_f, b_f, w_b, b_b, bool(activation), bool(channel_major))
    out_f = _new_out(x, channel_major) if out_f is None else out_f
    out_b = _new_out(x, channel_major) if out_b is None else out_b
    for name, o in (("out_f", out_f), ("out_b", out_b)):
        if not dense(o):
            raise ValueError(f"causal_conv1d_bidir_cpu: {name} must be dense, got strides {o.stride()}")
    return _kernel_forward(x, w_f, b_f, w_b, b_b, activation, out_f, out_b)
