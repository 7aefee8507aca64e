"""VideoMamba's clip preprocessing (``video_sm/datasets/kinetics_sparse.py``), written with torch ops.

Frames arrive as one ``(T, H, W, 3)`` uint8 array; every function returns a normalised ``(3, T, S, S)``
float tensor (channels, frames, height, width: the layout the video model takes).

Evaluation (``test`` mode, what the published K400 numbers use): resize the short side to ``S``
(bilinear, the long side to ``int(S · long / short)``, rounded back to uint8 as OpenCV's resize of uint8
frames), then ``crops`` squares of side ``S`` spread evenly along the long side (start
``int(k · (long − S) / (crops − 1))``; one crop: the centre, ``int((long − S) / 2)``), then /255 and the
ImageNet mean/std. The resize is torch's bilinear (half-pixel centres, no antialiasing), which is
OpenCV's ``INTER_LINEAR`` up to its fixed-point rounding.

Training (``_aug_frame``): RandAugment with the same operations on every frame of a clip, a random
resized crop (area 8-100 %, aspect 3/4-4/3) to ``S`` shared by all frames, a horizontal flip with
probability ½, normalisation, then random erasing frame by frame.
"""
from __future__ import annotations

import random

import numpy as np
import torch
import torch.nn.functional as F

MEAN = (0.485, 0.456, 0.406)  # IMAGENET_DEFAULT_MEAN, as VideoMamba
STD = (0.229, 0.224, 0.225)


def _normalise(frames: torch.Tensor) -> torch.Tensor:
    """(T, 3, H, W) uint8 or float in [0, 255] -> (3, T, H, W) normalised float32."""
    x = frames.float().div_(255.0)
    mean = torch.tensor(MEAN).view(1, 3, 1, 1)
    std = torch.tensor(STD).view(1, 3, 1, 1)
    return ((x - mean) / std).permute(1, 0, 2, 3).contiguous()


def resize_short_side(frames: np.ndarray, size: int) -> torch.Tensor:
    """(T, H, W, 3) uint8 -> (T, 3, h, w) uint8 with min(h, w) == size (VideoMamba's ``Resize(short_side)``)."""
    x = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2)
    H, W = x.shape[-2:]
    if min(H, W) == size:  # the official resize returns the clip untouched then
        return x
    new = (size, int(size * W / H)) if H <= W else (int(size * H / W), size)
    y = F.interpolate(x.float(), size=new, mode="bilinear", align_corners=False, antialias=False)
    return y.round_().clamp_(0, 255).to(torch.uint8)


def crop_starts(long: int, size: int, crops: int) -> list[int]:
    """Where the ``crops`` squares start along the long side (VideoMamba's test ``spatial_start``)."""
    if crops == 1:
        return [int((long - size) / 2)]
    step = (long - size) / (crops - 1)
    return [int(k * step) for k in range(crops)]


def eval_views(frames: np.ndarray, size: int, crops: int) -> list[torch.Tensor]:
    """One temporal clip's frames -> ``crops`` normalised (3, T, size, size) views (left to right / top to
    bottom along the long side)."""
    x = resize_short_side(frames, size)
    H, W = x.shape[-2:]
    views = []
    for start in crop_starts(max(H, W), size, crops):
        v = x[:, :, start:start + size, :size] if H >= W else x[:, :, :size, start:start + size]
        views.append(_normalise(v))
    return views


# ---------------------------------------------------------------------------------------------- training
class ClipAugment:
    """VideoMamba's training augmentation of one clip (see the module docstring).

    ``auto_augment``: a timm RandAugment spec (K400: ``rand-m5-n2-mstd0.25-inc1``) or ''/None;
    ``reprob``: random-erasing probability. Uses python's, numpy's and torch's global RNGs, so a clip's
    augmentation is fixed by the sampler's per-sample seed (:func:`vimtr.data.folders.seeded_rng`).
    """

    def __init__(self, size: int, auto_augment: str | None = None, reprob: float = 0.0,
                 scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), flip: bool = True):
        self.size, self.scale, self.ratio, self.flip = size, scale, ratio, flip
        self.rand_augment = None
        if auto_augment:
            from PIL import Image
            from timm.data.auto_augment import rand_augment_transform

            if not auto_augment.startswith("rand"):
                raise ValueError(f"video augmentation takes a RandAugment spec ('rand-...'), got {auto_augment!r}")
            hparams = {"translate_const": int(size * 0.45), "interpolation": Image.BICUBIC}
            self.rand_augment = rand_augment_transform(auto_augment, hparams)
        self.erase = None
        if reprob > 0:
            from timm.data.random_erasing import RandomErasing
            self.erase = RandomErasing(reprob, mode="pixel", max_count=1, num_splits=0, device="cpu")

    def _same_ops_on_every_frame(self, frames: np.ndarray) -> np.ndarray:
        """RandAugment draws its operations and magnitudes from python's and numpy's RNGs: replaying their
        state for each frame applies the identical operations to all of them (one augmentation per clip)."""
        from PIL import Image

        py_state, np_state = random.getstate(), np.random.get_state()
        out = []
        for frame in frames:
            random.setstate(py_state)
            np.random.set_state(np_state)
            out.append(np.asarray(self.rand_augment(Image.fromarray(frame))))
        return np.stack(out)

    def __call__(self, frames: np.ndarray) -> torch.Tensor:
        from torchvision.transforms import RandomResizedCrop

        if self.rand_augment is not None:
            frames = self._same_ops_on_every_frame(frames)
        x = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2)  # (T, 3, H, W) uint8
        x = _normalise(x).permute(1, 0, 2, 3)  # normalised (T, 3, H, W), as the official order
        i, j, h, w = RandomResizedCrop.get_params(x[0], scale=list(self.scale), ratio=list(self.ratio))
        x = F.interpolate(x[:, :, i:i + h, j:j + w], size=(self.size, self.size), mode="bilinear",
                          align_corners=False)
        if self.flip and torch.rand(1).item() < 0.5:
            x = x.flip(-1)
        if self.erase is not None:
            x = self.erase(x)  # a 4-D input is a batch: each frame gets its own draw, as VideoMamba's
        return x.permute(1, 0, 2, 3).contiguous()
