"""Tools built on the models, reductions and engines: demo, benchmark, sweep, visualisation, info, warmup.

Each module is imported on first use (``vimtr.tools.sweep`` works after ``import vimtr``): they import
torch, matplotlib and the engines, which a caller of one tool should not pay for the others.
"""
import importlib
import importlib.util


def __getattr__(name):
    if not name.startswith("_") and importlib.util.find_spec(f"{__name__}.{name}") is not None:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
