"""Data helpers: the official evaluation preprocessing."""
from vimtr.data.transforms import eval_transform

__all__ = ["eval_transform"]
