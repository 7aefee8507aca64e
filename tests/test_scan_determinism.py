"""The CPU scan gives the same bits for the same inputs, call after call, whatever else the process has
allocated: its results must not depend on where a call's buffers (its scratch, the token-major copies of
B and C) happen to lie in the heap. A reassociable sum over the states in a loop that stores once made
them depend on it (LLVM ran a scalar or a vector copy of the loop depending on the distance between
pointers; see "One order for every sum" in vimtr/ops/cpu/recurrence.py): outputs moved by up to 4e-6
from one identical call to the next. No timings here."""
import numpy as np
import pytest
import torch

from vimtr.ops.cpu import recurrence, selective_scan_cpu

from conftest import scan_inputs

pytestmark = pytest.mark.usefixtures("one_thread")

B, E, L = 2, 32, 65
REPEATS = 200


def _call(x, cut, mode):
    """One scan on the first L - cut tokens (strided views of the same storage): the outputs, and for
    ``mode="backward"`` every input's gradient too."""
    def s(t):
        return t[:, :, :L - cut]
    u, delta, Bm, C, z = (s(x[k]) for k in ("u", "delta", "B", "C", "z"))
    if mode == "backward":
        leaves = [t.detach().clone().requires_grad_() for t in (u, delta, x["A"], Bm, C, x["D"], z, x["delta_bias"])]
        lu, ld, lA, lB, lC, lD, lz, lb = leaves
        y = selective_scan_cpu(lu, ld, lA, lB, lC, D=lD, z=lz, delta_bias=lb, delta_softplus=True)
        y.backward(s(x["dout"]))
        return [y.detach()] + [t.grad for t in leaves]
    with torch.no_grad():
        y, last = selective_scan_cpu(u, delta, x["A"], Bm, C, D=x["D"], z=z, delta_bias=x["delta_bias"],
                                     delta_softplus=True, return_last_state=True, reverse=mode == "reverse")
    return [y, last]


@pytest.mark.parametrize("mode", ["forward", "reverse", "backward"])
@pytest.mark.parametrize("n", [8, 16])  # the generic recurrence (any N) and the N = 16 one in registers
def test_repeated_identical_calls_are_bit_identical(n, mode):
    x = scan_inputs(B, E, L, n)
    x["dout"] = torch.randn(B, E, L, generator=torch.Generator().manual_seed(1))
    ref = _call(x, 0, mode)
    names = ["out", "last_state"] if mode != "backward" else ["out", "du", "ddelta", "dA", "dB", "dC", "dD", "dz",
                                                               "ddelta_bias"]
    for i in range(REPEATS):
        moved = [torch.randn(100 * (i % 17 + 1)) for _ in range(3)]  # the heap changes between calls
        _call(x, i % 7, mode)  # shorter rows: other sizes of scratch and copies, freed again
        got = _call(x, 0, mode)
        for name, a, b in zip(names, got, ref):
            assert torch.equal(a, b), (f"call {i + 1}: {name} differs from the first identical call by up to "
                                       f"{(a - b).abs().max().item():.3g}")
        del moved


# --------------------------------------------------- the recurrences, with their buffers placed by hand
# Which copy of a loop LLVM runs is decided by comparing the addresses of the arrays it stores to with
# those it loads from, so placing one buffer right after (or before) another in one allocation reproduces
# deterministically what the heap does only now and then.

def _placed(arrays, first, second, gap):
    """``arrays`` with ``second`` moved to lie ``gap`` elements after the end of ``first`` (one allocation)."""
    out = dict(arrays)
    a, b = arrays[first], arrays[second]
    buf = np.zeros(a.size + gap + b.size, a.dtype)
    buf[:a.size], buf[a.size + gap:] = a, b
    out[first], out[second] = buf[:a.size], buf[a.size + gap:]
    return out


def _row(n, seed=0):
    g = np.random.default_rng(seed)
    f = np.float32
    return dict(dtb=g.random(L, dtype=f), ur=g.standard_normal(L, dtype=f), a=-g.random(n, dtype=f) - f(0.1),
                Bt=g.standard_normal(B * L * n, dtype=f), Ct=g.standard_normal(B * L * n, dtype=f),
                DA=np.empty(L * n, f), H=np.empty((L + 1) * n, f), y=np.empty(L, f))


def _states(x, n, batch):
    recurrence.decays(x["dtb"], x["a"], 0, n, 0.0, x["DA"])
    recurrence.states(x["DA"], x["ur"], x["dtb"], x["Bt"], x["Ct"], batch * L * n, n, x["H"], x["y"])
    return x["y"].copy(), x["H"].copy()


@pytest.mark.parametrize("n", [8, 24, 40])  # below, between and above the vector loop's widths
@pytest.mark.parametrize("batch", [0, 1])
def test_forward_recurrence_does_not_depend_on_where_its_buffers_lie(n, batch):
    ref_y, ref_h = _states(_row(n), n, batch)
    # numba's negative-index wraparound makes LLVM check against one array-length past each load too, so
    # the distances that matter include ones near the row's batch offset in B and C.
    near = max(0, batch * L * n - n)
    for first, second in [("Bt", "H"), ("Ct", "H"), ("DA", "H"), ("H", "Bt"), ("H", "Ct"), ("H", "DA")]:
        for gap in sorted({0, 3, 8, 16, near, near + 8}):
            y, h = _states(_placed(_row(n), first, second, gap), n, batch)
            assert np.array_equal(y, ref_y), (f"N={n}, batch {batch}: y changes with {second} placed {gap} "
                                             f"floats after {first} (max diff {np.abs(y - ref_y).max():.3g})")
            assert np.array_equal(h, ref_h), f"N={n}, batch {batch}: the states change with {second} after {first}"


def _backprop_inputs(n, seed=0):
    g = np.random.default_rng(seed)
    f = np.float32
    r = lambda k: g.standard_normal(k, dtype=f)  # noqa: E731
    return dict(dyb=r(L), dtb=g.random(L, dtype=f), dut=r(L), DA=g.random(L * n, dtype=f), H=r((L + 1) * n),
                A=-g.random(n, dtype=f), Bt=r(B * L * n), Ct=r(B * L * n), dB=np.zeros(B * L * n, f),
                dC=np.zeros(B * L * n, f), g=r(n), gA=np.zeros(n, f), sbb=np.zeros(L, f), sab=np.zeros(L, f))


_BACKPROP_OUT = ("dB", "dC", "g", "gA", "sbb", "sab")


def _backprop(x, n, batch):
    o = batch * L * n
    recurrence.backprop(x["dyb"], x["dtb"], x["dut"], x["DA"], x["H"], x["A"], 0, x["Bt"], x["Ct"], o, x["dB"],
                        x["dC"], o, x["g"], x["gA"], x["sbb"], x["sab"])
    return [x[k].copy() for k in _BACKPROP_OUT]


@pytest.mark.parametrize("n", [8, 40])
@pytest.mark.parametrize("batch", [0, 1])
def test_backward_recurrence_does_not_depend_on_where_its_buffers_lie(n, batch):
    ref = _backprop(_backprop_inputs(n), n, batch)
    for first in ("H", "DA", "A", "Bt", "Ct", "dut"):
        for second in ("g", "gA", "dB", "dC"):
            for gap in (0, 8):
                got = _backprop(_placed(_backprop_inputs(n), first, second, gap), n, batch)
                for name, a, b in zip(_BACKPROP_OUT, got, ref):
                    assert np.array_equal(a, b), f"N={n}: {name} changes with {second} placed {gap} after {first}"
