"""Data: the official preprocessing, ImageFolder datasets, the built-in digits, samplers.

- :mod:`vimtr.data.transforms`: ``eval_transform(model)``, the official evaluation pipeline;
- :mod:`vimtr.data.folders`: ImageFolder (ImageNet layout) and ``digits`` datasets, corrupt-file
  handling, the deterministic epoch sampler;
- :mod:`vimtr.data.digits`, :mod:`vimtr.data.clutter`: the scikit-learn digits the bundled models are trained
  on (centred on a blank canvas; anywhere on a cluttered one).

Submodules are imported on first use (torchvision and timm are heavy).
"""
import importlib

_LAZY = {"eval_transform": "vimtr.data.transforms", "load_dataset": "vimtr.data.folders"}
_SUBMODULES = ("clutter", "digits", "folders", "transforms")
__all__ = sorted(_LAZY)


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    if name in _SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
