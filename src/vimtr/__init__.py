"""vimtr: token reduction for Vision Mamba (MTR, R-MeeTo and baselines) on official checkpoints.

    import vimtr
    model = vimtr.load_model("vim_t_midclstok_76p1acc.pth")      # or vimtr.create_model("vim_tiny")
    vimtr.reduce(model, "mtr", flops_reduction=0.3)               # patch in place, weights untouched
    logits = model(images); print(model.reduction_trace["tokens"])
    vimtr.restore(model)                                          # back to the original, bit for bit
"""
from vimtr.flops import flops
from vimtr.models import create_model, list_models
from vimtr.reduce import list_methods, reduce, restore

try:  # written alongside; absent only in a partial checkout
    from vimtr.models.checkpoint import load_model
except ImportError:  # pragma: no cover
    pass

__version__ = "0.1.0"
__all__ = ["create_model", "flops", "list_methods", "list_models", "load_model", "reduce", "restore"]
