"""The scan backward at N = 16: the vector kernel (``_backward_n16``) against the generic loop kernel
(``_backward``, what N = 16 used before), per call and in a whole re-training step, alternating.

    PYTHONPATH=src python benchmarks/scan_backward.py [--rounds 5] [--no-step]

Per call: ``_backward_impl`` on the demo's shapes (B=16, E=96, N=16, L=65 and 25; delta and z
transposed (B, L, E) views as the mixer's torch path hands them, softplus + delta_bias + D + z) in both
directions, and Vim-Ti's (B=8, E=384, L=197). Step: the demo's reduced student (R-MeeTo, 30% fewer
FLOPs, drop-path 0) at batch 16, forward + backward. One thread; the two kernels alternate round by round
in this process (this machine is shared and noisy), fastest round and median reported.
"""
from __future__ import annotations

import argparse
import copy

import vimtr  # noqa: F401  first: it sets GOMP_SPINCOUNT before torch loads libgomp
import torch

import vimtr.ops.scan_cpu as sc
from scan import alternate_ab, mixer_inputs  # benchmarks/ (this script's folder) is on sys.path

_VECTOR = sc._backward_n16


def _use(vector: bool):
    # _backward_impl looks the kernel up at call time; pointing the N = 16 name at the loop kernel
    # runs the code N = 16 had before the vector kernel.
    sc._backward_n16 = _VECTOR if vector else sc._backward


def _inputs(b, e, l, n=16, reverse=False, seed=0):
    """_backward_impl's arguments for scan.mixer_inputs (the mixer's layout, softplus), an incoming
    gradient and a zero last-state gradient."""
    x = mixer_inputs(b, e, l, n, seed)
    saved = tuple(x[k] for k in ("u", "delta", "A", "B", "C", "D", "z", "delta_bias"))
    g = torch.Generator().manual_seed(seed + 1)
    return saved, True, reverse, torch.randn(b, e, l, generator=g), torch.zeros(b, e, n)


def _ab(fn, rounds, reps):
    return alternate_ab(fn, _use, rounds, reps)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--no-step", action="store_true", help="per-call timings only")
    args = ap.parse_args()
    torch.set_num_threads(1)
    for name, shape, reps in [("demo L=65", (16, 96, 65), 8), ("demo L=25", (16, 96, 25), 8),
                              ("Vim-Ti L=197", (8, 384, 197), 3)]:
        for rev in (False, True):
            x = _inputs(*shape, reverse=rev)
            print(f"{name:13s} {'reverse' if rev else 'forward'}  "
                  + _ab(lambda: sc._backward_impl(*x), args.rounds, reps), flush=True)
    if args.no_step:
        return
    from vimtr.data import digits
    from vimtr.tools.demo import SCHEDULE

    teacher = vimtr.load_model("vim_digits").eval()
    student = vimtr.reduce(copy.deepcopy(teacher), "rmeeto", flops_reduction=0.3, **SCHEDULE).train()
    student.set_drop_path(0.0)
    xb = digits.digits_tensors("train")[0][:16]

    def step():
        student.zero_grad(set_to_none=True)
        student(xb).logsumexp(-1).mean().backward()

    print(f"{'train step':13s} batch 16 " + _ab(step, args.rounds, 5), flush=True)


if __name__ == "__main__":
    main()
