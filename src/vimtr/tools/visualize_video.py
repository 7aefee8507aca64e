"""Token maps of a video clip: per-frame MTR importance, and which spatio-temporal groups each method merged.

``vimtr visualize CLIP --checkpoint videomamba_t16_k400_f8_res224.pth`` (a video file or a folder of frames)
reads the clip as ``vimtr eval`` does (the model's frames, sparse sampling, centre view) and writes one
figure: the sampled frames; MTR's importance (Δ of a block, averaged over channels) of every patch, frame
by frame on one colour scale; and per method, every patch painted with the mean colour of the group it was
merged into, groups spanning frames (a token of R-MeeTo may stand for patches of several frames).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from vimtr.data.video_transforms import MEAN, STD


def load_clip(path, model) -> tuple[torch.Tensor, np.ndarray]:
    """(model input (1, 3, T, S, S), frames to show (T, S, S, 3) in [0, 1]) for a clip file or frame folder."""
    from vimtr.data.video import VideoClips, model_geometry

    frames, size = model_geometry(model)
    dataset = VideoClips([(Path(path), 0)], frames, size, on_corrupt="fail")
    x = dataset[0][0]
    mean, std = torch.tensor(MEAN)[:, None, None, None], torch.tensor(STD)[:, None, None, None]
    shown = (x * std + mean).clamp(0, 1).permute(1, 2, 3, 0).numpy()
    return x[None], shown


def clip_importance(model, x: torch.Tensor, block: int = 1) -> np.ndarray:
    """MTR importance of every patch of the clip after block ``block``, as (T, gh, gw)."""
    from vimtr.tools.visualize import _ImportanceProbe

    saved, probe = model.reducer, _ImportanceProbe(block)
    model.reducer = probe
    try:
        with torch.no_grad():
            model.forward_tokens(x)
    finally:
        model.reducer = saved
    s = probe.score[0, 1:]  # the class token is first
    return s.reshape(-1, *model.patch_embed.grid_size).cpu().numpy()


def clip_groups(model, x: torch.Tensor, method: str, **params) -> tuple[np.ndarray, dict]:
    """The final token each patch ended up in, (T, gh, gw), and the reduction trace."""
    from vimtr.tools.visualize import group_indices

    groups, trace = group_indices(model, x, method, **params)
    return groups[0].reshape(-1, *model.patch_embed.grid_size).cpu().numpy(), trace


def group_mean_frames(frames: np.ndarray, groups: np.ndarray) -> np.ndarray:
    """Every patch of every frame painted with the mean colour of all pixels of its group (across frames)."""
    T, H, W, _ = frames.shape
    gh, gw = groups.shape[1:]
    pix = np.kron(groups, np.ones((1, H // gh, W // gw), dtype=groups.dtype))
    out = np.zeros_like(frames, dtype=np.float64)
    for g in np.unique(pix):
        m = pix == g
        out[m] = frames[m].mean(axis=0)
    return out


def clip_figure(model, x: torch.Tensor, frames: np.ndarray, methods: dict, path, block: int = 1, title=None):
    """Rows: frames, MTR importance per frame, then one row per method (``label -> (method, params)``)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    T = frames.shape[0]
    rows = 2 + len(methods)
    fig, axes = plt.subplots(rows, T, figsize=(1.8 * T + 1.2, 1.9 * rows), squeeze=False)
    imp = clip_importance(model, x, block)
    lo, hi = float(imp.min()), float(imp.max())
    for t in range(T):
        axes[0, t].imshow(frames[t])
        axes[0, t].set_title(f"frame {t}", fontsize=8)
        h = axes[1, t].imshow(imp[t], cmap="inferno", vmin=lo, vmax=hi)
    fig.colorbar(h, ax=list(axes[1]), fraction=0.02, pad=0.01, label="mean Δ")
    axes[1, 0].set_ylabel(f"MTR importance\n(block {block})", fontsize=8)
    for row, (label, (method, params)) in enumerate(methods.items(), start=2):
        groups, trace = clip_groups(model, x, method, **params)
        painted = group_mean_frames(frames, groups)
        for t in range(T):
            axes[row, t].imshow(painted[t])
        axes[row, 0].set_ylabel(f"{label}\n{trace['tokens'][-1]} tokens", fontsize=8)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    if title:
        fig.suptitle(title)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
