"""Datasets for the engines: ImageFolder (ImageNet layout) and the built-in ``digits``, plus samplers.

Class indices follow torchvision's ImageFolder (sorted folder names), which for ImageNet's 1000 synset
folders is exactly the index order of the official Vim / VideoMamba heads.

Training determinism: the order of an epoch is a function of (seed, epoch) only, and every sample's
augmentation is seeded from (seed, epoch, position). So a run resumed mid-epoch replays exactly the
same batches with exactly the same augmentations, whatever the number of loader workers.
"""
from __future__ import annotations

import contextlib
import random
import warnings
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler, Subset, default_collate, get_worker_info
from torchvision.datasets import ImageFolder

from vimtr.errors import CorruptImageError, CorruptImageWarning, UsageError

DIGITS = "digits"
# Built-in datasets (in-memory tensors, no download): spec -> module (tensors, dataset, training_set, to_image).
BUILTIN = {DIGITS: "vimtr.data.digits", "digits-clutter": "vimtr.data.clutter"}
ON_CORRUPT = ("skip", "fail")
LAYOUT_HINT = ("an ImageFolder: one sub-folder per class holding its images, e.g. ImageNet's "
               "val/n01440764/ILSVRC2012_val_00000293.JPEG (or a folder with train/ and val/ inside), "
               "or 'digits' / 'digits-clutter' for the built-in datasets")


class Skipped(NamedTuple):
    """What a dataset returns for an unreadable file under ``on_corrupt="skip"``: the loaders drop it from
    the batch and report the file by name (:func:`collate_skip`)."""
    path: str


def is_skipped(item) -> bool:
    return item is None or isinstance(item, Skipped)


class SafeImageFolder(ImageFolder):
    """ImageFolder that skips (returns None, with a warning) or rejects (naming the file) undecodable images."""

    def __init__(self, root, transform=None, on_corrupt: str = "skip"):
        if on_corrupt not in ON_CORRUPT:
            raise UsageError(f"on_corrupt must be one of {ON_CORRUPT}, got {on_corrupt!r}")
        super().__init__(str(root), transform=transform)
        self.on_corrupt = on_corrupt

    def __getitem__(self, index):
        path, target = self.samples[index]
        try:
            image = self.loader(path)  # PIL decodes lazily; the loader's convert("RGB") forces the decode here
        except (OSError, ValueError, SyntaxError) as e:  # UnidentifiedImageError and truncation are OSErrors
            msg = f"{path}: cannot decode image ({type(e).__name__}: {e})"
            if self.on_corrupt == "fail":
                raise CorruptImageError(f"{msg}; replace or delete the file, or pass --on-corrupt skip to skip "
                                        f"and count unreadable images") from None
            warnings.warn(f"{msg}; skipped", CorruptImageWarning, stacklevel=2)
            return Skipped(path)
        if self.transform is not None:
            image = self.transform(image)
        return image, target


def _split_root(root: Path, split: str) -> Path:
    """``root/split`` when it exists (ImageNet's train/ + val/ layout), else ``root`` itself."""
    return root / split if (root / split).is_dir() else root


def image_folder(path, split: str, transform=None, on_corrupt: str = "skip") -> SafeImageFolder:
    root = Path(path).expanduser()
    if not root.is_dir():
        what = "is a file, not a folder" if root.exists() else "does not exist"
        raise UsageError(f"data folder {str(root)!r} {what}; expected {LAYOUT_HINT}")
    root = _split_root(root, split)
    try:
        return SafeImageFolder(root, transform=transform, on_corrupt=on_corrupt)
    except FileNotFoundError as e:  # no class folders, or a class folder without images
        raise UsageError(f"data folder {str(root)!r} holds no usable images ({e}); expected {LAYOUT_HINT}") from None


def builtin(spec):
    """The module of a built-in dataset (``digits``, ``digits-clutter``), or None for anything else."""
    import importlib

    module = BUILTIN.get(str(spec))
    return importlib.import_module(module) if module else None


def load_dataset(spec, split: str, transform=None, on_corrupt: str = "skip") -> Dataset:
    """A built-in dataset (``digits``, ``digits-clutter``: already-normalised tensors; ``transform`` is
    ignored) or an ImageFolder path.

    ``split``: ``"train"`` or ``"val"`` (a built-in dataset's ``val`` is its fixed ``test`` split).
    """
    module = builtin(spec)
    if module is not None:
        ds = module.dataset("train" if split == "train" else "test")
        ds.classes = [str(i) for i in range(10)]
        ds.root = str(spec)
        return ds
    return image_folder(spec, split, transform, on_corrupt)


def num_classes(dataset) -> int | None:
    """Class count a dataset declares (ImageFolder/digits ``classes``), looking through Subsets."""
    while isinstance(dataset, Subset):
        dataset = dataset.dataset
    classes = getattr(dataset, "classes", None)
    return len(classes) if classes is not None else None


def describe(dataset) -> str:
    while isinstance(dataset, Subset):
        dataset = dataset.dataset
    return str(getattr(dataset, "root", type(dataset).__name__))


def check_classes(model, dataset, what: str = "dataset"):
    n, head = num_classes(dataset), getattr(model, "num_classes", None)
    if n is not None and head is not None and n != head:
        raise UsageError(f"{what} {describe(dataset)!r} has {n} classes but the model's head has {head} outputs; "
                         f"use the dataset the checkpoint was trained on (ImageNet-1k: 1000 synset folders) or a "
                         f"checkpoint with a {n}-class head")


def check_image_model(model, dataset):
    """Folder images load as RGB: a model of other channels needs a transform that converts them
    (``eval_transform`` does: its ``channels``)."""
    in_chans = model.input_size[0]
    if isinstance(dataset, ImageFolder) and in_chans != 3 and getattr(dataset.transform, "channels", 3) != in_chans:
        raise UsageError(f"image folder {dataset.root!r} gives RGB images but the model takes {in_chans}-channel "
                         f"input; use a 3-channel model (or a tensor dataset such as 'digits' for 1-channel models)")


def fraction_subset(dataset, fraction: float, seed: int) -> Dataset:
    """A fixed random ``fraction`` of ``dataset`` (same subset for the same seed), for data-efficiency runs."""
    if not 0 < fraction <= 1:
        raise UsageError(f"train fraction must be in (0, 1], got {fraction}")
    if fraction == 1:
        return dataset
    n = len(dataset)
    k = max(1, round(fraction * n))
    keep = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).narrow(0, 0, k).sort().values
    return Subset(dataset, keep.tolist())


# ---------------------------------------------------------------------------------------------- batching
def collate_skip(batch):
    """Default collate over the readable samples; returns (inputs, targets, names of the skipped files).

    A dataset marks an unreadable file with :class:`Skipped` (``None`` is accepted too, named
    ``"<unnamed>"``)."""
    good = [b for b in batch if not is_skipped(b)]
    skipped = [b.path if isinstance(b, Skipped) else "<unnamed>" for b in batch if is_skipped(b)]
    if not good:
        return None, None, skipped
    images, targets = default_collate(good)[:2]
    return images, targets, skipped


def unpack(batch):
    """(inputs, targets, skipped file names) from a ``collate_skip`` batch or a plain (inputs, targets) one."""
    if len(batch) == 3:
        x, y, skipped = batch
        return x, y, list(skipped) if not isinstance(skipped, int) else ["<unnamed>"] * skipped
    return batch[0], batch[1], []


# ---------------------------------------------------------------------------------------------- training order
class EpochSampler(Sampler):
    """This rank's share of a training epoch as ``(index, sample_seed)`` keys, resumable mid-epoch.

    The order depends only on (seed, epoch): a permutation (or the identity), each index repeated
    ``repeats`` times in a row (DeiT's repeated augmentation: the copies go to consecutive ranks, or to
    the same batch on one rank), dealt ``rank::world``, cut to ``len(dataset) // world`` samples per rank
    (so an epoch is as long as without repetition) and to whole batches. ``set_epoch(e, skip)`` starts
    ``skip`` samples into epoch ``e``. timm's RepeatAugSampler cannot skip, hence this class.
    """

    def __init__(self, size: int, batch_size: int, *, rank: int = 0, world: int = 1, seed: int = 0,
                 shuffle: bool = True, repeats: int = 1):
        if repeats < 1:
            raise UsageError(f"repeated augmentation count must be >= 1, got {repeats}")
        self.size, self.batch_size, self.rank, self.world = size, batch_size, rank, world
        self.seed, self.shuffle, self.repeats = seed, shuffle, repeats
        self.batches = (size // world) // batch_size
        self.epoch, self.skip = 0, 0

    def set_epoch(self, epoch: int, skip: int = 0):
        self.epoch, self.skip = epoch, skip

    def __len__(self):
        return self.batches * self.batch_size - self.skip

    def __iter__(self):
        g = torch.Generator().manual_seed(hash((self.seed, self.epoch)) & 0xFFFF_FFFF_FFFF)
        order = torch.randperm(self.size, generator=g) if self.shuffle else torch.arange(self.size)
        if self.repeats > 1:
            order = order.repeat_interleave(self.repeats)
        order = order.tolist()
        positions = range(self.rank, len(order), self.world)[: self.batches * self.batch_size]
        for pos in positions[self.skip:]:
            # Tuple hashes of ints do not depend on PYTHONHASHSEED: the same seed in every process.
            yield order[pos], hash((self.seed, self.epoch, pos)) & 0xFFFF_FFFF


@contextlib.contextmanager
def seeded_rng(seed: int):
    """Seed python, numpy and torch's CPU generator for one sample's augmentation.

    In the main process (``workers=0``) the previous states are restored afterwards: they also drive
    drop-path and mixup, whose streams must not shift. A loader worker's generators serve only its
    samples, so there the save/restore (most of the cost) is skipped. ``torch.manual_seed`` is avoided
    on purpose: it would also reseed the CUDA generators (and costs ~10x more).
    """
    saved = None
    if get_worker_info() is None:
        saved = random.getstate(), np.random.get_state(), torch.get_rng_state()
    random.seed(seed)
    np.random.seed(seed)
    torch.random.default_generator.manual_seed(seed)
    try:
        yield
    finally:
        if saved is not None:
            random.setstate(saved[0])
            np.random.set_state(saved[1])
            torch.set_rng_state(saved[2])


class SeededDataset(Dataset):
    """Applies ``transform`` to ``dataset[index]`` under RNGs seeded by the sampler's per-sample seed."""

    def __init__(self, dataset, transform=None):
        self.dataset, self.transform = dataset, transform

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, key):
        index, seed = key
        with seeded_rng(seed):
            item = self.dataset[index]
            if is_skipped(item) or self.transform is None:
                return item
            image, target = item[0], item[1]
            return self.transform(image), target


def loader_workers(dataset, requested: int) -> int:
    """Worker processes for a loader: none for in-memory tensors (``digits``: workers only add start-up
    cost), otherwise the request capped at the machine's cores (DataLoader warns past that)."""
    import os

    base = getattr(dataset, "dataset", dataset)  # through Subset / SeededDataset wrappers
    if isinstance(base, torch.utils.data.TensorDataset):
        return 0
    return max(0, min(int(requested), os.cpu_count() or 1))
