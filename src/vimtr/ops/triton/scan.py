"""The selective scan on Triton kernels: checks, launches, autograd.

:func:`selective_scan_triton` has mamba_ssm's ``selective_scan_fn`` signature and semantics (the recurrence:
see ``vimtr.ops.selective_scan_ref``) plus two extensions Vim needs:

* ``reverse=True`` scans from the last token to the first: exactly
  ``flip(scan(flip(u), flip(delta), A, flip(B), flip(C), D, flip(z)))`` along L (and its gradients),
  computed on the tensors as they are, by mirrored indexing;
* ``delta_sum_out``, a (batch, L) float32 tensor to which the forward *adds* Σ over the E channels of the Δ
  the scan used (after delta_bias and softplus), in token order: what MTR's importance reads, at no extra
  pass over (B, E, L). Not differentiated.

Where it runs: CUDA tensors (compiled kernels), or CPU tensors when the process has ``TRITON_INTERPRET=1``
set before the kernels are first used (Triton's interpreter; slow, for tests). :func:`available` says
which, :func:`unsupported` says why a set of inputs cannot run here (``None`` when it can), so a dispatcher
can fall back without try/except; :func:`selective_scan_triton` raises that reason as an error.
"""
from __future__ import annotations

import contextlib
import importlib
import importlib.util

import torch

from vimtr.errors import UsageError
from vimtr.ops.triton.interpreter import interpret_requested, vectorise_scan

# Input dtypes the kernels load (and convert to fp32 on chip); the state and all sums are fp32.
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MAX_DSTATE = 256

# Kernel shapes: (BLOCK_E channels per program, CHUNK positions, num_warps), and which forward kernel runs.
# "seq" steps through the positions one at a time (the reference's arithmetic, a few instructions per state
# and position, SEQ_UNROLL positions per iteration); "chunked" scans CHUNK positions at once with
# tl.associative_scan (log-depth: more work per element, more parallelism per program). The backward is
# always chunked: it needs each chunk's states in reverse order. A forward that saves states for the
# backward saves them every backward CHUNK positions: (B, E, L/CHUNK, N) fp32, 44 MB per scan at Vim-S
# batch 128 with CHUNK 32 (2.1 GB over its 48 scans). The compiled defaults are educated guesses until
# benchmarks/gpu.py has timed the alternatives on a GPU; for sm_90, ptxas -v gives them 128 ("seq"),
# 128 ("chunked") and 233 (backward) registers a thread and no spills (tests/triton_offline_compile.py).
# The interpreter's cost is per program and per step, so it gets wide blocks.
_COMPILED = {"fwd": (32, 32, 4), "bwd": (4, 32, 4), "fwd_kernel": "seq", "chunked_fwd": (4, 32, 4)}
_INTERPRETED = {"fwd": (32, 32, 1), "bwd": (32, 32, 1), "fwd_kernel": "seq", "chunked_fwd": (32, 32, 1)}
FWD_KERNELS = ("seq", "chunked")
SEQ_UNROLL = 4  # positions per loop iteration of the "seq" kernel (a power of two, at most CHUNK)
_override: dict = {}
_kernels_module = None


def _next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def _load_kernels():
    """Import the @triton.jit kernels (once). Whether they are compiled or interpreted is fixed here."""
    global _kernels_module
    if _kernels_module is None:
        module = importlib.import_module("vimtr.ops.triton.scan_kernels")
        if interpreted(module):
            vectorise_scan()
        _kernels_module = module
    return _kernels_module


def interpreted(module=None) -> bool:
    """Whether the kernels run (or, not yet loaded, would run) in Triton's interpreter."""
    module = module or _kernels_module
    if module is None:
        return interpret_requested()
    return type(module.scan_fwd_kernel).__name__ == "InterpretedFunction"


def triton_importable() -> bool:
    return importlib.util.find_spec("triton") is not None


def available(device) -> bool:
    """True where :func:`selective_scan_triton` can run on tensors on ``device``: a CUDA device with
    Triton installed, or the CPU when the kernels run in Triton's interpreter (``TRITON_INTERPRET=1``)."""
    device = torch.device(device)
    if not triton_importable():
        return False
    if device.type == "cuda":
        return torch.cuda.is_available()
    if device.type == "cpu":
        return interpreted()
    return False


@contextlib.contextmanager
def kernel_config(fwd: tuple[int, int, int] | None = None, bwd: tuple[int, int, int] | None = None,
                  fwd_kernel: str | None = None):
    """Inside the block, run the forward / backward kernels with other (BLOCK_E, CHUNK, num_warps), each a
    power of two, and/or the other forward kernel (``"seq"`` or ``"chunked"``). For tests of several
    chunkings and for the GPU sweep in benchmarks/gpu.py; not thread-safe (a process-wide setting)."""
    for cfg in (fwd, bwd):
        if cfg is not None and (len(cfg) != 3 or any(int(v) < 1 or int(v) & (int(v) - 1) for v in cfg)):
            raise ValueError(f"kernel_config: (BLOCK_E, CHUNK, num_warps) must be powers of two, got {cfg}")
    if fwd_kernel is not None and fwd_kernel not in FWD_KERNELS:
        raise ValueError(f"kernel_config: fwd_kernel must be one of {FWD_KERNELS}, got {fwd_kernel!r}")
    old = dict(_override)
    _override.update({k: v for k, v in (("fwd", fwd), ("bwd", bwd), ("fwd_kernel", fwd_kernel)) if v is not None})
    try:
        yield
    finally:
        _override.clear()
        _override.update(old)


def _fwd_kernel_name() -> str:
    return _override.get("fwd_kernel") or (_INTERPRETED if interpreted() else _COMPILED)["fwd_kernel"]


def _config(kind: str, dstate: int):
    """(BLOCK_E, CHUNK, num_warps) of the forward kernel in use (``kind="fwd"``) or of the backward."""
    if kind in _override:
        return tuple(int(v) for v in _override[kind])
    defaults = _INTERPRETED if interpreted() else _COMPILED
    block_e0, chunk0, warps = defaults["chunked_fwd" if kind == "fwd" and _fwd_kernel_name() == "chunked" else kind]
    block_e, chunk, n = block_e0, chunk0, _next_pow2(dstate)
    while block_e > 1 and block_e * n > block_e0 * 16:  # N > 16: keep the tile the size it has at N = 16
        block_e //= 2
    while chunk > 8 and block_e * n * chunk > block_e0 * 16 * chunk0:
        chunk //= 2
    return block_e, chunk, warps


# ------------------------------------------------------------------------------------------- checks
def _describe(x) -> str:
    if not isinstance(x, torch.Tensor):
        return type(x).__name__
    return f"{x.dtype} tensor of shape {tuple(x.shape)} on {x.device}"


def unsupported(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_sum_out=None) -> str | None:
    """Why these inputs cannot go through the Triton scan here, naming the tensor and what to do; or None."""
    if not isinstance(u, torch.Tensor) or u.dim() != 3:
        return f"u must be a (batch, dim, seqlen) tensor, got {_describe(u)}"
    batch, dim, length = u.shape
    device = u.device
    if device.type == "cpu" and not available(device):
        if interpret_requested():
            return ("u is a CPU tensor and TRITON_INTERPRET=1 is set, but the Triton kernels were already "
                    "loaded compiled in this process: set TRITON_INTERPRET=1 before vimtr first runs them")
        return ("u is a CPU tensor: the Triton scan runs on CUDA tensors, or on CPU tensors only under Triton's "
                "interpreter (set TRITON_INTERPRET=1 before the first call; slow, for tests); use "
                "VIMTR_SCAN=auto or cpu for CPU inference")
    if not available(device):
        return (f"u is on {device}: the Triton scan needs a CUDA device with triton installed "
                "(torch's Linux wheels ship it); use VIMTR_SCAN=auto")
    big = {"u": (u, (batch, dim, length)), "delta": (delta, (batch, dim, length))}
    if z is not None:
        big["z"] = (z, (batch, dim, length))
    for name, (x, shape) in big.items():
        if not isinstance(x, torch.Tensor) or tuple(x.shape) != shape:
            return f"{name} must have shape {shape} (batch, dim, seqlen), got {_describe(x)}"
    if not isinstance(A, torch.Tensor) or A.dim() != 2 or A.shape[0] != dim:
        return f"A must be a real (dim, dstate) = ({dim}, N) tensor, got {_describe(A)}"
    dstate = A.shape[1]
    if A.is_complex() or not A.is_floating_point():
        return f"A must be real floating point (complex A is not supported), got {_describe(A)}"
    if not 1 <= dstate <= MAX_DSTATE:
        return f"A has dstate {dstate}; the Triton scan supports 1..{MAX_DSTATE}"
    for name, x in (("B", B), ("C", C)):
        if not isinstance(x, torch.Tensor) or tuple(x.shape) != (batch, dstate, length):
            return (f"{name} must be input-dependent with shape (batch, dstate, seqlen) = "
                    f"{(batch, dstate, length)} (time-invariant (dim, dstate) and grouped (batch, groups, dstate,"
                    f" seqlen) {name} are not supported by the Triton scan), got {_describe(x)}")
        big[name] = (x, None)
    for name, (x, _) in big.items():
        if x.dtype not in DTYPES:
            return (f"{name} is {x.dtype}; the Triton scan takes float32, float16 or bfloat16 "
                    "(float64 runs in selective_scan_ref: VIMTR_SCAN=reference)")
    for name, x in (("D", D), ("delta_bias", delta_bias)):
        if x is not None and (not isinstance(x, torch.Tensor) or tuple(x.shape) != (dim,)
                              or not x.is_floating_point() or x.is_complex()):
            return f"{name} must be a real ({dim},) tensor, got {_describe(x)}"
    if delta_sum_out is not None and (not isinstance(delta_sum_out, torch.Tensor)
                                      or tuple(delta_sum_out.shape) != (batch, length)
                                      or delta_sum_out.dtype != torch.float32):
        return (f"delta_sum_out must be a float32 tensor of shape (batch, seqlen) = {(batch, length)}, "
                f"got {_describe(delta_sum_out)}")
    named = {"u": u, "delta": delta, "A": A, "B": B, "C": C, "D": D, "z": z, "delta_bias": delta_bias,
             "delta_sum_out": delta_sum_out}
    for name, x in named.items():
        if x is not None and x.device != device:
            return f"{name} is on {x.device} but u is on {device}: put every input on one device"
    return None


# ----------------------------------------------------------------------------------------- launches
def _forward(u, delta, A, B, C, D, z, delta_bias, softplus, reverse, save_states, want_dsum):
    """Launch the forward kernel. With ``save_states`` it runs at the backward's chunk length, so that the
    chunk-start states it saves are the ones the backward starts each chunk from."""
    kern = _load_kernels()
    batch, dim, length = u.shape
    dstate = A.shape[1]
    block_e, chunk, warps = _config("fwd", dstate)
    if save_states:
        chunk = _config("bwd", dstate)[1]
    n_chunks = max(1, -(-length // chunk))
    n_eblk = -(-dim // block_e)
    kernel = kern.scan_fwd_seq_kernel if _fwd_kernel_name() == "seq" else kern.scan_fwd_kernel
    out = torch.empty((batch, dim, length), dtype=u.dtype, device=u.device)
    last = torch.empty((batch, dim, dstate), dtype=torch.float32, device=u.device)
    states = torch.empty((batch, dim, n_chunks, dstate) if save_states else (1,), dtype=torch.float32,
                         device=u.device)
    dsum = torch.empty((batch, n_eblk, length) if want_dsum else (1,), dtype=torch.float32, device=u.device)
    zz = z if z is not None else u
    kernel[(batch, n_eblk)](
        u, delta, A, B, C, D if D is not None else A, zz, delta_bias if delta_bias is not None else A,
        out, last, states, dsum, dim, dstate, length, n_chunks,
        *u.stride(), *delta.stride(), *A.stride(), *B.stride(), *C.stride(), *zz.stride(), *out.stride(),
        HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None, SOFTPLUS=bool(softplus),
        REVERSE=bool(reverse), SAVE_STATES=bool(save_states), WANT_DSUM=bool(want_dsum),
        BLOCK_E=block_e, BLOCK_N=_next_pow2(dstate), CHUNK=chunk, num_warps=warps,
        **({"UNROLL": min(SEQ_UNROLL, chunk)} if kernel is kern.scan_fwd_seq_kernel else {}))
    return out, last, (states if save_states else None), (dsum if want_dsum else None), chunk


def _backward(saved, softplus, reverse, chunk, dout, dlast):
    """Launch the backward kernel on the saved inputs and chunk-start states; reduce its partial sums."""
    kern = _load_kernels()
    u, delta, A, B, C, D, z, delta_bias, states = saved
    batch, dim, length = u.shape
    dstate = A.shape[1]
    block_e, _, warps = _config("bwd", dstate)
    n_chunks = states.shape[2]
    n_eblk = -(-dim // block_e)
    dev = u.device
    dout = dout.contiguous()
    du = torch.empty((batch, dim, length), dtype=u.dtype, device=dev)
    ddelta = torch.empty((batch, dim, length), dtype=delta.dtype, device=dev)
    dz = torch.empty((batch, dim, length), dtype=z.dtype, device=dev) if z is not None else None
    dB = torch.empty((batch, n_eblk, dstate, length), dtype=torch.float32, device=dev)
    dC = torch.empty_like(dB)
    dA = torch.empty((batch, dim, dstate), dtype=torch.float32, device=dev)
    dD = torch.empty((batch, dim), dtype=torch.float32, device=dev) if D is not None else None
    dbias = torch.empty((batch, dim), dtype=torch.float32, device=dev) if delta_bias is not None else None
    zz = z if z is not None else u
    kern.scan_bwd_kernel[(batch, n_eblk)](
        u, delta, A, B, C, D if D is not None else A, zz, delta_bias if delta_bias is not None else A,
        dout, dlast.contiguous() if dlast is not None else A, states,
        du, ddelta, dz if dz is not None else du, dB, dC, dA, dD if dD is not None else dA,
        dbias if dbias is not None else dA,
        dim, dstate, length, n_chunks,
        *u.stride(), *delta.stride(), *A.stride(), *B.stride(), *C.stride(), *zz.stride(), *dout.stride(),
        HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None, SOFTPLUS=bool(softplus),
        REVERSE=bool(reverse), HAS_DLAST=dlast is not None,
        BLOCK_E=block_e, BLOCK_N=_next_pow2(dstate), CHUNK=chunk, num_warps=warps)
    # fixed-order reductions of the per-program partial sums (no atomics: the same bits on every run)
    return (du, ddelta, dA.sum(0), dB.sum(1).to(B.dtype), dC.sum(1).to(C.dtype),
            dD.sum(0) if dD is not None else None, dz, dbias.sum(0) if dbias is not None else None)


class _SelectiveScanTriton(torch.autograd.Function):
    """out, last_state, per-block Δ sums = scan(...); backward in Triton from the saved chunk-start states."""

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, softplus, reverse, want_dsum, grad):
        # grad: decided by the caller (inside forward, grad mode is always off)
        save = grad and any(ctx.needs_input_grad[:8])
        out, last, states, dsum, chunk = _forward(u, delta, A, B, C, D, z, delta_bias, softplus, reverse,
                                                  save, want_dsum)
        ctx.set_materialize_grads(False)
        if dsum is not None:
            ctx.mark_non_differentiable(dsum)
        if save:
            ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, states)
            ctx.softplus, ctx.reverse, ctx.chunk = softplus, reverse, chunk
        return out, last, dsum

    @staticmethod
    def backward(ctx, dout, dlast, _):
        saved = ctx.saved_tensors
        if dout is None:  # only the last state was used
            dout = torch.zeros_like(saved[0])
        grads = _backward(saved, ctx.softplus, ctx.reverse, ctx.chunk, dout, dlast)
        # the same order as forward's inputs: u, delta, A, B, C, D, z, delta_bias
        grads = tuple(g if need else None for g, need in zip(grads, ctx.needs_input_grad[:8]))
        return (*grads, None, None, None, None)


def selective_scan_triton(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                          return_last_state=False, reverse=False, delta_sum_out=None):
    """Selective scan on Triton kernels; mamba_ssm's ``selective_scan_fn`` semantics and shapes.

    u, delta, z (batch, dim, L) and B, C (batch, dstate, L) in float32, float16 or bfloat16, any strides;
    A (dim, dstate) real; D, delta_bias (dim,). Computes in fp32; returns ``out`` in u's dtype, or
    ``(out, last_state)`` with last_state (batch, dim, dstate) float32. Differentiable in every input
    (the backward is a Triton kernel that recomputes the states chunk by chunk). ``reverse`` and
    ``delta_sum_out``: see the module docstring. Raises :class:`vimtr.errors.UsageError` naming the tensor
    and what to do when the inputs cannot run here (see :func:`unsupported`).
    """
    reason = unsupported(u, delta, A, B, C, D, z, delta_bias, delta_sum_out)
    if reason is not None:
        raise UsageError(f"selective_scan_triton: {reason}")
    # The small fp32 parameters are cast here, under autograd, so their gradients return in their dtype.
    A = A.float()
    D = D.float() if D is not None else None
    delta_bias = delta_bias.float() if delta_bias is not None else None
    if 0 in u.shape:  # nothing to scan: the reference is exact (and adds nothing to delta_sum_out)
        from vimtr.ops import selective_scan_ref
        res = selective_scan_ref(u, delta, A, B, C, D=D, z=z, delta_bias=delta_bias,
                                 delta_softplus=delta_softplus, return_last_state=True)
        return res if return_last_state else res[0]
    grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad
                                           for t in (u, delta, A, B, C, D, z, delta_bias))
    out, last, dsum = _SelectiveScanTriton.apply(u, delta, A, B, C, D, z, delta_bias, bool(delta_softplus),
                                                 bool(reverse), delta_sum_out is not None, grad)
    if delta_sum_out is not None:
        with torch.no_grad():
            delta_sum_out += dsum.sum(1)
    return (out, last) if return_last_state else out
