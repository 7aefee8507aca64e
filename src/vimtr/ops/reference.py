"""The plain-PyTorch reference of every op: differentiable, any device and dtype, and what each fast
implementation is tested against. :mod:`vimtr.ops.dispatch` falls back to these wherever no faster
implementation applies.

Selective scan (the Mamba SSM recurrence), the semantics of mamba_ssm's ``selective_scan_ref``::

    Δ_t   = softplus(delta_t + delta_bias)            (if delta_softplus)
    h_t   = exp(Δ_t·A) ⊙ h_{t-1} + Δ_t·B_t·u_t         (per channel e, per state n)
    y_t   = Σ_n C_t[n]·h_t[n] + D·u_t
    out_t = y_t · SiLU(z_t)                            (if z is given)

Shapes: u, delta, z (B, E, L); A (E, N); B, C (B, N, L) ("variable", what Mamba uses); D, delta_bias (E,).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


# ------------------------------------------------------------------------------------ selective scan
def delta_used(delta, delta_bias=None, delta_softplus=False, dtype=torch.float32):
    """Δ as the scan uses it: delta + delta_bias, then softplus (threshold 20, as the CUDA kernel)."""
    d = delta.to(dtype)
    if delta_bias is not None:
        d = d + delta_bias[..., None].to(dtype)
    return F.softplus(d) if delta_softplus else d


def add_delta_sum(delta_sum_out, delta):
    """``delta_sum_out`` (B, L) += Σ over channels of ``delta`` (B, E, L): the scan ops' per-token summary."""
    if delta_sum_out is not None:
        delta_sum_out += delta.detach().sum(1).to(delta_sum_out.dtype)


def selective_scan_ref(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                       return_last_state=False, reverse=False, delta_sum_out=None):
    """Plain-PyTorch selective scan, mamba_ssm's signature plus two generic extensions:

    * ``reverse``: scan from the last token to the first (the same as flipping u, delta, z, B and C
      along L, scanning, and flipping the output back); ``last_state`` is then the state after token 0.
    * ``delta_sum_out``: a (B, L) float32 tensor to which Σ over channels of the Δ used at each token
      (after delta_bias and softplus) is *added*, in token order also with ``reverse``.

    The recurrence is sequential in L, vectorised over (batch, channel, state); the per-step work is a
    multiply-add, so the loop is exact (no reassociation) and matches mamba_ssm's reference bit for bit
    up to the order of the final sum over states.
    """
    if reverse:
        flip = [None if t is None else t.flip(-1) for t in (u, delta, B, C, z)]
        res = selective_scan_ref(flip[0], flip[1], A, flip[2], flip[3], D, flip[4], delta_bias, delta_softplus,
                                 return_last_state)
        if delta_sum_out is not None:
            add_delta_sum(delta_sum_out, delta_used(delta, delta_bias, delta_softplus, _acc(u)))
        return (res[0].flip(-1), res[1]) if return_last_state else res.flip(-1)
    dtype_in = u.dtype
    acc = _acc(u)
    u, A, B, C = (t.to(acc) for t in (u, A, B, C))
    delta = delta_used(delta, delta_bias, delta_softplus, acc)
    add_delta_sum(delta_sum_out, delta)
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


def _acc(u):
    # fp32 for fp32/fp16/bf16 inputs (as mamba_ssm); float64 stays float64 so gradcheck is meaningful.
    return torch.promote_types(u.dtype, torch.float32)


# --------------------------------------------------------------------------------- depthwise conv
def causal_conv1d_ref(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                      activation: bool = True):
    """Causal depthwise conv1d + SiLU, the semantics of ``causal_conv1d_fn(x, w, b, activation="silu")``.

    x (B, E, L); weight (E, 1, K) as stored by ``nn.Conv1d``, or (E, K); output (B, E, L). Output t sees
    inputs t-K+1 .. t (zero before the start): pad K-1 on both sides, keep the first L.
    """
    if weight.dim() == 2:
        weight = weight.unsqueeze(1)
    k = weight.shape[-1]
    out = F.conv1d(x, weight, bias, padding=k - 1, groups=x.shape[1])[..., : x.shape[-1]]
    return F.silu(out) if activation else out


def selective_scan_gapped(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                          decay_steps=None, reverse=False, delta_sum_out=None):
    """The selective scan over a sequence with gaps: token t's state update spans ``decay_steps[t]``
    positions of the original sequence, h_t = exp(steps_t·Δ_t·A) ⊙ h_{t−1} + Δ_t·B_t·u_t (y, D, z as in
    :func:`selective_scan_ref`). ``decay_steps`` (B, L) ≥ 1, in token order; for ``reverse`` it is the span
    from token t+1 back to t. All ones is the plain scan.

    This is what keeps a pruned sequence's states aligned with the original one (ToP-ViM's pruning-aware
    hidden-state alignment): the decay a kept token sees covers the positions the pruned ones held. It is
    a composition of :func:`vimtr.ops.selective_scan_fn` (so every backend's kernel serves it): scanning
    (u/g, g·Δ) has decay exp(g·Δ·A) and input g·Δ·B·u/g = Δ·B·u; D and the gate are applied after.
    """
    from vimtr.ops.dispatch import selective_scan_fn  # (the dispatch imports this module)

    if decay_steps is None:
        return selective_scan_fn(u, delta, A, B, C, D, z, delta_bias, delta_softplus, reverse=reverse,
                                 delta_sum_out=delta_sum_out)
    if decay_steps.shape != (u.shape[0], u.shape[-1]):
        raise ValueError(f"selective_scan_gapped: decay_steps must be (batch, length) = "
                         f"{(u.shape[0], u.shape[-1])}, got {tuple(decay_steps.shape)}")
    d = delta_used(delta, delta_bias, delta_softplus, dtype=torch.promote_types(u.dtype, torch.float32))
    add_delta_sum(delta_sum_out, d)
    g = decay_steps.to(d.dtype).unsqueeze(1)  # (B, 1, L)
    y = selective_scan_fn(u / g, d * g, A, B, C, None, None, None, False, reverse=reverse)
    out = y.to(d.dtype) if D is None else y.to(d.dtype) + u.to(d.dtype) * D.to(d.dtype)[:, None]
    if z is not None:
        out = out * F.silu(z.to(d.dtype))
    return out.to(u.dtype)


def conv_weights(w, E):
    """A depthwise conv weight as (E, K), from (E, 1, K) (``nn.Conv1d``'s layout) or (E, K)."""
    if w.dim() == 3 and w.shape[:2] == (E, 1):
        w = w.reshape(E, -1)
    if w.dim() != 2 or w.shape[0] != E:
        raise ValueError(f"causal_conv1d_bidir: weights must be (dim, 1, K) or (dim, K) with dim = {E}, "
                         f"got {tuple(w.shape)}")
    return w


def causal_conv1d_bidir_ref(x, w_f, b_f, w_b, b_b, activation: bool = True):
    """Vim's two depthwise convs of one input: the causal one with (w_f, b_f), and the anti-causal one with
    (w_b, b_b), which is what convolving the flipped sequence causally and flipping back computes."""
    E = x.shape[1]
    w_f, w_b = conv_weights(w_f, E), conv_weights(w_b, E)
    K = w_f.shape[1]
    c_f = F.conv1d(x, w_f.unsqueeze(1), b_f, padding=K - 1, groups=E)[..., : x.shape[-1]]
    c_b = F.conv1d(x, w_b.flip(-1).unsqueeze(1), b_b, padding=K - 1, groups=E)[..., K - 1:]
    return (F.silu(c_f), F.silu(c_b)) if activation else (c_f, c_b)


# ----------------------------------------------------------------------------- residual add + norm
def add_rms_norm_ref(hidden, residual, weight, eps: float, row_map=None):
    """(residual', normed): residual' = residual + hidden in float32 (hidden itself when ``residual`` is
    None: the first block), normed = residual' · (mean(residual'²) + eps)^-½ · weight in hidden's dtype.
    ``row_map`` (a :class:`vimtr.ops.RowMap`) is applied to both streams first."""
    if row_map is not None:
        if residual is None:
            raise ValueError("add_rms_norm: a row_map needs both streams (residual is None)")
        hidden, residual = row_map.apply(hidden), row_map.apply(residual)
    res = hidden.float() if residual is None else residual + hidden.float()
    normed = res * torch.rsqrt(res.pow(2).mean(-1, keepdim=True) + eps) * weight.float()
    return res, normed.to(hidden.dtype)


# ------------------------------------------------------------------------------ bidirectional mixer
def bimamba_inner_ref(hidden, in_proj_weight, in_proj_bias, conv_weight, conv_bias, x_proj_weight,
                      dt_proj_weight, dt_proj_bias, A, D, conv_b_weight, conv_b_bias, x_proj_b_weight,
                      dt_proj_b_weight, dt_proj_b_bias, A_b, D_b, divide_out=False, delta_sum_out=None,
                      return_aux=False, decay_steps=None):
    """Vim's bidirectional ("v2") Mamba mixer up to ``out_proj``, the official computation: in_proj, then
    per direction (the backward one on the flipped sequence) conv + SiLU, x_proj, dt_proj, the selective
    scan gated by z; the backward output flipped back and added, halved with ``divide_out``.

    hidden (B, L, D) -> y (B, L, E), to which the caller applies ``out_proj``. A, A_b are the (E, N) decay
    rates (-exp(A_log)). ``delta_sum_out`` (B, L) float32: Σ over channels of both directions' Δ is added
    to it, in token order. ``return_aux``: return ``(y, aux)`` with, in token order, ``delta_f``/
    ``delta_b`` (B, E, L) the Δ each scan used and ``B_f``/``B_b``/``C_f``/``C_b`` (B, L, N).
    ``decay_steps``: ``(steps_f, steps_b)``, each (B, L) in token order: the scans span gaps in the
    sequence (:func:`selective_scan_gapped`; steps_b[t] is the span from token t+1 back to t).

    Its convs and scans go through the dispatch (:func:`vimtr.ops.causal_conv1d_fn`,
    :func:`vimtr.ops.selective_scan_fn`), as mamba_ssm's ``mamba_inner_ref`` does: on a GPU the scan is
    the CUDA or Triton kernel; ``VIMTR_SCAN=reference`` makes the whole mixer plain PyTorch.
    """
    xz = F.linear(hidden, in_proj_weight, in_proj_bias).transpose(1, 2)  # (B, 2E, L)
    x, z = xz.chunk(2, dim=1)
    steps_f, steps_b = (None, None) if decay_steps is None else (decay_steps[0], decay_steps[1].flip(-1))
    y_f, aux_f = _direction(x, z, conv_weight, conv_bias, x_proj_weight, dt_proj_weight, dt_proj_bias, A, D,
                            return_aux, delta_sum_out, False, steps_f)
    y_b, aux_b = _direction(x.flip(-1), z.flip(-1), conv_b_weight, conv_b_bias, x_proj_b_weight, dt_proj_b_weight,
                            dt_proj_b_bias, A_b, D_b, return_aux, delta_sum_out, True, steps_b)
    y = y_f + y_b.flip(-1)
    if divide_out:
        y = y / 2
    y = y.transpose(1, 2)
    if not return_aux:
        return y
    return y, {"delta_f": aux_f["delta"], "delta_b": aux_b["delta"].flip(-1), "B_f": aux_f["B"], "C_f": aux_f["C"],
               "B_b": aux_b["B"].flip(1), "C_b": aux_b["C"].flip(1)}


def _direction(x, z, conv_weight, conv_bias, x_proj_weight, dt_proj_weight, dt_proj_bias, A, D, want_delta,
               delta_sum_out, flipped, steps=None):
    """One scan direction on (B, E, L) inputs already in that direction's order (``steps`` too)."""
    from vimtr.ops.dispatch import causal_conv1d_fn  # (the dispatch imports this module)

    def scan(*args, **kwargs):  # the dispatched scan, spanning gaps when steps are given
        return selective_scan_gapped(*args, decay_steps=steps, **kwargs)

    R = dt_proj_weight.shape[1]
    N = A.shape[1]
    c = causal_conv1d_fn(x, conv_weight, conv_bias)  # (B, E, L), SiLU applied
    x_dbl = F.linear(c.transpose(1, 2), x_proj_weight)  # (B, L, R + 2N)
    dt, Bm, Cm = torch.split(x_dbl, [R, N, N], dim=-1)
    delta = F.linear(dt, dt_proj_weight).transpose(1, 2)  # (B, E, L); the bias goes in as delta_bias
    Bs = Bm.transpose(1, 2).contiguous()
    Cs = Cm.transpose(1, 2).contiguous()
    # The flipped direction's Δ sums arrive in its own order: summed apart, then flipped into token order.
    sums = None if delta_sum_out is None else (torch.zeros_like(delta_sum_out) if flipped else delta_sum_out)
    if want_delta:
        # The timescale Δ the scan uses, computed here once so that the caller gets it without a second pass.
        delta = F.softplus(delta.float() + dt_proj_bias.float()[:, None])
        y = scan(c, delta, A, Bs, Cs, D.float(), z=z, delta_bias=None, delta_softplus=False, delta_sum_out=sums)
    else:
        y = scan(c, delta, A, Bs, Cs, D.float(), z=z, delta_bias=dt_proj_bias.float(), delta_softplus=True,
                 delta_sum_out=sums)
    if flipped and sums is not None:
        delta_sum_out += sums.flip(-1)
    return y, ({"delta": delta, "B": Bm, "C": Cm} if want_delta else None)
