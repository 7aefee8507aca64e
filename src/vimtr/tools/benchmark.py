"""``vimtr bench``: throughput and latency of a model with and without reductions.

Warm-up, then N timed forwards per (reduction, batch size, dtype); reports the median latency and its
spread (min / max / interquartile range), images/s at the median, and peak memory (GPU: allocator
peak; CPU: the process's peak resident size so far). ``--preset rmeeto`` uses R-MeeTo's convention:
batch 128, fp16, 100 warm-up and 30 timed forwards. Speed-ups are ratios within one run.
"""
from __future__ import annotations

import argparse
import contextlib
import resource
import statistics
import time

import torch

import vimtr
from vimtr.io import write_json

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
PRESETS = {"rmeeto": dict(batch_sizes=[128], dtypes=["fp16"], warmup=100, runs=30)}


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _autocast(device, dtype):
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def _random_batch(model, batch_size: int, device) -> torch.Tensor:
    # A generator of its own: timing must not move the global RNG (the demo re-trains after timing).
    return torch.randn(batch_size, *model.input_size, generator=torch.Generator().manual_seed(0)).to(device)


@torch.no_grad()
def time_forward(model, batch_size: int, dtype: str = "fp32", device="cpu", warmup: int = 3,
                 runs: int = 10) -> dict:
    """Median latency (s) of ``model`` on a random batch, with spread and peak memory."""
    device = torch.device(device)
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {list(DTYPES)}, got {dtype!r}")
    if batch_size < 1 or runs < 1 or warmup < 0:
        raise ValueError("batch_size and runs must be >= 1 and warmup >= 0")
    x = _random_batch(model, batch_size, device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    with _autocast(device, DTYPES[dtype]):
        for i in range(warmup + runs):
            _sync(device)
            t0 = time.perf_counter()
            model(x)
            _sync(device)
            if i >= warmup:
                times.append(time.perf_counter() - t0)
    q = statistics.quantiles(times, n=4) if len(times) > 1 else [times[0]] * 3
    med = statistics.median(times)
    peak = (torch.cuda.max_memory_allocated(device) if device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    return {"batch_size": batch_size, "dtype": dtype, "median_s": med, "min_s": min(times), "max_s": max(times),
            "iqr_s": q[2] - q[0], "images_per_s": batch_size / med, "peak_memory_mb": peak / 2 ** 20,
            "runs": runs, "warmup": warmup}


@torch.no_grad()
def time_alternating(models: dict, batch_size: int, rounds: int = 5, warmup: int = 1, device="cpu") -> dict:
    """{label: fastest forward (s)} of each model on one batch, the models taking turns in every round:
    on a shared machine whose speed drifts they are slowed alike, and the minimum is the least disturbed
    sample. For comparing configurations side by side (the demo's speed-up column)."""
    device = torch.device(device)
    x = _random_batch(next(iter(models.values())), batch_size, device)
    best = {label: float("inf") for label in models}
    for i in range(warmup + rounds):
        for label, m in models.items():
            _sync(device)
            t0 = time.perf_counter()
            m(x)
            _sync(device)
            if i >= warmup:
                best[label] = min(best[label], time.perf_counter() - t0)
    return best


def benchmark(model, configs: dict, batch_sizes=(1, 8, 32), dtypes=("fp32",), device="cpu", warmup=3, runs=10,
              progress=True) -> list[dict]:
    """Time ``model`` under each reduction in ``configs`` ({label: None | (method, params)}).

    Every row carries the speed-up over the unreduced row of the same batch size and dtype, measured in
    this run, and the FLOPs ratio for comparison.
    """
    from vimtr.progress import progress_bar

    device = torch.device(device)
    model = model.to(device).eval()
    rows = []
    jobs = [(label, bs, dt) for label in configs for bs in batch_sizes for dt in dtypes]
    for label, bs, dt in progress_bar(jobs, desc="bench", enabled=progress):
        cfg = configs[label]
        vimtr.restore(model)
        if cfg is not None:
            vimtr.reduce(model, cfg[0], **cfg[1])
        row = {"config": label, "method": cfg[0] if cfg else "baseline", "params": cfg[1] if cfg else {},
               "gflops": vimtr.flops(model) / 1e9, **time_forward(model, bs, dt, device, warmup, runs)}
        rows.append(row)
    vimtr.restore(model)
    base = {(r["batch_size"], r["dtype"]): r for r in rows if r["method"] == "baseline"}
    for r in rows:
        b = base.get((r["batch_size"], r["dtype"]))
        if b:
            r["speedup"] = b["median_s"] / r["median_s"]
            r["flops_ratio"] = b["gflops"] / r["gflops"]
    return rows


def parse_methods(specs: list[str], flops_reduction: float) -> dict:
    """``["mtr", "rmeeto:r=11"]`` -> {label: (method, params)}; the baseline always comes first."""
    from vimtr.io import parse_param

    configs = {"baseline": None}
    for spec in specs:
        name, _, rest = spec.partition(":")
        params = dict(parse_param(kv) for kv in rest.split(",") if kv) if rest else {}
        if "r" not in params and "flops_reduction" not in params:
            params["flops_reduction"] = flops_reduction
        configs[spec] = (name, params)
    return configs


def load_for_cli(args, allow_random: bool = False):
    """The model named by --model/--checkpoint (bench, sweep, info, visualize): the engine's loader, plus,
    with ``allow_random`` (speed and FLOPs only), a registered architecture with random weights."""
    from vimtr.engine.common import load_from_args
    from vimtr.models.checkpoint import bundled_models

    if allow_random and args.model and not args.checkpoint and args.model not in bundled_models():
        print(f"note: {args.model} is a registered architecture with random weights; give --checkpoint for "
              "trained weights (speed and FLOPs are still meaningful, accuracy is not)")
        return vimtr.create_model(args.model).eval()
    args.ema = getattr(args, "ema", False)
    return load_from_args(args)


def add_cli(sub):
    p = sub.add_parser("bench", help="throughput/latency with and without reductions (JSON out)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog="examples:\n  vimtr bench --model vim_digits --method mtr rmeeto tome\n"
                              "  vimtr bench --model vim_tiny --method rmeeto:r=5 mtr --batch-size 1 8 --runs 5\n"
                              "  vimtr bench --checkpoint vim_s.pth --method rmeeto:r=11 --device cuda "
                              "--preset rmeeto --json bench.json")
    p.add_argument("--model", help="registered or bundled model name")
    p.add_argument("--checkpoint", help="checkpoint to load")
    p.add_argument("--method", nargs="*", default=["mtr", "rmeeto"],
                   help="reductions to time: NAME or NAME:key=value,... (default mtr rmeeto)")
    p.add_argument("--flops-reduction", type=float, default=0.3, help="for methods given without r (default 0.3)")
    p.add_argument("--batch-size", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--dtype", nargs="+", default=["fp32"], choices=list(DTYPES))
    p.add_argument("--device", default="cpu")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--runs", type=int, default=10)
    p.add_argument("--preset", choices=list(PRESETS), help="rmeeto: batch 128, fp16, 100 warm-up, 30 timed")
    p.add_argument("--json", help="write the rows to this JSON file")
    p.set_defaults(func=run)


def run(args):
    if args.preset:
        pre = PRESETS[args.preset]
        args.batch_size, args.dtype, args.warmup, args.runs = pre["batch_sizes"], pre["dtypes"], pre["warmup"], pre["runs"]
    if args.device == "cpu" and "fp16" in args.dtype:
        raise ValueError("fp16 needs a GPU (--device cuda); on CPU use fp32 or bf16")
    from vimtr import checks

    configs = checks.bench_configs(args)
    model = load_for_cli(args, allow_random=True)
    checks.check_reductions(model, [c for c in configs.values() if c], "bench",  # before any timing
                            more_blocks="e.g. --method mtr:interval=1")
    rows = benchmark(model, configs, args.batch_size, args.dtype, args.device, args.warmup, args.runs)
    print(f"{'config':<24}{'batch':>6}{'dtype':>6}{'GFLOPs':>9}{'median ms':>11}{'im/s':>9}{'speed-up':>9}")
    for r in rows:
        print(f"{r['config']:<24}{r['batch_size']:>6}{r['dtype']:>6}{r['gflops']:>9.3f}{r['median_s'] * 1e3:>11.2f}"
              f"{r['images_per_s']:>9.1f}{r.get('speedup', float('nan')):>9.2f}")
    if args.json:
        write_json(args.json, {"model": getattr(model, "model_name", None), "device": args.device, "rows": rows})
        print(f"wrote {args.json}")
