"""Training and evaluation engines: ``vimtr eval`` and ``vimtr retrain`` (the R-MeeTo recipe).

Modules (imported lazily, so ``python -m vimtr.engine.evaluate`` runs without importing itself twice):

- :mod:`vimtr.engine.evaluate`: ``evaluate(model, dataset_or_loader)`` and the ``eval`` subcommand;
- :mod:`vimtr.engine.train`: ``retrain(student, train_set, ...)`` and the ``retrain`` subcommand;
- :mod:`vimtr.engine.recipe`: the re-training recipe (optimizer groups, augmentation, distillation loss);
- :mod:`vimtr.engine.checkpoints`: atomic, ``weights_only``-loadable training checkpoints;
- :mod:`vimtr.engine.distributed`: torchrun process groups and exact cross-rank sums;
- :mod:`vimtr.engine.common`: the model/reduction/device options both subcommands share.

Each subcommand module has ``add_cli(subparsers)``, which registers it and sets ``func=run``.
"""
import importlib

_SUBMODULES = ("checkpoints", "common", "distributed", "evaluate", "recipe", "train")
__all__ = list(_SUBMODULES)


def __getattr__(name):
    if name in _SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
