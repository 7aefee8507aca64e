"""Moving rows between strided tensors and the kernels' contiguous row buffers (numba, CPU).

Row i of a (B, E, L) operand is (b, e) = divmod(i, E); kernels see each operand as the 1-D view of its
storage span plus (base, batch, channel, token) element strides (:func:`vimtr.ops.cpu.runtime.span`), so
one compiled kernel reads every layout in place: contiguous rows, the transposed (B, L, E) views Vim's
projections produce, and rows read backwards (a negated token stride) for a reversed scan.

Rows are indexed through slices (``s = src[off:off + L]; s[t]``), never as ``src[off + t]``: numba wraps
negative indices, and on ``off + t`` (which LLVM cannot prove non-negative) that select keeps the loop
scalar (the output gate ran 6x slower that way). Reversed rows use an unsigned index for the same reason.
"""
from __future__ import annotations

import numpy as np
from numba import njit

from vimtr.ops.cpu.runtime import FM_EXACT, sigmoid

TILE = 16  # channels per tile when operands are channel-last (one 64-byte line of float32 per token)

@njit(nogil=True, error_model="numpy", cache=True)
def load_row(src, off, stride, dst):
    """dst[t] = src[off + t·stride]: a row of a strided tensor into a contiguous buffer.

    The unit-stride case gets its own loop so LLVM sees a plain vectorisable copy; the general case is a
    gather (e.g. the channel-last ``delta`` and ``z`` views Vim's mixer passes, or a reversed row).
    """
    L = dst.shape[0]
    if stride == 1:
        s = src[off:off + L]  # a slice, not src[off + t]: see the module docstring
        for t in range(L):
            dst[t] = s[t]
    elif stride == -1:
        s = src[off - (L - 1):off + 1]
        n = np.uint64(L - 1)
        for t in range(L):
            dst[t] = s[n - np.uint64(t)]
    else:
        for t in range(dst.shape[0]):
            dst[t] = src[off + t * stride]


@njit(nogil=True, error_model="numpy", cache=True)
def store_row(dst, off, stride, src):
    """dst[off + t·stride] = src[t], the inverse of :func:`load_row`."""
    L = src.shape[0]
    if stride == 1:
        d = dst[off:off + L]
        for t in range(L):
            d[t] = src[t]
    elif stride == -1:
        d = dst[off - (L - 1):off + 1]
        n = np.uint64(L - 1)
        for t in range(L):
            d[n - np.uint64(t)] = src[t]
    else:
        for t in range(src.shape[0]):
            dst[off + t * stride] = src[t]


@njit(nogil=True, error_model="numpy", cache=True)
def load_tile(src, off, s_e, s_l, gw, L, dst):
    """dst[w·L + t] = src[off + w·s_e + t·s_l] for w < gw: gw rows of a strided (B, E, L) tensor into
    contiguous rows. For a channel-last tensor (s_e = 1) each token's gw values are one contiguous read,
    where loading the rows one by one would touch a cache line per element."""
    for t in range(L):
        base = off + t * s_l
        for w in range(gw):
            dst[w * L + t] = src[base + w * s_e]


@njit(nogil=True, error_model="numpy", cache=True)
def store_tile(dst, off, s_e, s_l, gw, L, src, accumulate, scale):
    """The inverse of :func:`load_tile`; with ``accumulate`` dst = (dst + src)·scale, else src·scale."""
    for t in range(L):
        base = off + t * s_l
        if accumulate:
            for w in range(gw):
                dst[base + w * s_e] = (dst[base + w * s_e] + src[w * L + t]) * scale
        else:
            for w in range(gw):
                dst[base + w * s_e] = src[w * L + t] * scale


@njit(nogil=True, error_model="numpy", cache=True)
def emit_row(dst, off, stride, src, accumulate, scale):
    """dst[off + t·stride] = (dst[...] + src[t])·scale (``accumulate``) or src[t]·scale, for stride ±1 or any.

    The two-direction mixer writes its first direction and accumulates the second, (y_f + y_b)·½ being
    exactly the official (y_f + y_b) / 2 (a power-of-two scale rounds the same)."""
    L = src.shape[0]
    if stride == 1:
        d = dst[off:off + L]
        if accumulate:
            for t in range(L):
                d[t] = (d[t] + src[t]) * scale
        else:
            for t in range(L):
                d[t] = src[t] * scale
    elif stride == -1:
        d = dst[off - (L - 1):off + 1]
        n = np.uint64(L - 1)
        if accumulate:
            for t in range(L):
                k = n - np.uint64(t)
                d[k] = (d[k] + src[t]) * scale
        else:
            for t in range(L):
                d[n - np.uint64(t)] = src[t] * scale
    else:
        if accumulate:
            for t in range(L):
                dst[off + t * stride] = (dst[off + t * stride] + src[t]) * scale
        else:
            for t in range(L):
                dst[off + t * stride] = src[t] * scale


@njit(fastmath=FM_EXACT, error_model="numpy", cache=True)
def gated(y, g, scale):
    """y · SiLU(g) · scale: the gate Vim's mixer applies once to the sum of its two directions. Compiled
    without reassociation, so the output gate of the scan (``out_gate=``) and :func:`vimtr.ops.cpu.scan.gated_sum_cpu` (the
    same arithmetic under autograd) give the same bits."""
    return (y * (g * sigmoid(g))) * scale


@njit(nogil=True, fastmath=FM_EXACT, error_model="numpy", cache=True)
def emit_gated_row(dst, off, stride, src, g, accumulate, scale):
    """dst[off + t·stride] = ((dst[...] if accumulate else 0) + src[t]) · SiLU(g[t]) · scale, stride ±1 or any."""
    L = src.shape[0]
    if stride == 1:
        d = dst[off:off + L]
        if accumulate:
            for t in range(L):
                d[t] = gated(d[t] + src[t], g[t], scale)
        else:
            for t in range(L):
                d[t] = gated(src[t], g[t], scale)
    else:
        if accumulate:
            for t in range(L):
                dst[off + t * stride] = gated(dst[off + t * stride] + src[t], g[t], scale)
        else:
            for t in range(L):
                dst[off + t * stride] = gated(src[t], g[t], scale)


@njit(nogil=True, error_model="numpy", cache=True)
def reverse_row(src, dst):
    """dst[t] = src[L-1-t]. An unsigned index spares numba's negative-index wraparound, so LLVM vectorises
    it (a permute per vector)."""
    n = np.uint64(src.shape[0] - 1)
    for t in range(src.shape[0]):
        dst[t] = src[n - np.uint64(t)]


@njit(nogil=True, error_model="numpy", cache=True)
def add_row(dst, src):
    """dst += src (channel sums of Δ: each group of TILE channels adds its rows in channel order)."""
    for t in range(src.shape[0]):
        dst[t] += src[t]


@njit(nogil=True, error_model="numpy", cache=True)
def add_row_reversed(dst, src):
    L = src.shape[0]
    for t in range(L):
        dst[L - 1 - t] += src[t]


