"""Do reduced models realise their FLOPs savings? Baseline and reduced forwards of one model in one run.

    PYTHONPATH=src python benchmarks/reduced.py [--model vim_small] [--batch 8] [--threads 1] [--reps 5]

For each method (default: ``rmeeto`` r=11 and ``mtr`` flops_reduction=0.3) on the same weights, fp32,
224 px, fast CPU scan, inference mode, it records:

* the forward wall time (minimum over ``--reps`` rounds; the variants alternate within a round, so a
  busy second core slows them alike and the ratios survive it),
* ``flops_ratio`` = baseline FLOPs / reduced FLOPs (``vimtr.flops``, "full" convention, the reduction's
  own overhead included), the speed-up the FLOPs promise,
* ``speedup`` = baseline time / reduced time, and ``realised`` = speedup / flops_ratio (target ≥ 0.85),
* ``reducer_share`` = wall time spent inside ``model.reducer`` calls / the forward's wall time, in the
  same (fastest) forward (target ≤ 3%); the reducer's own sorts, gathers and scatters are all that
  is timed, the mixer's extra output for MTR (Δ) is part of the mixer;
* the same three in CPU time (``cpu_time``): with ``--threads 1`` the process's CPU time is the work
  itself, so these survive a machine shared with other jobs, where wall times do not.

Writes JSON (default benchmarks/results/reduced.json).
"""
from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

from vimtr.cli import tune_cpu_threads

tune_cpu_threads()  # GOMP_SPINCOUNT as the CLI sets it, before torch loads libgomp

import torch  # noqa: E402

import vimtr  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from scan import _proc_stat_busy, machine, write  # noqa: E402

METHODS = {"rmeeto": {"r": 11}, "mtr": {"flops_reduction": 0.3}}


class ReducerTimer:
    """Wraps a model's reducer: accumulates the wall and CPU time of its calls."""

    def __init__(self, reducer):
        self.reducer, self.seconds, self.cpu_seconds = reducer, 0.0, 0.0

    def __call__(self, block, state):
        c0, t0 = time.process_time(), time.perf_counter()
        out = self.reducer(block, state)
        self.seconds += time.perf_counter() - t0
        self.cpu_seconds += time.process_time() - c0
        return out

    def __getattr__(self, name):  # finish, applied, ... go to the reducer
        return getattr(self.reducer, name)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="vim_small")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--threads", type=int, help="torch threads (default: torch's own choice)")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--out", help="JSON path (default benchmarks/results/reduced.json)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from vimtr.ops import scan_backend

    torch.manual_seed(0)
    base = vimtr.create_model(args.model).eval()
    models = {"baseline": base}
    for name in args.methods:
        models[name] = vimtr.reduce(copy.deepcopy(base), name, **METHODS[name])
        models[name].reducer = ReducerTimer(models[name].reducer)
    x = torch.randn(args.batch, *base.input_size)
    flops = {k: vimtr.flops(m) for k, m in models.items()}
    walls = {k: [] for k in models}
    shares = {k: [] for k in models}
    cpus = {k: [] for k in models}  # on one thread, CPU time is the work itself, whatever else runs
    cpu_shares = {k: [] for k in models}
    busy0, t_start = _proc_stat_busy(), time.perf_counter()
    with torch.inference_mode(), scan_backend("cpu"):
        for m in models.values():  # warm-up (numba compile/cache load, allocator)
            m(x)
        for _ in range(args.reps):
            for k, m in models.items():
                if k != "baseline":
                    m.reducer.seconds = m.reducer.cpu_seconds = 0.0
                c0, t0 = time.process_time(), time.perf_counter()
                m(x)
                wall, cpu = time.perf_counter() - t0, time.process_time() - c0
                walls[k].append(wall)
                cpus[k].append(cpu)
                shares[k].append(m.reducer.seconds / wall if k != "baseline" else 0.0)
                cpu_shares[k].append(m.reducer.cpu_seconds / cpu if k != "baseline" else 0.0)
    busy1, elapsed = _proc_stat_busy(), time.perf_counter() - t_start
    t_base = min(walls["baseline"])
    rec = {"benchmark": "reduced", "machine": machine(), "model": args.model, "batch": args.batch, "dtype": "float32",
           "image_size": base.input_size[-1], "reps": args.reps, "scan_backend": "cpu",
           "baseline": {"wall_min_s": t_base, "walls_s": walls["baseline"], "cpu_min_s": min(cpus["baseline"]),
                        "flops_per_image": flops["baseline"]},
           "methods": {}}
    if busy0 and busy1:
        import os
        others = ((busy1[0] - busy0[0]) - (busy1[1] - busy0[1])) / os.sysconf("SC_CLK_TCK")
        rec["other_processes_cores"] = round(others / elapsed, 2)
    print(f"{args.model} b={args.batch} threads={torch.get_num_threads()}: baseline {t_base * 1e3:.1f} ms")
    for k in args.methods:
        i = min(range(len(walls[k])), key=walls[k].__getitem__)  # the fastest forward, and its reducer share
        t = walls[k][i]
        ratio = flops["baseline"] / flops[k]
        speedup = t_base / t
        r = {"params": METHODS[k], "wall_min_s": t, "walls_s": walls[k], "flops_per_image": flops[k],
             "flops_ratio": ratio, "speedup": speedup, "realised": speedup / ratio,
             "reducer_share": shares[k][i], "reducer_share_median": sorted(shares[k])[len(shares[k]) // 2],
             "tokens": models[k].reduction_trace["tokens"]}
        j = min(range(len(cpus[k])), key=cpus[k].__getitem__)  # the same in CPU time
        r["cpu_time"] = {"min_s": cpus[k][j], "speedup": min(cpus["baseline"]) / cpus[k][j],
                         "realised": min(cpus["baseline"]) / cpus[k][j] / ratio, "reducer_share": cpu_shares[k][j],
                         "reducer_share_median": sorted(cpu_shares[k])[len(cpu_shares[k]) // 2]}
        rec["methods"][k] = r
        c = r["cpu_time"]
        print(f"  {k:7s} {t * 1e3:8.1f} ms  FLOPs x{ratio:.3f}  speed-up x{speedup:.3f}  realised {r['realised']:.3f}"
              f"  reducer {r['reducer_share'] * 100:.2f}% of the forward | CPU time: realised {c['realised']:.3f},"
              f" reducer {c['reducer_share'] * 100:.2f}%")
    path = write(rec, args.out, "reduced")
    print(f"wrote {path}")


if __name__ == "__main__":
    sys.exit(main())
