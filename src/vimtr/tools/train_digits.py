"""Train a bundled model: ``python -m vimtr.tools.train_digits [--model vim_digits_clutter] [--out DIR]``.

Two bundled models, each a small Vim (official structure, middle class token; the config of the same name
in the registry) trained from scratch on a built-in dataset's train split:

- ``vim_digits_clutter`` (the default, the demo's model) on ``digits-clutter``: every epoch draws fresh
  canvases for the 1,437 train digits (place, scale, turn, fragments of other train digits, texture;
  :mod:`vimtr.data.clutter`), from a generator seeded by ``--seed``;
- ``vim_digits`` on ``digits`` (centred on a blank canvas), with small random affine maps.

Deterministic for a given seed on CPU. Writes ``<model>.safetensors`` and the card ``<model>.json``
(config, data, split, seed, command, accuracy, time). This is pre-training from scratch on in-memory
tensors, so it is a plain loop: AdamW, warm-up + cosine, label smoothing.

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
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import vimtr
from vimtr.io import atomic_write, write_json

DEFAULT_OUT = Path(__file__).resolve().parents[1] / "assets"
# model -> (dataset spec, epochs, batch): the bundled models' own recipes.
MODELS = {"vim_digits_clutter": ("digits-clutter", 110, 32), "vim_digits": ("digits", 25, 64)}


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


class _Epochs:
    """The training images of each epoch, as one (x, y) pair of tensors.

    ``digits-clutter``: a fresh canvas for every train digit every epoch (1,437 new canvases, ~1 s to
    draw), from a data generator of its own seeded ``seed`` + 1, so the model init's and the batch
    order's streams stay put. Fresh draws, not a few fixed sets read in turn: with 8 fixed sets a
    100-epoch run fits its canvases (train loss at the label-smoothing floor) and stopped at 95.8% top-1."""

    def __init__(self, data: str, seed: int, augment_strength: str):
        from vimtr.data import clutter, digits

        self.data, self.strength = data, augment_strength
        if data == "digits":
            self.x, self.y = digits.digits_tensors("train")
        else:
            self.y = clutter._split_digits("train")[1]
            self.generator = torch.Generator().manual_seed(seed + 1)
        self.size = len(self.y)

    def draw(self):
        """(x, y, per-batch transform) for the next epoch."""
        from vimtr.data import clutter, digits

        if self.data == "digits":
            return self.x, self.y, lambda xb: digits.augment(xb, self.strength)
        return (*clutter.render_split("train", self.generator), lambda xb: xb)


def describe_data(data: str, train_images: int, test_images: int, augment_strength: str) -> dict:
    """The card's ``dataset`` entry."""
    from vimtr.data import clutter, digits

    split = (f"the digits' stratified {1 - digits.TEST_FRACTION:.0%}/{digits.TEST_FRACTION:.0%} split, "
             f"random_state={digits.SPLIT_SEED}")
    common = {"name": data, "source": "sklearn.datasets.load_digits", "split": split,
              "train_images": train_images, "test_images": test_images}
    if data == "digits":
        return {**common, "img_size": digits.IMG_SIZE, "digit_size": digits.DIGIT_SIZE,
                "layout": "digit upscaled (bilinear) and centred on a blank canvas",
                "normalisation": {"mean": digits.MEAN, "std": digits.STD}}
    return {**common, "img_size": clutter.IMG_SIZE, "module": "vimtr.data.clutter",
            "layout": f"digit upscaled (bilinear) to a side of {clutter.SCALE[0]}-{clutter.SCALE[1]} px, turned by up "
                      f"to ±{clutter.ROTATION:g}°, at a uniformly random place; {clutter.FRAGMENTS} fragments "
                      f"({clutter.FRAGMENT_SIDE[0]}-{clutter.FRAGMENT_SIDE[1]} × {clutter.FRAGMENT_SIDE[0]}-"
                      f"{clutter.FRAGMENT_SIDE[1]} source pixels) of other digits of the same split, off the "
                      f"digit's box; smooth shading (amplitude {clutter.TEXTURE[0]}-{clutter.TEXTURE[1]}) and "
                      f"pixel noise (std {clutter.NOISE})",
            "test_set": f"one canvas per test digit, drawn with seed {clutter.TEST_SEED}; fragments from test "
                        f"digits only",
            "train_set": "canvases of the train digits drawn from the training seed (see training.augmentation; "
                         "fragments from train digits only)",
            "normalisation": {"mean": clutter.MEAN, "std": clutter.STD}}


def train(model_name="vim_digits_clutter", epochs=None, batch_size=None, lr=2e-3, weight_decay=0.05,
          warmup_epochs=2, seed=0, log=print, dt_range: tuple[float, float] | None = None,
          augment_strength: str = "default", command: str | None = None):
    """Train ``model_name`` (a key of ``MODELS``) from scratch; returns (the model in eval mode, its card)."""
    from vimtr.data import folders

    if model_name not in MODELS:
        raise ValueError(f"train_digits: model must be one of {sorted(MODELS)}, got {model_name!r}")
    data, default_epochs, default_batch = MODELS[model_name]
    epochs = default_epochs if epochs is None else epochs
    batch_size = default_batch if batch_size is None else batch_size
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    epochs_data = _Epochs(data, seed, augment_strength)
    xte, yte = folders.builtin(data).tensors("test")
    model = vimtr.create_model(model_name)
    init_backward_dt(model, dt_range)
    no_wd = model.no_weight_decay()
    decay = [p for n, p in model.named_parameters() if p.ndim > 1 and n not in no_wd]
    rest = [p for n, p in model.named_parameters() if not (p.ndim > 1 and n not in no_wd)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                             {"params": rest, "weight_decay": 0.0}], lr=lr)
    steps_per_epoch = math.ceil(epochs_data.size / batch_size)
    total, warm = epochs * steps_per_epoch, warmup_epochs * steps_per_epoch
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / warm if s < warm else 0.5 * (1 + math.cos(math.pi * (s - warm) / (total - warm))))
    start = time.time()
    for epoch in range(epochs):
        model.train()
        xtr, ytr, transform = epochs_data.draw()
        perm = torch.randperm(len(xtr), generator=g)
        for i in range(0, len(xtr), batch_size):
            idx = perm[i:i + batch_size]
            loss = F.cross_entropy(model(transform(xtr[idx])), ytr[idx], label_smoothing=0.1)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        if epoch % 5 == 4 or epoch == epochs - 1:
            log(f"epoch {epoch + 1}/{epochs}  loss {loss.item():.3f}  test top-1 {accuracy(model, xte, yte):.4f}  "
                f"{(time.time() - start) / 60:.1f} min")
    model.eval()
    training = {"epochs": epochs, "batch_size": batch_size, "lr": lr, "weight_decay": weight_decay,
                "warmup_epochs": warmup_epochs, "label_smoothing": 0.1}
    if data == "digits":
        from vimtr.data import digits
        training["augmentation"] = "RandomAffine: rotation ±{}°, shift ±{} px, scale {}-{}".format(
            *digits.AUGMENT[augment_strength][:2], *digits.AUGMENT[augment_strength][2])
    else:
        training["augmentation"] = (f"a fresh canvas per train digit every epoch, from one data generator seeded "
                                    f"{seed + 1}")
    training.update(
        init="official, plus Mamba's Δ init for dt_proj_b (see train_digits)" + (
            f"; Δ init range {dt_range[0]}-{dt_range[1]} in both directions" if dt_range else ""),
        seed=seed, command=command, minutes=round((time.time() - start) / 60, 2), torch=torch.__version__,
        threads=torch.get_num_threads(), machine=platform.machine())
    card = {"name": model_name, "model": model_name, "config": dict(model.config),
            "dataset": describe_data(data, epochs_data.size, len(yte), augment_strength),
            "training": training, "test_top1": accuracy(model, xte, yte),
            "parameters": sum(p.numel() for p in model.parameters())}
    return model, card


def main(argv=None):
    from vimtr.data import digits

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=sorted(MODELS), default="vim_digits_clutter",
                    help="which bundled model (default vim_digits_clutter, the demo's)")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="folder for <model>.safetensors/.json")
    ap.add_argument("--epochs", type=int, default=None,
                    help="default: the bundled model's (" + ", ".join(f"{m} {e}" for m, (_, e, _) in MODELS.items()) + ")")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dt-init", type=float, nargs=2, metavar=("MIN", "MAX"),
                    help="Mamba's Δ init range for both directions (default: 0.001-0.1, as Mamba)")
    ap.add_argument("--augment", choices=sorted(digits.AUGMENT), default="default",
                    help="vim_digits only: random affine strength (default: the bundled model's)")
    args = ap.parse_args(argv)
    if args.epochs is not None and args.epochs < 1:
        ap.error(f"--epochs must be >= 1, got {args.epochs}")
    command = "python -m vimtr.tools.train_digits " + " ".join(sys.argv[1:] if argv is None else argv)
    model, card = train(args.model, epochs=args.epochs, seed=args.seed,
                        dt_range=tuple(args.dt_init) if args.dt_init else None, augment_strength=args.augment,
                        command=command.strip())
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    atomic_write(args.out / f"{args.model}.safetensors", lambda f: f.write(_safetensors_bytes(state, args.model)))
    write_json(args.out / f"{args.model}.json", card)
    print(f"test top-1 {card['test_top1']:.4f}; wrote {args.out}/{args.model}.safetensors and .json")


def _safetensors_bytes(state, model_name: str) -> bytes:
    from safetensors.torch import save
    return save(state, metadata={"format": "pt", "model": model_name})


if __name__ == "__main__":
    main()
