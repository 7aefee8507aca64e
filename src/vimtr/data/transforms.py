"""The official evaluation preprocessing of Vim and VideoMamba image models, built from torchvision.

hustvl/Vim ``vim/datasets.py`` ``build_transform(is_train=False)`` (DeiT's, shared by VideoMamba's image
models): resize the short side to ``int(img_size / crop_ratio)`` with PIL bicubic, centre-crop
``img_size``, ``ToTensor`` and normalise with the ImageNet mean/std. With the default crop ratio 0.875
that is 224 → 256, 448 → 512, 576 → 658.
"""
from __future__ import annotations

import inspect

import numpy as np
import torch
from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torchvision import transforms
from torchvision.transforms import InterpolationMode
from torchvision.transforms.functional import to_pil_image

DEFAULT_CROP_RATIO = 0.875  # the official --eval-crop-ratio


def _to_pil(img):
    """Let arrays (e.g. ``skimage.data``) and CHW uint8 tensors in too: the resize must run in PIL to be official."""
    if isinstance(img, Image.Image):
        return img
    if isinstance(img, np.ndarray):
        return Image.fromarray(img)
    if isinstance(img, torch.Tensor):
        return to_pil_image(img)
    raise TypeError(f"eval_transform expects a PIL image, a HWC uint8 array or a CHW tensor, got {type(img).__name__}")


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
    ``torchvision.transforms.Compose`` mapping a PIL image (or an HWC uint8 array) to a normalised
    (C, H, W) float tensor. For video models this is the per-frame image pipeline at the model's frame
    size, not VideoMamba's multi-crop video evaluation.
    """
    h, w = _img_size(model_or_name, img_size)
    # DeiT resizes the short side to int(size / ratio); for non-square sizes the larger side sets the scale.
    resize = int(max(h, w) / crop_ratio)
    return transforms.Compose([
        transforms.Lambda(_to_pil),
        transforms.Resize(resize, interpolation=InterpolationMode.BICUBIC),
        transforms.CenterCrop((h, w)),
        transforms.ToTensor(),
        transforms.Normalize(IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD),
    ])
