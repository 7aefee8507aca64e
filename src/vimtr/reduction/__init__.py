"""Token reduction: one reducer hook per model, one short file per method on top of ``merge.py``."""
from vimtr.reduction.api import METHODS, list_methods, reduce, register, restore
from vimtr.reduction.evit import EViT
from vimtr.reduction.hsa import HSA
from vimtr.reduction.mtr import MTR
from vimtr.reduction.pumer import PuMer
from vimtr.reduction.positional import Positional
from vimtr.reduction.random_prune import RandomPrune
from vimtr.reduction.rmeeto import RMeeTo
from vimtr.reduction.tome import ToMe
from vimtr.reduction.utr import UTR

for _cls in (MTR, RMeeTo, ToMe, EViT, UTR, RandomPrune, PuMer, HSA, Positional):
    register(_cls)

__all__ = ["METHODS", "list_methods", "reduce", "register", "restore"]
