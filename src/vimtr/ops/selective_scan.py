"""Selective scan (the Mamba SSM recurrence) and the one dispatch point that picks its implementation.

Semantics are those of mamba_ssm's ``selective_scan_ref`` (and of its CUDA kernel):

    Δ_t   = softplus(delta_t + delta_bias)            (if delta_softplus)
    h_t   = exp(Δ_t·A) ⊙ h_{t-1} + Δ_t·B_t·u_t         (per channel e, per state n)
    y_t   = Σ_n C_t[n]·h_t[n] + D·u_t
    out_t = y_t · SiLU(z_t)                            (if z is given)

Shapes: u, delta, z (B, E, L); A (E, N); B, C (B, N, L) ("variable", what Mamba uses); D, delta_bias (E,).

Which implementation runs is chosen by ``VIMTR_SCAN`` (``auto`` | ``reference`` | ``cpu`` | ``cuda``) or by
:func:`set_scan_backend`. ``auto`` takes the mamba_ssm CUDA kernel for GPU tensors when that package is
installed, the fast CPU kernel for CPU tensors when it is available, and the reference otherwise.
"""
from __future__ import annotations

import contextlib
import importlib.util
import os

import torch
import torch.nn.functional as F

BACKENDS = ("auto", "reference", "cpu", "cuda")
_override: str | None = None


def selective_scan_ref(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                       return_last_state=False):
    """Plain-PyTorch selective scan: differentiable, any device, the reference every kernel is tested against.

    The recurrence is sequential in L, vectorised over (batch, channel, state); the per-step work is a
    multiply-add, so the loop is exact (no reassociation) and matches mamba_ssm's reference bit for bit
    up to the order of the final sum over states.
    """
    dtype_in = u.dtype
    # fp32 for fp32/fp16/bf16 inputs (as mamba_ssm); float64 stays float64 so gradcheck is meaningful.
    acc = torch.promote_types(dtype_in, torch.float32)
    u, delta, A, B, C = (t.to(acc) for t in (u, delta, A, B, C))
    if delta_bias is not None:
        delta = delta + delta_bias[..., None].to(acc)
    if delta_softplus:
        delta = F.softplus(delta)  # threshold 20, as the CUDA kernel
    batch, dim, length = u.shape
    # (L, B, E, N), time-major so each step reads contiguous memory: decay and input per step, computed
    # once outside the loop. The per-step views come from unbind, whose backward is one stack (indexing
    # [t] instead would make backward allocate a full (L, B, E, N) gradient per step: quadratic in L).
    delta_t = delta.permute(2, 0, 1).unsqueeze(-1)  # (L, B, E, 1)
    delta_A = torch.exp(delta_t * A).unbind(0)
    delta_B_u = (delta_t * u.permute(2, 0, 1).unsqueeze(-1) * B.permute(2, 0, 1).unsqueeze(2)).unbind(0)
    Cs = C.permute(2, 0, 1).unsqueeze(-1).unbind(0)  # L tensors (B, N, 1)
    x = u.new_zeros(batch, dim, A.shape[1])
    ys = []
    for t in range(length):
        x = delta_A[t] * x + delta_B_u[t]
        ys.append(torch.bmm(x, Cs[t]).squeeze(-1))  # Σ_n h·C
    y = torch.stack(ys, dim=2) if ys else u.new_zeros(batch, dim, 0)
    out = y if D is None else y + u * D.to(acc)[:, None]
    if z is not None:
        out = out * F.silu(z.to(acc))
    out = out.to(dtype_in)
    return (out, x) if return_last_state else out


# --------------------------------------------------------------------------------------------- dispatch
def _mamba_ssm_fn():
    try:
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn  # type: ignore
    except Exception:  # ImportError, or a build whose CUDA extension fails to load
        return None
    return selective_scan_fn


def _cpu_fn():
    try:
        from vimtr.ops.scan_cpu import selective_scan_cpu
    except ImportError:
        return None
    return selective_scan_cpu


def get_scan_backend() -> str:
    """The backend requested now: :func:`set_scan_backend`'s value, else ``$VIMTR_SCAN``, else ``auto``."""
    name = _override if _override is not None else os.environ.get("VIMTR_SCAN", "auto").strip().lower()
    if name not in BACKENDS:
        raise ValueError(f"VIMTR_SCAN={name!r} is not a scan backend; choose one of {', '.join(BACKENDS)}")
    return name


def set_scan_backend(name: str | None) -> str | None:
    """Choose the scan backend for this process (``None`` goes back to ``$VIMTR_SCAN``). Returns the old value."""
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


def cuda_kernels_available() -> bool:
    return torch.cuda.is_available() and importlib.util.find_spec("mamba_ssm") is not None and _mamba_ssm_fn() is not None


def resolve_scan(device: torch.device):
    """Return (name, function) of the implementation that will run for tensors on ``device``."""
    name = get_scan_backend()
    if name == "reference":
        return "reference", selective_scan_ref
    if name == "cuda":
        fn = _mamba_ssm_fn()
        if fn is None:
            raise RuntimeError("VIMTR_SCAN=cuda needs the mamba_ssm CUDA kernels: pip install 'vimtr[cuda]' "
                               "(mamba-ssm) on a machine with a GPU, or use VIMTR_SCAN=auto")
        if device.type != "cuda":
            raise RuntimeError(f"VIMTR_SCAN=cuda but the tensors are on {device}; move the model to a GPU "
                               "or use VIMTR_SCAN=auto")
        return "cuda", fn
    if name == "cpu":
        fn = _cpu_fn()
        if fn is None:
            raise RuntimeError("VIMTR_SCAN=cpu: the fast CPU selective scan is not available in this build "
                               "(vimtr.ops.scan_cpu could not be imported); use VIMTR_SCAN=reference or auto")
        if device.type != "cpu":
            raise RuntimeError(f"VIMTR_SCAN=cpu but the tensors are on {device}; use VIMTR_SCAN=auto")
        return "cpu", fn
    # auto
    if device.type == "cuda":
        fn = _mamba_ssm_fn()
        if fn is not None:
            return "cuda", fn
    elif device.type == "cpu":
        fn = _cpu_fn()
        if fn is not None:
            return "cpu", fn
    return "reference", selective_scan_ref


def selective_scan_fn(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                      return_last_state=False):
    """Selective scan through the chosen backend; signature and semantics of mamba_ssm's ``selective_scan_fn``."""
    _, fn = resolve_scan(u.device)
    return fn(u, delta, A, B, C, D=D, z=z, delta_bias=delta_bias, delta_softplus=delta_softplus,
              return_last_state=return_last_state)
