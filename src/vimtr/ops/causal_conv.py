"""Causal depthwise conv1d + SiLU, the semantics of ``causal_conv1d_fn(x, w, b, activation="silu")``."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def causal_conv1d_ref(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, activation: bool = True):
    """x (B, E, L); weight (E, 1, K) as stored by ``nn.Conv1d``, or (E, K); output (B, E, L).

    Output t sees inputs t-K+1 .. t (zero before the start): pad K-1 on both sides, keep the first L.
    """
    if weight.dim() == 2:
        weight = weight.unsqueeze(1)
    k = weight.shape[-1]
    out = F.conv1d(x, weight, bias, padding=k - 1, groups=x.shape[1])[..., : x.shape[-1]]
    return F.silu(out) if activation else out


def causal_conv1d_fn(x, weight, bias=None, activation: bool = True):
    """Dispatch point for the conv; the reference is a single cuDNN/oneDNN call and is fast on every device."""
    return causal_conv1d_ref(x, weight, bias, activation)
