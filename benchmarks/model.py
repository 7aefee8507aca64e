"""Time whole models (Vim-Ti, Vim-S; 224 px, fp32, inference) on the CPU kernels and on the reference ops
(VIMTR_SCAN=reference) in the same run, next to the machine's floor for that model.

    PYTHONPATH=src python benchmarks/model.py [--quick] [--batch-sizes 1 8 32] [--out results.json]

floor = model matmul FLOPs / measured torch.mm rate + scan exp count / measured torch.exp rate.

* FLOPs are counted by torch's FlopCounterMode on a batch-1 forward (mm/addmm/bmm/convolution, 2 per
  multiply-add) and scaled by the batch; the scan itself is opaque to it, so nothing is double counted.
* The exp count is B·E·L·N per scan call, summed over the calls the forward actually makes.
* Rates: ``floor`` uses a representative torch.mm (the in_proj product, (batch·L, D) @ (D, 4D)) and
  torch.exp on a tensor the size of one scan call's decays (B·E·L·N, what the reference materialises);
  ``floor_strict`` uses the best rates measured (a large square mm, an L2-resident exp), the lowest floor.

The reference is slow (minutes per forward at batch 32): ``--ref-max-batch`` bounds where it is timed,
``--quick`` times batch 1 only. With ``--ref-reps`` the two alternate and the speed-up is also given in
CPU time (``speedup_vs_reference_cpu_time``), which on one thread (``--threads 1``) is the work itself
and survives a machine shared with other jobs. Run against another checkout's library (``PYTHONPATH``)
for a before/after comparison; the scan share is then not counted. Writes JSON (default
benchmarks/results/model.json).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from vimtr.cli import tune_cpu_threads

tune_cpu_threads()  # GOMP_SPINCOUNT as the CLI sets it, before torch loads libgomp

import torch  # noqa: E402

import vimtr  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from scan import exp_rate, machine, mm_rate, timeit, write

MODELS = ("vim_tiny", "vim_small")


class ScanCounter:
    """Wraps the fast scan to count calls, exps (B·E·L·N) and the wall time spent inside it (a checkout
    without vimtr.ops.cpu, measured for a before/after comparison, counts nothing)."""

    def __init__(self):
        try:
            from vimtr.ops.cpu import scan
        except ImportError:
            scan = None
        self.mod, self.orig = scan, getattr(scan, "selective_scan_cpu", None)
        self.calls = self.exps = 0
        self.seconds = 0.0

    def __enter__(self):
        def counted(u, delta, A, *args, **kw):
            t0 = time.perf_counter()
            out = self.orig(u, delta, A, *args, **kw)
            self.seconds += time.perf_counter() - t0
            self.calls += 1
            self.exps += u.shape[0] * u.shape[1] * u.shape[2] * A.shape[1]
            return out
        if self.mod is not None:
            self.mod.selective_scan_cpu = counted  # the CPU mixer looks it up in its module at each call
        return self

    def __exit__(self, *exc):
        if self.mod is not None:
            self.mod.selective_scan_cpu = self.orig


def count_model(model, img):
    """Batch-1 FLOPs by op and the scan's calls and exp count."""
    from torch.utils.flop_counter import FlopCounterMode

    from vimtr.ops import scan_backend
    x = torch.randn(1, 3, img, img)
    with torch.inference_mode(), scan_backend("cpu"), ScanCounter() as sc, FlopCounterMode(display=False) as fc:
        model(x)
    by_op = {str(op): int(n) for op, n in fc.get_flop_counts().get("Global", {}).items()}
    calls, exps = sc.calls, sc.exps
    if not calls:  # nothing counted (see ScanCounter): two scans per block, every token, all B·E·L·N
        mixer = model.layers[0].mixer
        calls = 2 * len(model.layers)
        exps = calls * mixer.d_inner * (model.patch_embed.num_patches + 1) * mixer.d_state
    return {"flops_per_image": int(fc.get_total_flops()), "flops_by_op": by_op, "scan_calls": calls,
            "exps_per_image": exps}


def bench_model(name, batches, args):
    from vimtr.ops import scan_backend

    model = vimtr.create_model(name).eval()
    img = 224
    counts = count_model(model, img)
    D = model.embed_dim
    L = model.patch_embed.num_patches + 1  # tokens entering every block (class token included)
    rec = dict(model=name, params=sum(p.numel() for p in model.parameters()), tokens=L, **counts, batches=[])
    peak_mm = mm_rate(2048, 2048, 2048)
    peak_exp = exp_rate(1 << 18)
    for batch in batches:
        x = torch.randn(batch, 3, img, img)
        b = {"batch": batch}
        flops, exps = counts["flops_per_image"] * batch, counts["exps_per_image"] * batch
        b["mm_rate_flop_s"] = mm_rate(batch * L, D, 4 * D)
        b["exp_rate_per_s"] = exp_rate(exps // max(counts["scan_calls"], 1))
        b["peak_mm_rate_flop_s"], b["peak_exp_rate_per_s"] = peak_mm, peak_exp
        b["floor_s"] = flops / b["mm_rate_flop_s"] + exps / b["exp_rate_per_s"]
        b["floor_matmul_s"] = flops / b["mm_rate_flop_s"]
        b["floor_strict_s"] = flops / max(peak_mm, b["mm_rate_flop_s"]) + exps / max(peak_exp, b["exp_rate_per_s"])

        def fwd(backend, x=x):
            def run():
                with torch.inference_mode(), scan_backend(backend):
                    model(x)
            return run

        reps = 2 if args.quick else 5
        if batch <= args.ref_max_batch and args.ref_reps > 1:
            # Alternate fast and reference forwards so that load from other processes hits both alike.
            fast_t, ref_t = [], []
            fwd("cpu")()
            for _ in range(args.ref_reps):
                ref_t.append(timeit(fwd("reference"), reps=1, warmup=0))
                fast_t.append(timeit(fwd("cpu"), reps=max(1, reps // args.ref_reps), warmup=0))
            b["reference_interleaved"] = {"wall_min_s": min(r["wall_min_s"] for r in ref_t),
                                          "walls_s": [r["wall_min_s"] for r in ref_t],
                                          "cpu_min_s": min(r["cpu_min_s"] for r in ref_t)}
            b["fast_interleaved"] = {"wall_min_s": min(r["wall_min_s"] for r in fast_t),
                                     "walls_s": [r["wall_min_s"] for r in fast_t],
                                     "cpu_min_s": min(r["cpu_min_s"] for r in fast_t)}
            b["speedup_vs_reference_interleaved"] = (b["reference_interleaved"]["wall_min_s"]
                                                     / b["fast_interleaved"]["wall_min_s"])
            # On one thread CPU time is the work itself, whatever else runs on the machine.
            b["speedup_vs_reference_cpu_time"] = (b["reference_interleaved"]["cpu_min_s"]
                                                  / b["fast_interleaved"]["cpu_min_s"])
        b["fast"] = timeit(fwd("cpu"), reps=reps, warmup=1)
        with ScanCounter() as sc:  # one more forward, instrumented: how much of it is the scan
            t0 = time.perf_counter()
            fwd("cpu")()
            total = time.perf_counter() - t0
        b["fast_scan_share"] = sc.seconds / total if sc.calls else None
        b["fast_scan_s"] = sc.seconds
        b["fast_over_floor"] = b["fast"]["wall_min_s"] / b["floor_s"]
        b["fast_over_floor_strict"] = b["fast"]["wall_min_s"] / b["floor_strict_s"]
        if batch <= args.ref_max_batch and "reference_interleaved" in b:
            b["reference"] = b["reference_interleaved"]
            b["speedup_vs_reference"] = b["speedup_vs_reference_interleaved"]
        elif batch <= args.ref_max_batch:
            b["reference"] = timeit(fwd("reference"), reps=1, warmup=0)  # minutes at batch 32: one run
            b["speedup_vs_reference"] = b["reference"]["wall_min_s"] / b["fast"]["wall_min_s"]
        rec["batches"].append(b)
        share = f"{b['fast_scan_share'] * 100:4.1f}%" if b["fast_scan_share"] is not None else "n/a"
        msg = (f"{name:9s} b={batch:<3d} fast {b['fast']['wall_min_s'] * 1e3:9.1f} ms "
               f"(scan {share})  floor {b['floor_s'] * 1e3:7.1f} ms "
               f"-> x{b['fast_over_floor']:.2f} of floor (strict x{b['fast_over_floor_strict']:.2f})")
        if "reference" in b:
            msg += f"  | reference {b['reference']['wall_min_s']:.1f} s, speedup x{b['speedup_vs_reference']:.1f}"
            if "speedup_vs_reference_cpu_time" in b:
                msg += f" (CPU time x{b['speedup_vs_reference_cpu_time']:.1f})"
        print(msg, flush=True)
    return rec


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", help="JSON path (default benchmarks/results/model.json)")
    p.add_argument("--quick", action="store_true", help="batch 1 only (unless --batch-sizes), fewer repetitions")
    p.add_argument("--batch-sizes", type=int, nargs="+", help="default 1 8 32 (1 with --quick)")
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--ref-max-batch", type=int, help="largest batch the reference scan is timed at "
                   "(default: every batch; 1 with --quick)")
    p.add_argument("--ref-reps", type=int, default=1, help="reference forwards per batch, each next to a fast "
                   "one (alternated; the speed-up is then min(reference) / min(fast, same rounds))")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's own choice)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    batches = args.batch_sizes or ([1] if args.quick else [1, 8, 32])
    if args.ref_max_batch is None:
        args.ref_max_batch = 1 if args.quick else max(batches)
    result = {"benchmark": "model", "machine": machine(), "quick": args.quick, "image_size": 224, "dtype": "float32",
                  "models": [bench_model(name, batches, args) for name in args.models]}
    path = write(result, args.out, "model")
    print(f"wrote {path}")


if __name__ == "__main__":
    sys.exit(main())
