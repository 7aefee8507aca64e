"""How fast is the demo's re-training on a small CPU machine? Two comparisons, each measured in one run.

    PYTHONPATH=src python benchmarks/retrain_speed.py [--rounds 5] [--epochs 1] [--out FILE.json]

1. One training step of the demo's student (the bundled model, rmeeto at 30% fewer FLOPs, batch 16,
   forward + backward, one thread) on the CPU kernels (``VIMTR_SCAN=cpu``) and on the plain-PyTorch
   reference ops (``VIMTR_SCAN=reference``), taking turns: ``rounds`` rounds of 10 steps each, the fastest
   round and the median kept.
2. ``vimtr.tools.demo.retrain_rmeeto`` (the demo's recipe, ``--epochs`` epochs) in one process with all
   the machine's threads against one one-thread process per core (at most 2) with DDP, alternating
   ``--pairs`` times; wall seconds including the processes' start-up.

Writes JSON (default benchmarks/results/retrain_speed.json). Timings are machine-dependent and noisy on
shared machines: compare the ratios, and rerun before trusting a small difference.
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

from vimtr.cli import tune_cpu_threads

tune_cpu_threads()  # GOMP_SPINCOUNT as the CLI sets it, before torch loads libgomp

import torch  # noqa: E402

import vimtr  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from scan import machine  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def step_times(rounds: int) -> dict:
    from vimtr.data import digits
    from vimtr.ops import scan_backend
    from vimtr.tools.demo import SCHEDULE

    torch.set_num_threads(1)
    teacher = vimtr.load_model("vim_digits").eval()
    student = vimtr.reduce(copy.deepcopy(teacher), "rmeeto", flops_reduction=0.3, **SCHEDULE).train()
    x, _ = digits.digits_tensors("train")
    xb = x[:16]

    def step():
        student(xb).logsumexp(-1).mean().backward()

    backends = ("cpu", "reference")
    times = {b: [] for b in backends}
    for backend in backends:  # warm-up (JIT, allocator) for both
        with scan_backend(backend):
            for _ in range(3):
                step()
    for _ in range(rounds):
        for backend in backends:
            with scan_backend(backend):
                t0 = time.perf_counter()
                for _ in range(10):
                    step()
                times[backend].append((time.perf_counter() - t0) / 10)
    out = {name: {"min_ms": 1e3 * min(times[b]), "median_ms": 1e3 * statistics.median(times[b])}
           for name, b in (("cpu_kernels", "cpu"), ("reference_ops", "reference"))}
    out["speedup_min"] = out["reference_ops"]["min_ms"] / out["cpu_kernels"]["min_ms"]
    out["speedup_median"] = out["reference_ops"]["median_ms"] / out["cpu_kernels"]["median_ms"]
    return out


def process_times(epochs: int, pairs: int) -> dict:
    from vimtr.engine import distributed
    from vimtr.tools.demo import retrain_rmeeto

    threads = distributed.cpu_workers(64)
    runs = {"one_process": [], "processes": []}
    for _ in range(pairs):
        for name, procs in (("one_process", 1), ("processes", None)):
            torch.set_num_threads(threads if procs == 1 else 1)
            t0 = time.perf_counter()
            _, summary = retrain_rmeeto("vim_digits", 0.3, epochs=epochs, progress=False, processes=procs)
            runs[name].append({"seconds": time.perf_counter() - t0, "processes": summary["processes"]})
    torch.set_num_threads(threads)
    best = {k: min(r["seconds"] for r in v) for k, v in runs.items()}
    return {"epochs": epochs, "threads_of_one_process": threads, "runs": runs,
            "speedup": best["one_process"] / best["processes"]}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--pairs", type=int, default=2)
    p.add_argument("--skip-processes", action="store_true", help="only the step comparison")
    p.add_argument("--out", type=Path, default=RESULTS / "retrain_speed.json")
    args = p.parse_args(argv)
    threads = torch.get_num_threads()
    result = {"machine": machine(), "step_batch16_one_thread": step_times(args.rounds)}
    torch.set_num_threads(threads)
    if not args.skip_processes:
        result["retrain_epochs"] = process_times(args.epochs, args.pairs)
    from vimtr.io import write_json
    write_json(args.out, result)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    sys.exit(main())
