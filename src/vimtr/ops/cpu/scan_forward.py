"""The selective scan forward kernel (numba, CPU) and what it shares with the backward: Δ per row, the
kernel arguments from tensors, the per-group channel sums of Δ.

Per (batch, channel) row, in passes over its L tokens: Δ (load, + delta_bias, softplus, and a check that
the fast exp is valid), the recurrence (:mod:`vimtr.ops.cpu.recurrence`, compiled into this kernel: see
the package docstring on numba's cache), then D·u and the SiLU(z) gate, and the row written out. Each
pass vectorises over tokens; fused into the recurrence they would not
(softplus, D and the gate left to torch instead made the call 1.7-1.9x slower at Vim-Ti batch 8).

Operands whose rows are not contiguous (the channel-last views Vim's projections produce) are moved
through tiles of :data:`vimtr.ops.cpu.rows.TILE` channels: a token's 16 values are one 64-byte read,
where reading the rows element by element cost ~4x as much. A reversed scan reads every row through
negated token strides and runs the same loop (iterating the recurrence backwards instead was 35-43%
slower: LLVM no longer sees a plain induction variable).
"""
from __future__ import annotations

import math

import numpy as np
import torch
from numba import njit

from vimtr.ops.cpu.recurrence import (decays, states, tree_sums, vector_decays, vector_states,
                                      vector_states_fast)
from vimtr.ops.cpu.rows import (TILE, add_row, add_row_reversed, emit_gated_row, emit_row, load_row, load_tile,
                                reverse_row, store_row, store_tile)
from vimtr.ops.cpu.runtime import FM_KERNEL, LOG2E, empty, no_span, out_like, run_rows, sigmoid, softplus, span
from vimtr.ops.cpu.vec16 import vstore

_JIT = dict(nogil=True, fastmath=FM_KERNEL, error_model="numpy", cache=True)


@njit(nogil=True, error_model="numpy", cache=True)
def count_positive(a):
    """How many entries of A are not ≤ 0 (NaN counts): 0 means Δ·A ≤ 0 wherever Δ ≥ 0."""
    bad = 0
    for i in range(a.shape[0]):
        if not (a[i] <= 0):
            bad += 1
    return bad


@njit(**_JIT)
def delta_row(dl, off, stride, bse, use_softplus, dtb):
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
    if use_softplus:
        for t in range(L):
            dtb[t] = softplus(dtb[t])
    bad = zero  # a float count: a float reduction vectorises next to float compares, an int64 one did not
    for t in range(L):
        x = dtb[t]
        bad += zero if (x >= zero) & (x < inf) else one
    return bad


def _build_forward(vector: bool):
    """The forward kernel over rows [lo, hi) (row i is (b, e) = divmod(i, E)); ``vector``: the N = 16
    recurrence in registers (:func:`vimtr.ops.cpu.recurrence.vector_states`), else the generic one."""

    @njit(**_JIT)
    def forward(lo, hi, L, N, u, su, dl, sd, a, a_ok, Bt, Ct, D, zf, sz, bias, has_D, has_z, has_bias, use_softplus,
                of, so, last, accumulate, scale, dof, sdo, has_dout, rev, gsum, has_gsum, og, sog, has_og):
        E = a.shape[0] // N
        dtype = last.dtype
        zero = dtype.type(0)
        one = dtype.type(1)
        # Operands whose rows are not contiguous (channel-last views) go through tiles of TILE rows; rows
        # with token stride 1 are read in place, stride -1 (a reversed contiguous row) through a row buffer.
        tile_u, tile_d = abs(su[3]) != 1, abs(sd[3]) != 1
        # With out_gate the output goes row by row (any stride) through emit_gated_row.
        tile_z, tile_o = has_z and abs(sz[3]) != 1, abs(so[3]) != 1 and not has_og
        Ut = np.empty(TILE * L, dtype)
        Dt = np.empty(TILE * L, dtype)
        Zt = np.empty(TILE * L, dtype)
        Yt = np.empty(TILE * L, dtype)
        dtb = np.empty(L, dtype)
        zb = np.empty(L, dtype)
        ub = np.empty(L, dtype)
        yb = np.empty(L, dtype)
        gb = np.empty(L, dtype)
        Lp = -(-L // 16) * 16  # the vector path's scratch: one row, padded to whole 16-token groups
        P = np.empty(Lp * 16 if vector else 0, dtype)
        ys = np.empty(Lp if vector else 0, dtype)
        DA = np.empty(0 if vector else L * N, dtype)
        H = np.empty(0 if vector else (L + 1) * N, dtype)
        i = lo
        while i < hi:
            b = i // E
            e0 = i - b * E
            gw = min(TILE, E - e0, hi - i)  # rows e0 .. e0+gw-1 of batch b
            if tile_u:
                load_tile(u, su[0] + b * su[1] + e0 * su[2], su[2], su[3], gw, L, Ut)
            if tile_d:
                load_tile(dl, sd[0] + b * sd[1] + e0 * sd[2], sd[2], sd[3], gw, L, Dt)
            if tile_z:
                load_tile(zf, sz[0] + b * sz[1] + e0 * sz[2], sz[2], sz[3], gw, L, Zt)
            for w in range(gw):
                e = e0 + w
                # Δ for the whole row first: a vectorisable pass, and it tells whether the fast exp is valid.
                bse = bias[e] if has_bias else zero
                if tile_d:
                    nbad = delta_row(Dt, w * L, 1, bse, use_softplus, dtb)
                else:
                    nbad = delta_row(dl, sd[0] + b * sd[1] + e * sd[2], sd[3], bse, use_softplus, dtb)
                if has_dout:
                    store_row(dof, sdo[0] + b * sdo[1] + e * sdo[2], sdo[3], dtb)
                if has_gsum:
                    if rev:  # dtb is in scan order: from the last token
                        add_row_reversed(gsum[b, e // TILE], dtb)
                    else:
                        add_row(gsum[b, e // TILE], dtb)
                if not a_ok:
                    nbad += one
                if tile_u:
                    ur = Ut[w * L:(w + 1) * L]
                else:
                    u0 = su[0] + b * su[1] + e * su[2]
                    if su[3] == 1:
                        ur = u[u0:u0 + L]  # read in place
                    else:
                        load_row(u, u0, su[3], ub)
                        ur = ub
                o0 = so[0] + b * so[1] + e * so[2]
                in_place = not tile_o and so[3] == 1 and not accumulate and scale == one and not has_og
                if tile_o:
                    yr = Yt[w * L:(w + 1) * L]
                elif in_place:
                    yr = of[o0:o0 + L]  # write in place (no emit pass)
                else:
                    yr = yb
                ob = b * L * N
                if vector:
                    if nbad == 0:  # Δ·A ≤ 0 everywhere: the decays in registers, with the fast exp
                        h = vector_states_fast(P, ur, dtb, a, e, Bt, Ct, ob, P, P)
                    else:  # any input: the decays first (one flat exp pass that handles everything)
                        vector_decays(dtb, a, e, nbad, P)
                        h = vector_states(P, ur, dtb, a, e, Bt, Ct, ob, P, P)
                    tree_sums(P, ys, yr)
                    vstore(last, (b * E + e) * 16, h)
                else:
                    decays(dtb, a, e, N, nbad, DA)
                    states(DA, ur, dtb, Bt, Ct, ob, N, H, yr)
                    for n in range(N):
                        last[(b * E + e) * N + n] = H[L * N + n]
                # Skip connection and gate, a second vectorisable pass over the row.
                De = D[e] if has_D else zero
                if has_z:
                    if tile_z:
                        zr = Zt[w * L:(w + 1) * L]
                    else:
                        load_row(zf, sz[0] + b * sz[1] + e * sz[2], sz[3], zb)
                        zr = zb
                    for t in range(L):
                        zz = zr[t]
                        yr[t] = (yr[t] + De * ur[t]) * (zz * sigmoid(zz))
                elif has_D:
                    for t in range(L):
                        yr[t] = yr[t] + De * ur[t]
                if has_og:
                    g0 = sog[0] + b * sog[1] + e * sog[2]
                    if so[3] == -1 and sog[3] == -1:
                        # Reversed scan of contiguous rows: put the result in token order (a vectorised
                        # reversal in L1) and gate in token order, reading the gate row in place. The
                        # gate's SiLU must stay in a unit-stride loop, or it is scalar (measured 2.4x).
                        reverse_row(yr, gb)
                        emit_gated_row(of, o0 - (L - 1), 1, gb, og[g0 - (L - 1):g0 + 1], accumulate, scale)
                    else:
                        load_row(og, g0, sog[3], gb)
                        emit_gated_row(of, o0, so[3], yr, gb, accumulate, scale)
                elif not tile_o and not in_place:
                    emit_row(of, o0, so[3], yr, accumulate, scale)
            if tile_o:
                store_tile(of, so[0] + b * so[1] + e0 * so[2], so[2], so[3], gw, L, Yt, accumulate, scale)
            i += gw

    return forward


_forward_vector = _build_forward(vector=True)
_forward_generic = _build_forward(vector=False)


def forward_kernel(N: int):
    """The compiled forward for state count N (the vector kernel for N = 16)."""
    return _forward_vector if N == 16 else _forward_generic


# -------------------------------------------------------------------------------- tensors <-> kernels
def prepare(u, delta, A, B, C, D, z, delta_bias, reverse):
    """Kernel arguments shared by the forward and the backward (flat arrays for everything indexed by
    state; see :mod:`vimtr.ops.cpu.recurrence`)."""
    npdt = np.float32 if u.dtype == torch.float32 else np.float64
    uf, su = span(u, reverse)
    df, sd = span(delta, reverse)
    a = A.detach() * float(LOG2E) if u.dtype == torch.float32 else A.detach()
    a = a.contiguous().view(-1).numpy()
    a_ok = count_positive(a) == 0  # with Δ ≥ 0 (checked per row in the kernel) the fast exp is valid
    if reverse:
        B, C = B.flip(-1), C.flip(-1)
    Bt = B.detach().transpose(1, 2).contiguous().view(-1).numpy()
    Ct = C.detach().transpose(1, 2).contiguous().view(-1).numpy()
    Dn = D.detach().contiguous().numpy() if D is not None else empty(npdt)
    zf, sz = span(z, reverse) if z is not None else no_span(npdt)
    bn = delta_bias.detach().contiguous().numpy() if delta_bias is not None else empty(npdt)
    return (uf, su, df, sd, a, a_ok, Bt, Ct, Dn, zf, sz, bn, D is not None, z is not None,
            delta_bias is not None)


def channel_groups(batch, E, L, dtype, wanted):
    """Partial channel sums of Δ, one per group of TILE channels: each group is summed by one thread in
    channel order and the groups are then summed by torch, so the result does not depend on the thread
    count (run_rows keeps groups whole)."""
    if not wanted:
        return np.zeros((0, 0, 0), dtype)
    return np.zeros((batch, -(-E // TILE), L), dtype)


def forward(u, delta, A, B, C, D, z, delta_bias, delta_softplus, reverse=False, out=None, accumulate=False,
            out_scale=1.0, delta_out=None, delta_sum_out=None, out_gate=None):
    """Run the forward kernel: (out, last_state). Arguments as :func:`vimtr.ops.cpu.scan.selective_scan_cpu`
    (checked there); compute-dtype tensors."""
    batch, E, L = u.shape
    N = A.shape[1]
    if out is None:
        out = out_like(u)
    last = torch.empty(batch, E, N, dtype=u.dtype)
    (uf, su, df, sd, a, a_ok, Bt, Ct, Dn, zf, sz, bn, has_D, has_z, has_bias) = prepare(
        u, delta, A, B, C, D, z, delta_bias, reverse)
    of, so = span(out, reverse)
    dof, sdo = span(delta_out, reverse) if delta_out is not None else no_span(of.dtype)
    ogf, sog = span(out_gate, reverse) if out_gate is not None else no_span(of.dtype)
    lst = last.view(-1).numpy()
    kernel = forward_kernel(N)
    scale = of.dtype.type(out_scale)
    groups = channel_groups(batch, E, L, of.dtype, delta_sum_out is not None)

    def call(lo, hi, chunk):
        kernel(lo, hi, L, N, uf, su, df, sd, a, a_ok, Bt, Ct, Dn, zf, sz, bn, has_D, has_z, has_bias,
               bool(delta_softplus), of, so, lst, bool(accumulate), scale, dof, sdo, delta_out is not None,
               bool(reverse), groups, delta_sum_out is not None, ogf, sog, out_gate is not None)

    run_rows(call, batch * E, batch * E * L * N, groups_of=(E, TILE))
    if delta_sum_out is not None:
        delta_sum_out += torch.from_numpy(groups).sum(1).to(delta_sum_out.dtype)
    return out, last


@njit(nogil=True, error_model="numpy", cache=True)
def _delta_rows(lo, hi, dl, sd, bias, has_bias, use_softplus, of, so, E, L, gsum, has_gsum):
    dtb = np.empty(L, of.dtype)
    for i in range(lo, hi):
        b = i // E
        e = i - b * E
        delta_row(dl, sd[0] + b * sd[1] + e * sd[2], sd[3], bias[e] if has_bias else of.dtype.type(0),
                  use_softplus, dtb)
        store_row(of, so[0] + b * so[1] + e * so[2], so[3], dtb)
        if has_gsum:
            add_row(gsum[b, e // TILE], dtb)


def delta_only(delta, delta_bias, delta_softplus, delta_sum_out):
    """Δ as the forward kernel computes it (and its channel sums added to ``delta_sum_out``, if given),
    in delta's layout when delta is dense. Arguments checked by the caller."""
    Bn, E, L = delta.shape
    out = out_like(delta)
    df, sd = span(delta)
    of, so = span(out)
    bn = delta_bias.detach().to(delta.dtype).contiguous().numpy() if delta_bias is not None else empty(of.dtype)
    groups = channel_groups(Bn, E, L, of.dtype, delta_sum_out is not None)
    run_rows(lambda lo, hi, chunk: _delta_rows(lo, hi, df, sd, bn, delta_bias is not None, bool(delta_softplus),
                                               of, so, E, L, groups, delta_sum_out is not None),
             Bn * E, Bn * E * L, groups_of=(E, TILE))
    if delta_sum_out is not None:
        delta_sum_out += torch.from_numpy(groups).sum(1).to(delta_sum_out.dtype)
    return out
