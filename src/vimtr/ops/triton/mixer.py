"""Vim's bidirectional mixer (up to ``out_proj``) for the Triton backend: the official computation of
:func:`vimtr.ops.reference.bimamba_inner_ref` without a single flip.

The backward direction convolves anti-causally in token order (:func:`causal_conv1d_bidir_ref`) and scans
with ``reverse=True``; everything between the conv and the scan (x_proj, dt_proj, the split into Δ, B, C)
is pointwise in time, so this equals flip → causal conv → scan → flip exactly, but reads and writes each
(B, E, L) tensor once instead of five flipped copies (and their gradients). Δ sums and ``aux`` come out in
token order directly.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from vimtr.ops.reference import causal_conv1d_bidir_ref
from vimtr.ops.triton.scan import selective_scan_triton


def bimamba_inner_triton(hidden, in_proj_weight, in_proj_bias, conv_weight, conv_bias, x_proj_weight,
                         dt_proj_weight, dt_proj_bias, A, D, conv_b_weight, conv_b_bias, x_proj_b_weight,
                         dt_proj_b_weight, dt_proj_b_bias, A_b, D_b, divide_out=False, delta_sum_out=None,
                         return_aux=False):
    """Arguments and result of :func:`vimtr.ops.reference.bimamba_inner_ref`."""
    xz = F.linear(hidden, in_proj_weight, in_proj_bias).transpose(1, 2)  # (B, 2E, L)
    x, z = xz.chunk(2, dim=1)
    c_f, c_b = causal_conv1d_bidir_ref(x, conv_weight, conv_bias, conv_b_weight, conv_b_bias)
    ys, aux = [], {}
    for tag, c, x_proj, dt_w, dt_b, A_, D_, reverse in (
            ("f", c_f, x_proj_weight, dt_proj_weight, dt_proj_bias, A, D, False),
            ("b", c_b, x_proj_b_weight, dt_proj_b_weight, dt_proj_b_bias, A_b, D_b, True)):
        R, N = dt_w.shape[1], A_.shape[1]
        x_dbl = F.linear(c.transpose(1, 2), x_proj)  # (B, L, R + 2N)
        dt, Bm, Cm = torch.split(x_dbl, [R, N, N], dim=-1)
        delta = F.linear(dt, dt_w).transpose(1, 2)  # (B, E, L)
        Bs, Cs = Bm.transpose(1, 2), Cm.transpose(1, 2)  # strided views: the kernel reads any strides
        if return_aux:  # the Δ the scan uses, computed once so the caller gets it without a second pass
            delta = F.softplus(delta.float() + dt_b.float()[:, None])
            y = selective_scan_triton(c, delta, A_, Bs, Cs, D_.float(), z, None, False, reverse=reverse,
                                      delta_sum_out=delta_sum_out)
            aux.update({f"delta_{tag}": delta, f"B_{tag}": Bm, f"C_{tag}": Cm})
        else:
            y = selective_scan_triton(c, delta, A_, Bs, Cs, D_.float(), z, dt_b.float(), True, reverse=reverse,
                                      delta_sum_out=delta_sum_out)
        ys.append(y)
    y = ys[0] + ys[1]
    if divide_out:
        y = y / 2
    y = y.transpose(1, 2)
    return (y, aux) if return_aux else y
