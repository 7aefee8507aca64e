"""Data: the official preprocessing, ImageFolder datasets, the built-in digits, samplers.

- :mod:`vimtr.data.transforms`: ``eval_transform(model)``, the official evaluation pipeline;
- :mod:`vimtr.data.folders`: ImageFolder (ImageNet layout) and ``digits`` datasets, corrupt-file
  handling, the deterministic epoch sampler;
- :mod:`vimtr.data.digits`, :mod:`vimtr.data.clutter`: the scikit-learn digits the bundled models are trained
  on (centred on a blank canvas; anywhere on a cluttered one);
- :mod:`vimtr.data.video`: video clips (annotation lists, Kinetics-layout folders, frame folders), VideoMamba's
  sparse sampling and multi-view test protocol (decoding in :mod:`vimtr.data.video_decode`, PyAV;
  preprocessing in :mod:`vimtr.data.video_transforms`); :mod:`vimtr.data.synthetic_video` writes a small
  set of moving-digit clips.

Submodules are imported on first use (torchvision and timm are heavy).
"""
import importlib

_LAZY = {"eval_transform": "vimtr.data.transforms", "load_dataset": "vimtr.data.folders",
         "load_video_dataset": "vimtr.data.video"}
_SUBMODULES = ("clutter", "digits", "folders", "transforms", "video", "video_decode", "video_transforms", "synthetic_video")
__all__ = sorted(_LAZY)


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    if name in _SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
