from vimtr.models.registry import ALIASES, canonical_name, create_model, list_models
from vimtr.models.token_state import TokenState
from vimtr.models.videomamba import VideoMamba
from vimtr.models.vim import VisionMamba

__all__ = ["ALIASES", "TokenState", "VideoMamba", "VisionMamba", "canonical_name", "create_model", "list_models"]


def __getattr__(name):
    """The other submodules (``vimtr.models.checkpoint``, ``vimtr.models.hub``, ...) on first use."""
    import importlib
    import importlib.util

    if not name.startswith("_") and importlib.util.find_spec(f"{__name__}.{name}") is not None:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
