"""``vimtr.load_model``: a checkpoint's weights and architecture (:mod:`vimtr.models.checkpoint`), then the
token reduction a vimtr-written checkpoint records (:mod:`vimtr.reduction`).

It lives here, above both, so that models never import the reduction methods: a re-trained R-MeeTo
student comes back reduced exactly as it was trained, and ``models/`` stays a plain model library.
"""
from __future__ import annotations

from collections.abc import Mapping

import torch.nn as nn

from vimtr.models.checkpoint import CheckpointError, build_from_checkpoint


def load_model(checkpoint, name: str | None = None, use_ema: bool = False, **overrides) -> nn.Module:
    """A ready vimtr model (eval mode) from a checkpoint.

    ``checkpoint``: a file (official ``.pth``, flat or ``module.``-prefixed state dict, ``.safetensors``,
    a vimtr-written file), a state dict, a Hugging Face repo id (``'hustvl/Vim-tiny-midclstok'`` or
    ``'repo:filename'``) or a bundled model name. ``name``: the registered model (or alias) to build;
    ``None`` infers it from the tensor shapes. ``use_ema``: take the ``model_ema`` weights.
    ``overrides``: passed to :func:`vimtr.create_model`; an ``img_size`` other than the checkpoint's
    resamples the position embedding.

    The model gets ``model.model_name`` and ``model.checkpoint_info`` (file, name, overrides, notices,
    and the ``reduction`` re-applied from a vimtr-written checkpoint). Any failure raises
    :class:`~vimtr.models.checkpoint.CheckpointError`.
    """
    model = build_from_checkpoint(checkpoint, name=name, use_ema=use_ema, **overrides)
    reduction = model.checkpoint_info.get("reduction")
    if reduction:
        model = apply_recorded_reduction(model, reduction, model.checkpoint_info["file"])
    return model


def apply_recorded_reduction(model: nn.Module, reduction: Mapping, label: str) -> nn.Module:
    """``vimtr.reduce(model, **reduction)`` for a checkpoint's record, failures as a :class:`CheckpointError`."""
    from vimtr.reduction import reduce

    try:
        return reduce(model, reduction["method"], **dict(reduction.get("params") or {}))
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{label}: could not re-apply the recorded token reduction {dict(reduction)!r}: "
                              f"{type(e).__name__}: {e}") from None
