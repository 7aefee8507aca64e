"""Fast CPU selective scan: forward and backward as numba-compiled kernels (no build step at install).

:func:`selective_scan_cpu` has exactly the signature and semantics of
:func:`vimtr.ops.selective_scan.selective_scan_ref` (mamba_ssm's ``selective_scan_ref``)::

    Δ_t   = softplus(delta_t + delta_bias)            (if delta_softplus; threshold 20, as torch)
    h_t   = exp(Δ_t·A) ⊙ h_{t-1} + Δ_t·B_t·u_t
    y_t   = Σ_n C_t[n]·h_t[n] + D·u_t
    out_t = y_t · SiLU(z_t)                            (if z is given)

with u, delta, z (Bt, E, L); A (E, N) real; B, C (Bt, N, L); D, delta_bias (E,). Gradients flow to every
input that requires one (and from ``last_state`` too, when it is returned and used).

Why it is shaped the way it is (every number below was measured, see benchmarks/NOTES.md):

* **One exp per (token, channel, state), and that exp is the cost.** The reference materialises the
  (Bt, E, L, N) decay tensor with torch.exp and then loops in Python; here one pass over L per
  (batch, channel) row keeps the N states in a tiny buffer and computes each decay on the fly.
* **A vectorisable exp.** numba lowers ``math.exp`` to a libm call per element (no SVML in the wheels),
  which would cost ~5x the rest of the loop. In float32 the decay is computed as 2**(Δ·A·log2 e) with a
  degree-5 polynomial (relative error < 2e-7, ~3 ulp) and the exponent written into the float's bits,
  all plain arithmetic that LLVM vectorises over the N states. Mamba always has A = -exp(A_log) < 0
  and Δ = softplus(·) ≥ 0, so the argument is ≤ 0 and only an underflow clamp is needed; rows whose
  Δ or A break that (A > 0, Δ < 0, non-finite values) take a second copy of the loop whose exp also
  handles overflow (inf) and NaN, so no input gives a wrong answer, only a slower one.
  float64 (used by the gradient checks) uses ``math.exp``: exact, not fast.
* **N fixed at compile time for N = 16** (Vim's d_state): LLVM then unrolls the state loop into two
  AVX2 registers with no remainder code (+19% on the forward). Other N use the generic kernel.
* **The N = 16 forward's y_t = Σ_n C·h is summed 16 tokens at a time.** A horizontal sum per token
  (four shuffles and four adds) cost 36% of the recurrence; the recurrence keeps h in one vector
  (``_Vec16``, below), stores the 16 products C_t·h_t per token, and one shuffle tree per 16 tokens
  sums them (``_vsum16``, in the same order per lane, so the same bits). 1.08-1.18x per call at Vim-Ti,
  1.0-1.1x on the demo's calls; the exp (12 vector ops per token) is most of what remains.
* **softplus, D and the SiLU(z) gate are fused** as per-row passes over L before/after the recurrence,
  written with the same polynomial exp (and a series log1p) so they vectorise too; leaving them to
  torch (four extra passes over (Bt, E, L) tensors) makes the call 1.7-1.9x slower at Vim-Ti batch 8.
* **Strided inputs are read in place.** Vim's mixer hands over ``delta`` and ``z`` as transposed views
  of (B, L, E) tensors; copying them to (B, E, L) first would cost more than the scan saves. Each of
  u, delta, z, the output (and the incoming gradient) goes to the kernel as its storage span plus
  element strides, so every layout is one compiled kernel. Contiguous rows are used in place; other
  rows are moved through tiles of 16 channels (a token's 16 values are one 64-byte read for a
  channel-last view), which costs ~20% where reading them element by element cost ~90%. B and C are
  small and are transposed to (Bt, L, N) so a token's N values are contiguous.
* ``reverse=True`` scans from the last token: Vim's backward direction without flipping five tensors
  and the output. Rows are read and written through negated token strides (a contiguous row becomes a
  reversed copy into a row buffer, ~0.1 ms per operand at Vim-Ti batch 8), so the hot loop is the
  forward one: iterating it backwards instead cost 35-43%.
* Forward-only ``out=`` / ``accumulate=`` / ``delta_out=`` let Vim's CPU mixer path sum the two
  directions in the kernel ((y_f + y_b)·½ written in place) and get the Δ MTR reads without a softplus
  pass in torch.
* **Threads:** rows are split into one contiguous chunk per thread (``torch.get_num_threads()``); the
  kernels release the GIL and run on a small persistent thread pool plus the calling thread. This
  avoids a second OpenMP runtime next to torch's (numba's ``parallel=True``), compiles much faster,
  and makes the partial sums of the backward deterministic.
* **Backward recomputes** the states of one row into an (L+1)×N buffer (12.6 KB for Vim, cache
  resident) instead of storing (Bt, E, L, N) states in the forward: no memory cost for inference and
  ~one extra forward of work in the backward. The reductions over channels (dB, dC) go to one partial
  buffer per chunk, summed afterwards; those over batch (dA, dD, d delta_bias) to per-row buffers.
* **The N = 16 backward keeps a row's 16 states in one LLVM vector** (``_Vec16``, a numba type with
  loads, stores and arithmetic as intrinsics). With run-time N, LLVM vectorises the state loops 32 at
  a time and N = 16 only ever ran their 4-wide remainder; with N fixed, the unrolled loops stay scalar
  (it cannot prove the arrays apart). Explicit vectors were 2.3-3.5x faster per call (Vim-Ti and the
  demo's shapes). Work that is per token rather than per state (gate, softplus derivative, D, the sums
  into du and ddelta) runs in passes over L outside the recurrences, and the decays are one flat exp
  pass over L·16 before them. Other N use the generic loop kernel.

Dtypes: float32 and float64 are computed natively (float64 in float64, unlike the reference, which
computes everything in float32). float16/bfloat16 are upcast to float32, like the reference does, and
the output is cast back to the input's dtype. Integer, bool and complex inputs raise ``TypeError``;
non-CPU tensors, wrong ranks or shapes raise ``ValueError`` naming the argument and the expected shape.

Compiled kernels are cached on disk by numba (``cache=True``): the first call in a fresh environment
spends a few seconds compiling, later processes load them.
"""
from __future__ import annotations

import math
import operator
import os
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
import torch.nn.functional as F
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic, models, overload, register_model

from vimtr.ops.selective_scan import selective_scan_ref

__all__ = ["gated_sum_cpu", "selective_scan_cpu"]

# ------------------------------------------------------------------------------------ fast-math policy
# Kernels may reassociate (needed to vectorise the Σ_n C·h reduction) and contract to FMA, but keep NaN
# and inf semantics (no nnan/ninf) so non-finite inputs propagate as in the reference. Helpers whose
# correctness depends on exact rounding (the round-to-nearest-by-magic-number trick below) allow only
# contraction; numba compiles them as separate functions and LLVM inlines them keeping each
# instruction's own flags.
_FM_KERNEL = {"contract", "reassoc", "nsz", "arcp"}
_FM_EXACT = {"contract"}

_F = np.float32
_LOG2E = _F(1.4426950408889634)
_ZERO, _ONE, _TWO, _TWENTY = _F(0.0), _F(1.0), _F(2.0), _F(20.0)
_MAGIC = _F(12582912.0)  # 1.5·2**23: adding it rounds a |y| < 2**22 to an integer held in the low mantissa bits
_YMIN = _F(-126.0)  # smallest exponent of a normal float32
_YMIN_ANY = _F(-125.0)
_YMAX_ANY = _F(128.0)
# Near-minimax (relative error) polynomial for 2**f on [-1/2, 1/2], fitted for this kernel (Lawson's
# iteratively reweighted least squares on 4001 Chebyshev nodes; max relative error 9e-8 in exact
# arithmetic, < 2e-7 evaluated in float32).
_P1, _P2, _P3 = _F(6.931470037e-01), _F(2.402224243e-01), _F(5.550733581e-02)
_P4, _P5 = _F(9.671512991e-03), _F(1.326472731e-03)
# log1p(w) = 2·atanh(s), s = w / (2 + w) ∈ [0, 1/3] for w ∈ [0, 1]: odd series, terms to s**13 (rel. err < 2e-8).
_Q3, _Q5, _Q7, _Q9, _Q11, _Q13 = (_F(1 / 3), _F(1 / 5), _F(1 / 7), _F(1 / 9), _F(1 / 11), _F(1 / 13))


@intrinsic
def _scale_by_rounded(typingctx, p, t):
    """float32 p · 2**k where k is the integer held in t's low mantissa bits (t = y + 1.5·2**23).

    Adds k to p's exponent field with integer arithmetic: bits(t) << 23 == k << 23 (mod 2**32) because
    the magic constant's own low bits vanish under the shift. numba has no scalar bitcast, hence an
    intrinsic; it compiles to two vector integer ops.
    """
    if isinstance(p, types.Float) and p.bitwidth == 32 and t == p:
        def codegen(context, builder, signature, args):
            i32 = ir.IntType(32)
            pb = builder.bitcast(args[0], i32)
            tb = builder.bitcast(args[1], i32)
            return builder.bitcast(builder.add(pb, builder.shl(tb, ir.Constant(i32, 23))), ir.FloatType())
        return types.float32(p, t), codegen
    return None


@njit(fastmath=_FM_EXACT, error_model="numpy", cache=True)
def _exp2_core_f32(y):
    """2**y for float32 y in [-126, 127] (no range handling): round, degree-5 polynomial, scale."""
    t = y + _MAGIC
    f = y - (t - _MAGIC)  # y - round(y), in [-1/2, 1/2]
    p = ((((_P5 * f + _P4) * f + _P3) * f + _P2) * f + _P1) * f + _ONE
    return _scale_by_rounded(p, t)


@njit(fastmath=_FM_EXACT, error_model="numpy", cache=True)
def _exp2_nonpos_f32(y):
    """2**y for y ≤ 0 (or -inf). Below -126 it returns 2**-126 ≈ 1.2e-38 instead of a denormal."""
    return _exp2_core_f32(max(y, _YMIN))


@njit(fastmath=_FM_EXACT, error_model="numpy", cache=True)
def _exp2_any_f32(y):
    """2**y for any float32 y: inf from 128 up, 0 below -125 (denormals flushed), NaN stays NaN."""
    # Evaluate 2**(y-1)·2 so y up to 128 stays inside the exponent field; 2**127·2 rounds to inf.
    r = _exp2_core_f32(min(max(y, _YMIN_ANY), _YMAX_ANY) - _ONE) * _TWO
    if y < _YMIN_ANY:
        r = _ZERO
    if math.isnan(y):
        r = y
    return r


@njit(fastmath=_FM_EXACT, error_model="numpy", cache=True)
def _softplus_f32(x):
    """log(1 + e**x), = x above 20 (torch's threshold); max(x, 0) + log1p(e**-|x|) below, vectorisable."""
    w = _exp2_nonpos_f32(-abs(x) * _LOG2E)
    s = w / (_TWO + w)
    s2 = s * s
    lg = _TWO * s * (_ONE + s2 * (_Q3 + s2 * (_Q5 + s2 * (_Q7 + s2 * (_Q9 + s2 * (_Q11 + s2 * _Q13))))))
    r = max(x, _ZERO) + lg
    if not (x <= _TWENTY):  # also passes NaN and +inf through unchanged
        r = x
    return r


@njit(fastmath=_FM_EXACT, error_model="numpy", cache=True)
def _sigmoid_f32(x):
    return _ONE / (_ONE + _exp2_any_f32(-x * _LOG2E))


@njit(error_model="numpy", cache=True)
def _softplus_f64(x):
    return math.log1p(math.exp(x)) if x <= 20.0 else x


@njit(error_model="numpy", cache=True)
def _sigmoid_f64(x):
    return 1.0 / (1.0 + math.exp(-x))


# Dtype dispatch for the generic kernels. float32 "a" is A·log2(e) (decays are powers of two), float64
# "a" is A itself (decays are math.exp).
def _decay_fast(y):  # pragma: no cover - typing stub, replaced by the overload in compiled code
    raise NotImplementedError


def _decay_any(y):  # pragma: no cover
    raise NotImplementedError


def _softplus(x):  # pragma: no cover
    raise NotImplementedError


def _sigmoid(x):  # pragma: no cover
    raise NotImplementedError


def _by_dtype(f32_impl, f64_impl):
    def typer(x):
        if x == types.float32:
            return lambda x: f32_impl(x)
        if x == types.float64:
            return lambda x: f64_impl(x)
        return None
    return typer


overload(_decay_fast)(_by_dtype(_exp2_nonpos_f32, njit(cache=True)(lambda y: math.exp(y))))
overload(_decay_any)(_by_dtype(_exp2_any_f32, njit(cache=True)(lambda y: math.exp(y))))
overload(_softplus)(_by_dtype(_softplus_f32, _softplus_f64))
overload(_sigmoid)(_by_dtype(_sigmoid_f32, _sigmoid_f64))


# -------------------------------------------------------------------------------------------- kernels
# Row i of the work is (b, e) = divmod(i, E); each call handles rows [lo, hi). u, delta, z (and dout)
# arrive as 1-D views of their storage span with (batch, channel, token) element strides in s*.


# _RUN_NOTE: rows are indexed through slices (``s = src[off:off + L]; s[t]``), never as ``src[off + t]``:
# numba wraps negative indices, and on ``off + t`` (which LLVM cannot prove non-negative) that select
# keeps the loop scalar. Measured on the output gate: 2.2 ms scalar vs 0.35 ms sliced for 3072 rows of
# 197. Reversed rows use an unsigned index for the same reason.


@njit(nogil=True, error_model="numpy", cache=True)
def _load_row(src, off, stride, dst):
    """dst[t] = src[off + t·stride]: a row of a strided tensor into a contiguous buffer.

    The unit-stride case gets its own loop so LLVM sees a plain vectorisable copy; the general case is a
    gather (e.g. the channel-last ``delta`` and ``z`` views Vim's mixer passes, or a reversed row).
    """
    L = dst.shape[0]
    if stride == 1:
        s = src[off:off + L]  # a slice, not src[off + t]: see _RUN_NOTE
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
def _store_row(dst, off, stride, src):
    """dst[off + t·stride] = src[t], the inverse of :func:`_load_row`."""
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
def _count_positive(a):
    """How many entries of A are not ≤ 0 (NaN counts): 0 means Δ·A ≤ 0 wherever Δ ≥ 0."""
    bad = 0
    for i in range(a.shape[0]):
        for j in range(a.shape[1]):
            if not (a[i, j] <= 0):
                bad += 1
    return bad


@njit(nogil=True, fastmath=_FM_KERNEL, error_model="numpy", cache=True)
def _delta_row(dl, off, stride, bse, softplus, dtb):
    """Δ for one row into dtb; returns the count of Δ that are negative or non-finite (0: fast exp valid).

    Three separate loops (load + bias, softplus, check) because each vectorises on its own, while a
    fused one does not (measured: 0.73 ms vs 1.34 ms for 8×384 rows of 197).
    """
    zero = dtb.dtype.type(0)
    one = dtb.dtype.type(1)
    inf = dtb.dtype.type(math.inf)
    L = dtb.shape[0]
    if stride == 1:
        s = dl[off:off + L]
        for t in range(L):
            dtb[t] = s[t] + bse
    elif stride == -1:
        s = dl[off - (L - 1):off + 1]
        n = np.uint64(L - 1)
        for t in range(L):
            dtb[t] = s[n - np.uint64(t)] + bse
    else:
        for t in range(L):
            dtb[t] = dl[off + t * stride] + bse
    if softplus:
        for t in range(L):
            dtb[t] = _softplus(dtb[t])
    bad = zero  # a float count: a float reduction vectorises next to float compares, an int64 one did not
    for t in range(L):
        x = dtb[t]
        bad += zero if (x >= zero) & (x < inf) else one
    return bad


# Row i of the work is (b, e) = divmod(i, E); each call handles rows [lo, hi). u, delta, z, the output
# (and the incoming gradient) are 1-D views of their storage span; s* = (base, batch, channel, token)
# element strides, so row (b, e) starts at s[0] + b·s[1] + e·s[2] and steps by s[3]. A reversed scan
# just starts at the row's last token with a negated token stride.


_G = 16  # channels per tile when operands are channel-last (one 64-byte line of float32 per token)


@njit(nogil=True, error_model="numpy", cache=True)
def _load_tile(src, off, s_e, s_l, gw, L, dst):
    """dst[w·L + t] = src[off + w·s_e + t·s_l] for w < gw: gw rows of a strided (B, E, L) tensor into
    contiguous rows. For a channel-last tensor (s_e = 1) each token's gw values are one contiguous read,
    where loading the rows one by one would touch a cache line per element."""
    for t in range(L):
        base = off + t * s_l
        for w in range(gw):
            dst[w * L + t] = src[base + w * s_e]


@njit(nogil=True, error_model="numpy", cache=True)
def _store_tile(dst, off, s_e, s_l, gw, L, src, accumulate, scale):
    """The inverse of :func:`_load_tile`; with ``accumulate`` dst = (dst + src)·scale, else src·scale."""
    for t in range(L):
        base = off + t * s_l
        if accumulate:
            for w in range(gw):
                dst[base + w * s_e] = (dst[base + w * s_e] + src[w * L + t]) * scale
        else:
            for w in range(gw):
                dst[base + w * s_e] = src[w * L + t] * scale


@njit(nogil=True, error_model="numpy", cache=True)
def _emit_row(dst, off, stride, src, accumulate, scale):
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


@njit(fastmath=_FM_EXACT, error_model="numpy", cache=True)
def _gated(y, g, scale):
    """y · SiLU(g) · scale: the gate Vim's mixer applies once to the sum of its two directions. Compiled
    without reassociation, so the output gate of the scan (``out_gate=``) and :func:`gated_sum_cpu` (the
    same arithmetic under autograd) give the same bits."""
    return (y * (g * _sigmoid(g))) * scale


@njit(nogil=True, fastmath=_FM_EXACT, error_model="numpy", cache=True)
def _emit_gated_row(dst, off, stride, src, g, accumulate, scale):
    """dst[off + t·stride] = ((dst[...] if accumulate else 0) + src[t]) · SiLU(g[t]) · scale, stride ±1 or any."""
    L = src.shape[0]
    if stride == 1:
        d = dst[off:off + L]
        if accumulate:
            for t in range(L):
                d[t] = _gated(d[t] + src[t], g[t], scale)
        else:
            for t in range(L):
                d[t] = _gated(src[t], g[t], scale)
    else:
        if accumulate:
            for t in range(L):
                dst[off + t * stride] = _gated(dst[off + t * stride] + src[t], g[t], scale)
        else:
            for t in range(L):
                dst[off + t * stride] = _gated(src[t], g[t], scale)


@njit(nogil=True, error_model="numpy", cache=True)
def _reverse_row(src, dst):
    """dst[t] = src[L-1-t]. An unsigned index spares numba's negative-index wraparound, so LLVM vectorises
    it (a permute per vector)."""
    n = np.uint64(src.shape[0] - 1)
    for t in range(src.shape[0]):
        dst[t] = src[n - np.uint64(t)]


@njit(nogil=True, error_model="numpy", cache=True)
def _add_row(dst, src):
    """dst += src (channel sums of Δ: each group of _G channels adds its rows in channel order)."""
    for t in range(src.shape[0]):
        dst[t] += src[t]


@njit(nogil=True, error_model="numpy", cache=True)
def _add_row_reversed(dst, src):
    L = src.shape[0]
    for t in range(L):
        dst[L - 1 - t] += src[t]


def _build_forward(nfix, vector=False):
    """The forward kernel; ``nfix`` > 0 fixes N at compile time (LLVM then fully unrolls the state loop).
    ``vector`` (N = 16 only) runs each row's recurrence in 16-wide vectors (:func:`_scan_row_n16`);
    without it N = 16 gets the loop kernel it had before (benchmarks/scan_forward.py compares them)."""
    vec16 = vector and nfix == 16

    @njit(nogil=True, fastmath=_FM_KERNEL, error_model="numpy", cache=True)
    def forward(lo, hi, L, u, su, dl, sd, a, a_ok, Bt, Ct, D, zf, sz, bias, has_D, has_z, has_bias, softplus,
                of, so, last, accumulate, scale, dof, sdo, has_dout, rev, gsum, has_gsum, og, sog, has_og):
        _, E, N_ = last.shape
        N = nfix if nfix > 0 else N_
        dtype = last.dtype
        zero = dtype.type(0)
        one = dtype.type(1)
        # Operands whose rows are not contiguous (channel-last views) go through tiles of _G rows; rows
        # with token stride 1 are read in place, stride -1 (a reversed contiguous row) through a row buffer.
        tile_u, tile_d = abs(su[3]) != 1, abs(sd[3]) != 1
        # With out_gate the output goes row by row (any stride) through _emit_gated_row.
        tile_z, tile_o = has_z and abs(sz[3]) != 1, abs(so[3]) != 1 and not has_og
        Ut = np.empty(_G * L, dtype)
        Dt = np.empty(_G * L, dtype)
        Zt = np.empty(_G * L, dtype)
        Yt = np.empty(_G * L, dtype)
        dtb = np.empty(L, dtype)
        zb = np.empty(L, dtype)
        ub = np.empty(L, dtype)
        yb = np.empty(L, dtype)
        gb = np.empty(L, dtype)
        h = np.empty(N, dtype)
        Lp = -(-L // 16) * 16 if vec16 else 0  # the vector path's scratch: one row, padded to 16 tokens
        P16 = np.empty(Lp * 16, dtype)
        ys16 = np.empty(Lp, dtype)
        i = lo
        while i < hi:
            b = i // E
            e0 = i - b * E
            gw = min(_G, E - e0, hi - i)  # rows e0 .. e0+gw-1 of batch b
            if tile_u:
                _load_tile(u, su[0] + b * su[1] + e0 * su[2], su[2], su[3], gw, L, Ut)
            if tile_d:
                _load_tile(dl, sd[0] + b * sd[1] + e0 * sd[2], sd[2], sd[3], gw, L, Dt)
            if tile_z:
                _load_tile(zf, sz[0] + b * sz[1] + e0 * sz[2], sz[2], sz[3], gw, L, Zt)
            for w in range(gw):
                e = e0 + w
                # Δ for the whole row first: a vectorisable pass, and it tells whether the fast exp is valid.
                bse = bias[e] if has_bias else zero
                if tile_d:
                    nbad = _delta_row(Dt, w * L, 1, bse, softplus, dtb)
                else:
                    nbad = _delta_row(dl, sd[0] + b * sd[1] + e * sd[2], sd[3], bse, softplus, dtb)
                if has_dout:
                    _store_row(dof, sdo[0] + b * sdo[1] + e * sdo[2], sdo[3], dtb)
                if has_gsum:
                    if rev:  # dtb is in scan order: from the last token
                        _add_row_reversed(gsum[b, e // _G], dtb)
                    else:
                        _add_row(gsum[b, e // _G], dtb)
                if not a_ok:
                    nbad += one
                if tile_u:
                    ur = Ut[w * L:(w + 1) * L]
                else:
                    u0 = su[0] + b * su[1] + e * su[2]
                    if su[3] == 1:
                        ur = u[u0:u0 + L]  # read in place
                    else:
                        _load_row(u, u0, su[3], ub)
                        ur = ub
                o0 = so[0] + b * so[1] + e * so[2]
                in_place = not tile_o and so[3] == 1 and not accumulate and scale == one and not has_og
                if tile_o:
                    yr = Yt[w * L:(w + 1) * L]
                elif in_place:
                    yr = of[o0:o0 + L]  # write in place (no emit pass)
                else:
                    yr = yb
                for n in range(N):
                    h[n] = zero
                if vec16:
                    _scan_row_n16(dtb, ur, a, e, Bt, b, Ct, nbad, P16, ys16, yr, last)
                elif nbad == 0:
                    # Δ·A ≤ 0 everywhere: the decay exp needs only its underflow clamp.
                    for t in range(L):
                        d = dtb[t]
                        du = d * ur[t]
                        Bv = Bt[b, t]
                        Cv = Ct[b, t]
                        acc = zero
                        for n in range(N):
                            hn = _decay_fast(d * a[e, n]) * h[n] + du * Bv[n]
                            h[n] = hn
                            acc += hn * Cv[n]
                        yr[t] = acc
                else:
                    for t in range(L):
                        d = dtb[t]
                        du = d * ur[t]
                        Bv = Bt[b, t]
                        Cv = Ct[b, t]
                        acc = zero
                        for n in range(N):
                            hn = _decay_any(d * a[e, n]) * h[n] + du * Bv[n]
                            h[n] = hn
                            acc += hn * Cv[n]
                        yr[t] = acc
                # Skip connection and gate, a second vectorisable pass over the row.
                De = D[e] if has_D else zero
                if has_z:
                    if tile_z:
                        zr = Zt[w * L:(w + 1) * L]
                    else:
                        _load_row(zf, sz[0] + b * sz[1] + e * sz[2], sz[3], zb)
                        zr = zb
                    for t in range(L):
                        zz = zr[t]
                        yr[t] = (yr[t] + De * ur[t]) * (zz * _sigmoid(zz))
                elif has_D:
                    for t in range(L):
                        yr[t] = yr[t] + De * ur[t]
                if has_og:
                    g0 = sog[0] + b * sog[1] + e * sog[2]
                    if so[3] == -1 and sog[3] == -1:
                        # Reversed scan of contiguous rows: put the result in token order (a vectorised
                        # reversal in L1) and gate in token order, reading the gate row in place. The
                        # gate's SiLU must stay in a unit-stride loop, or it is scalar (measured 2.4x).
                        _reverse_row(yr, gb)
                        _emit_gated_row(of, o0 - (L - 1), 1, gb, og[g0 - (L - 1):g0 + 1], accumulate, scale)
                    else:
                        _load_row(og, g0, sog[3], gb)
                        _emit_gated_row(of, o0, so[3], yr, gb, accumulate, scale)
                elif not tile_o and not in_place:
                    _emit_row(of, o0, so[3], yr, accumulate, scale)
                if not vec16:
                    for n in range(N):
                        last[b, e, n] = h[n]
            if tile_o:
                _store_tile(of, so[0] + b * so[1] + e0 * so[2], so[2], so[3], gw, L, Yt, accumulate, scale)
            i += gw

    return forward


_forward_n16 = _build_forward(16, vector=True)
_forward_any = _build_forward(0)


@njit(nogil=True, error_model="numpy", cache=True)
def _backward_row_inputs(i, E, L, u, su, dl, sd, a_ok, D, zf, sz, bias, has_D, has_z, has_bias, softplus, go, sg,
                         dtb, xb, ub, gb, zb):
    """A backward row's inputs (both backward kernels): Δ into dtb, the softplus input into xb, u, the
    incoming gradient and z into their row buffers. Returns (b, e, delta_bias[e], D[e], nbad)."""
    dtype = dtb.dtype
    zero = dtype.type(0)
    b = i // E
    e = i - b * E
    bse = bias[e] if has_bias else zero
    De = D[e] if has_D else zero
    d0 = sd[0] + b * sd[1] + e * sd[2]
    nbad = _delta_row(dl, d0, sd[3], bse, softplus, dtb)
    if not a_ok:
        nbad += dtype.type(1)
    if softplus:
        _load_row(dl, d0, sd[3], xb)
        for t in range(L):
            xb[t] = xb[t] + bse
    _load_row(u, su[0] + b * su[1] + e * su[2], su[3], ub)
    _load_row(go, sg[0] + b * sg[1] + e * sg[2], sg[3], gb)
    if has_z:
        _load_row(zf, sz[0] + b * sz[1] + e * sz[2], sz[3], zb)
    return b, e, bse, De, nbad


@njit(nogil=True, fastmath=_FM_KERNEL, error_model="numpy", cache=True)
def _backward(lo, hi, chunk, L, u, su, dl, sd, A, a, a_ok, Bt, Ct, D, zf, sz, bias, has_D, has_z, has_bias,
              softplus, go, sg, dlast, has_dlast, sgo, du, ddl, dz, dA_rows, dD_rows, dbias_rows,
              dB_part, dC_part):
    """Gradients for rows [lo, hi) in processing order; du, ddelta, dz go out through the strides sgo
    (shared by the three, contiguous (B, E, L) tensors); channel sums into dB_part[chunk], dC_part[chunk]
    (Bt, L, N), in processing order."""
    _, E, N = dA_rows.shape
    dtype = dA_rows.dtype
    zero = dtype.type(0)
    one = dtype.type(1)
    thr = dtype.type(20)
    xb = np.empty(L, dtype)       # delta + bias (the softplus input)
    dtb = np.empty(L, dtype)      # Δ
    ub = np.empty(L, dtype)
    zb = np.empty(L, dtype)
    gb = np.empty(L, dtype)       # incoming gradient of the row
    yb = np.empty(L, dtype)       # y + D·u before the gate (for dz)
    dub = np.empty(L, dtype)
    ddb = np.empty(L, dtype)
    dzb = np.empty(L, dtype)
    H = np.empty((L + 1, N), dtype)  # H[t + 1] = h_t, H[0] = 0
    DA = np.empty((L, N), dtype)     # decays exp(Δ_t·A)
    g = np.empty(N, dtype)           # running ∂loss/∂h_t
    gA = np.empty(N, dtype)
    for i in range(lo, hi):
        b, e, bse, De, nbad = _backward_row_inputs(i, E, L, u, su, dl, sd, a_ok, D, zf, sz, bias, has_D, has_z,
                                                   has_bias, softplus, go, sg, dtb, xb, ub, gb, zb)
        Bb = Bt[b]
        Cb = Ct[b]
        dBp = dB_part[chunk, b]
        dCp = dC_part[chunk, b]
        ae = a[e]
        Ae = A[e]
        # Recompute the row's states and decays (same arithmetic as the forward).
        for n in range(N):
            H[0, n] = zero
        for t in range(L):
            d = dtb[t]
            dut = d * ub[t]
            if nbad == 0:
                for n in range(N):
                    DA[t, n] = _decay_fast(d * ae[n])
            else:
                for n in range(N):
                    DA[t, n] = _decay_any(d * ae[n])
            acc = zero
            for n in range(N):
                hn = DA[t, n] * H[t, n] + dut * Bb[t, n]
                H[t + 1, n] = hn
                acc += hn * Cb[t, n]
            yb[t] = acc + De * ub[t]
        # Backward recurrence, t = L-1 .. 0. The state loop is split in four so that each touches few
        # arrays (LLVM's runtime alias checks then stay small).
        for n in range(N):
            g[n] = dlast[b, e, n] if has_dlast else zero
            gA[n] = zero
        dD_acc = zero
        db_acc = zero
        for tt in range(L):  # (numba compiles a negative-step range ~35% slower here)
            t = L - 1 - tt
            gt = gb[t]
            ut = ub[t]
            if has_z:
                zz = zb[t]
                sgm = _sigmoid(zz)
                dy = gt * zz * sgm
                dzb[t] = gt * yb[t] * sgm * (one + zz * (one - sgm))
            else:
                dy = gt
            dD_acc += dy * ut
            d = dtb[t]
            dut = d * ut
            for n in range(N):  # ∂loss/∂h_t: from y_t, plus what flowed back from h_{t+1}
                g[n] += dy * Cb[t, n]
            for n in range(N):  # C enters y_t = Σ C·h_t (summed over channels across rows)
                dCp[t, n] += dy * H[t + 1, n]
            s_b = zero  # Σ_n g_n · B_n
            for n in range(N):  # B enters through Δ·u·B
                dBp[t, n] += g[n] * dut
                s_b += g[n] * Bb[t, n]
            s_a = zero  # Σ_n ∂loss/∂(Δ·A_n) · A_n
            for n in range(N):  # the decay exp(Δ·A): to A, to Δ, and on to h_{t-1}
                q = g[n] * H[t, n] * DA[t, n]
                s_a += q * Ae[n]
                gA[n] += q * d
                g[n] = g[n] * DA[t, n]
            dub[t] = dy * De + s_b * d
            gd = s_a + s_b * ut
            if softplus:
                x = xb[t]
                if x <= thr:
                    gd = gd * _sigmoid(x)
            ddb[t] = gd
            db_acc += gd
        o0 = sgo[0] + b * sgo[1] + e * sgo[2]
        _store_row(du, o0, sgo[3], dub)
        _store_row(ddl, o0, sgo[3], ddb)
        if has_z:
            _store_row(dz, o0, sgo[3], dzb)
        for n in range(N):
            dA_rows[b, e, n] = gA[n]
        dD_rows[b, e] = dD_acc
        dbias_rows[b, e] = db_acc


# ------------------------------------------------------------------------- 16-wide vectors (N = 16)
# The backward's state loops run over N = 16 with run-time N, and LLVM vectorises them with a main body
# of 32 (16 lanes x 2 interleaved) that N = 16 never enters: every state loop ran in its 4-wide epilogue,
# behind run-time alias checks, at every token (read from the IR). Fixing N at compile time instead gets
# the loops fully unrolled and then left scalar, as the SLP vectoriser cannot prove the unrolled loads
# and stores independent (round 8: 2x slower). So the N = 16 backward holds a row's 16 states in one
# LLVM vector value, a numba type of its own with a few operators, loaded and stored whole: the states
# stay in registers across tokens and there is nothing left for the vectorisers to decide.
class _Vec16(types.Type):
    """16 values of one float dtype as one LLVM vector (<16 x float>: two AVX2 registers)."""

    def __init__(self, dtype):
        self.dtype = dtype
        super().__init__(name=f"Vec16({dtype})")


@register_model(_Vec16)
class _Vec16Model(models.PrimitiveModel):
    def __init__(self, dmm, fe_type):
        super().__init__(dmm, fe_type, ir.VectorType(dmm.lookup(fe_type.dtype).get_value_type(), 16))


_VEC_FLAGS = tuple(sorted(_FM_KERNEL))  # the kernels' own fast-math flags (reassociation, FMA contraction)


def _vec_ptr(context, builder, aryty, ary, i, ity):
    data = context.make_array(aryty)(context, builder, ary).data
    p = builder.gep(data, [context.cast(builder, i, ity, types.intp)])
    return builder.bitcast(p, context.get_value_type(_Vec16(aryty.dtype)).as_pointer())


@intrinsic
def _vload(typingctx, ary, i):
    """ary's elements i .. i+15 (flat index into a C-contiguous array) as one vector."""
    if isinstance(ary, types.Array) and ary.layout == "C" and isinstance(i, types.Integer):
        vt = _Vec16(ary.dtype)

        def codegen(context, builder, sig, args):
            ptr = _vec_ptr(context, builder, sig.args[0], args[0], args[1], sig.args[1])
            return builder.load(ptr, align=context.get_abi_sizeof(context.get_value_type(ary.dtype)))
        return vt(ary, i), codegen
    return None


@intrinsic
def _vstore(typingctx, ary, i, v):
    """ary[i:i+16] = v."""
    if (isinstance(ary, types.Array) and ary.layout == "C" and isinstance(i, types.Integer)
            and v == _Vec16(ary.dtype)):
        def codegen(context, builder, sig, args):
            ptr = _vec_ptr(context, builder, sig.args[0], args[0], args[1], sig.args[1])
            builder.store(args[2], ptr, align=context.get_abi_sizeof(context.get_value_type(ary.dtype)))
            return context.get_dummy_value()
        return types.none(ary, i, v), codegen
    return None


@intrinsic
def _vsplat(typingctx, x, like):
    """x in all 16 lanes, in the dtype of the vector ``like``."""
    if isinstance(like, _Vec16) and isinstance(x, (types.Float, types.Integer)):
        def codegen(context, builder, sig, args):
            vty = context.get_value_type(like)
            s = context.cast(builder, args[0], sig.args[0], like.dtype)
            v = builder.insert_element(ir.Constant(vty, ir.Undefined), s, ir.Constant(ir.IntType(32), 0))
            return builder.shuffle_vector(v, ir.Constant(vty, ir.Undefined),
                                          ir.Constant(ir.VectorType(ir.IntType(32), 16), [0] * 16))
        return like(x, like), codegen
    return None


@intrinsic
def _vzeros(typingctx, ary):
    """16 zeros of ary's dtype."""
    if isinstance(ary, types.Array):
        vt = _Vec16(ary.dtype)

        def codegen(context, builder, sig, args):
            return ir.Constant(context.get_value_type(vt), None)
        return vt(ary), codegen
    return None


@intrinsic
def _vsum(typingctx, v):
    """Σ of the 16 lanes (a reassociated tree: shuffles and adds)."""
    if isinstance(v, _Vec16):
        def codegen(context, builder, sig, args):
            sty = context.get_value_type(v.dtype)
            fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(sty, [sty, args[0].type]),
                                                f"llvm.vector.reduce.fadd.v16f{v.dtype.bitwidth}")
            return builder.call(fn, [ir.Constant(sty, 0.0), args[0]], fastmath=_VEC_FLAGS)
        return v.dtype(v), codegen
    return None


@intrinsic
def _vsum16(typingctx, ary, i):
    """The lane sums of the 16 vectors ary[i + 16k : i + 16k + 16], k < 16, as one vector (lane k: Σ of
    vector k). A tree of 15 two-vector steps (two shuffles and one add each) instead of 16 separate
    horizontal sums (four shuffles and four adds each): the per-token sum of the forward cost it 36%.
    Each lane is summed in the order llvm.vector.reduce.fadd uses (halves, then quarters, ...), so the
    bits are :func:`_vsum`'s."""
    if isinstance(ary, types.Array) and ary.layout == "C" and isinstance(i, types.Integer):
        vt = _Vec16(ary.dtype)

        def codegen(context, builder, sig, args):
            vty = context.get_value_type(vt)
            align = context.get_abi_sizeof(context.get_value_type(ary.dtype))
            vs = []
            for k in range(16):
                ik = builder.add(args[1], ir.Constant(args[1].type, 16 * k))
                vs.append(builder.load(_vec_ptr(context, builder, sig.args[0], args[0], ik, sig.args[1]), align=align))
            w = 16  # lanes per token in each vector: 16 tokens' partial sums halve in width at every level
            while len(vs) > 1:
                h, t = w // 2, 16 // w
                lo = [g * w + j for g in range(t) for j in range(h)]
                hi = [g * w + h + j for g in range(t) for j in range(h)]
                nxt = []
                for a, b in zip(vs[::2], vs[1::2]):
                    ma = ir.Constant(ir.VectorType(ir.IntType(32), 16), lo + [16 + x for x in lo])
                    mb = ir.Constant(ir.VectorType(ir.IntType(32), 16), hi + [16 + x for x in hi])
                    nxt.append(builder.fadd(builder.shuffle_vector(a, b, ma), builder.shuffle_vector(a, b, mb),
                                            flags=_VEC_FLAGS))
                vs, w = nxt, h
            return vs[0]
        return vt(ary, i), codegen
    return None


def _vec_binop(opname):
    @intrinsic
    def op(typingctx, x, y):
        if isinstance(x, _Vec16) and x == y:
            def codegen(context, builder, sig, args):
                return getattr(builder, opname)(args[0], args[1], flags=_VEC_FLAGS)
            return x(x, y), codegen
        return None
    return op


_vadd, _vsub, _vmul = _vec_binop("fadd"), _vec_binop("fsub"), _vec_binop("fmul")


def _vec_intrinsic(builder, name, vty, args):
    fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(vty, [vty] * len(args)), name)
    return builder.call(fn, args)


@intrinsic
def _vfma(typingctx, x, y, w):
    """x·y + w in each lane with one rounding (llvm.fma). The forward recurrence h = dA·h + Δu·B is
    written with it so that its loop-carried path is one FMA: left to contraction, LLVM fused Δu·B
    instead and kept dA·h as a separate multiply, a multiply and an FMA per token on the chain."""
    if isinstance(x, _Vec16) and x == y == w:
        def codegen(context, builder, sig, args):
            return _vec_intrinsic(builder, f"llvm.fma.v16f{x.dtype.bitwidth}", context.get_value_type(x), args)
        return x(x, y, w), codegen
    return None


@intrinsic
def _vdecay_fast(typingctx, y):
    """:func:`_decay_fast` in all 16 lanes: for float32 the instructions of :func:`_exp2_nonpos_f32`
    (clamp as numba's ``max``, magic-number rounding, the same FMA chain, the exponent added as an
    integer), so the same bits in vector registers; for float64 llvm.exp per lane (math.exp's)."""
    if isinstance(y, _Vec16) and y.dtype in (types.float32, types.float64):
        def codegen(context, builder, sig, args):
            vty = context.get_value_type(y)
            if y.dtype == types.float64:
                return _vec_intrinsic(builder, "llvm.exp.v16f64", vty, args)

            def c(x):
                return ir.Constant(vty, [float(x)] * 16)
            # Explicit flags: numba gives the kernel's own (reassoc) to every fp instruction that has none,
            # and reassociation would cancel y - ((y + M) - M) to 0.
            fl = tuple(_FM_EXACT)
            i32v = ir.VectorType(ir.IntType(32), 16)
            x = args[0]
            x = builder.select(builder.fcmp_ordered(">", c(_YMIN), x, flags=fl), c(_YMIN), x)  # max(y, _YMIN)
            t = builder.fadd(x, c(_MAGIC), flags=fl)
            f = builder.fsub(x, builder.fsub(t, c(_MAGIC), flags=fl), flags=fl)
            p = c(_P5)
            for k in (_P4, _P3, _P2, _P1, _ONE):
                p = _vec_intrinsic(builder, "llvm.fma.v16f32", vty, [p, f, c(k)])
            k23 = builder.shl(builder.bitcast(t, i32v), ir.Constant(i32v, [23] * 16))
            return builder.bitcast(builder.add(builder.bitcast(p, i32v), k23), vty)
        return y(y), codegen
    return None


def _vec_operator(vop):
    """Typer for a vector operator: vector ∘ vector, and a scalar on either side (broadcast)."""
    def typer(x, y):
        if isinstance(x, _Vec16) and x == y:
            return lambda x, y: vop(x, y)
        if isinstance(x, _Vec16) and isinstance(y, (types.Float, types.Integer)):
            return lambda x, y: vop(x, _vsplat(y, x))
        if isinstance(y, _Vec16) and isinstance(x, (types.Float, types.Integer)):
            return lambda x, y: vop(_vsplat(x, y), y)
        return None
    return typer


overload(operator.add)(_vec_operator(_vadd))
overload(operator.sub)(_vec_operator(_vsub))
overload(operator.mul)(_vec_operator(_vmul))


@njit(nogil=True, fastmath=_FM_KERNEL, error_model="numpy", cache=True)
def _scan_row_n16(dtb, ur, a, e, Bt, b, Ct, nbad, P, ys, yr, last):
    """The forward recurrence of row (b, e) for N = 16, the states in one vector (see _Vec16):
    yr[t] = Σ_n C_t[n]·h_t[n], and h_{L-1} into last[b, e]. P (≥ L·16, a multiple of 256) and ys (≥ L,
    a multiple of 16) are scratch."""
    L = dtb.shape[0]
    E = last.shape[1]
    ae = _vload(a, e * 16)
    ob = b * L * 16  # token 0 of batch b in Bt, Ct (Bn, L, 16)
    h = _vzeros(P)
    if nbad == 0:
        # Δ·A ≤ 0 everywhere: the decays in registers, in the loop. The exp is throughput work that does
        # not depend on h, so the out-of-order core overlaps it with the one-FMA chain of the recurrence.
        for t in range(L):
            d = dtb[t]
            h = _vfma(_vdecay_fast(d * ae), h, (d * ur[t]) * _vload(Bt, ob + t * 16))
            _vstore(P, t * 16, h * _vload(Ct, ob + t * 16))
    else:
        # Any input: the decays first, one flat pass over L·16 with the scalar _decay_any (vectorised).
        for t in range(L):
            _vstore(P, t * 16, dtb[t] * ae)
        for k in range(L * 16):
            P[k] = _decay_any(P[k])
        for t in range(L):
            h = _vfma(_vload(P, t * 16), h, (dtb[t] * ur[t]) * _vload(Bt, ob + t * 16))
            _vstore(P, t * 16, h * _vload(Ct, ob + t * 16))
    # y_t = Σ_n C_t[n]·h_t[n]: the products of 16 tokens at a time summed by one tree (P is padded to a
    # multiple of 16 tokens; the lanes of the tokens past L are never read).
    for t0 in range(0, L, 16):
        _vstore(ys, t0, _vsum16(P, t0 * 16))
    for t in range(L):
        yr[t] = ys[t]
    _vstore(last, (b * E + e) * 16, h)


@njit(nogil=True, fastmath=_FM_KERNEL, error_model="numpy", cache=True)
def _backward_n16(lo, hi, chunk, L, u, su, dl, sd, A, a, a_ok, Bt, Ct, D, zf, sz, bias, has_D, has_z, has_bias,
                  softplus, go, sg, dlast, has_dlast, sgo, du, ddl, dz, dA_rows, dD_rows, dbias_rows,
                  dB_part, dC_part):
    """:func:`_backward` for N = 16, the states of a row in one vector (see _Vec16). Everything that is
    per token rather than per state (the gate, the softplus derivative, the D path, the sums into du and
    ddelta) is taken out of the recurrences into passes over L that vectorise over tokens; the decays
    are one flat pass over L·16 with the scalar exp, which LLVM vectorises, so the fast and the any-input
    exp differ in that pass only."""
    _, E, N = dA_rows.shape
    Bn = dB_part.shape[1]
    dtype = dA_rows.dtype
    zero = dtype.type(0)
    one = dtype.type(1)
    thr = dtype.type(20)
    xb = np.empty(L, dtype)       # delta + bias (the softplus input)
    dtb = np.empty(L, dtype)      # Δ
    ub = np.empty(L, dtype)
    zb = np.empty(L, dtype)
    gb = np.empty(L, dtype)       # incoming gradient of the row
    yb = np.empty(L, dtype)       # Σ_n C·h (for dz)
    dyb = np.empty(L, dtype)      # ∂loss/∂y before the gate
    dut = np.empty(L, dtype)      # Δ·u
    sbb = np.empty(L, dtype)      # Σ_n g_n·B_n per token
    sab = np.empty(L, dtype)      # Σ_n ∂loss/∂(Δ·A_n)·A_n per token
    dub = np.empty(L, dtype)
    ddb = np.empty(L, dtype)
    dzb = np.empty(L, dtype)
    H = np.empty((L + 1) * 16, dtype)  # H[16(t+1):] = h_t, H[:16] = 0
    DA = np.empty(L * 16, dtype)       # decays exp(Δ_t·A)
    for i in range(lo, hi):
        b, e, bse, De, nbad = _backward_row_inputs(i, E, L, u, su, dl, sd, a_ok, D, zf, sz, bias, has_D, has_z,
                                                   has_bias, softplus, go, sg, dtb, xb, ub, gb, zb)
        ob = b * L * 16              # token 0 of batch b in Bt, Ct (Bn, L, 16)
        op = (chunk * Bn + b) * L * 16  # token 0 of batch b in this chunk's dB_part, dC_part
        ae = _vload(a, e * 16)
        Ae = _vload(A, e * 16)
        # Decays: Δ_t·a for all tokens, then the exp as one flat vectorisable pass.
        for t in range(L):
            _vstore(DA, t * 16, dtb[t] * ae)
        if nbad == 0:
            for k in range(L * 16):
                DA[k] = _decay_fast(DA[k])
        else:
            for k in range(L * 16):
                DA[k] = _decay_any(DA[k])
        for t in range(L):
            dut[t] = dtb[t] * ub[t]
        # Recompute the row's states (the forward's arithmetic).
        h = _vzeros(H)
        _vstore(H, 0, h)
        for t in range(L):
            h = _vload(DA, t * 16) * h + dut[t] * _vload(Bt, ob + t * 16)
            _vstore(H, (t + 1) * 16, h)
            if has_z:
                yb[t] = _vsum(h * _vload(Ct, ob + t * 16))
        if has_z:
            for t in range(L):
                zz = zb[t]
                sgm = _sigmoid(zz)
                dyb[t] = gb[t] * zz * sgm
                dzb[t] = gb[t] * (yb[t] + De * ub[t]) * sgm * (one + zz * (one - sgm))
        else:
            for t in range(L):
                dyb[t] = gb[t]
        # Backward recurrence, t = L-1 .. 0: g = ∂loss/∂h_t.
        g = _vload(dlast, (b * E + e) * 16) if has_dlast else _vzeros(H)
        gA = _vzeros(H)
        for tt in range(L):  # (numba compiles a negative-step range ~35% slower here)
            t = L - 1 - tt
            dy = dyb[t]
            g = g + dy * _vload(Ct, ob + t * 16)  # from y_t, plus what flowed back from h_{t+1}
            p = op + t * 16
            _vstore(dC_part, p, _vload(dC_part, p) + dy * _vload(H, (t + 1) * 16))  # C enters y_t = Σ C·h_t
            _vstore(dB_part, p, _vload(dB_part, p) + dut[t] * g)  # B enters through Δ·u·B
            sbb[t] = _vsum(g * _vload(Bt, ob + t * 16))
            dA_t = _vload(DA, t * 16)
            q = g * _vload(H, t * 16) * dA_t  # ∂loss/∂(Δ·A_n): to A, to Δ, and on to h_{t-1}
            sab[t] = _vsum(q * Ae)
            gA = gA + dtb[t] * q
            g = g * dA_t
        dD_acc = zero
        for t in range(L):
            dub[t] = dyb[t] * De + sbb[t] * dtb[t]
            dD_acc += dyb[t] * ub[t]
        for t in range(L):
            ddb[t] = sab[t] + sbb[t] * ub[t]
        if softplus:
            for t in range(L):
                x = xb[t]
                ddb[t] = ddb[t] * _sigmoid(x) if x <= thr else ddb[t]
        db_acc = zero
        for t in range(L):
            db_acc += ddb[t]
        o0 = sgo[0] + b * sgo[1] + e * sgo[2]
        _store_row(du, o0, sgo[3], dub)
        _store_row(ddl, o0, sgo[3], ddb)
        if has_z:
            _store_row(dz, o0, sgo[3], dzb)
        _vstore(dA_rows, (b * E + e) * 16, gA)
        dD_rows[b, e] = dD_acc
        dbias_rows[b, e] = db_acc


# ------------------------------------------------------------------------------------------- threads
_pool: ThreadPoolExecutor | None = None
_pool_key: tuple[int, int] | None = None
_pool_lock = threading.Lock()
_MIN_WORK_PER_THREAD = 1 << 15  # state updates; below this a thread hand-off costs more than it saves


def _threads_for(rows: int, work: int) -> int:
    n = max(1, torch.get_num_threads())
    return max(1, min(n, rows, work // _MIN_WORK_PER_THREAD))


def _get_pool(workers: int) -> ThreadPoolExecutor:
    global _pool, _pool_key
    key = (os.getpid(), workers)  # a forked child must not reuse the parent's (dead) worker threads
    with _pool_lock:
        if _pool is None or _pool_key != key:
            _pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="vimtr-scan")
            _pool_key = key
        return _pool


def _aligned(i: int, E: int, group: int) -> int:
    """The first row at or after i = b·E + e whose channel e starts a group of ``group`` channels."""
    b, e = divmod(i, E)
    e = -(-e // group) * group
    return b * E + e if e < E else (b + 1) * E


def _run_rows(call, rows: int, work: int, groups_of: tuple[int, int] | None = None) -> int:
    """Run ``call(lo, hi, chunk)`` over [0, rows) in one contiguous chunk per thread; returns the chunk count.
    ``groups_of=(E, G)``: chunks start only where a group of G channels starts (row i is channel i % E),
    so no group is split between threads."""
    nt = _threads_for(rows, work)
    if nt == 1:
        call(0, rows, 0)
        return 1
    bounds = [rows * k // nt for k in range(nt + 1)]
    if groups_of is not None:
        bounds = [min(rows, _aligned(x, *groups_of)) for x in bounds]
    pool = _get_pool(nt - 1)
    futures = [pool.submit(call, bounds[k], bounds[k + 1], k) for k in range(1, nt)]
    try:
        call(bounds[0], bounds[1], 0)
    finally:
        for f in futures:  # wait for all before returning or re-raising: they write into our buffers
            f.result()
    return nt


# -------------------------------------------------------------------------------- tensors <-> kernels
def _span(x: torch.Tensor, reverse: bool = False):
    """(1-D numpy view of x's storage span, int64 (base, batch, channel, token) strides): lets a kernel
    read or write the (B, E, L) tensor x in place, in token order or (``reverse``) from the last token."""
    span = 1 + sum((n - 1) * s for n, s in zip(x.shape, x.stride())) if x.numel() else 0
    flat = torch.as_strided(x.detach(), (span,), (1,))
    sb, se, sl = x.stride()
    base = 0
    if reverse:
        base, sl = (x.shape[2] - 1) * sl, -sl
    return flat.numpy(), np.array([base, sb, se, sl], dtype=np.int64)


def _empty(dtype, ndim=1):
    return np.empty((0,) * ndim, dtype=dtype)


def _prepare(u, delta, A, B, C, D, z, delta_bias, reverse):
    """Kernel arguments shared by the forward and the backward."""
    npdt = np.float32 if u.dtype == torch.float32 else np.float64
    uf, su = _span(u, reverse)
    df, sd = _span(delta, reverse)
    a = A.detach() * float(_LOG2E) if u.dtype == torch.float32 else A.detach()
    a = a.contiguous().numpy()
    a_ok = _count_positive(a) == 0  # with Δ ≥ 0 (checked per row in the kernel) the fast exp is valid
    if reverse:
        B, C = B.flip(-1), C.flip(-1)
    Bt = B.detach().transpose(1, 2).contiguous().numpy()
    Ct = C.detach().transpose(1, 2).contiguous().numpy()
    Dn = D.detach().contiguous().numpy() if D is not None else _empty(npdt)
    if z is not None:
        zf, sz = _span(z, reverse)
    else:
        zf, sz = _empty(npdt), np.zeros(4, dtype=np.int64)
    bn = delta_bias.detach().contiguous().numpy() if delta_bias is not None else _empty(npdt)
    return (uf, su, df, sd, a, a_ok, Bt, Ct, Dn, zf, sz, bn, D is not None, z is not None,
            delta_bias is not None)


def _out_like(u):
    """The output in u's memory layout when u is dense (as torch's elementwise ops do): a transposed
    (B, L, E) input gives a transposed output, which the mixer's out_proj then reads without a copy."""
    if u.is_contiguous() or not _dense(u):
        return torch.empty(u.shape, dtype=u.dtype)
    return torch.empty_like(u, memory_format=torch.preserve_format)


def _dense(x):
    order = sorted(range(x.dim()), key=lambda i: x.stride(i))
    expected = 1
    for i in order:
        if x.shape[i] != 1 and x.stride(i) != expected:
            return False
        expected *= x.shape[i]
    return True


def _forward(u, delta, A, B, C, D, z, delta_bias, delta_softplus, reverse=False, out=None, accumulate=False,
             out_scale=1.0, delta_out=None, delta_channel_sum=None, out_gate=None):
    batch, E, L = u.shape
    N = A.shape[1]
    if out is None:
        out = _out_like(u)
    last = torch.empty(batch, E, N, dtype=u.dtype)
    # A reversed scan reads every row through negated token strides (a contiguous row then costs a
    # reversed copy into a row buffer) and runs the same loop as the forward one. Running the recurrence
    # backwards over rows in token order instead (t = L-1-tt) was 35-43% slower: LLVM no longer sees a
    # plain induction variable in the hot loop (measured, benchmarks/NOTES.md).
    (uf, su, df, sd, a, a_ok, Bt, Ct, Dn, zf, sz, bn, has_D, has_z, has_bias) = _prepare(
        u, delta, A, B, C, D, z, delta_bias, reverse)
    of, so = _span(out, reverse)
    if delta_out is not None:
        dof, sdo = _span(delta_out, reverse)
    else:
        dof, sdo = _empty(of.dtype), np.zeros(4, dtype=np.int64)
    lst = last.numpy()
    kernel, items = (_forward_n16 if N == 16 else _forward_any), batch * E
    scale = of.dtype.type(out_scale)
    groups = _channel_groups(batch, E, L, of.dtype, delta_channel_sum is not None)
    if out_gate is not None:
        ogf, sog = _span(out_gate, reverse)
    else:
        ogf, sog = _empty(of.dtype), np.zeros(4, dtype=np.int64)

    def call(lo, hi, chunk):
        kernel(lo, hi, L, uf, su, df, sd, a, a_ok, Bt, Ct, Dn, zf, sz, bn, has_D, has_z, has_bias,
               bool(delta_softplus), of, so, lst, bool(accumulate), scale, dof, sdo, delta_out is not None,
               bool(reverse), groups, delta_channel_sum is not None, ogf, sog, out_gate is not None)

    _run_rows(call, items, batch * E * L * N, groups_of=(E, _G))
    if delta_channel_sum is not None:
        delta_channel_sum += torch.from_numpy(groups).sum(1)
    return out, last


def _channel_groups(batch, E, L, dtype, wanted):
    """Partial channel sums of Δ, one per group of _G channels: each group is summed by one thread in
    channel order and the groups are then summed by torch, so the result does not depend on the thread
    count (run_rows keeps groups whole)."""
    if not wanted:
        return np.zeros((0, 0, 0), dtype)
    return np.zeros((batch, -(-E // _G), L), dtype)


def _backward_impl(saved, delta_softplus, reverse, dout, dlast):
    u, delta, A, B, C, D, z, delta_bias = saved
    batch, E, L = u.shape
    N = A.shape[1]
    dtype = u.dtype
    (uf, su, df, sd, a, a_ok, Bt, Ct, Dn, zf, sz, bn, has_D, has_z, has_bias) = _prepare(
        u, delta, A, B, C, D, z, delta_bias, reverse)
    gf, sg = _span(dout, reverse)
    has_dlast = dlast is not None
    dl = dlast.detach().to(dtype).contiguous().numpy() if has_dlast else _empty(a.dtype, 3)
    du = torch.empty(batch, E, L, dtype=dtype)
    ddelta = torch.empty(batch, E, L, dtype=dtype)
    dz = torch.empty(batch, E, L, dtype=dtype) if has_z else torch.empty(0, dtype=dtype)
    _, sgo = _span(du, reverse)
    dA_rows = torch.empty(batch, E, N, dtype=dtype)
    dD_rows = torch.empty(batch, E, dtype=dtype)
    dbias_rows = torch.empty(batch, E, dtype=dtype)
    rows, work = batch * E, 2 * batch * E * L * N
    nt = _threads_for(rows, work)
    dB_part = torch.zeros(nt, batch, L, N, dtype=dtype)
    dC_part = torch.zeros(nt, batch, L, N, dtype=dtype)
    An = A.detach().contiguous().numpy()
    outs = (du.view(-1).numpy(), ddelta.view(-1).numpy(), dz.view(-1).numpy(), dA_rows.numpy(),
            dD_rows.numpy(), dbias_rows.numpy(), dB_part.numpy(), dC_part.numpy())

    kernel = _backward_n16 if N == 16 else _backward  # see _Vec16

    def call(lo, hi, chunk):
        kernel(lo, hi, chunk, L, uf, su, df, sd, An, a, a_ok, Bt, Ct, Dn, zf, sz, bn, has_D, has_z, has_bias,
                  bool(delta_softplus), gf, sg, dl, has_dlast, sgo, *outs)

    _run_rows(call, rows, work)
    dB = dB_part.sum(0).transpose(1, 2)
    dC = dC_part.sum(0).transpose(1, 2)
    if reverse:
        dB, dC = dB.flip(-1), dC.flip(-1)
    return (du, ddelta, dA_rows.sum(0), dB, dC, dD_rows.sum(0) if has_D else None,
            dz if has_z else None, dbias_rows.sum(0) if has_bias else None)


class _SelectiveScanCPU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, delta_softplus, reverse):
        out, last = _forward(u, delta, A, B, C, D, z, delta_bias, delta_softplus, reverse)
        ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias)
        ctx.delta_softplus, ctx.reverse = delta_softplus, reverse
        return out, last

    @staticmethod
    def backward(ctx, dout, dlast):
        if dout is None:
            dout = torch.zeros_like(ctx.saved_tensors[0])
        grads = _backward_impl(ctx.saved_tensors, ctx.delta_softplus, ctx.reverse, dout, dlast)
        grads = tuple(g if need else None for g, need in zip(grads, ctx.needs_input_grad))
        return grads + (None, None)


@njit(nogil=True, error_model="numpy", cache=True)
def _delta_rows(lo, hi, dl, sd, bias, has_bias, softplus, of, so, E, L, gsum, has_gsum):
    dtb = np.empty(L, of.dtype)
    for i in range(lo, hi):
        b = i // E
        e = i - b * E
        _delta_row(dl, sd[0] + b * sd[1] + e * sd[2], sd[3], bias[e] if has_bias else of.dtype.type(0), softplus,
                   dtb)
        _store_row(of, so[0] + b * so[1] + e * so[2], so[3], dtb)
        if has_gsum:
            _add_row(gsum[b, e // _G], dtb)


def scan_delta_cpu(delta, delta_bias=None, delta_softplus=True, channel_sum=None):
    """Δ exactly as :func:`selective_scan_cpu` computes it (delta + delta_bias, then softplus), forward only,
    in delta's layout when delta is dense: what its ``delta_out=`` writes, for callers that need Δ
    while the scan itself runs under autograd. float32/float64 (B, E, L) CPU tensors. ``channel_sum``:
    a (B, L) tensor Σ_e Δ is added to, exactly as the scan's ``delta_channel_sum=`` adds it."""
    if delta.dim() != 3 or delta.device.type != "cpu" or delta.dtype not in _NATIVE:
        raise ValueError(f"scan_delta_cpu: delta must be a float32/float64 (batch, dim, seqlen) CPU tensor, "
                         f"got {tuple(delta.shape)} {delta.dtype} on {delta.device}")
    Bn, E, L = delta.shape
    if delta_bias is not None and tuple(delta_bias.shape) != (E,):
        raise ValueError(f"scan_delta_cpu: delta_bias must be ({E},), got {tuple(delta_bias.shape)}")
    out = _out_like(delta)
    if delta.numel() == 0:
        return out
    df, sd = _span(delta)
    of, so = _span(out)
    bn = (delta_bias.detach().to(delta.dtype).contiguous().numpy() if delta_bias is not None
          else _empty(of.dtype))
    if channel_sum is not None:
        _check_sum("channel_sum", channel_sum, (Bn, L), delta.dtype)
    groups = _channel_groups(Bn, E, L, of.dtype, channel_sum is not None)
    _run_rows(lambda lo, hi, chunk: _delta_rows(lo, hi, df, sd, bn, delta_bias is not None, bool(delta_softplus),
                                                of, so, E, L, groups, channel_sum is not None),
              Bn * E, Bn * E * L, groups_of=(E, _G))
    if channel_sum is not None:
        channel_sum += torch.from_numpy(groups).sum(1)
    return out


# ------------------------------------------------------------------------------------------ checking
_NATIVE = (torch.float32, torch.float64)
_UPCAST = (torch.float16, torch.bfloat16)


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
    if not _dense(x):
        raise ValueError(f"selective_scan_cpu: {name} must be a dense tensor (any dimension order, no gaps or "
                         f"broadcast strides), got strides {x.stride()}")


def _check_sum(name, x, shape, dtype):
    if not isinstance(x, torch.Tensor) or x.device.type != "cpu" or x.dtype != dtype or tuple(x.shape) != shape:
        what = f"{tuple(x.shape)} {x.dtype} on {x.device}" if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"selective_scan_cpu: {name} must be a {dtype} CPU tensor of shape (batch, seqlen) = "
                         f"{shape}, got {what}")


def selective_scan_cpu(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                       return_last_state=False, *, reverse=False, out=None, accumulate=False, out_scale=1.0,
                       delta_out=None, delta_channel_sum=None, out_gate=None):
    """Selective scan on CPU tensors; same signature, semantics and gradients as ``selective_scan_ref``.

    Returns ``out`` (u's dtype and shape; in u's memory layout when u is a dense view such as a transposed
    (B, L, E) tensor, contiguous otherwise), or ``(out, last_state)`` with ``last_state`` (batch, dim,
    dstate) in the compute dtype (float64 for float64 u, float32 otherwise) when ``return_last_state``.

    ``reverse=True`` (an extension, not in mamba's signature) scans from the last token to the first:
    the same as flipping u, delta, z, B and C along L, scanning, and flipping the output back, without
    the five copies; ``last_state`` is then the state after token 0. Vim's backward direction is this.

    Forward-only extensions (inference; they raise ``ValueError`` when a gradient would be needed), all
    for float32/float64 inputs, used by the two-direction mixer to skip torch passes over (B, E, L):

    * ``out``: a dense (batch, dim, seqlen) tensor of the compute dtype, any memory layout, to write the
      result into (and return). It must not overlap any input.
    * ``accumulate=True``: ``out = (out + result) · out_scale`` instead of ``out = result · out_scale``;
      Vim's mixer writes the forward direction, then accumulates the reverse one with ``out_scale=0.5``,
      which is exactly its ``(y_f + y_b) / 2``.
    * ``delta_out``: a dense (batch, dim, seqlen) tensor that receives Δ as the scan used it (after
      delta_bias and softplus), in token order also with ``reverse``: what MTR reads, at no extra pass.
    * ``delta_channel_sum``: a (batch, seqlen) tensor of the compute dtype that Σ_e Δ[b, e, t] is *added*
      to (zero it first): MTR's importance is the channel mean of Δ_f + Δ_b, so both directions add into
      one tensor and torch's (B, E, L) add and mean disappear. Summed in groups of 16 channels, each in
      channel order, then over groups: the same result for any thread count.
    * ``out_gate``: a dense (batch, dim, seqlen) tensor g of the compute dtype: the output becomes
      ``((out if accumulate else 0) + result) · SiLU(g) · out_scale``. Vim's mixer scans both directions
      without ``z`` and gates their sum once this way (one SiLU pass per block instead of two);
      :func:`gated_sum_cpu` is the same arithmetic under autograd, bit for bit.
    """
    _check(u, delta, A, B, C, D, z, delta_bias)
    dtype_in = u.dtype
    cdt = torch.float64 if dtype_in == torch.float64 else torch.float32
    shape = tuple(u.shape)
    extended = out is not None or delta_out is not None or delta_channel_sum is not None or out_gate is not None
    if delta_channel_sum is not None:
        _check_sum("delta_channel_sum", delta_channel_sum, (shape[0], shape[2]), cdt)
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
        # Nothing to scan (empty batch, channels, sequence or state): the reference is exact and free.
        res = selective_scan_ref(u, delta, A, B, C, D=D, z=z, delta_bias=delta_bias,
                                 delta_softplus=delta_softplus, return_last_state=True)
        if not extended:
            return res if return_last_state else res[0]
        y, last = res
        d = delta.to(cdt) + (0 if delta_bias is None else delta_bias.to(cdt)[:, None])
        d = F.softplus(d) if delta_softplus else d
        if delta_out is not None:
            delta_out.copy_(d)
        if delta_channel_sum is not None:
            delta_channel_sum += d.sum(1)
        if accumulate:
            y = out + y
        y = y * (F.silu(out_gate) * out_scale) if out_gate is not None else y * out_scale
        if out is not None:
            y = out.copy_(y)
        return (y, last) if return_last_state else y
    softplus = bool(delta_softplus)
    if needs_grad:
        res, last = _SelectiveScanCPU.apply(*args, softplus, bool(reverse))
    else:
        res, last = _forward(*args, softplus, bool(reverse), out=out, accumulate=bool(accumulate),
                             out_scale=float(out_scale), delta_out=delta_out, delta_channel_sum=delta_channel_sum,
                             out_gate=out_gate)
    res = res.to(dtype_in)
    return (res, last) if return_last_state else res


# ------------------------------------------------------------------------------- gated sum (autograd)
@njit(nogil=True, error_model="numpy", cache=True)
def _gated_sum_rows(lo, hi, E, L, bf, sb, gf, sg, of, so, scale):
    bb = np.empty(L, of.dtype)
    gb = np.empty(L, of.dtype)
    for i in range(lo, hi):
        b = i // E
        e = i - b * E
        _load_row(bf, sb[0] + b * sb[1] + e * sb[2], sb[3], bb)
        _load_row(gf, sg[0] + b * sg[1] + e * sg[2], sg[3], gb)
        _emit_gated_row(of, so[0] + b * so[1] + e * so[2], so[3], bb, gb, True, scale)


def _gated_sum_kernel(a, b, g, scale):
    out = _out_like(a)
    out.copy_(a)
    bf, sb = _span(b)
    gf, sg = _span(g)
    of, so = _span(out)
    Bn, E, L = a.shape
    sc = of.dtype.type(scale)
    _run_rows(lambda lo, hi, chunk: _gated_sum_rows(lo, hi, E, L, bf, sb, gf, sg, of, so, sc), Bn * E, Bn * E * L)
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
