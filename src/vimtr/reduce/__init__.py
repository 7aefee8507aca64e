"""Token reduction: one reducer hook per model, one short file per method on top of ``merge.py``."""
from vimtr.reduce.api import METHODS, list_methods, reduce, register, restore
from vimtr.reduce.mtr import MTR
from vimtr.reduce.rmeeto import RMeeTo

for _cls in (MTR, RMeeTo):
    register(_cls)

__all__ = ["METHODS", "list_methods", "reduce", "register", "restore"]
