"""Running the kernels in Triton's interpreter (``TRITON_INTERPRET=1``): CPU tensors, numpy underneath.

The interpreter evaluates ``tl.associative_scan`` with a user combine function one *element* at a time
(``ScanOps.generic_scan``: a Python call per element of the whole tile), which is ~85% of an interpreted
selective scan and makes a (2, 8, 16, 37) scan take seconds. A combine function is elementwise by
Triton's contract, so calling it once per step along the scan axis, on the whole slice of the other axes,
computes exactly the same values in the same order. :func:`vectorise_scan` installs that evaluation in
the interpreter (process-wide; a pure speed-up for every interpreted kernel, not a change of semantics),
and only where the interpreter still has the method it replaces with the same signature: on a Triton whose
internals differ it does nothing and the kernels run, slower, through Triton's own code.
"""
from __future__ import annotations

import inspect
import os

import numpy as np

_TRUE = ("1", "true", "yes", "on")
# Triton's own ScanOps.generic_scan, kept when replaced (tests compare the two).
replaced: dict = {}


def interpret_requested() -> bool:
    """Whether ``TRITON_INTERPRET`` asks for the interpreter now (Triton reads it the same way)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in _TRUE


def interpretable(fn):
    """``fn``, a function of ``triton.language`` that kernels call, made callable from interpreted kernels.

    Triton decides interpreted or compiled when a function is decorated. ``triton.language``'s own @jit
    functions (``tl.sum``, ``tl.zeros``, ``tl.sigmoid``) are decorated when triton is first imported,
    which torch or timm often do before anyone sets ``TRITON_INTERPRET`` (``import timm`` reaches
    torch._dynamo, which imports triton): they are then compiled-mode functions that an interpreted kernel
    cannot call. Kernels call them through this: in a process that interprets, a compiled-mode one is
    wrapped as the interpreter's own function of the same Python source; otherwise ``fn`` is returned.
    """
    if not interpret_requested():
        return fn
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction
    return InterpretedFunction(fn.fn) if isinstance(fn, JITFunction) else fn


def _scan_by_steps(self, input):
    """``ScanOps.generic_scan`` evaluated one step of the scan axis at a time (see the module docstring)."""
    steps = [np.moveaxis(arg.handle.data, self.axis, 0) for arg in input]
    outs = [np.empty_like(s) for s in steps]
    acc = None
    for i in range(steps[0].shape[0]):
        cur = tuple(self.to_tensor(s[i], arg.dtype) for s, arg in zip(steps, input))
        if acc is None:
            acc = cur
        else:
            res = self.combine_fn.fn(*acc, *cur)
            acc = res if isinstance(res, tuple) else (res,)
        for o, a in zip(outs, acc):
            o[i] = a.handle.data.reshape(o[i].shape) if hasattr(a, "handle") else a
    return [self.to_tensor(np.moveaxis(o, 0, self.axis), arg.dtype) for o, arg in zip(outs, input)]


def vectorise_scan() -> bool:
    """Install :func:`_scan_by_steps` as the interpreter's generic scan. True if installed (or already)."""
    try:
        from triton.runtime import interpreter
    except ImportError:
        return False
    ops = getattr(interpreter, "ScanOps", None)
    current = getattr(ops, "generic_scan", None)
    if current is None:
        return False
    if current is _scan_by_steps:
        return True
    if list(inspect.signature(current).parameters) != ["self", "input"] or not hasattr(ops, "to_tensor"):
        return False
    replaced["generic_scan"] = current
    ops.generic_scan = _scan_by_steps
    return True
