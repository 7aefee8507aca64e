"""Analytic FLOPs counter for the Vision Mamba family, with the conventions the papers use.

Counts come from the shapes the model actually processes: the token count entering every block (after
any active reduction, caps included) and each reduction step's own cost. Conventions (all count a
multiply-accumulate as one operation, as both source papers do):

- ``"rmeeto"``: R-MeeTo's ``calculate_flop_inference``: in_proj, out_proj, conv, x_proj, dt_proj and the
  scan (9·L·E·N + 2·L·E) of **one** scan direction, patch embedding counted over L tokens (class token
  included), the head, and R-MeeTo's merge cost per event. Reproduces its published 1.28 / 3.58 /
  13.21 G for Vim-Ti r=5 / Vim-S r=11 / Vim-B r=11.
- ``"full"``: the same terms with **both** directions counted, patch embedding over the patches only,
  and each method's own reduction cost. Default; used to derive schedules from ``flops_reduction``.
- ``"fvcore"``: what fvcore counts for VideoMamba's published figures (the fused Mamba op is opaque):
  in_proj, out_proj, patch embedding and head only. Reproduces VideoMamba-Ti/S/M/B 1.07/4.24/12.64/16.85 G.

Video models (one clip of T frames, 1 + T·HW tokens): the same terms over the clip's tokens. ``"rmeeto"``
is then R-MeeTo's video counter (``video_task/utils/calc_flops.get_flops``, forward hooks): the Conv3d
patch embedding over its T·HW outputs (no class token), and each merge event's cost with the requested
``r`` (its ``num_prune``). It reproduces the K400 table's VideoMamba-S r=88 (30.99 G); the table's M
(67.11 G) leaves the merge cost out and its Ti (9.44 G) matches neither reading (9.49 / 8.05 G), see
docs/video.md. ``"fvcore"`` on a video model is VideoMamba's fvcore count of one clip (one view: multiply
by clips × crops for its multi-view test).
"""
from __future__ import annotations

CONVENTIONS = ("full", "rmeeto", "fvcore")


def _dims(model):
    mixer = model.layers[0].mixer
    pe = model.patch_embed
    frames = getattr(model, "num_frames", 1) // getattr(model, "kernel_size", 1)
    kernel = pe.proj.weight[0].numel()  # in_chans · (tubelet ·) ph · pw
    head = model.head.weight.shape[0] if hasattr(model.head, "weight") else 0
    return dict(C=model.embed_dim, E=mixer.d_inner, R=mixer.dt_rank, N=mixer.d_state, K=mixer.d_conv,
                P=pe.num_patches * frames, kernel=kernel, classes=head)


def _block(n: float, d: dict, directions: int, fvcore: bool) -> float:
    C, E, R, N, K = d["C"], d["E"], d["R"], d["N"], d["K"]
    proj = n * C * 2 * E + n * E * C  # in_proj (x and z) + out_proj
    if fvcore:
        return proj
    per_dir = (n + K - 1) * E * K + n * E * (R + 2 * N) + n * R * E + 9 * n * E * N + 2 * n * E
    return proj + directions * per_dir


def count_flops(model, lengths=None, applied=None, reducer=None, convention: str = "full") -> float:
    """FLOPs of one image/clip given the token count entering each block (``lengths``) and the tokens
    removed at each block (``applied``); defaults to the model's active reduction, or none."""
    if convention not in CONVENTIONS:
        raise ValueError(f"convention must be one of {CONVENTIONS}, got {convention!r}")
    d = _dims(model)
    L0 = d["P"] + 1
    depth = len(model.layers)
    if lengths is None:
        reducer = reducer if reducer is not None else model.reducer
        lengths = reducer.lengths if reducer is not None else [L0] * depth
        applied = reducer.applied if reducer is not None else [0] * depth
    video = hasattr(model, "temporal_pos_embedding")
    # R-MeeTo's image counter is analytic (patch embedding over all L0 tokens); its video counter hooks the
    # Conv3d (T·HW outputs) and charges each merge event its requested r (num_prune), capped or not.
    embed_tokens = L0 if convention == "rmeeto" and not video else d["P"]
    total = embed_tokens * d["C"] * d["kernel"] + d["C"] * d["classes"]
    requested = getattr(reducer, "r", None) if convention == "rmeeto" and video else None
    before = L0
    for i, (n, r) in enumerate(zip(lengths, applied)):
        if r and reducer is not None and convention != "fvcore":
            total += reducer.overhead_macs(before, requested[i] if requested else r)
        total += _block(n, d, 1 if convention == "rmeeto" else 2, convention == "fvcore")
        before = n
    return float(total)


def flops(model, input_size=None, convention: str = "full") -> float:
    """FLOPs of one forward of ``model`` on one input, reflecting any active reduction and its overhead.

    ``input_size`` (optional, with or without the batch dimension) must be the size the model takes.
    """
    if input_size is not None:
        size = tuple(input_size)
        expected = tuple(model.input_size)
        if size[-len(expected):] != expected or len(size) > len(expected) + 1:
            raise ValueError(f"flops: {type(model).__name__} processes inputs of size {expected}, got {size}; "
                             f"build the model at that size (create_model(..., img_size=...))")
    return count_flops(model, convention=convention)
