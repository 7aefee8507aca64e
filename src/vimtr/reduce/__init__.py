"""Token reduction: one reducer hook per model, one short file per method on top of ``merge.py``."""
from vimtr.reduce.api import METHODS, list_methods, reduce, register, restore
from vimtr.reduce.evit import EViT
from vimtr.reduce.mtr import MTR
from vimtr.reduce.random_prune import RandomPrune
from vimtr.reduce.rmeeto import RMeeTo
from vimtr.reduce.tome import ToMe
from vimtr.reduce.utr import UTR

for _cls in (MTR, RMeeTo, ToMe, EViT, UTR, RandomPrune):
    register(_cls)

__all__ = ["METHODS", "list_methods", "reduce", "register", "restore"]
