"""``vimtr warmup``: compile vimtr's CPU kernels into numba's disk cache, once per environment.

The CPU kernels (the scan, the depthwise conv, the fused add + RMSNorm, the merges) are compiled by numba
on their first call and cached on disk (``cache=True``), so every later process only loads them (~1 s).
In a fresh environment that first call costs ~15 s of compiling, which would otherwise land in the
first real run (the first ``vimtr demo`` on a new machine, or a benchmark's first timing). ``make
install`` (and so ``make demo`` and ``make test``) runs this once after installing; after ``pip install
vimtr``, run it yourself, or let the first run pay.

It runs what the demo runs, on the bundled model: one small forward per reduction method and one
forward + backward of a reduced student, and builds matplotlib's font cache (which its first import
otherwise builds inside the demo's figures). A kernel it did not reach compiles on first use as before: nothing depends on this step.
"""
from __future__ import annotations

import argparse
import time

import vimtr


def warm_up(model_name: str = "vim_digits_clutter", log=print) -> dict:
    """Compile (or load) the kernels that inference and re-training use on ``model_name``; returns the
    seconds each part took."""
    from vimtr.tools import demo, sweep

    start = time.time()
    model = vimtr.load_model(model_name).eval()
    params = {**demo.SCHEDULE, "flops_reduction": 0.3}
    sweep.load_kernels(model, [(None, None)] + [(method, params) for method in sweep.TRAINING_FREE])
    inference = time.time()
    demo.load_training_kernels(model, params["flops_reduction"])
    training = time.time()
    from matplotlib import font_manager  # builds the font cache on first import

    font_manager.findfont("DejaVu Sans")
    seconds = {"inference": inference - start, "training": training - inference,
               "matplotlib": time.time() - training}
    log("vimtr warmup: CPU kernels ready (" + ", ".join(f"{k} {v:.1f} s" for k, v in seconds.items()) + ")")
    return seconds


def add_cli(sub):
    p = sub.add_parser("warmup", help="compile the CPU kernels into numba's disk cache (make install runs it)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog="examples:\n  vimtr warmup")
    p.add_argument("--model", default="vim_digits_clutter",
                   help="bundled model name or checkpoint file to run (default vim_digits_clutter, the demo's; "
                        "a model with another state size N uses other kernels)")
    p.set_defaults(func=run)


def run(args):
    warm_up(args.model)
