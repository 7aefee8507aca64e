"""The selective-scan recurrence of one (batch, channel) row, each form written once (numba, CPU).

    h_t = exp(Δ_t·A) ⊙ h_{t-1} + Δ_t·u_t·B_t,     y_t = Σ_n C_t[n]·h_t[n]          (forward)
    g_t = ∂loss/∂h_t, carried from t = L-1 down to 0                               (backward)

Two forms of each: a generic one for any state count N (loops over n), and one for N = 16, Vim's state
size, whose 16 states live in one LLVM vector (:mod:`vimtr.ops.cpu.vec16`). The scan forward, the
state recomputation of the scan backward, and their N = 16 forms all run the forward recurrence from
here, so the backward differentiates the very states the forward produced.

Row data comes as flat float arrays: ``a``/``A`` (E·N) the decay rates (a = A·log2 e in float32, see
:mod:`vimtr.ops.cpu.runtime`), ``Bt``/``Ct`` (batch·L·N) token-major with ``ob`` the offset of the row's
batch, decays ``DA`` and states ``H`` (L·N and (L+1)·N, H[0:N] = h_{-1} = 0) per thread.

**One order for every sum.** numba cannot tell LLVM that two arrays are distinct, so LLVM vectorises a
loop that stores (H, dB, g) behind a run-time check on the addresses of the arrays it stores to and
loads from, and runs a scalar copy of the loop when the check cannot rule out an overlap. The check is
conservative (a distance under one vector step counts, and numba's negative-index wraparound adds a
range one array-length past each load), so it also fails for distinct arrays that merely lie close
together: which copy runs depends on where malloc put this call's buffers. For elementwise work both
copies give the same bits; for a sum that may be reassociated they do not (vector lanes and a tree
against one running total). A reassociable Σ_n C·h in :func:`states` made identical calls differ by up
to 4e-6, whole batches of rows at a time, depending on earlier allocations. So a sum either has a loop
without stores of its own (no check, one compiled form) or is compiled without reassociation
(``FM_EXACT``: added in index order in either copy). The generic recurrences below, whose state loops
both store and sum, take the second way: split into store-free sums, the N = 8 forward ran ~2x slower
(per-token loop overhead), while in order it is faster than the vectorised loop was. The N = 16 forms
are explicit vectors, which LLVM does not re-vectorise.
"""
from __future__ import annotations

from numba import njit

from vimtr.ops.cpu.runtime import FM_EXACT, FM_KERNEL, decay_any, decay_fast
from vimtr.ops.cpu.vec16 import vdecay_fast, vfma, vload, vstore, vsum, vsum16, vzeros

_JIT = dict(nogil=True, fastmath=FM_KERNEL, error_model="numpy", cache=True)
_JIT_ORDERED = dict(nogil=True, fastmath=FM_EXACT, error_model="numpy", cache=True)  # sums in index order


@njit(**_JIT)
def decays(dtb, a, e, N, nbad, DA):
    """DA[t·N + n] = exp(Δ_t·a[e, n]) for the row's L tokens: the products first, then the exp as one
    flat pass over L·N (vectorisable for any N). ``nbad`` = 0 (Δ·A ≤ 0 everywhere) takes the fast exp."""
    L = dtb.shape[0]
    for t in range(L):
        d = dtb[t]
        for n in range(N):
            DA[t * N + n] = d * a[e * N + n]
    exps(DA, L * N, nbad)


@njit(**_JIT)
def exps(DA, count, nbad):
    """DA[k] = exp(DA[k]) for k < count, the fast exp where ``nbad`` = 0 (all arguments ≤ 0)."""
    if nbad == 0:
        for k in range(count):
            DA[k] = decay_fast(DA[k])
    else:
        for k in range(count):
            DA[k] = decay_any(DA[k])


@njit(**_JIT_ORDERED)
def states(DA, ur, dtb, Bt, Ct, ob, N, H, y):
    """The forward recurrence for any N: states into H[(t+1)·N:], y_t = Σ_n C·h into y."""
    L = dtb.shape[0]
    zero = H.dtype.type(0)
    for n in range(N):
        H[n] = zero
    for t in range(L):
        du = dtb[t] * ur[t]
        p = t * N
        q = ob + p
        acc = zero
        for n in range(N):
            hn = DA[p + n] * H[p + n] + du * Bt[q + n]
            H[p + N + n] = hn
            acc += hn * Ct[q + n]
        y[t] = acc


def _vector_states(decay_in_loop: bool, keep_states: bool):
    """The forward recurrence for N = 16, states in one vector; the products C_t·h_t go to P (token t at
    P[16t:]) for :func:`tree_sums`. ``decay_in_loop``: compute the decays in registers, in the loop (the
    fast exp; it does not depend on h, so the out-of-order core overlaps it with the one-FMA chain of the
    recurrence) instead of reading them from DA. ``keep_states``: also store h_t into H (the backward).
    Both are fixed at compile time: one source, three compiled variants."""

    @njit(**_JIT)
    def run(DA, ur, dtb, a, e, Bt, Ct, ob, H, P):
        L = dtb.shape[0]
        ae = vload(a, e * 16)
        h = vzeros(P)
        if keep_states:
            vstore(H, 0, h)
        for t in range(L):
            d = dtb[t]
            dA = vdecay_fast(d * ae) if decay_in_loop else vload(DA, t * 16)
            # One FMA on the loop-carried path (see vfma): h = dA·h + (Δ·u)·B.
            h = vfma(dA, h, (d * ur[t]) * vload(Bt, ob + t * 16))
            if keep_states:
                vstore(H, (t + 1) * 16, h)
            vstore(P, t * 16, h * vload(Ct, ob + t * 16))
        return h

    return run


vector_states_fast = _vector_states(decay_in_loop=True, keep_states=False)
vector_states = _vector_states(decay_in_loop=False, keep_states=False)
vector_states_kept = _vector_states(decay_in_loop=False, keep_states=True)


@njit(**_JIT)
def vector_decays(dtb, a, e, nbad, DA):
    """:func:`decays` for N = 16: the products as vector stores, then the same flat exp pass."""
    L = dtb.shape[0]
    ae = vload(a, e * 16)
    for t in range(L):
        vstore(DA, t * 16, dtb[t] * ae)
    exps(DA, L * 16, nbad)


@njit(**_JIT)
def tree_sums(P, ys, y):
    """y_t = Σ_n P[16t + n] for the row's tokens, 16 tokens at a time by one shuffle tree (P padded to a
    multiple of 16 tokens; the lanes past L are never read). A horizontal sum per token cost 36% of the
    recurrence; the tree sums each lane in the order of :func:`vsum`, so the bits are the same."""
    L = y.shape[0]
    for t0 in range(0, L, 16):
        vstore(ys, t0, vsum16(P, t0 * 16))
    for t in range(L):
        y[t] = ys[t]


@njit(**_JIT_ORDERED)
def backprop(dyb, dtb, dut, DA, H, A, e, Bt, Ct, ob, dB, dC, op, g, gA, sbb, sab):
    """The backward recurrence for any N, t = L-1 .. 0. In: dyb (∂loss/∂y_t before the gate), g (the
    gradient of the last state), states H and decays DA. Out: dB, dC (+= at op, the row's batch in this
    thread's partial sums), gA (∂loss/∂A·Δ summed over t, per state), and per token sbb = Σ_n g_n·B_n,
    sab = Σ_n ∂loss/∂(Δ·A_n)·A_n, from which :func:`vimtr.ops.cpu.scan_backward` forms du and dΔ."""
    L = dtb.shape[0]
    N = g.shape[0]
    zero = g.dtype.type(0)
    for tt in range(L):  # (numba compiles a negative-step range ~35% slower here)
        t = L - 1 - tt
        dy = dyb[t]
        d = dtb[t]
        p = t * N
        q0 = ob + p
        pp = op + p
        for n in range(N):  # ∂loss/∂h_t: from y_t, plus what flowed back from h_{t+1}
            g[n] += dy * Ct[q0 + n]
        for n in range(N):  # C enters y_t = Σ C·h_t (summed over channels across rows)
            dC[pp + n] += dy * H[p + N + n]
        s_b = zero
        for n in range(N):  # B enters through Δ·u·B
            dB[pp + n] += g[n] * dut[t]
            s_b += g[n] * Bt[q0 + n]
        s_a = zero
        for n in range(N):  # the decay exp(Δ·A): to A, to Δ, and on to h_{t-1}
            qn = g[n] * H[p + n] * DA[p + n]
            s_a += qn * A[e * N + n]
            gA[n] += qn * d
            g[n] = g[n] * DA[p + n]
        sbb[t] = s_b
        sab[t] = s_a


@njit(**_JIT)
def vector_backprop(dyb, dtb, dut, DA, H, A, e, Bt, Ct, ob, dB, dC, op, g, sbb, sab):
    """:func:`backprop` for N = 16 with g in a vector (the argument: its initial value); returns gA."""
    L = dtb.shape[0]
    Ae = vload(A, e * 16)
    gA = vzeros(H)
    for tt in range(L):
        t = L - 1 - tt
        dy = dyb[t]
        g = g + dy * vload(Ct, ob + t * 16)
        p = op + t * 16
        vstore(dC, p, vload(dC, p) + dy * vload(H, (t + 1) * 16))
        vstore(dB, p, vload(dB, p) + dut[t] * g)
        sbb[t] = vsum(g * vload(Bt, ob + t * 16))
        dA_t = vload(DA, t * 16)
        q = g * vload(H, t * 16) * dA_t
        sab[t] = vsum(q * Ae)
        gA = gA + dtb[t] * q
        g = g * dA_t
    return gA
