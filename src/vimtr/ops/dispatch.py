"""The one place that picks an op's implementation, from the tensors' device and dtype, the grad mode and
the backend setting (``VIMTR_SCAN`` or :func:`set_scan_backend`):

    reference   plain PyTorch everywhere (:mod:`vimtr.ops.reference`)
    cpu         the numba kernels (:mod:`vimtr.ops.cpu`) for CPU tensors
    cuda        mamba_ssm's CUDA selective scan (``pip install 'vimtr[cuda]'``); other ops: the reference
    triton      the Triton kernels of :mod:`vimtr.ops.triton`, where this build has them
    auto        (default) cpu for CPU tensors; for GPU tensors cuda, else triton, else the reference

An implementation is found by name: ``<op>_cpu`` in :mod:`vimtr.ops.cpu`, ``<op>_triton`` in
:mod:`vimtr.ops.triton`, ``<op>_ref`` in :mod:`vimtr.ops.reference`; an op a backend lacks falls back to
its reference. Every implementation takes the reference's arguments. Where the CPU kernels compute only
some dtypes (the mixer and the norm: float32), other inputs take the reference, and each CPU kernel picks
its inference or autograd form from the grad mode, so callers never choose.
"""
from __future__ import annotations

import contextlib
import importlib
import os

import torch

from vimtr.ops import reference
from vimtr.ops.reference import add_delta_sum, delta_used

BACKENDS = ("auto", "reference", "cpu", "cuda", "triton")
_override: str | None = None
_modules: dict = {}  # "cpu" / "triton" -> the imported module, or None where it cannot be imported


def get_scan_backend() -> str:
    """The backend requested now: :func:`set_scan_backend`'s value, else ``$VIMTR_SCAN``, else ``auto``."""
    name = _override if _override is not None else os.environ.get("VIMTR_SCAN", "auto").strip().lower()
    if name not in BACKENDS:
        raise ValueError(f"VIMTR_SCAN={name!r} is not a scan backend; choose one of {', '.join(BACKENDS)}")
    return name


def set_scan_backend(name: str | None) -> str | None:
    """Choose the backend for this process (``None`` goes back to ``$VIMTR_SCAN``). Returns the old value."""
    global _override
    if name is not None and name not in BACKENDS:
        raise ValueError(f"scan backend {name!r} is unknown; choose one of {', '.join(BACKENDS)}")
    old, _override = _override, name
    return old


@contextlib.contextmanager
def scan_backend(name: str | None):
    """``with scan_backend("reference"): ...`` — the same as :func:`set_scan_backend`, for a block of code."""
    old = set_scan_backend(name)
    try:
        yield
    finally:
        set_scan_backend(old)


# --------------------------------------------------------------------------------- implementations
def _module(kind: str):
    """vimtr.ops.cpu (needs numba) or vimtr.ops.triton (needs triton), imported once; None if it cannot be."""
    if kind not in _modules:
        try:
            _modules[kind] = importlib.import_module(f"vimtr.ops.{kind}")
        except ImportError:
            _modules[kind] = None
    return _modules[kind]


def _triton_scan():
    return getattr(_module("triton"), "selective_scan_triton", None)


def _cpu_scan():
    cpu = _module("cpu")
    return None if cpu is None else cpu.selective_scan_cpu


def _mamba_ssm_scan():
    if "mamba_ssm" not in _modules:
        _modules["mamba_ssm"] = _load_mamba_ssm_scan()
    return _modules["mamba_ssm"]


def _load_mamba_ssm_scan():
    try:
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn  # type: ignore
    except Exception:  # ImportError, or a build whose CUDA extension fails to load
        return None

    def selective_scan_cuda(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                            return_last_state=False, reverse=False, delta_sum_out=None):
        """mamba_ssm's kernel with the two extensions it lacks done in torch around it."""
        if delta_sum_out is not None:
            add_delta_sum(delta_sum_out, delta_used(delta, delta_bias, delta_softplus))
        if reverse:
            u, delta, B, C, z = (None if t is None else t.flip(-1) for t in (u, delta, B, C, z))
        res = selective_scan_fn(u, delta, A, B, C, D=D, z=z, delta_bias=delta_bias, delta_softplus=delta_softplus,
                                return_last_state=return_last_state)
        if reverse:
            res = (res[0].flip(-1), res[1]) if return_last_state else res.flip(-1)
        return res

    return selective_scan_cuda


def _triton_usable(device: torch.device) -> bool:
    """The Triton kernels run on ``device`` here: triton imports, and the tensors are CUDA ones (or CPU ones
    under ``TRITON_INTERPRET=1``, fixed for the process when the kernels first load)."""
    return _triton_scan() is not None and _module("triton").available(device)


def _mamba_ssm_works(device: torch.device):
    """mamba_ssm's scan if it imports *and* a tiny call on ``device`` succeeds (once per process): a build
    whose CUDA extension does not match the driver or GPU imports fine and fails at the first call."""
    key = ("mamba_ssm_ok", str(device))
    if key not in _modules:
        fn, ok = _mamba_ssm_scan(), False
        if fn is not None:
            try:
                x = torch.ones(1, 2, 3, device=device)
                fn(x, x, -torch.ones(2, 4, device=device), torch.ones(1, 4, 3, device=device),
                   torch.ones(1, 4, 3, device=device))
                ok = True
            except Exception:  # noqa: BLE001 - any failure means: do not pick it automatically
                ok = False
        _modules[key] = fn if ok else None
    return _modules[key]


def resolve_scan(device: torch.device):
    """Return (backend name, selective scan function) for tensors on ``device``."""
    name = get_scan_backend()
    if name == "reference":
        return "reference", reference.selective_scan_ref
    if name == "cuda":
        fn = _mamba_ssm_scan()
        if fn is None:
            raise RuntimeError("VIMTR_SCAN=cuda needs the mamba_ssm CUDA kernels: pip install 'vimtr[cuda]' "
                               "(mamba-ssm) on a machine with a GPU, or use VIMTR_SCAN=auto")
        if device.type != "cuda":
            raise RuntimeError(f"VIMTR_SCAN=cuda but the tensors are on {device}; move the model to a GPU "
                               "or use VIMTR_SCAN=auto")
        return "cuda", fn
    if name == "triton":
        fn = _triton_scan()
        if fn is None:
            raise RuntimeError("VIMTR_SCAN=triton: the Triton kernels are not available in this build "
                               "(vimtr.ops.triton with selective_scan_triton could not be imported; it needs the "
                               "triton package); use VIMTR_SCAN=auto")
        if not _triton_usable(device):
            raise RuntimeError(f"VIMTR_SCAN=triton but the Triton kernels cannot run on {device} here: they need "
                               "the triton package (Linux torch wheels ship it) and CUDA tensors (CPU tensors "
                               "only with TRITON_INTERPRET=1 set before the kernels first load); use "
                               "VIMTR_SCAN=auto")
        return "triton", fn
    if name == "cpu":
        fn = _cpu_scan()
        if fn is None:
            raise RuntimeError("VIMTR_SCAN=cpu: the fast CPU kernels are not available in this build "
                               "(vimtr.ops.cpu could not be imported; it needs numba); use VIMTR_SCAN=reference "
                               "or auto")
        if device.type != "cpu":
            raise RuntimeError(f"VIMTR_SCAN=cpu but the tensors are on {device}; use VIMTR_SCAN=auto")
        return "cpu", fn
    # auto
    if device.type == "cuda":
        fn = _mamba_ssm_works(device)
        if fn is not None:
            return "cuda", fn
        if _triton_usable(device):
            return "triton", _triton_scan()
    elif device.type == "cpu":
        fn = _cpu_scan()
        if fn is not None:
            return "cpu", fn
    return "reference", reference.selective_scan_ref


def _implementation(op: str, device: torch.device, cpu_fits: bool, triton_fits: bool = True):
    """``op``'s implementation for the backend that serves ``device``; ``cpu_fits``: the inputs are what
    the CPU kernel computes (else the CPU backend serves them with the reference); ``triton_fits``: likewise
    for the Triton kernels when ``auto`` chose them (an explicit ``VIMTR_SCAN=triton`` raises instead)."""
    backend, _ = resolve_scan(device)
    fn = None
    if backend == "cpu" and cpu_fits:
        fn = getattr(_module("cpu"), f"{op}_cpu")
    elif backend == "triton" and (triton_fits or get_scan_backend() == "triton"):
        fn = getattr(_module("triton"), f"{op}_triton", None)
    return fn or getattr(reference, f"{op}_ref")


def _float32_cpu(*tensors) -> bool:
    """Float32 CPU tensors, outside CPU autocast (under it the mixer's matmuls would run in bf16)."""
    return not torch.is_autocast_enabled("cpu") and all(
        t is None or (t.device.type == "cpu" and t.dtype == torch.float32) for t in tensors)


_TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# ---------------------------------------------------------------------------------------- the ops
def selective_scan_fn(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                      return_last_state=False, reverse=False, delta_sum_out=None):
    """The selective scan through the chosen backend: mamba_ssm's ``selective_scan_fn`` signature and
    semantics, plus ``reverse`` and ``delta_sum_out`` (see :func:`vimtr.ops.reference.selective_scan_ref`)."""
    backend, fn = resolve_scan(u.device)
    if backend == "triton" and get_scan_backend() == "auto":
        # auto chose Triton for this device: inputs its kernels do not take (float64, grouped B/C, ...) take
        # the reference instead of an error; VIMTR_SCAN=triton raises the kernels' own message.
        if _module("triton").unsupported(u, delta, A, B, C, D, z, delta_bias, delta_sum_out) is not None:
            fn = reference.selective_scan_ref
    return fn(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state, reverse=reverse,
              delta_sum_out=delta_sum_out)


def causal_conv1d_fn(x, weight, bias=None, activation: bool = True):
    """Causal depthwise conv1d (+ SiLU); the reference is one cuDNN/oneDNN call, fast on every device."""
    return _implementation("causal_conv1d", x.device, False)(x, weight, bias, activation)


def add_rms_norm_fn(hidden, residual, weight, eps: float, row_map=None):
    """Residual add + RMSNorm, what every Vim block starts with: (residual + hidden in float32, its RMSNorm
    in hidden's dtype); ``residual`` None in the first block. ``row_map`` (:class:`vimtr.ops.RowMap`):
    shorten both streams first, as the map says (the CPU kernel gathers and averages the rows as it reads
    them). See :func:`vimtr.ops.reference.add_rms_norm_ref`."""
    fits = _float32_cpu(hidden, residual, weight) and hidden.dim() == 3
    return _implementation("add_rms_norm", hidden.device, fits)(hidden, residual, weight, eps, row_map=row_map)


def bimamba_inner_fn(hidden, in_proj_weight, in_proj_bias, conv_weight, conv_bias, x_proj_weight, dt_proj_weight,
                     dt_proj_bias, A, D, conv_b_weight, conv_b_bias, x_proj_b_weight, dt_proj_b_weight,
                     dt_proj_b_bias, A_b, D_b, divide_out=False, delta_sum_out=None, return_aux=False,
                     decay_steps=None):
    """Vim's bidirectional Mamba mixer up to ``out_proj`` (see :func:`vimtr.ops.reference.bimamba_inner_ref`
    for the arguments): y (B, L, E), or (y, aux) with ``return_aux``. With ``decay_steps`` (scans spanning
    gaps) the reference composition runs, its scans on the chosen backend's kernel."""
    args = (hidden, in_proj_weight, in_proj_bias, conv_weight, conv_bias, x_proj_weight, dt_proj_weight,
            dt_proj_bias, A, D, conv_b_weight, conv_b_bias, x_proj_b_weight, dt_proj_b_weight, dt_proj_b_bias,
            A_b, D_b)
    fits = _float32_cpu(*args) and hidden.dim() == 3
    triton_fits = all(t is None or t.dtype in _TRITON_DTYPES for t in args)
    if decay_steps is not None:
        return reference.bimamba_inner_ref(*args, divide_out=divide_out, delta_sum_out=delta_sum_out,
                                           return_aux=return_aux, decay_steps=decay_steps)
    return _implementation("bimamba_inner", hidden.device, fits, triton_fits)(*args, divide_out=divide_out,
                                                                 delta_sum_out=delta_sum_out,
                                                                 return_aux=return_aux)
