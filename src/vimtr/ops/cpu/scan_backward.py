"""The selective scan backward kernel (numba, CPU).

The forward keeps nothing: per row the backward recomputes the decays and the states into an (L+1)·N
buffer (12.6 KB for Vim, cache resident) with the forward's own recurrence, then runs the backward
recurrence (:mod:`vimtr.ops.cpu.recurrence`). No (B, E, L, N) state tensor is stored at any time, for
about one extra forward of work. Everything that is per token rather than per state (the gate, the
softplus derivative, the D path, the sums into du and dΔ) runs in passes over L outside the recurrences.

Reductions over channels (dB, dC) go to one partial buffer per thread, those over the batch (dA, dD,
d delta_bias) to per-row buffers; both are summed afterwards in a fixed order, so the gradients do not
depend on the thread count.
"""
from __future__ import annotations

import numpy as np
import torch
from numba import njit

from vimtr.ops.cpu.recurrence import (backprop, decays, states, tree_sums, vector_backprop, vector_decays,
                                      vector_states_kept)
from vimtr.ops.cpu.rows import load_row, store_row
from vimtr.ops.cpu.runtime import FM_KERNEL, empty, run_rows, sigmoid, span, threads_for
from vimtr.ops.cpu.scan_forward import delta_row, prepare
from vimtr.ops.cpu.vec16 import vload, vstore, vzeros

_JIT = dict(nogil=True, fastmath=FM_KERNEL, error_model="numpy", cache=True)


@njit(nogil=True, error_model="numpy", cache=True)
def _row_inputs(i, E, L, u, su, dl, sd, a_ok, D, zf, sz, bias, has_D, has_z, has_bias, use_softplus, go, sg,
                dtb, xb, ub, gb, zb):
    """A row's inputs: Δ into dtb, the softplus input into xb, u, the incoming gradient and z into their
    row buffers. Returns (b, e, D[e], nbad)."""
    dtype = dtb.dtype
    zero = dtype.type(0)
    b = i // E
    e = i - b * E
    bse = bias[e] if has_bias else zero
    De = D[e] if has_D else zero
    d0 = sd[0] + b * sd[1] + e * sd[2]
    nbad = delta_row(dl, d0, sd[3], bse, use_softplus, dtb)
    if not a_ok:
        nbad += dtype.type(1)
    if use_softplus:
        load_row(dl, d0, sd[3], xb)
        for t in range(L):
            xb[t] = xb[t] + bse
    load_row(u, su[0] + b * su[1] + e * su[2], su[3], ub)
    load_row(go, sg[0] + b * sg[1] + e * sg[2], sg[3], gb)
    if has_z:
        load_row(zf, sz[0] + b * sz[1] + e * sz[2], sz[3], zb)
    return b, e, De, nbad


def _build_backward(vector: bool):
    """The backward kernel over rows [lo, hi) (``vector``: N = 16 in registers). du, dΔ, dz go out through
    the strides sgo (shared by the three, contiguous (B, E, L) tensors); channel sums into this chunk's
    slice of dB_part, dC_part (flat (chunks, B, L, N)), in processing order."""

    @njit(**_JIT)
    def backward(lo, hi, chunk, L, N, u, su, dl, sd, A, a, a_ok, Bt, Ct, D, zf, sz, bias, has_D, has_z, has_bias,
                 use_softplus, go, sg, dlast, has_dlast, sgo, du, ddl, dz, dA_rows, dD_rows, dbias_rows,
                 dB_part, dC_part):
        E = a.shape[0] // N
        Bn = dD_rows.shape[0]
        dtype = dD_rows.dtype
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
        H = np.empty((L + 1) * N, dtype)  # H[N(t+1):] = h_t, H[:N] = 0
        DA = np.empty(L * N, dtype)       # decays exp(Δ_t·A)
        Lp = -(-L // 16) * 16
        P = np.empty(Lp * 16 if vector else 0, dtype)
        ys = np.empty(Lp if vector else 0, dtype)
        g = np.empty(N, dtype)
        gA = np.empty(N, dtype)
        for i in range(lo, hi):
            b, e, De, nbad = _row_inputs(i, E, L, u, su, dl, sd, a_ok, D, zf, sz, bias, has_D, has_z, has_bias,
                                         use_softplus, go, sg, dtb, xb, ub, gb, zb)
            ob = b * L * N                 # token 0 of batch b in Bt, Ct
            op = (chunk * Bn + b) * L * N  # token 0 of batch b in this chunk's dB_part, dC_part
            # Decays, then the row's states again with the forward's recurrence (and y for dz).
            if vector:
                vector_decays(dtb, a, e, nbad, DA)
                vector_states_kept(DA, ub, dtb, a, e, Bt, Ct, ob, H, P)
                if has_z:
                    tree_sums(P, ys, yb)
            else:
                decays(dtb, a, e, N, nbad, DA)
                states(DA, ub, dtb, Bt, Ct, ob, N, H, yb)
            for t in range(L):
                dut[t] = dtb[t] * ub[t]
            if has_z:
                for t in range(L):
                    zz = zb[t]
                    sgm = sigmoid(zz)
                    dyb[t] = gb[t] * zz * sgm
                    dzb[t] = gb[t] * (yb[t] + De * ub[t]) * sgm * (one + zz * (one - sgm))
            else:
                for t in range(L):
                    dyb[t] = gb[t]
            # The backward recurrence, t = L-1 .. 0.
            r0 = (b * E + e) * N
            if vector:
                g16 = vload(dlast, r0) if has_dlast else vzeros(H)
                vstore(dA_rows, r0, vector_backprop(dyb, dtb, dut, DA, H, A, e, Bt, Ct, ob, dB_part, dC_part, op,
                                                    g16, sbb, sab))
            else:
                for n in range(N):
                    g[n] = dlast[r0 + n] if has_dlast else zero
                    gA[n] = zero
                backprop(dyb, dtb, dut, DA, H, A, e, Bt, Ct, ob, dB_part, dC_part, op, g, gA, sbb, sab)
                for n in range(N):
                    dA_rows[r0 + n] = gA[n]
            # Per token: du, dΔ (through the softplus), and the sums over the row for dD and d delta_bias.
            # dD's sum is a loop without stores: fused with the store into dub, it ran in one of two orders
            # picked by the heap addresses of these buffers (see "One order for every sum" in recurrence.py).
            for t in range(L):
                dub[t] = dyb[t] * De + sbb[t] * dtb[t]
            dD_acc = zero
            for t in range(L):
                dD_acc += dyb[t] * ub[t]
            for t in range(L):
                ddb[t] = sab[t] + sbb[t] * ub[t]
            if use_softplus:
                for t in range(L):
                    x = xb[t]
                    ddb[t] = ddb[t] * sigmoid(x) if x <= thr else ddb[t]
            db_acc = zero
            for t in range(L):
                db_acc += ddb[t]
            o0 = sgo[0] + b * sgo[1] + e * sgo[2]
            store_row(du, o0, sgo[3], dub)
            store_row(ddl, o0, sgo[3], ddb)
            if has_z:
                store_row(dz, o0, sgo[3], dzb)
            dD_rows[b, e] = dD_acc
            dbias_rows[b, e] = db_acc

    return backward


_backward_vector = _build_backward(vector=True)
_backward_generic = _build_backward(vector=False)


def backward_kernel(N: int):
    """The compiled backward for state count N (the vector kernel for N = 16)."""
    return _backward_vector if N == 16 else _backward_generic


def backward(saved, delta_softplus, reverse, dout, dlast):
    """Gradients (du, ddelta, dA, dB, dC, dD, dz, d delta_bias) of the scan for the saved inputs, None for
    absent optional ones."""
    u, delta, A, B, C, D, z, delta_bias = saved
    batch, E, L = u.shape
    N = A.shape[1]
    dtype = u.dtype
    (uf, su, df, sd, a, a_ok, Bt, Ct, Dn, zf, sz, bn, has_D, has_z, has_bias) = prepare(
        u, delta, A, B, C, D, z, delta_bias, reverse)
    gf, sg = span(dout, reverse)
    has_dlast = dlast is not None
    dl = dlast.detach().to(dtype).contiguous().view(-1).numpy() if has_dlast else empty(a.dtype)
    du = torch.empty(batch, E, L, dtype=dtype)
    ddelta = torch.empty(batch, E, L, dtype=dtype)
    dz = torch.empty(batch, E, L, dtype=dtype) if has_z else torch.empty(0, dtype=dtype)
    _, sgo = span(du, reverse)
    dA_rows = torch.empty(batch, E, N, dtype=dtype)
    dD_rows = torch.empty(batch, E, dtype=dtype)
    dbias_rows = torch.empty(batch, E, dtype=dtype)
    rows, work = batch * E, 2 * batch * E * L * N
    nt = threads_for(rows, work)
    dB_part = torch.zeros(nt, batch, L, N, dtype=dtype)
    dC_part = torch.zeros(nt, batch, L, N, dtype=dtype)
    An = A.detach().contiguous().view(-1).numpy()
    outs = (du.view(-1).numpy(), ddelta.view(-1).numpy(), dz.view(-1).numpy(), dA_rows.view(-1).numpy(),
            dD_rows.numpy(), dbias_rows.numpy(), dB_part.view(-1).numpy(), dC_part.view(-1).numpy())
    kernel = backward_kernel(N)

    def call(lo, hi, chunk):
        kernel(lo, hi, chunk, L, N, uf, su, df, sd, An, a, a_ok, Bt, Ct, Dn, zf, sz, bn, has_D, has_z, has_bias,
               bool(delta_softplus), gf, sg, dl, has_dlast, sgo, *outs)

    used = run_rows(call, rows, work)
    assert used == nt  # the partial sums were sized for this many chunks
    dB = dB_part.sum(0).transpose(1, 2)
    dC = dC_part.sum(0).transpose(1, 2)
    if reverse:
        dB, dC = dB.flip(-1), dC.flip(-1)
    return (du, ddelta, dA_rows.sum(0), dB, dC, dD_rows.sum(0) if has_D else None,
            dz if has_z else None, dbias_rows.sum(0) if has_bias else None)
