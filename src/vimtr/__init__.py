"""vimtr: token reduction for Vision Mamba (MTR, R-MeeTo and baselines) on official checkpoints.

    import vimtr
    model = vimtr.load_model("vim_t_midclstok_76p1acc.pth")      # or vimtr.create_model("vim_tiny")
    vimtr.reduce(model, "mtr", flops_reduction=0.3)               # patch in place, weights untouched
    logits = model(images); print(model.reduction_trace["tokens"])
    vimtr.restore(model)                                          # back to the original, bit for bit
"""
import os as _os

# PyTorch's OpenMP workers (libgomp) spin for a while after every parallel op, waiting for the next.
# The CPU scan kernels run on their own threads between torch ops, and on a 2-core machine the
# spinning worker took a core from them: Vim-Ti b8 forward 593 ms with the default spin, 390 ms with
# 30,000 (benchmarks/NOTES.md). libgomp reads this when torch is first imported, so it only takes
# effect if vimtr is imported first; an explicit setting in the environment always wins.
_os.environ.setdefault("GOMP_SPINCOUNT", "30000")

from vimtr.flops import flops  # noqa: E402
from vimtr.models import create_model, list_models  # noqa: E402
from vimtr.reduce import list_methods, reduce, restore  # noqa: E402

try:  # written alongside; absent only in a partial checkout
    from vimtr.models.checkpoint import load_model
except ImportError:  # pragma: no cover
    pass

__version__ = "0.1.0"
__all__ = ["create_model", "flops", "list_methods", "list_models", "load_model", "reduce", "restore"]
