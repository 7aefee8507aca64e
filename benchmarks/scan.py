"""Time the selective scan alone: the fast CPU kernel against the reference, forward and forward+backward.

    PYTHONPATH=src python benchmarks/scan.py [--quick] [--batch-sizes 1 8] [--out results.json]

Shapes are Vim-Ti's and Vim-S's (L = 197 tokens, E = 384 / 768 channels, N = 16 states or ``--d-state``), with
the inputs laid out as the mixer hands them over (delta and z transposed (B, L, E) views, B and C contiguous
(B, N, L)), softplus with delta_bias, D and the z gate: the call Vim makes 48 times per image.

Besides fast vs reference it records what the fast kernel's design choices are worth (the same call
with softplus and gate done in torch; contiguous inputs; one thread) and the scan's exp floor: its
B·E·L·N exps at the rate torch.exp achieves on a tensor of that size. Also holds the timing helpers
benchmarks/model.py uses. Writes JSON (default benchmarks/results/scan.json).
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

from vimtr.cli import tune_cpu_threads

tune_cpu_threads()  # GOMP_SPINCOUNT as the CLI sets it, before torch loads libgomp

import torch  # noqa: E402

import vimtr  # noqa: E402
import torch.nn.functional as F

RESULTS = Path(__file__).resolve().parent / "results"
SHAPES = {"vim_tiny": {"E": 384, "L": 197, "N": 16}, "vim_small": {"E": 768, "L": 197, "N": 16}}


# ------------------------------------------------------------------------------------------- helpers
def _proc_stat_busy():
    """(busy jiffies of the whole machine, of this process) from /proc; None where /proc is missing."""
    try:
        with open("/proc/stat") as f:
            vals = [int(v) for v in f.readline().split()[1:]]
        idle = vals[3] + (vals[4] if len(vals) > 4 else 0)
        with open("/proc/self/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return sum(vals) - idle, int(fields[11]) + int(fields[12])  # machine busy, own utime + stime
    except (OSError, IndexError, ValueError):
        return None


def timeit(fn, reps: int, warmup: int = 1, max_seconds: float | None = None) -> dict:
    """Wall and CPU seconds per call over ``reps`` calls after ``warmup``, plus how busy the rest of the
    machine was meanwhile (``other_processes_cores``: cores' worth of CPU other processes used). On a
    shared 2-core machine a wall time taken while another process holds a core is not the kernel's."""
    for _ in range(warmup):
        fn()
    walls, cpus = [], []
    start, t_start = _proc_stat_busy(), time.perf_counter()
    for _ in range(reps):
        c0, t0 = time.process_time(), time.perf_counter()
        fn()
        walls.append(time.perf_counter() - t0)
        cpus.append(time.process_time() - c0)
        if max_seconds is not None and time.perf_counter() - t_start > max_seconds:
            break
    end, elapsed = _proc_stat_busy(), time.perf_counter() - t_start
    rec = {"reps": len(walls), "wall_min_s": min(walls), "wall_median_s": statistics.median(walls),
           "cpu_min_s": min(cpus), "cpu_median_s": statistics.median(cpus)}
    if start and end:
        others = ((end[0] - start[0]) - (end[1] - start[1])) / os.sysconf("SC_CLK_TCK")
        rec["other_processes_cores"] = round(others / elapsed, 2)
    return rec


def machine() -> dict:
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    info = {"cpu": cpu, "logical_cpus": os.cpu_count(), "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
                "python": platform.python_version(), "loadavg_at_start": list(os.getloadavg())}
    try:
        import numba
        info["numba"] = numba.__version__
    except ImportError:
        pass
    return info


def write(result: dict, out: str | None, name: str) -> Path:
    path = Path(out) if out else RESULTS / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    result["machine"]["loadavg_at_end"] = list(os.getloadavg())
    from vimtr.io import write_json  # temp file + rename: an interrupted run leaves no half-written JSON
    write_json(path, result)
    return path


def exp_rate(numel: int, reps: int = 10) -> float:
    """torch.exp elements per second on a float32 tensor of ``numel`` elements (out= preallocated)."""
    x = torch.empty(numel).uniform_(-10, 0)
    o = torch.empty_like(x)
    t = timeit(lambda: torch.exp(x, out=o), reps=reps, warmup=2)
    return numel / t["wall_min_s"]


def mm_rate(m: int, k: int, n: int, reps: int = 10) -> float:
    """torch.mm FLOP/s (2·m·k·n per product) for (m, k) @ (k, n) in float32."""
    a, b = torch.randn(m, k), torch.randn(k, n)
    o = torch.empty(m, n)
    t = timeit(lambda: torch.mm(a, b, out=o), reps=reps, warmup=2)
    return 2 * m * k * n / t["wall_min_s"]


# ----------------------------------------------------------------------------------------- the scan
def mixer_inputs(batch, E, L, N, seed=0):
    """Inputs as the reference mixer passes them (vimtr.ops.reference.bimamba_inner_ref): delta and z are
    transposed (B, L, E) views."""
    g = torch.Generator().manual_seed(seed)
    u = F.silu(torch.randn(batch, E, L, generator=g))
    delta = (torch.randn(batch, L, E, generator=g) * 0.5).transpose(1, 2)
    z = torch.randn(batch, L, E, generator=g).transpose(1, 2)
    A = -torch.arange(1, N + 1, dtype=torch.float32).repeat(E, 1)  # S4D-real init, as Vim
    B, C = torch.randn(batch, N, L, generator=g), torch.randn(batch, N, L, generator=g)
    D = torch.ones(E)
    dt = torch.exp(torch.rand(E, generator=g) * (torch.log(torch.tensor(0.1)) - torch.log(torch.tensor(1e-3)))
                   + torch.log(torch.tensor(1e-3)))
    delta_bias = dt + torch.log(-torch.expm1(-dt))  # softplus⁻¹ of dt ∈ [1e-3, 0.1], as Vim's init
    return {"u": u, "delta": delta, "A": A, "B": B, "C": C, "D": D, "z": z, "delta_bias": delta_bias}


def _fwd(fn, x):
    def run():
        with torch.inference_mode():
            fn(**x, delta_softplus=True)
    return run


def _fwd_bwd(fn, x):
    leaves = {k: v.detach().clone().requires_grad_() for k, v in x.items()}
    w = torch.randn(x["u"].shape)

    def run():
        out = fn(**leaves, delta_softplus=True)
        (out * w).sum().backward()
        for v in leaves.values():
            v.grad = None
    return run


def _unfused(fast):
    """The fast kernel with softplus, D and the gate left to torch, to measure what fusing them is worth."""
    def fn(u, delta, A, B, C, D, z, delta_bias, delta_softplus):
        d = F.softplus(delta + delta_bias[:, None])
        y = fast(u, d, A, B, C)
        return (y + u * D[:, None]) * F.silu(z)
    return fn


def bench_case(name, batch, quick, ref_max_batch, d_state=None):
    from vimtr.ops import selective_scan_ref
    from vimtr.ops.cpu import selective_scan_cpu

    shp = SHAPES[name]
    E, L, N = shp["E"], shp["L"], d_state or shp["N"]
    x = mixer_inputs(batch, E, L, N)
    reps = 3 if quick else 10
    rec = {"model": name, "batch": batch, "E": E, "L": L, "N": N, "exps": batch * E * L * N}
    rec["fast_fwd"] = timeit(_fwd(selective_scan_cpu, x), reps=reps, warmup=2)
    rec["fast_fwd_bwd"] = timeit(_fwd_bwd(selective_scan_cpu, x), reps=reps, warmup=2)
    rec["fast_fwd_unfused"] = timeit(_fwd(_unfused(selective_scan_cpu), x), reps=reps, warmup=2)
    xc = {k: v.contiguous() for k, v in x.items()}
    rec["fast_fwd_contiguous_inputs"] = timeit(_fwd(selective_scan_cpu, xc), reps=reps, warmup=2)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        rec["fast_fwd_1thread"] = timeit(_fwd(selective_scan_cpu, x), reps=reps, warmup=1)
    finally:
        torch.set_num_threads(threads)
    if batch <= ref_max_batch:
        ref_reps = 1 if quick or batch > 1 else 2
        rec["ref_fwd"] = timeit(_fwd(selective_scan_ref, x), reps=ref_reps, warmup=0)
        rec["ref_fwd_bwd"] = timeit(_fwd_bwd(selective_scan_ref, x), reps=ref_reps, warmup=0)
        rec["speedup_fwd"] = rec["ref_fwd"]["wall_min_s"] / rec["fast_fwd"]["wall_min_s"]
        rec["speedup_fwd_bwd"] = rec["ref_fwd_bwd"]["wall_min_s"] / rec["fast_fwd_bwd"]["wall_min_s"]
        # parity on these inputs, the number the tests bound by 1e-5
        with torch.inference_mode():
            a, b = selective_scan_cpu(**x, delta_softplus=True), selective_scan_ref(**x, delta_softplus=True)
        rec["max_rel_err_fwd"] = ((a - b).abs().max() / b.abs().max()).item()
    rate = exp_rate(rec["exps"])
    rec["torch_exp_rate_per_s"] = rate
    rec["exp_floor_s"] = rec["exps"] / rate
    rec["fast_fwd_over_exp_floor"] = rec["fast_fwd"]["wall_min_s"] / rec["exp_floor_s"]
    rec["fast_state_updates_per_s"] = rec["exps"] / rec["fast_fwd"]["wall_min_s"]
    return rec


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", help="JSON path (default benchmarks/results/scan.json)")
    p.add_argument("--quick", action="store_true", help="fewer repetitions, batch 1 only unless --batch-sizes")
    p.add_argument("--batch-sizes", type=int, nargs="+", help="default 1 8 (1 with --quick)")
    p.add_argument("--models", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    p.add_argument("--ref-max-batch", type=int, default=8, help="largest batch the reference is timed at")
    p.add_argument("--threads", type=int, help="torch threads, which the kernel follows (default: torch's)")
    p.add_argument("--d-state", type=int, help="N, the state size (default: the model's, 16; any other N runs the "
                                               "generic recurrence instead of the N = 16 one in registers)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    batches = args.batch_sizes or ([1] if args.quick else [1, 8])
    result = {"benchmark": "scan", "machine": machine(), "quick": args.quick, "cases": []}
    for name in args.models:
        for batch in batches:
            rec = bench_case(name, batch, args.quick, args.ref_max_batch, args.d_state)
            result["cases"].append(rec)
            msg = (f"{name:9s} b={batch:<3d} fast fwd {rec['fast_fwd']['wall_min_s'] * 1e3:8.2f} ms  "
                   f"fwd+bwd {rec['fast_fwd_bwd']['wall_min_s'] * 1e3:8.2f} ms  "
                   f"exp floor {rec['exp_floor_s'] * 1e3:7.2f} ms")
            if "ref_fwd" in rec:
                msg += f"  | ref fwd x{rec['speedup_fwd']:.0f}, fwd+bwd x{rec['speedup_fwd_bwd']:.0f}"
            print(msg, flush=True)
    path = write(result, args.out, "scan")
    print(f"wrote {path}")


if __name__ == "__main__":
    sys.exit(main())
