"""Token maps: which patches each final token stands for, and MTR's importance heat-map.

``vimtr visualize IMAGE --model NAME|--checkpoint PATH --method mtr rmeeto ...`` writes a PNG with the
image, the importance map and one merged-group map per method. Works with any model vimtr loads; for a
video model IMAGE is a clip (a video file or a folder of frames) and the maps are drawn frame by frame
(:mod:`vimtr.tools.visualize_video`).
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

import vimtr
from vimtr.models.token_state import TokenState
from vimtr.reduction.mtr import delta_importance


class _ImportanceProbe:
    """A reducer that reduces nothing: it asks block ``block`` for Δ and keeps MTR's score of it."""

    def __init__(self, block: int, pool: str = "none"):
        self.block, self.pool, self.score = block, pool, None

    def __call__(self, i: int, state: TokenState) -> TokenState:
        if i == self.block + 1:
            self.score = delta_importance(state.aux, self.pool)
        if i == self.block:  # what delta_importance reads, from this block's mixer
            state.requests = frozenset({"delta_sum", "delta_f", "delta_b"})
        return state


@torch.no_grad()
def importance_map(model, x: torch.Tensor, block: int = 1) -> np.ndarray:
    """MTR importance of every patch after block ``block`` of the unreduced model, as (B, gh, gw)."""
    saved = model.reducer
    probe = _ImportanceProbe(block)
    model.reducer = probe
    try:
        model.forward_tokens(x)
    finally:
        model.reducer = saved
    s = probe.score
    c = model.initial_cls_index
    s = torch.cat((s[:, :c], s[:, c + 1:]), dim=1)
    return s.reshape(x.shape[0], *_grid(model)).cpu().numpy()


def _grid(model):
    return model.patch_embed.grid_size


def group_map(model, x: torch.Tensor, method: str, **params) -> tuple[np.ndarray, dict]:
    """Reduce with ``method`` and return, per patch, the index of the final token it ended up in
    (B, gh, gw), plus the trace. The model is restored afterwards."""
    groups, trace = group_indices(model, x, method, **params)
    return groups.reshape(x.shape[0], *_grid(model)).cpu().numpy(), trace


@torch.no_grad()
def group_indices(model, x: torch.Tensor, method: str, **params) -> tuple[torch.Tensor, dict]:
    """(B, P): the final token each of the P patches (all frames of a clip) ended up in, and the trace."""
    saved = getattr(model, "reduction", None)
    vimtr.reduce(model, method, trace_source=True, **params)
    try:
        model(x)
        trace = model.reduction_trace
    finally:
        vimtr.restore(model)
        if saved is not None:
            vimtr.reduce(model, saved["method"], **{**saved["params"], "trace_source": False})
    return trace["source"].argmax(dim=1), trace  # (B, P): the final token each patch belongs to


def group_mean_image(image: np.ndarray, groups: np.ndarray) -> np.ndarray:
    """ToMe-style picture: every patch painted with the mean colour of all pixels in its group."""
    gh, gw = groups.shape
    H, W = image.shape[:2]
    ph, pw = H // gh, W // gw
    pix = np.kron(groups, np.ones((ph, pw), dtype=groups.dtype))
    pix = np.pad(pix, ((0, H - pix.shape[0]), (0, W - pix.shape[1])), mode="edge")
    out = np.zeros_like(image, dtype=np.float64)
    for g in np.unique(pix):
        m = pix == g
        out[m] = image[m].mean(axis=0)
    return out, pix


def _boundaries(ax, pix):
    """Draw the borders between groups as thin white lines."""
    edge_v = pix[:, 1:] != pix[:, :-1]
    edge_h = pix[1:, :] != pix[:-1, :]
    ys, xs = np.nonzero(edge_v)
    for y, x in zip(ys, xs):
        ax.plot([x + 0.5, x + 0.5], [y - 0.5, y + 0.5], color="white", lw=0.6)
    ys, xs = np.nonzero(edge_h)
    for y, x in zip(ys, xs):
        ax.plot([x - 0.5, x + 0.5], [y + 0.5, y + 0.5], color="white", lw=0.6)


def token_map_figure(model, x: torch.Tensor, image: np.ndarray, methods: dict, path, title=None,
                     importance_block: int = 1):
    """One row: the image, MTR's importance heat-map, then the merged groups of each method.

    ``x`` is the model input (1, ...), ``image`` the picture to show (H, W) or (H, W, 3) in [0, 1],
    ``methods`` maps a label to (method, params).
    """
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = 2 + len(methods)
    fig, axes = plt.subplots(1, n, figsize=(3.2 * n, 3.6))
    cmap = "gray" if image.ndim == 2 else None
    axes[0].imshow(image, cmap=cmap, vmin=0, vmax=1)
    axes[0].set_title("input")
    imp = importance_map(model, x, importance_block)[0]
    h = axes[1].imshow(imp, cmap="inferno")
    axes[1].set_title(f"MTR importance (Δ, block {importance_block})")
    fig.colorbar(h, ax=axes[1], fraction=0.046, pad=0.04, label="mean Δ")
    for ax, (label, (method, params)) in zip(axes[2:], methods.items()):
        groups, trace = group_map(model, x, method, **params)
        pic, pix = group_mean_image(image if image.ndim == 3 else image[..., None], groups[0])
        ax.imshow(pic.squeeze(-1) if image.ndim == 2 else pic, cmap=cmap, vmin=0, vmax=1)
        _boundaries(ax, pix)
        ax.set_title(f"{label}: {trace['tokens'][-1]} tokens")
    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# ---------------------------------------------------------------------------------------------- CLI
def add_cli(sub):
    p = sub.add_parser("visualize", help="merged-token groups and importance heat-maps as PNG",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog="examples:\n  vimtr visualize cat.jpg --checkpoint vim_t_midclstok_76p1acc.pth "
                              "--method mtr rmeeto\n  vimtr visualize digits:0 --model vim_digits --out map.png")
    p.add_argument("image", help="an image file, or digits:N for test image N of the built-in digits set; for a "
                                 "video model a clip (video file or folder of frames)")
    p.add_argument("--model", help="registered or bundled model name (default vim_digits for digits:N)")
    p.add_argument("--checkpoint", help="checkpoint file to load (official .pth, .safetensors, vimtr)")
    p.add_argument("--method", nargs="+", default=["mtr", "rmeeto"], help="methods to show (default mtr rmeeto)")
    p.add_argument("--flops-reduction", type=float, default=0.3, help="reduction level (default 0.3)")
    p.add_argument("--block", type=int, default=1, help="block whose Δ gives the importance map (default 1)")
    p.add_argument("--out", default="token_map.png", help="output PNG (default token_map.png)")
    p.set_defaults(func=run)


def _load_input(spec: str, model):
    if spec.startswith("digits:"):
        from vimtr.data import digits
        x, _ = digits.digits_tensors("test")
        i = int(spec.split(":", 1)[1])
        return x[i:i + 1], digits.to_image(x[i])
    path = Path(spec)
    if not path.is_file():
        raise FileNotFoundError(f"image {spec!r} not found (give a file path or digits:N)")
    from PIL import Image
    from vimtr.data import eval_transform
    t = eval_transform(model)  # converts any image mode to the model's channels
    with Image.open(path) as img:
        x = t(img).unsqueeze(0)
    mean, std = (torch.tensor(v)[:, None, None] for v in (t.mean, t.std))
    shown = (x[0] * std + mean).clamp(0, 1).permute(1, 2, 0).numpy()
    return x, shown[..., 0] if shown.shape[-1] == 1 else shown


def run(args):
    from vimtr import checks
    from vimtr.errors import UsageError
    from vimtr.tools.benchmark import load_for_cli

    if not args.model and not args.checkpoint and args.image.startswith("digits:"):
        args.model = "vim_digits"
    model = load_for_cli(args)
    if args.block >= len(model.layers) - 1:
        raise UsageError(f"--block {args.block}: the importance map reads the Δ of a block that has a next one; "
                         f"{getattr(model, 'model_name', 'this model')} has blocks 0 to {len(model.layers) - 1}, so "
                         f"--block takes 0 to {len(model.layers) - 2}")
    methods = {m: (m, {"flops_reduction": args.flops_reduction}) for m in args.method}
    checks.check_reductions(model, list(methods.values()), "visualize", more_blocks=None)
    title = f"{getattr(model, 'model_name', '')} — {args.flops_reduction:.0%} fewer FLOPs"
    if hasattr(model, "temporal_pos_embedding"):  # a video model: per-frame maps of one clip
        from vimtr.tools.visualize_video import clip_figure, load_clip
        if not Path(args.image).exists():
            raise FileNotFoundError(f"clip {args.image!r} not found (a video file or a folder of frames)")
        x, frames = load_clip(args.image, model)
        out = clip_figure(model, x, frames, methods, args.out, block=args.block, title=title)
        print(f"wrote {out}")
        return
    x, image = _load_input(args.image, model)
    out = token_map_figure(model, x, image, methods, args.out, importance_block=args.block, title=title)
    print(f"wrote {out}")
