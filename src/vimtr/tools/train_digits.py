"""Train the bundled ``vim_digits`` model: ``python -m vimtr.tools.train_digits [--out DIR]``.

A small Vim (official structure, middle class token; config ``vim_digits`` in the registry) trained
from scratch on the built-in ``digits`` train split. Deterministic for a given seed on CPU. Writes
``vim_digits.safetensors`` and the card ``vim_digits.json`` (config, split, seed, accuracy, time).
This is pre-training from scratch on in-memory tensors, so it is a plain loop: AdamW, warm-up +
cosine, label smoothing, small random affine transforms.

One deliberate difference from the official initialisation: the backward direction's Δ projection
(``dt_proj_b``) gets Mamba's Δ initialisation, as the forward one does. The official code builds it as a
plain ``nn.Linear`` whose bias the model init then zeroes, so every backward Δ starts at softplus(≈0) ≈ 0.69
for every token; a 25-epoch run from scratch never moves it far, and MTR's importance (Δ summed over the
two directions) would be dominated by that constant. Official checkpoints, trained for 300 epochs, are
loaded as they are.
"""
from __future__ import annotations

import argparse
import math
import platform
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import vimtr
from vimtr.data import digits
from vimtr.io import atomic_write, write_json

DEFAULT_OUT = Path(__file__).resolve().parents[1] / "assets"


@torch.no_grad()
def accuracy(model, x, y, batch_size=256) -> float:
    model.eval()
    correct = sum((model(x[i:i + batch_size]).argmax(-1) == y[i:i + batch_size]).sum().item()
                  for i in range(0, len(x), batch_size))
    return correct / len(x)


def init_backward_dt(model, dt_range: tuple[float, float] | None = None):
    """Give every ``dt_proj_b`` the forward direction's Mamba Δ init (see the module docstring).
    ``dt_range`` (dt_min, dt_max): re-initialise both directions with that range instead of Mamba's
    0.001-0.1 (larger Δ: each scan state forgets faster)."""
    for layer in model.layers:
        if dt_range is not None:
            layer.mixer.init_dt(layer.mixer.dt_proj, *dt_range)
        layer.mixer.init_dt(layer.mixer.dt_proj_b, *(dt_range or ()))


def train(epochs=25, batch_size=64, lr=2e-3, weight_decay=0.05, warmup_epochs=2, seed=0, log=print,
          dt_range: tuple[float, float] | None = None, augment_strength: str = "default"):
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    xtr, ytr = digits.digits_tensors("train")
    xte, yte = digits.digits_tensors("test")
    model = vimtr.create_model("vim_digits")
    init_backward_dt(model, dt_range)
    no_wd = model.no_weight_decay()
    decay = [p for n, p in model.named_parameters() if p.ndim > 1 and n not in no_wd]
    rest = [p for n, p in model.named_parameters() if not (p.ndim > 1 and n not in no_wd)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                             {"params": rest, "weight_decay": 0.0}], lr=lr)
    steps_per_epoch = math.ceil(len(xtr) / batch_size)
    total, warm = epochs * steps_per_epoch, warmup_epochs * steps_per_epoch
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / warm if s < warm else 0.5 * (1 + math.cos(math.pi * (s - warm) / (total - warm))))
    start = time.time()
    for epoch in range(epochs):
        model.train()
        perm = torch.randperm(len(xtr), generator=g)
        for i in range(0, len(xtr), batch_size):
            idx = perm[i:i + batch_size]
            loss = F.cross_entropy(model(digits.augment(xtr[idx], augment_strength)), ytr[idx], label_smoothing=0.1)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        if epoch % 5 == 4 or epoch == epochs - 1:
            log(f"epoch {epoch + 1}/{epochs}  loss {loss.item():.3f}  test top-1 {accuracy(model, xte, yte):.4f}  "
                f"{(time.time() - start) / 60:.1f} min")
    model.eval()
    card = {
        "name": "vim_digits",
        "model": "vim_digits",
        "config": {k: v for k, v in model.config.items()},
        "dataset": {"name": "digits", "source": "sklearn.datasets.load_digits", "img_size": digits.IMG_SIZE,
                    "digit_size": digits.DIGIT_SIZE, "layout": "digit upscaled (bilinear) and centred on a blank canvas",
                    "split": f"stratified {1 - digits.TEST_FRACTION:.0%}/{digits.TEST_FRACTION:.0%}, "
                             f"random_state={digits.SPLIT_SEED}", "train_images": len(xtr), "test_images": len(xte),
                    "normalisation": {"mean": digits.MEAN, "std": digits.STD}},
        "training": {"epochs": epochs, "batch_size": batch_size, "lr": lr, "weight_decay": weight_decay,
                     "warmup_epochs": warmup_epochs, "label_smoothing": 0.1,
                     "augmentation": "RandomAffine: rotation ±{}°, shift ±{} px, scale {}-{}".format(
                         *digits.AUGMENT[augment_strength][:2], *digits.AUGMENT[augment_strength][2]),
                     "init": "official, plus Mamba's Δ init for dt_proj_b (see train_digits)" + (
                         f"; Δ init range {dt_range[0]}-{dt_range[1]} in both directions" if dt_range else ""),
                     "seed": seed, "minutes": round((time.time() - start) / 60, 2), "torch": torch.__version__,
                     "threads": torch.get_num_threads(), "machine": platform.machine()},
        "test_top1": accuracy(model, xte, yte),
        "parameters": sum(p.numel() for p in model.parameters()),
    }
    return model, card


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="folder for vim_digits.safetensors/.json")
    ap.add_argument("--epochs", type=int, default=25)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dt-init", type=float, nargs=2, metavar=("MIN", "MAX"),
                    help="Mamba's Δ init range for both directions (default: 0.001-0.1, as Mamba)")
    ap.add_argument("--augment", choices=sorted(digits.AUGMENT), default="default",
                    help="random affine strength (default: the bundled model's)")
    args = ap.parse_args(argv)
    model, card = train(epochs=args.epochs, seed=args.seed, dt_range=tuple(args.dt_init) if args.dt_init else None,
                        augment_strength=args.augment)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    atomic_write(args.out / "vim_digits.safetensors", lambda f: f.write(_safetensors_bytes(state)))
    write_json(args.out / "vim_digits.json", card)
    print(f"test top-1 {card['test_top1']:.4f}; wrote {args.out}/vim_digits.safetensors and .json")


def _safetensors_bytes(state) -> bytes:
    from safetensors.torch import save
    return save(state, metadata={"format": "pt", "model": "vim_digits"})


if __name__ == "__main__":
    main()
