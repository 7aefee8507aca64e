"""Stand-ins for a user's own data, for the tests that run the README's and --help's commands: a small Vim
written in the official checkpoint format, an ImageNet-layout folder, a photo. Deterministic."""
import argparse

import numpy as np
import torch
from PIL import Image

import vimtr

CLASSES = 4


def official_checkpoint(path) -> str:
    """A Vim in hustvl/Vim's format (``model``, ``model_ema``, ``epoch``, ``args``): 12 blocks, width 48,
    8×8 patches of a 64×64 image (64 patch tokens + the middle class token), a 4-class head."""
    torch.manual_seed(0)
    model = vimtr.create_model("vim_tiny", depth=12, embed_dim=48, img_size=64, patch_size=8,
                               num_classes=CLASSES).eval()
    state = model.state_dict()
    args = argparse.Namespace(model="vim_tiny_patch16_224_bimambav2_final_pool_mean_abs_pos_embed_with_midclstok_div2",
                              input_size=64, nb_classes=CLASSES)
    torch.save({"model": state, "model_ema": {k: v.clone() for k, v in state.items()}, "epoch": 299, "args": args},
               path)
    return str(path)


def image_folder(root, train: int = 8, val: int = 4) -> str:
    """``root/{train,val}/<synset>/*.JPEG``, :data:`CLASSES` classes of random 72×80 photos."""
    rng = np.random.default_rng(0)
    for split, count in (("train", train), ("val", val)):
        for c in range(CLASSES):
            folder = root / split / f"n0000000{c}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                Image.fromarray((rng.random((72, 80, 3)) * 255).astype(np.uint8)).save(folder / f"img_{i}.JPEG")
    return str(root)


def photo(path, size=(120, 160)) -> str:
    """A random RGB photo of ``size`` (height, width) at ``path`` (its folder made if missing)."""
    from pathlib import Path

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray((np.random.default_rng(1).random((*size, 3)) * 255).astype(np.uint8)).save(path)
    return str(path)
