"""The pieces of the R-MeeTo re-training recipe: optimizer groups, augmentation, losses, the teacher.

Kept apart from the loop (:mod:`vimtr.engine.train`) so each can be read and tested on its own.
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F

import vimtr
from vimtr.engine import common
from vimtr.engine.settings import RAND_AUGMENT


def param_groups(model, weight_decay: float) -> list[dict]:
    """AdamW groups: no decay for 1-D tensors (norms, biases, D), ``model.no_weight_decay()`` names
    (position/class embeddings) and the parameters Mamba exempts (A_log, D): those a module lists in
    ``no_weight_decay_params`` or marked ``_no_weight_decay`` (a mark ``copy.deepcopy`` does not keep)."""
    skip = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
    exempt = {id(getattr(m, n)) for m in model.modules() for n in getattr(m, "no_weight_decay_params", ())}
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        plain = p.ndim <= 1 or name in skip or id(p) in exempt or getattr(p, "_no_weight_decay", False)
        (no_decay if plain else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def adamw(model, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW over :func:`param_groups`, with torch's fused kernel where every parameter allows it (floating
    point, on CPU or CUDA). The default per-parameter loop costs ~10 ms per step for the demo's 311 k
    parameters in 211 tensors on one CPU thread, the fused kernel ~2 ms (``benchmarks/NOTES.md`` round 10);
    both compute the same update, rounded differently."""
    groups = param_groups(model, weight_decay)
    params = [p for g in groups for p in g["params"]]
    fused = bool(params) and all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params)
    return torch.optim.AdamW(groups, lr=lr, fused=fused or None)


def train_transform(model, auto_augment=RAND_AUGMENT, color_jitter=0.4, reprob=0.25):
    """DeiT's training augmentation (timm): random-resized crop (bicubic), flip, RandAugment, colour
    jitter, random erasing (pixel mode). Expects PIL images."""
    from timm.data import create_transform
    return create_transform(input_size=model.input_size, is_training=True, auto_augment=auto_augment or None,
                            color_jitter=color_jitter, interpolation="bicubic", re_prob=reprob, re_mode="pixel",
                            re_count=1)


class EvalIfImage:
    """Without augmentation: tensors pass through, images get the official eval preprocessing."""

    def __init__(self, model):
        from vimtr.data import eval_transform
        self.transform = eval_transform(model)

    def __call__(self, x):
        return x if isinstance(x, torch.Tensor) else self.transform(x)


def criterion_and_mixup(num_classes: int, mixup: float, cutmix: float, label_smoothing: float):
    """(loss on (logits, targets), timm Mixup or None). With mixup/cutmix the targets are soft (label
    smoothing folded in) and the loss is soft-target CE, as DeiT; otherwise label-smoothed CE."""
    from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
    if mixup > 0 or cutmix > 0:
        from timm.data import Mixup
        return SoftTargetCrossEntropy(), Mixup(mixup_alpha=mixup, cutmix_alpha=cutmix,
                                               label_smoothing=label_smoothing, num_classes=num_classes)
    if label_smoothing > 0:
        return LabelSmoothingCrossEntropy(smoothing=label_smoothing), None
    return torch.nn.CrossEntropyLoss(), None


def mix(mixup, x: torch.Tensor, y: torch.Tensor):
    """(inputs, targets) after timm's ``mixup`` (or as they are when it is None). timm cuts its CutMix box from
    the last two axes of a 4-D batch, so clips (B, C, T, H, W) go in as (B, C·T, H, W): one box in H × W,
    the same on every frame (as VideoMamba's video mixup)."""
    if mixup is None:
        return x, y
    mixed, targets = mixup(x.flatten(1, -3), y)
    return mixed.view(x.shape), targets


def distill_kl(student_logits, teacher_logits, temperature: float = 1.0):
    """KL(teacher ‖ student) on softmax(logits / T), batch mean, scaled by T² (T = 1: R-MeeTo's loss)."""
    t = temperature
    return F.kl_div(F.log_softmax(student_logits / t, dim=-1), F.log_softmax(teacher_logits / t, dim=-1),
                    reduction="batchmean", log_target=True) * (t * t)


def training_loss(logits, targets, criterion, *, ce_weight: float = 1.0, teacher_logits=None,
                  distill_weight: float = 0.0, temperature: float = 1.0):
    """The re-training objective on one batch: ``ce_weight · criterion(logits, targets)`` plus, with a
    teacher, ``distill_weight · distill_kl(logits, teacher_logits, temperature)`` (R-MeeTo: 1 and 0.5, T = 1).
    ``criterion`` is :func:`criterion_and_mixup`'s (soft-target CE after mixup, label-smoothed CE otherwise)."""
    loss = ce_weight * criterion(logits, targets)
    if teacher_logits is not None:
        loss = loss + distill_weight * distill_kl(logits, teacher_logits, temperature)
    return loss


def make_teacher(student):
    """The student's weights without its reduction: a frozen copy in eval mode (no drop-path)."""
    teacher = vimtr.restore(copy.deepcopy(common.unwrap(student)))
    return teacher.eval().requires_grad_(False)
