"""What every CPU kernel shares: the fast-math policy, a vectorisable exp (and the softplus and sigmoid
built on it), the thread pool the kernels run on, and the bridge from torch tensors to kernel arguments.

**Why a hand-written exp.** numba lowers ``math.exp`` to one libm call per element (its wheels have no
SVML), which costs about five times the rest of the scan's inner loop. In float32 the scan's decays are
computed as 2**(Δ·A·log2 e): round the exponent with a magic number, a degree-5 polynomial for the
fraction, and the integer part written into the float's exponent bits. All of it is plain arithmetic,
so LLVM vectorises it over the N states. Mamba always has A = -exp(A_log) < 0 and Δ = softplus(·) ≥ 0,
so the argument is ≤ 0 and only an underflow clamp is needed (:func:`decay_fast`); inputs that break
that (A > 0, Δ < 0, non-finite values) take :func:`decay_any`, which also handles overflow and NaN:
no input gives a wrong answer, only a slower one. float64 (the gradient checks) uses ``math.exp``.

**Why a thread pool of our own.** Rows are split into one contiguous chunk per thread
(``torch.get_num_threads()``); the kernels release the GIL and run on a small persistent pool plus the
calling thread. numba's ``parallel=True`` would bring a second OpenMP runtime next to torch's, compile
much more slowly, and make the backward's partial sums depend on scheduling.
"""
from __future__ import annotations

import math
import os
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic, overload

# ------------------------------------------------------------------------------------ fast-math policy
# Kernels may reassociate (needed to vectorise the Σ_n C·h reduction) and contract to FMA, but keep NaN
# and inf semantics (no nnan/ninf) so non-finite inputs propagate as in the reference. Helpers whose
# correctness depends on exact rounding (the round-to-nearest-by-magic-number trick below) allow only
# contraction; numba compiles them as separate functions and LLVM inlines them keeping each
# instruction's own flags.
FM_KERNEL = {"contract", "reassoc", "nsz", "arcp"}
FM_EXACT = {"contract"}

_F = np.float32
LOG2E = _F(1.4426950408889634)
ZERO, ONE, TWO, TWENTY = _F(0.0), _F(1.0), _F(2.0), _F(20.0)
MAGIC = _F(12582912.0)  # 1.5·2**23: adding it rounds a |y| < 2**22 to an integer held in the low mantissa bits
YMIN = _F(-126.0)  # smallest exponent of a normal float32
_YMIN_ANY = _F(-125.0)
_YMAX_ANY = _F(128.0)
# Near-minimax (relative error) polynomial for 2**f on [-1/2, 1/2], fitted for this kernel (Lawson's
# iteratively reweighted least squares on 4001 Chebyshev nodes; max relative error 9e-8 in exact
# arithmetic, < 2e-7 evaluated in float32). Highest degree first, the order Horner's rule uses them.
EXP2_POLY = (_F(1.326472731e-03), _F(9.671512991e-03), _F(5.550733581e-02), _F(2.402224243e-01),
             _F(6.931470037e-01), ONE)
_P5, _P4, _P3, _P2, _P1, _ = EXP2_POLY
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


@njit(fastmath=FM_EXACT, error_model="numpy", cache=True)
def _exp2_core_f32(y):
    """2**y for float32 y in [-126, 127] (no range handling): round, degree-5 polynomial, scale."""
    t = y + MAGIC
    f = y - (t - MAGIC)  # y - round(y), in [-1/2, 1/2]
    p = ((((_P5 * f + _P4) * f + _P3) * f + _P2) * f + _P1) * f + ONE
    return _scale_by_rounded(p, t)


@njit(fastmath=FM_EXACT, error_model="numpy", cache=True)
def _exp2_nonpos_f32(y):
    """2**y for y ≤ 0 (or -inf). Below -126 it returns 2**-126 ≈ 1.2e-38 instead of a denormal."""
    return _exp2_core_f32(max(y, YMIN))


@njit(fastmath=FM_EXACT, error_model="numpy", cache=True)
def _exp2_any_f32(y):
    """2**y for any float32 y: inf from 128 up, 0 below -125 (denormals flushed), NaN stays NaN."""
    # Evaluate 2**(y-1)·2 so y up to 128 stays inside the exponent field; 2**127·2 rounds to inf.
    r = _exp2_core_f32(min(max(y, _YMIN_ANY), _YMAX_ANY) - ONE) * TWO
    if y < _YMIN_ANY:
        r = ZERO
    if math.isnan(y):
        r = y
    return r


@njit(fastmath=FM_EXACT, error_model="numpy", cache=True)
def _softplus_f32(x):
    """log(1 + e**x), = x above 20 (torch's threshold); max(x, 0) + log1p(e**-|x|) below, vectorisable."""
    w = _exp2_nonpos_f32(-abs(x) * LOG2E)
    s = w / (TWO + w)
    s2 = s * s
    lg = TWO * s * (ONE + s2 * (_Q3 + s2 * (_Q5 + s2 * (_Q7 + s2 * (_Q9 + s2 * (_Q11 + s2 * _Q13))))))
    r = max(x, ZERO) + lg
    if not (x <= TWENTY):  # also passes NaN and +inf through unchanged
        r = x
    return r


@njit(fastmath=FM_EXACT, error_model="numpy", cache=True)
def _sigmoid_f32(x):
    return ONE / (ONE + _exp2_any_f32(-x * LOG2E))


@njit(error_model="numpy", cache=True)
def _softplus_f64(x):
    return math.log1p(math.exp(x)) if x <= 20.0 else x


@njit(error_model="numpy", cache=True)
def _sigmoid_f64(x):
    return 1.0 / (1.0 + math.exp(-x))


# Dtype dispatch for the kernels, which are compiled for float32 and float64 alike. The float32 decay
# argument is Δ·A·log2(e) (decays are powers of two), the float64 one Δ·A (decays are math.exp).
def decay_fast(y):  # pragma: no cover - typing stub, replaced by the overload in compiled code
    """exp of a decay argument known to be ≤ 0 (compiled code only)."""
    raise NotImplementedError


def decay_any(y):  # pragma: no cover
    """exp of any decay argument, overflow and NaN included (compiled code only)."""
    raise NotImplementedError


def softplus(x):  # pragma: no cover
    """log(1 + e**x) with torch's threshold of 20 (compiled code only)."""
    raise NotImplementedError


def sigmoid(x):  # pragma: no cover
    """1 / (1 + e**-x) (compiled code only)."""
    raise NotImplementedError


def _by_dtype(f32_impl, f64_impl):
    def typer(x):
        if x == types.float32:
            return lambda x: f32_impl(x)
        if x == types.float64:
            return lambda x: f64_impl(x)
        return None
    return typer


overload(decay_fast)(_by_dtype(_exp2_nonpos_f32, njit(cache=True)(lambda y: math.exp(y))))
overload(decay_any)(_by_dtype(_exp2_any_f32, njit(cache=True)(lambda y: math.exp(y))))
overload(softplus)(_by_dtype(_softplus_f32, _softplus_f64))
overload(sigmoid)(_by_dtype(_sigmoid_f32, _sigmoid_f64))


# ------------------------------------------------------------------------------------------- threads
_pool: ThreadPoolExecutor | None = None
_pool_key: tuple[int, int] | None = None
_pool_lock = threading.Lock()
MIN_WORK_PER_THREAD = 1 << 15  # state updates; below this a thread hand-off costs more than it saves


def threads_for(rows: int, work: int) -> int:
    """How many threads :func:`run_rows` uses for ``rows`` rows of ``work`` units in all."""
    n = max(1, torch.get_num_threads())
    return max(1, min(n, rows, work // MIN_WORK_PER_THREAD))


def _get_pool(workers: int) -> ThreadPoolExecutor:
    global _pool, _pool_key
    key = (os.getpid(), workers)  # a forked child must not reuse the parent's (dead) worker threads
    with _pool_lock:
        if _pool is None or _pool_key != key:
            _pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="vimtr-cpu")
            _pool_key = key
        return _pool


def _aligned(i: int, E: int, group: int) -> int:
    """The first row at or after i = b·E + e whose channel e starts a group of ``group`` channels."""
    b, e = divmod(i, E)
    e = -(-e // group) * group
    return b * E + e if e < E else (b + 1) * E


def run_rows(call, rows: int, work: int, groups_of: tuple[int, int] | None = None) -> int:
    """Run ``call(lo, hi, chunk)`` over [0, rows) in one contiguous chunk per thread; returns the chunk count.
    ``groups_of=(E, G)``: chunks start only where a group of G channels starts (row i is channel i % E),
    so no group is split between threads."""
    nt = threads_for(rows, work)
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
def span(x: torch.Tensor, reverse: bool = False):
    """(1-D numpy view of x's storage span, int64 (base, batch, channel, token) strides): lets a kernel
    read or write the (B, E, L) tensor x in place, in token order or (``reverse``) from the last token.
    Row (b, e) then starts at s[0] + b·s[1] + e·s[2] and steps by s[3]."""
    n = 1 + sum((k - 1) * s for k, s in zip(x.shape, x.stride())) if x.numel() else 0
    flat = torch.as_strided(x.detach(), (n,), (1,))
    sb, se, sl = x.stride()
    base = 0
    if reverse:
        base, sl = (x.shape[2] - 1) * sl, -sl
    return flat.numpy(), np.array([base, sb, se, sl], dtype=np.int64)


def no_span(dtype):
    """:func:`span`'s result for an absent optional operand."""
    return empty(dtype), np.zeros(4, dtype=np.int64)


def empty(dtype, ndim=1):
    return np.empty((0,) * ndim, dtype=dtype)


def dense(x: torch.Tensor) -> bool:
    """Whether x covers its storage span without gaps or broadcast strides (any dimension order)."""
    order = sorted(range(x.dim()), key=lambda i: x.stride(i))
    expected = 1
    for i in order:
        if x.shape[i] != 1 and x.stride(i) != expected:
            return False
        expected *= x.shape[i]
    return True


def out_like(u: torch.Tensor) -> torch.Tensor:
    """A new tensor in u's memory layout when u is dense (as torch's elementwise ops do): a transposed
    (B, L, E) input gives a transposed output, which a following projection reads without a copy."""
    if u.is_contiguous() or not dense(u):
        return torch.empty(u.shape, dtype=u.dtype)
    return torch.empty_like(u, memory_format=torch.preserve_format)
