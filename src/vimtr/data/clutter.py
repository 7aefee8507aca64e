"""The built-in dataset ``digits-clutter``: scikit-learn's digits anywhere on a larger, cluttered canvas.

Each image is one 8×8 digit of the fixed ``digits`` split (the same stratified 80/20, ``random_state=0``:
1,437 train / 360 test digits), upscaled (bilinear) to a random side of ``SCALE`` pixels, turned by up to
``ROTATION`` degrees and put at a uniformly random place on a 48×48 canvas, so a patch-4 model sees
12×12 = 144 patch tokens and no position is always background. Around it:

- a background texture: smooth random shading (a 6×6 uniform field upsampled bicubically, amplitude
  ``TEXTURE``) plus fine pixel noise (std ``NOISE``);
- ``FRAGMENTS`` fragments of other digits: a random window of 3-5 × 3-5 of another digit's 8×8 pixels at
  the digit's own scale, placed where it does not touch the digit's box (a fragment that finds no free
  place in ``TRIES`` draws is left out), so the label stays the digit's while strokes elsewhere look
  like parts of digits.

Ink is composed over the background as ``bg + (1 - bg)·ink``. Leakage: the fragments of a split's images
come from that split's digits only (never the image's own digit), so no test digit is ever seen in
training, not even in pieces. The ``test`` split is drawn once from ``TEST_SEED`` (one image per test
digit, 360 images); the ``train`` tensors from ``TRAIN_SEED``. Training reads fresh draws instead
(:class:`ClutterDigits`, :func:`render_split` with any generator): every epoch sees new placements.

Why this dataset: on ``digits`` the digit is always centred on a blank canvas, so the top rows are always
background and a content-blind rule (drop the first tokens in raster order) keeps the accuracy that the
informed methods fight for (see ``docs/demo.md``). Here where the digit is, and what is digit and what
is clutter, has to be read from the image.
"""
from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, TensorDataset

from vimtr.data import digits

NAME = "digits-clutter"
IMG_SIZE = 48  # the canvas; patch 4 -> 144 tokens
SCALE = (18, 28)  # side of the upscaled digit in pixels, uniform
ROTATION = 10.0  # degrees, uniform in ±ROTATION
FRAGMENTS = 3  # other-digit fragments per image (each left out if it finds no free place)
FRAGMENT_SIDE = (3, 5)  # window of the other digit's 8×8 pixels, per side, uniform integer
TRIES = 8  # places drawn per fragment
TEXTURE = (0.0, 0.35)  # amplitude of the smooth background shading, uniform
NOISE = 0.04  # std of the pixel noise
TEST_SEED, TRAIN_SEED = 20_250_101, 1
MEAN, STD = 0.17, 0.21  # of the canvas's [0, 1] pixels, rounded; fixed so the checkpoint never depends on data


@functools.lru_cache(maxsize=2)
def _split_digits(split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(the split's 8×8 digits in [0, 1] (N, 8, 8), labels (N,)): the ``digits`` dataset's fixed split."""
    if split not in ("train", "test"):
        raise ValueError(f"{NAME} split must be 'train' or 'test', got {split!r}")
    images, target, splits = digits._load()
    idx = splits[split]
    return (torch.as_tensor(images[idx], dtype=torch.float32) / 16.0,
            torch.as_tensor(target[idx], dtype=torch.long))


def _uniform(n: int, lo: float, hi: float, g: torch.Generator) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(n, generator=g)


def _paste(src: torch.Tensor, side: torch.Tensor, x0: torch.Tensor, y0: torch.Tensor, angle: torch.Tensor,
           window: tuple[torch.Tensor, ...] | None = None) -> torch.Tensor:
    """Draw each (8, 8) ``src`` image (N, 8, 8) as a box of ``side`` pixels with its top-left corner at
    (``x0``, ``y0``) on a blank canvas, turned by ``angle`` (radians) about the box centre: (N, 1, S, S).

    One batched ``grid_sample`` (bilinear): canvas pixel centres are mapped into the source's normalised
    coordinates. ``window`` (left, top, width, height in source pixels, each (N,)): only that part of the
    source is drawn, as a box of ``side``·width/8 × ``side``·height/8 whose corner is at (x0, y0)."""
    n, S = src.shape[0], IMG_SIZE
    if window is None:
        left = top = torch.zeros(n)
        width = height = torch.full((n,), 8.0)
    else:
        left, top, width, height = (w.float() for w in window)
    scale = side / 8.0  # canvas pixels per source pixel
    # Canvas pixel centres, in pixels.
    coords = torch.arange(S, dtype=torch.float32) + 0.5
    cx = (x0 + scale * width / 2)[:, None, None]
    cy = (y0 + scale * height / 2)[:, None, None]
    dx, dy = coords[None, None, :] - cx, coords[None, :, None] - cy
    cos, sin = torch.cos(angle)[:, None, None], torch.sin(angle)[:, None, None]
    # Into source pixels (rotated about the box centre), then to grid_sample's [-1, 1] (align_corners=False).
    u = (cos * dx + sin * dy) / scale[:, None, None] + (left + width / 2)[:, None, None]
    v = (-sin * dx + cos * dy) / scale[:, None, None] + (top + height / 2)[:, None, None]
    grid = torch.stack((u / 4.0 - 1.0, v / 4.0 - 1.0), dim=-1)
    out = F.grid_sample(src[:, None], grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    if window is not None:  # only the window: outside it the source's other strokes stay hidden
        # Faded over the window's outermost source pixel: a hard cut would draw a bright box outline.
        edge = torch.minimum(torch.minimum(u - left[:, None, None], (left + width)[:, None, None] - u),
                             torch.minimum(v - top[:, None, None], (top + height)[:, None, None] - v))
        out = out * edge.clamp(0, 1)[:, None]
    return out


def render(images: torch.Tensor, pool: torch.Tensor, generator: torch.Generator,
           own: torch.Tensor | None = None) -> torch.Tensor:
    """Canvases (N, 1, 48, 48) in [0, 1] for the 8×8 digits ``images`` (N, 8, 8) in [0, 1], their
    fragments taken from ``pool`` (M, 8, 8). ``own`` (N,): each image's index in ``pool``, never used as
    its own fragment. Every random choice is drawn from ``generator``, in a fixed order: the same
    generator state gives the same canvases."""
    g, n, S = generator, images.shape[0], IMG_SIZE
    side = _uniform(n, *SCALE, g)
    x0, y0 = _uniform(n, 0, 1, g) * (S - side), _uniform(n, 0, 1, g) * (S - side)
    angle = _uniform(n, -ROTATION, ROTATION, g) * math.pi / 180
    ink = _paste(images, side, x0, y0, angle)
    for _ in range(FRAGMENTS):
        pick = torch.randint(0, pool.shape[0] - 1 if own is not None else pool.shape[0], (n,), generator=g)
        if own is not None:
            pick = pick + (pick >= own).long()  # any pool digit but the image's own
        width = torch.randint(FRAGMENT_SIDE[0], FRAGMENT_SIDE[1] + 1, (n,), generator=g)
        height = torch.randint(FRAGMENT_SIDE[0], FRAGMENT_SIDE[1] + 1, (n,), generator=g)
        left = (torch.rand(n, generator=g) * (9 - width)).floor()
        top = (torch.rand(n, generator=g) * (9 - height)).floor()
        fw, fh = side * width / 8, side * height / 8
        fx = torch.rand(n, TRIES, generator=g) * (S - fw)[:, None]
        fy = torch.rand(n, TRIES, generator=g) * (S - fh)[:, None]
        # Free: the fragment's box (grown by 1 px for the bilinear edge) misses the digit's box.
        free = ((fx + fw[:, None] + 1 <= x0[:, None]) | (fx - 1 >= (x0 + side)[:, None])
                | (fy + fh[:, None] + 1 <= y0[:, None]) | (fy - 1 >= (y0 + side)[:, None]))
        first = free.float().argmax(dim=1)  # the first free draw (0 when none: masked out below)
        rows = torch.arange(n)
        part = _paste(pool[pick], side, fx[rows, first], fy[rows, first], torch.zeros(n),
                      window=(left, top, width, height))
        ink = torch.maximum(ink, part * free.any(dim=1).float()[:, None, None, None])
    shading = F.interpolate(torch.rand(n, 1, 6, 6, generator=g), size=(S, S), mode="bicubic", align_corners=False)
    background = (shading.clamp(0, 1) * _uniform(n, *TEXTURE, g)[:, None, None, None]
                  + NOISE * torch.randn(n, 1, S, S, generator=g)).clamp(0, 1)
    return background + (1 - background) * ink.clamp(0, 1)


def normalise(x: torch.Tensor) -> torch.Tensor:
    return (x - MEAN) / STD


def render_split(split: str, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(normalised canvases (N, 1, 48, 48), labels) of every digit of ``split``, drawn from ``generator``."""
    images, labels = _split_digits(split)
    own = torch.arange(len(images))
    return normalise(render(images, images, generator, own)), labels


def clutter_tensors(split: str = "test") -> tuple[torch.Tensor, torch.Tensor]:
    """The fixed ``train``/``test`` images (``TRAIN_SEED``/``TEST_SEED``): (N, 1, 48, 48) float32, (N,) int64."""
    if split not in ("train", "test"):
        raise ValueError(f"{NAME} split must be 'train' or 'test', got {split!r}")
    return render_split(split, torch.Generator().manual_seed(TEST_SEED if split == "test" else TRAIN_SEED))


def clutter_dataset(split: str = "test") -> TensorDataset:
    return TensorDataset(*clutter_tensors(split))


class ClutterDigits(Dataset):
    """A split whose every read is a fresh canvas for its digit (new place, scale, turn, fragments and
    texture, drawn from torch's global generator), for training: under vimtr's trainer each read is
    seeded per sample and epoch, so a run is reproducible and independent of the number of processes."""

    def __init__(self, split: str = "train"):
        self.images, self.labels = _split_digits(split)

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        g = torch.Generator().manual_seed(int(torch.randint(0, 2 ** 62, (1,)).item()))
        x = render(self.images[i:i + 1], self.images, g, torch.tensor([i]))
        return normalise(x)[0], self.labels[i]


# The interface every built-in dataset module offers (see vimtr.data.folders.builtin).
tensors, dataset, training_set = clutter_tensors, clutter_dataset, ClutterDigits


def to_image(x: torch.Tensor):
    """Undo the normalisation of one (1, H, W) tensor: an (H, W) array in [0, 1] for plotting."""
    return (x[0] * STD + MEAN).clamp(0, 1).cpu().numpy()
