from vimtr.models.registry import ALIASES, canonical_name, create_model, list_models
from vimtr.models.token_state import TokenState
from vimtr.models.videomamba import VideoMamba
from vimtr.models.vim import VisionMamba

__all__ = ["ALIASES", "TokenState", "VideoMamba", "VisionMamba", "canonical_name", "create_model", "list_models"]
