"""Shared layers of the Vision Mamba family: RMSNorm, patch embedding, the bidirectional Mamba mixer, Block.

Attribute names follow the official code (hustvl/Vim ``models_mamba.py`` and its ``mamba_simple.py``
fork) so that official state dicts load with no renaming. The maths is the official fast path, written
in plain PyTorch; only the selective scan goes through :mod:`vimtr.ops`, which picks a kernel.
"""
from __future__ import annotations

import math
import threading

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import DropPath

from vimtr.ops import causal_conv1d_fn, resolve_scan, selective_scan_fn


class RMSNorm(nn.Module):
    """y = x · rsqrt(mean(x²) + eps) · w, computed in fp32 (as the official triton kernel), no bias."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor, out_dtype: torch.dtype | None = None) -> torch.Tensor:
        xf = x.float()
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight.float()
        return y.to(out_dtype or x.dtype)


class PatchEmbed(nn.Module):
    """Conv2d patchify (kernel ``patch_size``, step ``stride``), raster order (index = row·W + col)."""

    def __init__(self, img_size=224, patch_size=16, stride=16, in_chans=3, embed_dim=192):
        super().__init__()
        self.img_size = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
        self.patch_size = (patch_size, patch_size)
        self.grid_size = tuple((s - patch_size) // stride + 1 for s in self.img_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.in_chans = in_chans
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class BiMamba(nn.Module):
    """The bidirectional ("bimamba v2") Mamba mixer of Vim and VideoMamba.

    Both directions share ``in_proj``, ``out_proj`` and the gate z; each has its own conv1d, x_proj,
    dt_proj, A_log and D (``*_b`` for the backward one). The backward direction runs on the sequence
    flipped and its output is flipped back. Vim averages the two directions (``divide_out=True``);
    VideoMamba sums them.
    """

    # Mamba exempts these from weight decay (mamba_ssm marks them ``_no_weight_decay``). The names are
    # kept on the class as well because ``copy.deepcopy`` drops attributes set on a Parameter, and every
    # re-trained student here is a deep copy (``vimtr.engine.recipe.param_groups`` reads both).
    no_weight_decay_params = ("A_log", "D", "A_b_log", "D_b")

    def __init__(self, d_model, d_state=16, d_conv=4, expand=2, dt_rank="auto", dt_min=0.001, dt_max=0.1,
                 dt_init_floor=1e-4, conv_bias=True, bias=False, divide_out=True):
        super().__init__()
        self.d_model, self.d_state, self.d_conv = d_model, d_state, d_conv
        self.d_inner = int(expand * d_model)
        self.dt_rank = math.ceil(d_model / 16) if dt_rank == "auto" else dt_rank
        self.divide_out = divide_out
        E, N, R = self.d_inner, d_state, self.dt_rank

        self.in_proj = nn.Linear(d_model, 2 * E, bias=bias)
        self.conv1d = nn.Conv1d(E, E, d_conv, groups=E, padding=d_conv - 1, bias=conv_bias)
        self.x_proj = nn.Linear(E, R + 2 * N, bias=False)
        self.dt_proj = nn.Linear(R, E, bias=True)
        A = torch.arange(1, N + 1, dtype=torch.float32).repeat(E, 1)  # S4D-real init
        self.A_log = nn.Parameter(torch.log(A))
        self.D = nn.Parameter(torch.ones(E))
        self.A_b_log = nn.Parameter(torch.log(A.clone()))
        self.conv1d_b = nn.Conv1d(E, E, d_conv, groups=E, padding=d_conv - 1, bias=conv_bias)
        self.x_proj_b = nn.Linear(E, R + 2 * N, bias=False)
        self.dt_proj_b = nn.Linear(R, E, bias=True)
        self.D_b = nn.Parameter(torch.ones(E))
        self.out_proj = nn.Linear(E, d_model, bias=bias)
        for name in self.no_weight_decay_params:
            getattr(self, name)._no_weight_decay = True
        self.init_dt(self.dt_proj, dt_min, dt_max, dt_init_floor)

    @torch.no_grad()
    def init_dt(self, proj: nn.Linear, dt_min=0.001, dt_max=0.1, floor=1e-4):
        """Mamba's Δ init of a dt projection: weights U(±R^-½), bias = softplus⁻¹(dt), dt log-uniform.
        The official code applies it to ``dt_proj`` only; ``dt_proj_b`` keeps a plain Linear init."""
        std = self.dt_rank ** -0.5
        nn.init.uniform_(proj.weight, -std, std)
        dt = torch.exp(torch.rand(self.d_inner) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
        dt = dt.clamp(min=floor)
        proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))
        proj.bias._no_reinit = True  # the model's init zeroes every other Linear bias

    def _direction(self, x, z, conv, x_proj, dt_proj, A_log, D, want_aux):
        """One scan direction on (B, E, L) inputs already in that direction's order."""
        N, R = self.d_state, self.dt_rank
        c = causal_conv1d_fn(x, conv.weight, conv.bias)  # (B, E, L), SiLU applied
        x_dbl = F.linear(c.transpose(1, 2), x_proj.weight)  # (B, L, R + 2N)
        dt, Bm, Cm = torch.split(x_dbl, [R, N, N], dim=-1)
        delta = F.linear(dt, dt_proj.weight).transpose(1, 2)  # (B, E, L); bias goes in as delta_bias
        A = -torch.exp(A_log.float())
        Bs = Bm.transpose(1, 2).contiguous()
        Cs = Cm.transpose(1, 2).contiguous()
        aux = None
        if want_aux:
            # The timescale Δ the scan uses; computed here once so the reducer needs no second pass.
            delta = F.softplus(delta.float() + dt_proj.bias.float()[:, None])
            y = selective_scan_fn(c, delta, A, Bs, Cs, D.float(), z=z, delta_bias=None, delta_softplus=False)
            aux = {"delta": delta, "B": Bm, "C": Cm}
        else:
            y = selective_scan_fn(c, delta, A, Bs, Cs, D.float(), z=z, delta_bias=dt_proj.bias.float(),
                                  delta_softplus=True)
        return y, aux

    def forward(self, hidden: torch.Tensor, want_aux: bool = False):
        """hidden (B, L, D) -> (out (B, L, D), aux or None).

        ``aux`` (only with ``want_aux``) holds per direction, in token order: ``delta_f``/``delta_b``
        (B, E, L) the softplus'd timescales, and ``B_f``/``B_b``/``C_f``/``C_b`` (B, L, N). The CPU path
        adds ``delta_channel_sum`` (B, L), Σ over channels of delta_f + delta_b, summed by the kernels,
        and ``delta_channels`` (E). ``want_aux`` may also be a collection of key names: the CPU path then
        leaves out ``delta_f``/``delta_b`` unless named (the other paths always give every key).

        fp32 on CPU with the fast scan backend takes :meth:`_forward_cpu` (same maths, no flips or copies,
        inference and training); everything else (other devices, backends, dtypes) takes the path below.
        """
        if self._use_cpu_path(hidden):
            return self._forward_cpu(hidden, want_aux)
        xz = self.in_proj(hidden).transpose(1, 2)  # (B, 2E, L)
        x, z = xz.chunk(2, dim=1)
        y_f, aux_f = self._direction(x, z, self.conv1d, self.x_proj, self.dt_proj, self.A_log, self.D, want_aux)
        y_b, aux_b = self._direction(x.flip(-1), z.flip(-1), self.conv1d_b, self.x_proj_b, self.dt_proj_b,
                                     self.A_b_log, self.D_b, want_aux)
        y = y_f + y_b.flip(-1)
        if self.divide_out:
            y = y / 2
        out = self.out_proj(y.transpose(1, 2))
        if not want_aux:
            return out, None
        aux = {"delta_f": aux_f["delta"], "delta_b": aux_b["delta"].flip(-1),
               "B_f": aux_f["B"], "C_f": aux_f["C"], "B_b": aux_b["B"].flip(1), "C_b": aux_b["C"].flip(1)}
        return out, aux


    def _params(self):
        """The mixer's parameters. ``Module.parameters()`` walks the tree through generators, ~0.1 ms a call,
        and a forward asks twice per block: ~10 ms of a demo re-training step (student and teacher, 12
        blocks each). The children are plain Linear/Conv1d, so one level suffices; a wrapped child (one with
        children of its own) takes the full walk."""
        children = [m for m in self._modules.values() if m is not None]
        if any(m._modules for m in children):
            return list(self.parameters())
        return [p for m in (self, *children) for p in m._parameters.values() if p is not None]

    def _use_cpu_path(self, hidden: torch.Tensor) -> bool:
        if hidden.device.type != "cpu" or hidden.dtype != torch.float32 or hidden.dim() != 3:
            return False
        if resolve_scan(hidden.device)[0] != "cpu":
            return False
        if any(p.dtype != torch.float32 or p.device.type != "cpu" for p in self._params()):
            return False
        return _cpu_kernels() is not None

    def _forward_cpu(self, hidden: torch.Tensor, want_aux: bool):
        """The path for the CPU kernels, in the layout of mamba_ssm's fused path: every (B, E, L) tensor is
        stored as (E, B·L), so each projection is one matmul on views and each channel's row is contiguous
        for the kernels. Both convolutions are one pass (the backward one anti-causal instead of flipping)
        and the backward scan runs reversed (no flips).

        Both scans run without z; the gate is applied once to their sum, (y_f + y_b)·SiLU(z)·½ (the
        official (y_f·SiLU(z) + y_b·SiLU(z)) / 2 up to float rounding). Without gradients, the big
        intermediates live in a per-thread workspace, the reverse scan accumulates into the forward one's
        output and applies the gate and the ½ on the way (``out_gate=``), and the scans write out the Δ
        they used for ``want_aux``. With gradients the same kernels run through autograd and
        ``gated_sum_cpu`` does the sum and the gate with the same compiled arithmetic: the values are bit
        for bit those of the inference path (tested), so a model's output does not depend on the grad mode.
        """
        conv_bidir, scan, scan_delta, gated_sum = _cpu_kernels()
        Bn, L, _ = hidden.shape
        E, N, R = self.d_inner, self.d_state, self.dt_rank
        M = Bn * L
        grad = torch.is_grad_enabled() and (hidden.requires_grad or any(p.requires_grad for p in self._params()))

        def bel(t2):  # (E', B·L) storage seen as (B, E', L)
            return t2.view(-1, Bn, L).transpose(0, 1)

        if grad:
            xz2 = torch.mm(self.in_proj.weight, hidden.reshape(M, -1).t())  # (2E, B·L)
            if self.in_proj.bias is not None:
                xz2 = xz2 + self.in_proj.bias[:, None]
        else:
            # Fresh multi-MB tensors at every call cost page faults (glibc hands freed top-of-heap memory
            # back to the OS): measured 1.2 ms more per conv call with new outputs than with reused ones.
            ws = _workspace(6 * E * M)
            xz2, cf2, cb2, dl2, y2 = (ws[i * E * M:(i + k) * E * M].view(k * E, M)
                                      for i, k in ((0, 2), (2, 1), (3, 1), (4, 1), (5, 1)))
            torch.mm(self.in_proj.weight, hidden.reshape(M, -1).t(), out=xz2)
            if self.in_proj.bias is not None:
                xz2 += self.in_proj.bias[:, None]
        xz = bel(xz2)  # (B, 2E, L), rows contiguous
        x, z = xz[:, :E], xz[:, E:]
        convs = (x, self.conv1d.weight, self.conv1d.bias, self.conv1d_b.weight, self.conv1d_b.bias)
        if grad:
            c_f, c_b = conv_bidir(*convs, channel_major=True)
        else:
            c_f, c_b = conv_bidir(*convs, out_f=bel(cf2), out_b=bel(cb2))
        aux, ys = {}, []
        # want_aux may name the keys wanted: Δ itself (two (B, E, L) tensors) is then written only if asked.
        keys = None if isinstance(want_aux, bool) else set(want_aux)
        want_delta = bool(want_aux) and (keys is None or bool(keys & {"delta_f", "delta_b"}))
        if want_aux:  # Σ_e (Δ_f + Δ_b) per token, added up by the kernels (MTR's importance, times E)
            aux["delta_channel_sum"] = hidden.new_zeros(Bn, L)
            aux["delta_channels"] = E
        scale = 0.5 if self.divide_out else 1.0
        for tag, c, x_proj, dt_proj, A_log, D, reverse in (
                ("f", c_f, self.x_proj, self.dt_proj, self.A_log, self.D, False),
                ("b", c_b, self.x_proj_b, self.dt_proj_b, self.A_b_log, self.D_b, True)):
            x_dbl = torch.mm(x_proj.weight, c.transpose(0, 1).reshape(E, M))  # (R + 2N, B·L), a view of c
            if grad:
                delta = bel(torch.mm(dt_proj.weight, x_dbl[:R]))
            else:
                delta = bel(torch.mm(dt_proj.weight, x_dbl[:R], out=dl2))
            Bm, Cm = bel(x_dbl[R:R + N]), bel(x_dbl[R + N:])  # (B, N, L)
            args = (c, delta, -torch.exp(A_log), Bm, Cm, D)
            # No z here: both directions are gated once, after their sum ((y_f + y_b)·SiLU(z)·½ instead of
            # (y_f·SiLU(z) + y_b·SiLU(z))·½: one SiLU pass and one z read per block less).
            kw = dict(delta_bias=dt_proj.bias, delta_softplus=True, reverse=reverse)
            if grad:
                ys.append(scan(*args, **kw))
                delta_used = (scan_delta(delta.detach(), dt_proj.bias.detach(), channel_sum=aux["delta_channel_sum"])
                              if want_aux else None)
            else:
                delta_used = bel(hidden.new_empty(E, M)) if want_delta else None
                scan(*args, **kw, out=bel(y2), accumulate=reverse, out_scale=scale if reverse else 1.0,
                     out_gate=z if reverse else None, delta_out=delta_used,
                     delta_channel_sum=aux.get("delta_channel_sum"))
            if want_aux:
                aux.update({f"B_{tag}": Bm.transpose(1, 2), f"C_{tag}": Cm.transpose(1, 2)})
                if want_delta:
                    aux[f"delta_{tag}"] = delta_used
        if grad:  # the same arithmetic as the inference path's out_gate, bit for bit
            y2 = gated_sum(ys[0], ys[1], z, scale).transpose(0, 1).reshape(E, M)
        out = F.linear(y2.t(), self.out_proj.weight, self.out_proj.bias)
        return out.view(Bn, L, -1), (aux if want_aux else None)


_WORKSPACE = threading.local()


def _workspace(numel: int) -> torch.Tensor:
    """A float32 CPU buffer of at least ``numel`` elements, one per thread, kept for the next call (grown,
    never shrunk: Vim-S at batch 32 holds 116 MB). Only for intermediates that never leave a call."""
    buf = getattr(_WORKSPACE, "buf", None)
    if buf is None or buf.numel() < numel:
        _WORKSPACE.buf = buf = None  # free the old one first
        with torch.inference_mode(False):  # a normal tensor: usable both in and out of inference mode
            _WORKSPACE.buf = buf = torch.empty(numel, dtype=torch.float32)
    return buf[:numel]


def _add_rmsnorm_cpu():
    from vimtr.ops.norm_cpu import add_rmsnorm_cpu
    return add_rmsnorm_cpu


_CPU_KERNELS: tuple | None = None


def _cpu_kernels():
    """(causal_conv1d_bidir_cpu, selective_scan_cpu, scan_delta_cpu, gated_sum_cpu), or None where numba is
    missing."""
    global _CPU_KERNELS
    if _CPU_KERNELS is None:
        try:
            from vimtr.ops.conv_cpu import causal_conv1d_bidir_cpu
            from vimtr.ops.scan_cpu import gated_sum_cpu, scan_delta_cpu, selective_scan_cpu
        except ImportError:
            _CPU_KERNELS = ()
        else:
            _CPU_KERNELS = (causal_conv1d_bidir_cpu, selective_scan_cpu, scan_delta_cpu, gated_sum_cpu)
    return _CPU_KERNELS or None


class Block(nn.Module):
    """Add → RMSNorm → Mixer, with the residual stream carried separately in fp32 (official ordering)."""

    def __init__(self, dim, d_state=16, drop_path=0.0, norm_eps=1e-5, divide_out=True):
        super().__init__()
        self.mixer = BiMamba(dim, d_state=d_state, divide_out=divide_out)
        self.norm = RMSNorm(dim, eps=norm_eps)
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()

    def forward(self, hidden, residual=None, want_aux: bool = False, merge=None):
        """``merge``: a reduction step's :class:`~vimtr.reduction.merge.PendingMerge` for hidden and residual
        (both unreduced), applied here: inside the add + RMSNorm kernel on the CPU path, eagerly otherwise."""
        # DropPath is the identity in eval mode (and at rate 0): the fused kernel then computes the same add.
        no_drop = isinstance(self.drop_path, nn.Identity) or not self.drop_path.training
        if no_drop and self.mixer._use_cpu_path(hidden):
            # The CPU path: the add and the norm in one kernel pass (same formula; see vimtr.ops.norm_cpu).
            residual, normed = _add_rmsnorm_cpu()(hidden, residual, self.norm.weight, self.norm.eps, merge=merge)
        else:
            if merge is not None:
                hidden, residual = merge.apply(hidden), merge.apply(residual)
            if residual is None:  # first block: the embedding itself starts the residual stream
                residual = hidden.float()
            else:
                residual = residual + self.drop_path(hidden).float()
            normed = self.norm(residual, out_dtype=hidden.dtype)
        out, aux = self.mixer(normed, want_aux=want_aux)
        return out, residual, aux
