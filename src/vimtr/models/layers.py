"""Shared layers of the Vision Mamba family: RMSNorm, patch embedding, the bidirectional Mamba mixer, Block.

Attribute names follow the official code (hustvl/Vim ``models_mamba.py`` and its ``mamba_simple.py``
fork) so that official state dicts load with no renaming. The computation is :mod:`vimtr.ops`': the mixer
calls :func:`~vimtr.ops.bimamba_inner_fn` then its ``out_proj``, a block starts with
:func:`~vimtr.ops.add_rms_norm_fn`; which kernel runs is the ops' decision, never this file's.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from vimtr.models.token_state import AUX_KEYS
from vimtr.ops import add_rms_norm_fn, bimamba_inner_fn

_PER_DIRECTION = frozenset({"delta_f", "delta_b", "B_f", "B_b", "C_f", "C_b"})


class DropPath(nn.Module):
    """Stochastic depth (timm's ``DropPath``): in training, zero a sample's whole branch with probability
    ``drop_prob`` and scale the kept ones by 1 / (1 − drop_prob); the identity in eval mode."""

    def __init__(self, drop_prob: float = 0.0):
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep = 1.0 - self.drop_prob
        mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)
        if keep > 0.0:
            mask.div_(keep)
        return x * mask

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob:.3f}"


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

    def forward(self, hidden: torch.Tensor, want_aux=False, decay_steps=None):
        """hidden (B, L, D) -> (out (B, L, D), aux or None).

        ``want_aux``: False, True (every key) or a collection of the keys wanted
        (:data:`vimtr.models.token_state.AUX_KEYS`). ``aux`` then holds, in token order: ``delta_f``/``delta_b``
        (B, E, L) the softplus'd timescales the two scans used, ``B_f``/``B_b``/``C_f``/``C_b`` (B, L, N),
        and ``delta_sum`` (B, L) = Σ over channels of delta_f + delta_b with ``delta_channels`` = E.
        ``decay_steps``: (steps_f, steps_b), the scans span gaps (:func:`vimtr.ops.selective_scan_gapped`).
        """
        keys = AUX_KEYS if want_aux is True else frozenset(want_aux or ())
        delta_sum = None
        if "delta_sum" in keys:
            delta_sum = torch.zeros(hidden.shape[:2], dtype=torch.float32, device=hidden.device)
        return_aux = bool(keys & _PER_DIRECTION)
        y = bimamba_inner_fn(hidden, self.in_proj.weight, self.in_proj.bias,
                             self.conv1d.weight, self.conv1d.bias, self.x_proj.weight, self.dt_proj.weight,
                             self.dt_proj.bias, -torch.exp(self.A_log.float()), self.D,
                             self.conv1d_b.weight, self.conv1d_b.bias, self.x_proj_b.weight, self.dt_proj_b.weight,
                             self.dt_proj_b.bias, -torch.exp(self.A_b_log.float()), self.D_b,
                             divide_out=self.divide_out, delta_sum_out=delta_sum, return_aux=return_aux,
                             decay_steps=decay_steps)
        y, aux = y if return_aux else (y, {})
        out = self.out_proj(y)
        if not keys:
            return out, None
        if delta_sum is not None:
            aux.update(delta_sum=delta_sum, delta_channels=self.d_inner)
        return out, aux


class Block(nn.Module):
    """Add → RMSNorm → Mixer, with the residual stream carried separately in fp32 (official ordering)."""

    def __init__(self, dim, d_state=16, drop_path=0.0, norm_eps=1e-5, divide_out=True):
        super().__init__()
        self.mixer = BiMamba(dim, d_state=d_state, divide_out=divide_out)
        self.norm = RMSNorm(dim, eps=norm_eps)
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()

    def forward(self, hidden, residual=None, want_aux=False, row_map=None, decay_steps=None):
        """(mixer output, residual stream, aux). ``row_map`` (a :class:`vimtr.ops.RowMap`): shorten hidden
        and residual (both as the previous block left them) on the way into the add + RMSNorm.
        ``decay_steps``: the mixer's scans span gaps in the sequence (see :meth:`BiMamba.forward`)."""
        if residual is not None and self.drop_path.training and not isinstance(self.drop_path, nn.Identity):
            # Stochastic depth drops the branch before the add: the streams must be shortened first.
            if row_map is not None:
                hidden, residual, row_map = row_map.apply(hidden), row_map.apply(residual), None
            hidden = self.drop_path(hidden)
        residual, normed = add_rms_norm_fn(hidden, residual, self.norm.weight, self.norm.eps, row_map=row_map)
        out, aux = self.mixer(normed, want_aux=want_aux, decay_steps=decay_steps)
        return out, residual, aux
