"""The re-training settings, defined once: the :class:`Settings` fields drive ``retrain(**settings)``, the
``vimtr retrain`` flags (name, default, help), the JSON log's ``config`` and the checkpoint's record.

Each field's metadata says how the command line spells it (``flag``), its command-line default where
that differs from the library's (``cli``: the library defaults to the smallest run, the command to
R-MeeTo's recipe), its help text and its group in ``--help``, and whether a resumed run must keep it
(``resume``: the data order, the schedule or the RNG streams depend on it).
"""
from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field, fields

from vimtr.errors import UsageError

RAND_AUGMENT = "rand-m9-mstd0.5-inc1"  # DeiT's RandAugment policy, as R-MeeTo
_SAME = object()  # "the command line uses the library default"


def _s(default, help: str, *, flag: str | None = None, cli=_SAME, group: str = "optimisation",
       resume: bool = False, metavar: str | None = None):
    meta = {"help": help, "flag": flag, "cli": cli, "group": group, "resume": resume, "metavar": metavar}
    return field(default=default, metadata=meta)


@dataclass
class Settings:
    """Hyperparameters of one re-training run (the keyword arguments of :func:`vimtr.engine.train.retrain`)."""
    epochs: int = _s(1, "R-MeeTo: 30 (Vim-Ti), 15 (Vim-S/B), 3 (ablations)", cli=3, resume=True)
    batch_size: int = _s(64, "per process", cli=128, resume=True)
    accum_steps: int = _s(1, "micro-batches per optimizer step", resume=True)
    base_lr: float = _s(2e-5, "learning rate per 512 images of global batch")
    lr: float | None = _s(None, "absolute learning rate (overrides --base-lr scaling)", resume=True)
    min_lr: float = _s(1e-6, "end of the cosine schedule", resume=True)
    warmup_steps: int = _s(0, "linear warm-up from --min-lr (R-MeeTo: none)", resume=True)
    warmup_epochs: float = _s(0.0, "more warm-up, in epochs (R-MeeTo's K400 recipe: 5)", resume=True)
    weight_decay: float = _s(0.05, "AdamW decay (not on norms/biases/embeddings)")
    clip_grad: float | None = _s(None, "clip the gradient norm", metavar="NORM")
    drop_path: float | None = _s(None, "the student's top stochastic-depth rate (default: the model's, 0.1; "
                                       "R-MeeTo keeps it)", metavar="RATE", resume=True)
    ema_decay: float | None = _s(None, "EMA decay per optimizer step (with --model-ema)", flag="--model-ema-decay",
                                 cli=0.99996, resume=True)
    seed: int = _s(0, "data order, augmentation, drop-path, mixup", resume=True)
    distill_weight: float = _s(0.5, "weight of KL(teacher || student)", group="distillation")
    ce_weight: float = _s(1.0, "weight of the (soft-target) cross-entropy", group="distillation")
    distill_temperature: float = _s(1.0, "softmax temperature T (loss × T²)", group="distillation")
    augment: bool = _s(False, "DeiT augmentation of PIL training images (else the official eval preprocessing)",
                       flag="--no-augment", cli=True, group="augmentation", resume=True)
    auto_augment: str = _s(RAND_AUGMENT, "timm RandAugment spec ('' for none)", flag="--aa", group="augmentation")
    color_jitter: float = _s(0.4, "colour jitter strength", group="augmentation")
    reprob: float = _s(0.25, "random erasing probability", group="augmentation")
    mixup: float = _s(0.0, "mixup alpha (0 = off)", cli=0.8, group="augmentation", resume=True)
    cutmix: float = _s(0.0, "cutmix alpha (0 = off)", cli=1.0, group="augmentation", resume=True)
    label_smoothing: float = _s(0.1, "label smoothing", flag="--smoothing", group="augmentation")
    repeated_aug: int = _s(1, "DeiT repeated augmentation (1 = off)", cli=3, group="augmentation", resume=True)
    train_fraction: float = _s(1.0, "train on a fixed random fraction (ablation)", group="data", resume=True)
    num_sample: int = _s(1, "video: augmented clips drawn per video and visit, all in its batch (VideoMamba/R-MeeTo "
                            "--num_sample 2: a batch of B videos trains on 2B clips)", group="augmentation",
                         resume=True)
    save_every_steps: int = _s(0, "also checkpoint every N optimizer steps (a kill loses at most N steps)",
                               group="data", metavar="N")
    eval_every_steps: int = _s(0, "also evaluate every N steps", group="data", metavar="N")
    recover_within: float | None = _s(None, "report training minutes until top-1 is within POINTS of the "
                                            "unreduced model", cli=1.0, group="data", metavar="POINTS")
    eval_batch_size: int | None = _s(None, "default: --batch-size", group="augmentation")
    workers: int = _s(0, "data-loading processes", group=None)  # the shared --workers flag (engine.common)
    eval_before: bool = _s(True, "evaluate the training-free model before training", group=None)

    def check(self):
        from vimtr.engine.common import check_batch_size

        for name in ("epochs", "batch_size", "accum_steps", "num_sample"):
            check_batch_size(getattr(self, name), name)
        for name in ("save_every_steps", "eval_every_steps", "warmup_steps", "workers"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise UsageError(f"{name} must be an integer >= 0, got {v!r}")
        if not self.warmup_epochs >= 0:
            raise UsageError(f"warmup_epochs must be >= 0, got {self.warmup_epochs!r}")
        if self.drop_path is not None and not 0.0 <= self.drop_path < 1.0:
            raise UsageError(f"drop_path is a probability in [0, 1), got {self.drop_path!r}")
        if (self.mixup > 0 or self.cutmix > 0) and self.batch_size % 2:
            raise UsageError(f"mixup/cutmix mix each batch with its reverse and need an even batch size; got "
                             f"batch_size={self.batch_size}")

    @classmethod
    def of(cls, settings: "Settings | None" = None, **overrides) -> "Settings":
        """``settings`` (or the defaults) with ``overrides``; an unknown name raises a TypeError listing the valid."""
        names = {f.name for f in fields(cls)}
        bad = sorted(set(overrides) - names)
        if bad:
            raise TypeError(f"unknown re-training setting(s) {bad}; valid: {', '.join(sorted(names))}")
        return dataclasses.replace(settings or cls(), **overrides)


# Not settings, but also fixed for a resumed run.
RESUME_KEYS = tuple(f.name for f in fields(Settings) if f.metadata["resume"]) + ("world_size", "train_size")

GROUPS = {"data": "data and output", "optimisation": "optimisation", "distillation": "distillation",
          "augmentation": "augmentation (DeiT recipe; tensor datasets such as digits get none)"}


def _flag(f) -> str:
    return f.metadata["flag"] or "--" + f.name.replace("_", "-")


def add_cli(parser: argparse.ArgumentParser, groups: dict | None = None):
    """Add a flag per setting, into ``groups`` (name -> argparse group; created on ``parser`` when missing)."""
    groups = dict(groups or {})
    for f in fields(Settings):
        meta = f.metadata
        if meta["group"] is None:
            continue
        if meta["group"] not in groups:
            groups[meta["group"]] = parser.add_argument_group(GROUPS[meta["group"]])
        default = f.default if meta["cli"] is _SAME else meta["cli"]
        kw = {"dest": f.name, "help": meta["help"]}
        if f.type in ("bool", bool):  # a switch that turns the command line's default (on) off
            groups[meta["group"]].add_argument(_flag(f), action="store_false", **kw)
            continue
        kind = {"int": int, "float": float, "str": str}[str(f.type).split(" ")[0]]
        groups[meta["group"]].add_argument(_flag(f), type=kind, default=default, metavar=meta["metavar"], **kw)
    return groups


def from_args(args: argparse.Namespace, **overrides) -> Settings:
    """The settings a parsed ``vimtr retrain`` command line asks for (``overrides`` win)."""
    values = {f.name: getattr(args, f.name) for f in fields(Settings) if hasattr(args, f.name)}
    return Settings.of(**{**values, **overrides})
