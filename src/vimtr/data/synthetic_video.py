"""A small Kinetics-layout video set written on the spot: moving digits encoded with PyAV.

``write_moving_digits(root)`` draws scikit-learn's 8×8 digits, scaled up, sliding across a dark
background (each class a digit, each clip its own path and speed), encodes every clip as a real video
file and writes the layout and list files Kinetics users have::

    root/videos/<digit>/clip_<k>.mp4       (class folders, the download layout)
    root/train.csv, root/val.csv           (VideoMamba's "path,label" annotation lists)

It serves the tests (decode → sample → model → reduce → JSON on real files), the decoding benchmark and
anyone who wants to try ``vimtr eval`` on video without Kinetics. Needs PyAV.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

# Codecs tried in order for each container (the first the installed FFmpeg can encode wins).
CODECS = {".mp4": ("libx264", "mpeg4", "h264"), ".mkv": ("libx264", "mpeg4", "ffv1"),
          ".webm": ("libvpx-vp9", "libvpx"), ".avi": ("mpeg4", "mjpeg")}


def pick_codec(suffix: str) -> str:
    from vimtr.data.video_decode import require_av

    av = require_av()
    for name in CODECS.get(suffix, ("mpeg4",)):
        try:
            av.codec.Codec(name, "w")
            return name
        except Exception:  # UnknownCodecError and friends: this FFmpeg build lacks it
            continue
    raise RuntimeError(f"this PyAV/FFmpeg build can encode none of {CODECS.get(suffix)} for {suffix} files")


def write_video(path, frames: np.ndarray, fps: int = 12, codec: str | None = None):
    """Encode ``frames`` (T, H, W, 3) uint8 (even H, W) into ``path``; the container follows the suffix."""
    from vimtr.data.video_decode import require_av

    av = require_av()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    codec = codec or pick_codec(path.suffix.lower())
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "yuv420p" if codec != "ffv1" else "yuv444p"
        if codec in ("libx264", "h264"):
            stream.options = {"crf": "18", "preset": "ultrafast"}
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def moving_digit(digit_image: np.ndarray, frames: int, size: int, rng: np.random.Generator,
                 width: int | None = None) -> np.ndarray:
    """(frames, size, width, 3) uint8: the digit (scaled to size/2) sliding along a random straight path."""
    width = size if width is None else width
    glyph = np.kron(digit_image / 16.0, np.ones((size // 16, size // 16)))  # 8x8 -> size/2
    g = glyph.shape[0]
    limit = np.array([size - g + 1, width - g + 1])
    start, end = rng.integers(0, limit), rng.integers(0, limit)
    colour = rng.uniform(0.5, 1.0, size=3)
    background = rng.uniform(0.0, 0.15, size=3)
    out = np.empty((frames, size, width, 3), dtype=np.uint8)
    for t in range(frames):
        y, x = np.round(start + (end - start) * t / max(frames - 1, 1)).astype(int)
        canvas = np.tile(background, (size, width, 1))
        canvas[y:y + g, x:x + g] = np.maximum(canvas[y:y + g, x:x + g], glyph[..., None] * colour)
        out[t] = (canvas * 255).round().astype(np.uint8)
    return out


def write_moving_digits(root, classes: int = 3, per_class: int = 2, frames: int = 16, size: int = 64,
                        suffix: str = ".mp4", seed: int = 0, val_per_class: int | None = None,
                        width: int | None = None) -> dict:
    """Write the set under ``root``; returns ``{"videos", "train", "val", "clips", "classes"}`` (paths, counts).

    ``per_class`` clips per digit go to ``train.csv``, ``val_per_class`` (default: the same number) more to
    ``val.csv``; all live in ``videos/<digit>/``. Frames are ``size`` high (a multiple of 16) and ``width``
    wide (default ``size``; even).
    """
    from sklearn.datasets import load_digits

    if size % 16:
        raise ValueError(f"size must be a multiple of 16, got {size}")
    root = Path(root)
    digits = load_digits()
    rng = np.random.default_rng(seed)
    val_per_class = per_class if val_per_class is None else val_per_class
    lists = {"train": [], "val": []}
    for label in range(classes):
        pool = digits.images[digits.target == label]
        for k in range(per_class + val_per_class):
            clip = moving_digit(pool[k % len(pool)], frames, size, rng, width)
            rel = Path("videos") / str(label) / f"clip_{k}{suffix}"
            write_video(root / rel, clip)
            lists["train" if k < per_class else "val"].append(f"{rel.as_posix()},{label}")
    for split, lines in lists.items():
        (root / f"{split}.csv").write_text("\n".join(lines) + "\n")
    return {"videos": root / "videos", "train": root / "train.csv", "val": root / "val.csv",
            "clips": classes * (per_class + val_per_class), "classes": classes}
