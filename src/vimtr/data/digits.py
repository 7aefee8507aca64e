"""The built-in dataset ``digits``: scikit-learn's handwritten digits (1,797 8×8 images, 10 classes).

Ships inside scikit-learn, so the demo and the tests need no download. Each 8×8 digit is upscaled to
``DIGIT_SIZE``×``DIGIT_SIZE`` (bilinear) and centred on a blank 32×32 canvas, so a patch-4 model sees 8×8 = 64
patch tokens plus the class token, of which roughly the outer ring (about 60%) is background: like a photo,
the image has tokens that carry the object and tokens that carry nothing, which is what token reduction
exploits. (Filling the whole frame instead makes every token part of the digit and neighbouring tokens
near-copies; on such a model no scoring rule beats random pruning on average, see the README.) The split
is fixed: stratified 80/20 with ``random_state=0`` (1,437 train / 360 test images).
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset

NAME = "digits"
IMG_SIZE = 32  # the canvas
DIGIT_SIZE = 20  # the upscaled digit, centred on the canvas
SPLIT_SEED = 0
TEST_FRACTION = 0.2
MEAN, STD = 0.1, 0.3  # of the canvas's [0, 1] pixels, rounded; fixed so the checkpoint never depends on data


def _load():
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError as e:  # pragma: no cover - scikit-learn is a dependency
        raise ImportError("the 'digits' dataset needs scikit-learn: pip install scikit-learn") from e
    d = load_digits()
    idx = torch.arange(len(d.target)).numpy()
    train_idx, test_idx = train_test_split(idx, test_size=TEST_FRACTION, random_state=SPLIT_SEED,
                                           stratify=d.target)
    return d.images, d.target, {"train": sorted(train_idx), "test": sorted(test_idx)}


def digits_tensors(split: str = "test") -> tuple[torch.Tensor, torch.Tensor]:
    """(images (N, 1, 32, 32) normalised float32, labels (N,) int64) of the fixed ``train``/``test`` split."""
    if split not in ("train", "test"):
        raise ValueError(f"digits split must be 'train' or 'test', got {split!r}")
    images, target, splits = _load()
    idx = splits[split]
    x = torch.as_tensor(images[idx], dtype=torch.float32).unsqueeze(1) / 16.0
    x = F.interpolate(x, size=(DIGIT_SIZE, DIGIT_SIZE), mode="bilinear", align_corners=False)
    before = (IMG_SIZE - DIGIT_SIZE) // 2
    after = IMG_SIZE - DIGIT_SIZE - before
    x = F.pad(x, (before, after, before, after))  # zeros: the blank canvas
    return (x - MEAN) / STD, torch.as_tensor(target[idx], dtype=torch.long)


def digits_dataset(split: str = "test") -> TensorDataset:
    return TensorDataset(*digits_tensors(split))


# RandomAffine (degrees, shift in px, scale range): the bundled model's, and a stronger one to explore with.
AUGMENT = {"default": (10, 2, (0.9, 1.1)), "strong": (15, 4, (0.75, 1.15))}


def augment(x: torch.Tensor, strength: str = "default") -> torch.Tensor:
    """Per image of a batch (N, 1, H, W): rotation ±10°, shift ±2 px, scale 0.9-1.1 (``strong``: ±15°,
    ±4 px, 0.75-1.15; torchvision's RandomAffine on tensors, drawing from torch's global generator),
    background-filled."""
    if strength not in AUGMENT:
        raise ValueError(f"digits augmentation strength must be one of {sorted(AUGMENT)}, got {strength!r}")
    t = _affine(strength)
    return torch.stack([t(img) for img in x])


@functools.lru_cache(maxsize=None)
def _affine(strength: str):
    """One RandomAffine per strength: building it anew cost ~0.1 ms of the ~0.55 ms of a re-training read."""
    from torchvision.transforms import v2

    degrees, shift, scale = AUGMENT[strength]
    return v2.RandomAffine(degrees=degrees, translate=(shift / IMG_SIZE, shift / IMG_SIZE), scale=scale,
                           interpolation=v2.InterpolationMode.BILINEAR, fill=-MEAN / STD)


class AugmentedDigits(torch.utils.data.Dataset):
    """A digits split whose every read is a fresh random affine map of the image (the bundled model's
    training augmentation), for re-training: under vimtr's trainer each read is seeded per sample and
    epoch, so a run is reproducible and independent of the number of processes."""

    def __init__(self, split: str = "train", strength: str = "default"):
        self.dataset, self.strength = digits_dataset(split), strength
        augment(self.dataset[0][0][None], strength)  # a bad strength fails here, not in the loop

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        x, y = self.dataset[i]
        return augment(x[None], self.strength)[0], y


# The interface every built-in dataset module offers (vimtr.data.folders.builtin): the fixed splits as
# tensors or a dataset, the training reads (a fresh random variation per read), plotting.
def tensors(split: str = "test") -> tuple[torch.Tensor, torch.Tensor]:
    return digits_tensors(split)


def dataset(split: str = "test") -> TensorDataset:
    return digits_dataset(split)


def training_set(split: str = "train") -> "AugmentedDigits":
    return AugmentedDigits(split)


def to_image(x: torch.Tensor):
    """Undo the normalisation of one (1, H, W) tensor: an (H, W) array in [0, 1] for plotting."""
    return (x[0] * STD + MEAN).clamp(0, 1).cpu().numpy()
