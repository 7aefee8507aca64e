"""The scan forward at N = 16: the vector kernel (``_forward_n16``) against the loop kernel
(``_build_forward(16)``, what N = 16 used before), on the calls the demo really makes, alternating.

    PYTHONPATH=src python benchmarks/scan_forward.py [--rounds 5] [--no-model]

Per call: the ``_forward`` calls recorded (arguments copied with their strides) from
(a) an eval forward of the bundled model at batch 128 with two threads (out=, accumulate=, out_gate=),
(b) an eval forward of the demo's reduced student at batch 128, two threads (its Δ channel sums, L
shrinking), (c) a training step of that student at batch 16, one thread (autograd path, no out=),
replayed with the thread count they were recorded under; then Vim-Ti's shape (B=8, E=384, L=197, delta
and z transposed (B, L, E) views, softplus + bias + D + z) both directions. Each call's ``out`` is
restored before it is timed, so accumulate= sees the same values every time. Model: the whole eval
forward of the bundled model (batch 128 / 2 threads, batch 16 / 1 thread). The two kernels alternate
round by round in one process (this machine is shared and noisy); fastest round and median reported.
"""
from __future__ import annotations

import argparse
import copy
import time

import vimtr  # noqa: F401  first: it sets GOMP_SPINCOUNT before torch loads libgomp
import torch

import vimtr.ops.scan_cpu as sc
from scan import alternate_ab, mixer_inputs  # benchmarks/ (this script's folder) is on sys.path

_VECTOR = sc._forward_n16
_LOOP = sc._build_forward(16)


def _use(vector: bool):
    # _forward looks the kernel up at call time; pointing the N = 16 name at the loop kernel runs the
    # code N = 16 had before the vector kernel.
    sc._forward_n16 = _VECTOR if vector else _LOOP


def _copy(x):
    if not isinstance(x, torch.Tensor):
        return x
    y = torch.empty_strided(x.shape, x.stride(), dtype=x.dtype)  # same layout (the inputs are dense)
    return y.copy_(x)


def record(fn, threads):
    """The (args, kwargs) of every _forward call ``fn`` makes, copied."""
    calls, orig = [], sc._forward

    def spy(*a, **k):
        calls.append(([_copy(x) for x in a], {n: _copy(v) for n, v in k.items()}))
        return orig(*a, **k)

    sc._forward = spy
    torch.set_num_threads(threads)
    try:
        fn()
    finally:
        sc._forward = orig
    return calls


def replay(calls):
    """Seconds in the kernel calls (``out`` and the channel sums restored, untimed, before each)."""
    total = 0.0
    with torch.inference_mode():  # (the eval calls' copies are inference tensors)
        for a, k in calls:
            saved = {n: k[n].clone() for n in ("out", "delta_channel_sum") if k.get(n) is not None}
            t0 = time.perf_counter()
            sc._forward(*a, **k)
            total += time.perf_counter() - t0
            for n, v in saved.items():
                k[n].copy_(v)
    return total


def _ab(fn, rounds, reps):
    return alternate_ab(fn, _use, rounds, reps)


def _vim_ti(reverse, seed=0):
    """One recorded-style call at Vim-Ti's shape (B=8, E=384, L=197) from scan.mixer_inputs."""
    x = mixer_inputs(8, 384, 197, 16, seed)
    return [([*(x[k] for k in ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")), True, reverse], {})]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--no-model", action="store_true", help="per-call timings only")
    args = ap.parse_args()
    from vimtr.data import digits
    from vimtr.tools.demo import SCHEDULE
    teacher = vimtr.load_model("vim_digits").eval()
    student = vimtr.reduce(copy.deepcopy(teacher), "rmeeto", flops_reduction=0.3, **SCHEDULE)
    xt = digits.digits_tensors("test")[0][:128]
    xb = digits.digits_tensors("train")[0][:16]

    def eval_fwd(model, x):
        with torch.inference_mode():
            model(x)

    def train_step():
        student.train().set_drop_path(0.0)
        student.zero_grad(set_to_none=True)
        student(xb).logsumexp(-1).mean().backward()
        student.eval()

    sets = [("eval b128 bundled", 2, record(lambda: eval_fwd(teacher, xt), 2)),
            ("eval b128 student", 2, record(lambda: eval_fwd(student.eval(), xt), 2)),
            ("train b16 student", 1, record(train_step, 1))]
    for name, threads, calls in sets:
        torch.set_num_threads(threads)
        by_dir = {False: [c for c in calls if not c[0][9]], True: [c for c in calls if c[0][9]]}
        for rev, cs in by_dir.items():
            Ls = sorted({c[0][0].shape[2] for c in cs})
            print(f"{name} {'rev' if rev else 'fwd'} ({len(cs)} calls, L {Ls[0]}..{Ls[-1]}, {threads} thr)  "
                  + _ab(lambda: replay(cs), args.rounds, 3), flush=True)
    torch.set_num_threads(1)
    for rev in (False, True):
        cs = _vim_ti(rev)
        print(f"Vim-Ti B=8 L=197 {'rev' if rev else 'fwd'} (1 thr)  " + _ab(lambda: replay(cs), args.rounds, 3),
              flush=True)
    if args.no_model:
        return
    for bs, threads in ((128, 2), (16, 1)):
        torch.set_num_threads(threads)
        x = xt[:bs]
        print(f"eval forward bundled b{bs} ({threads} thr)  "
              + _ab(lambda: eval_fwd(teacher, x), args.rounds, 3 if bs == 128 else 10), flush=True)


if __name__ == "__main__":
    main()
