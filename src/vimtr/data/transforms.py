"""The official evaluation preprocessing of Vim and VideoMamba image models, built from torchvision.

hustvl/Vim ``vim/datasets.py`` ``build_transform(is_train=False)`` (DeiT's, shared by VideoMamba's image
models): resize the short side to ``int(img_size / crop_ratio)`` with PIL bicubic, centre-crop
``img_size``, ``ToTensor`` and normalise with the ImageNet mean/std. With the default crop ratio 0.875
that is 224 → 256, 448 → 512, 576 → 658.

Any image goes in: it is first converted to the model's channels, in one place (:func:`to_model_mode`):
RGB for 3-channel models, grayscale for 1-channel ones, whatever the file holds (grayscale, RGBA, palette,
CMYK, 16-bit, 32-bit integer or float). An RGB image into a 3-channel model is untouched, so the official
pipeline stays bit-exact.
"""
from __future__ import annotations

import functools
import inspect

import numpy as np
import torch
from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torchvision import transforms
from torchvision.transforms import InterpolationMode
from torchvision.transforms.functional import to_pil_image

DEFAULT_CROP_RATIO = 0.875  # the official --eval-crop-ratio


IMAGE_MODES = {1: "L", 3: "RGB"}  # model input channels -> the PIL mode the model takes


def _to_pil(img):
    """Let arrays (e.g. ``skimage.data``) and CHW uint8 tensors in too: the resize must run in PIL to be official."""
    if isinstance(img, Image.Image):
        return img
    if isinstance(img, np.ndarray):
        try:
            return Image.fromarray(img)
        except (TypeError, ValueError) as e:
            raise TypeError(f"eval_transform: cannot read a {img.dtype} array of shape {img.shape} as an image ({e}); "
                            f"give HW or HWC (C = 3 or 4) uint8, uint16 or float32") from None
    if isinstance(img, torch.Tensor):
        return to_pil_image(img)
    raise TypeError(f"eval_transform expects a PIL image, a HWC uint8 array or a CHW tensor, got {type(img).__name__}")


def _to_8bit_gray(img: Image.Image) -> Image.Image:
    """16-bit (I;16*), 32-bit integer (I) or float (F) grayscale as 8-bit L, scaled rather than clipped:
    PIL's own conversion clips at 255, which turns a 16-bit photo white."""
    a = np.asarray(img)
    if img.mode == "F":
        a = a.astype(np.float64) * (255.0 if np.nanmax(a, initial=0.0) <= 1.0 else 1.0)
    else:
        a = a.astype(np.float64) / (257.0 if img.mode.startswith("I;16") or a.max(initial=0) > 255 else 1.0)
    return Image.fromarray(np.clip(np.nan_to_num(a), 0, 255).round().astype(np.uint8), mode="L")


def _check_channels(channels: int):
    if channels not in IMAGE_MODES:
        raise ValueError(f"eval_transform: the model takes {channels}-channel input; images convert to 1 (grayscale) "
                         f"or 3 (RGB) channels only. Pass tensors of shape ({channels}, H, W) to the model directly")


def to_model_mode(img, channels: int) -> Image.Image:
    """``img`` (any PIL mode, array or tensor) as the PIL image a ``channels``-channel model takes: RGB or L.

    Alpha is dropped as torchvision's ImageFolder loader drops it (``convert("RGB")``), so a file gives the
    same tensor through a folder or on its own; palette images go through RGBA (PIL's advice for their
    transparency)."""
    _check_channels(channels)
    img = _to_pil(img)
    target = IMAGE_MODES[channels]
    if img.mode == target:
        return img
    if img.mode in ("I", "F") or img.mode.startswith("I;16"):
        img = _to_8bit_gray(img)
    elif img.mode in ("P", "PA"):
        img = img.convert("RGBA")
    return img.convert(target)


def _model_channels(model_or_name) -> int:
    if isinstance(model_or_name, str):
        from vimtr.models.registry import model_config
        from vimtr.models.vim import VisionMamba
        _, cfg = model_config(model_or_name)
        return cfg.get("in_chans", inspect.signature(VisionMamba).parameters["in_chans"].default)
    return int(model_or_name.patch_embed.proj.weight.shape[1])


def normalisation(model_or_name) -> tuple[tuple, tuple]:
    """(mean, std) per channel: a bundled model's own (its card), else ImageNet's, the official one, for RGB
    models, and its channel average for grayscale ones (as timm does for one channel)."""
    channels = _model_channels(model_or_name)
    own = (getattr(model_or_name, "checkpoint_info", None) or {}).get("normalisation") or {}
    if own.get("mean") is not None and own.get("std") is not None:
        mean, std = own["mean"], own["std"]
        mean = tuple(mean) if isinstance(mean, (list, tuple)) else (float(mean),) * channels
        std = tuple(std) if isinstance(std, (list, tuple)) else (float(std),) * channels
        return mean, std
    if channels == 3:
        return tuple(IMAGENET_DEFAULT_MEAN), tuple(IMAGENET_DEFAULT_STD)
    return (sum(IMAGENET_DEFAULT_MEAN) / 3,) * channels, (sum(IMAGENET_DEFAULT_STD) / 3,) * channels


def _img_size(model_or_name, img_size) -> tuple[int, int]:
    if img_size is None:
        if isinstance(model_or_name, str):
            from vimtr.models.registry import model_config
            from vimtr.models.vim import VisionMamba
            _, cfg = model_config(model_or_name)  # also rejects unknown names, with suggestions
            # Registered configs leave img_size to the constructor default, so read that default.
            img_size = cfg.get("img_size", inspect.signature(VisionMamba).parameters["img_size"].default)
        else:
            img_size = model_or_name.patch_embed.img_size
    return (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)


def eval_transform(model_or_name, img_size: int | None = None, crop_ratio: float = DEFAULT_CROP_RATIO):
    """The official eval pipeline for a model (reads ``model.patch_embed.img_size``) or a registered name.

    ``img_size`` overrides the size (required to describe e.g. a 448 fine-tune by name). Returns a
    ``torchvision.transforms.Compose`` mapping an image (PIL in any mode, an HWC array or a CHW tensor) to
    a normalised (C, H, W) float tensor with the model's C (see :func:`to_model_mode`,
    :func:`normalisation`); the Compose also carries ``channels``, ``mean`` and ``std``. For video models
    this is the per-frame image pipeline at the model's frame size, not VideoMamba's multi-crop video
    evaluation.
    """
    h, w = _img_size(model_or_name, img_size)
    channels = _model_channels(model_or_name)
    _check_channels(channels)
    mean, std = normalisation(model_or_name)
    # DeiT resizes the short side to int(size / ratio); for non-square sizes the larger side sets the scale.
    resize = int(max(h, w) / crop_ratio)
    pipeline = transforms.Compose([
        transforms.Lambda(functools.partial(to_model_mode, channels=channels)),
        transforms.Resize(resize, interpolation=InterpolationMode.BICUBIC),
        transforms.CenterCrop((h, w)),
        transforms.ToTensor(),
        transforms.Normalize(mean, std),
    ])
    pipeline.channels, pipeline.mean, pipeline.std = channels, mean, std
    return pipeline
