"""vimtr: token reduction for Vision Mamba (MTR, R-MeeTo and baselines) on official checkpoints.

    import vimtr
    model = vimtr.load_model("vim_t_midclstok_76p1acc.pth")      # or vimtr.create_model("vim_tiny")
    vimtr.reduce(model, "mtr", flops_reduction=0.3)               # patch in place, weights untouched
    logits = model(images); print(model.reduction_trace["tokens"])
    vimtr.restore(model)                                          # back to the original, bit for bit

``import vimtr`` imports nothing heavy and changes nothing in the process (no environment variables, no
thread settings): each name below, and each documented submodule (``vimtr.data``, ``vimtr.ops``,
``vimtr.reduction``, ``vimtr.engine``, ``vimtr.tools``, ``vimtr.models``), is imported on first use.
"""
import importlib

# Eager, and light (no torch): importing the submodule ``vimtr.flops`` binds the package attribute to the
# module, so the function is bound here first, after that import, and stays.
from vimtr.flops import flops

__version__ = "0.1.0"

# public name -> the module that defines it
_API = {
    "create_model": "vimtr.models.registry",
    "list_models": "vimtr.models.registry",
    "load_model": "vimtr.loading",
    "reduce": "vimtr.reduction.api",
    "restore": "vimtr.reduction.api",
    "list_methods": "vimtr.reduction.api",
}
_SUBMODULES = ("data", "engine", "io", "loading", "models", "ops", "reduction", "tools", "errors")

__all__ = sorted({*_API, "flops"})


def __getattr__(name):
    if name in _API:
        value = getattr(importlib.import_module(_API[name]), name)
        globals()[name] = value  # later lookups skip this function
        return value
    if name in _SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_API) | set(_SUBMODULES))
