"""vimtr: token reduction for Vision Mamba (MTR, R-MeeTo and baselines) on official checkpoints."""
from vimtr.models import create_model, list_models

__version__ = "0.1.0"
__all__ = ["create_model", "list_models"]
