"""``vimtr sweep``: methods × reduction levels → accuracy, GFLOPs, images/s (CSV + JSON + the two plots
the papers draw: accuracy vs FLOPs and accuracy vs throughput)."""
from __future__ import annotations

import argparse
import csv
import io
from pathlib import Path

import torch

import vimtr
from vimtr.io import atomic_write, write_json
from vimtr.tools import train_digits

TRAINING_FREE = ("mtr", "rmeeto", "tome", "evit", "utr", "random", "positional")
COLUMNS = ("method", "level", "top1", "top5", "loss", "gflops", "flops_saved", "images_per_s", "speedup",
           "final_tokens", "top1_std", "top1_min", "top1_max")
RANDOM_SEEDS = 5
# --data's model when none is given: each built-in dataset's bundled model, as train_digits trains them
BUNDLED_FOR = {data: model for model, (data, _, _) in train_digits.MODELS.items()}
DEFAULT_LEVELS = (0.1, 0.2, 0.3, 0.4, 0.5)  # `vimtr sweep` without --levels: those of them each method reaches


def measure(model, dataset, method=None, params=None, batch_size=128, device="cpu", base=None,
            random_seeds: int = RANDOM_SEEDS) -> dict:
    """Evaluate ``model`` reduced with ``method`` (None: unreduced) and return one result row.

    ``random`` without an explicit ``seed`` is evaluated with seeds 0 … ``random_seeds``−1 and reported
    as the mean (``top1``, ``top5``, ``loss``) with ``top1_std``/``top1_min``/``top1_max``: one subset
    is drawn per step and shared by the batch, so a single seed is one fixed pruning pattern, and on a
    small model two seeds can differ by 30 points (see the README).

    ``images_per_s`` is the accuracy pass's (the first seed's for ``random``), after one warm-up forward
    of 16 images so that it does not pay for loading kernels; it is one sample, as noisy as the machine.
    """
    from vimtr.engine.evaluate import evaluate
    from vimtr.tools.benchmark import time_forward

    params = dict(params or {})
    seeds = [None]
    if method == "random" and "seed" not in params and random_seeds > 1:
        seeds = list(range(random_seeds))
    runs = []
    for seed in seeds:
        vimtr.restore(model)
        if method:
            vimtr.reduce(model, method, **(params if seed is None else {**params, "seed": seed}))
        if not runs:
            # Warm-up: the first call of a method's kernels loads them. A small batch does that as well as a
            # full one (the same compiled code) and costs a tenth of it: 25 points of the demo's sweep.
            time_forward(model, min(batch_size, len(dataset), 16), device=device, warmup=0, runs=1)
        runs.append(evaluate(model, dataset, batch_size=batch_size, device=device, progress=False))
    res = {k: sum(r[k] for r in runs) / len(runs) for k in ("top1", "top5", "loss")}
    gflops = vimtr.flops(model) / 1e9
    row = {"method": method or "baseline", "level": params.get("flops_reduction", 0.0),
           "top1": res["top1"], "top5": res["top5"], "loss": res["loss"], "gflops": gflops,
           "images_per_s": runs[0]["images_per_s"],
           "final_tokens": (model.reducer.lengths[-1] if model.reducer
                            else getattr(model, "num_tokens", model.num_patches + 1))}
    if len(runs) > 1:
        top1 = torch.tensor([r["top1"] for r in runs], dtype=torch.float64)
        row.update(seeds=seeds, top1_std=top1.std().item(), top1_min=top1.min().item(), top1_max=top1.max().item())
    vimtr.restore(model)
    return relative_to(row, base or row)


def relative_to(row: dict, base: dict) -> dict:
    """Fill ``row``'s ``flops_saved`` and ``speedup`` against the unreduced ``base`` row."""
    row["flops_saved"] = 1.0 - row["gflops"] / base["gflops"]
    row["speedup"] = row["images_per_s"] / base["images_per_s"]
    return row


def sweep(model, dataset, methods=TRAINING_FREE, levels=(0.1, 0.2, 0.3, 0.4, 0.5), batch_size=128,
          device="cpu", progress=True, params: dict | None = None, random_seeds: int = RANDOM_SEEDS,
          processes: int = 1) -> list[dict]:
    """The unreduced model, then every method at every FLOPs-reduction level (``levels``: one list for all
    methods, or ``{method: levels}``, see :func:`levels_for`); ``params`` (e.g.
    ``{"interval": 1}``) go to every method. ``random`` is averaged over ``random_seeds`` seeds (see
    :func:`measure`).

    ``processes`` > 1 (CPU only): the points are shared out among that many one-thread processes
    (:func:`vimtr.engine.distributed.map_cpu`, ~1.5x faster on 2 cores for a small model). Accuracies and
    FLOPs are those of a single process; each point's ``images_per_s`` is then one thread's, measured
    with the other processes running beside it."""
    from functools import partial

    from vimtr.engine import distributed

    per_method = levels if isinstance(levels, dict) else dict.fromkeys(methods, levels)
    jobs = [(None, None)] + [(method, {**(params or {}), "flops_reduction": level})
                             for method in methods for level in per_method[method]]
    run = partial(_measure_jobs, model, dataset, batch_size=batch_size, device=device, random_seeds=random_seeds)
    if processes > 1:
        if torch.device(device).type != "cpu":
            raise ValueError(f"sweep: {processes} processes share the points out among CPU processes; "
                             f"on {device} use 1 (--processes 1)")
        load_kernels(model, jobs, batch_size, device)
        shares = _shares(jobs, processes, random_seeds)
        results = distributed.map_cpu(run, [([jobs[i] for i in share], n == 0 and progress)
                                            for n, share in enumerate(shares)])
        rows = [None] * len(jobs)
        for share, values in zip(shares, results):
            for i, row in zip(share, values):
                rows[i] = row
    else:
        rows = run((jobs, progress))
    return [rows[0]] + [relative_to(row, rows[0]) for row in rows[1:]]


def _measure_jobs(model, dataset, work, *, batch_size, device, random_seeds) -> list[dict]:
    """:func:`measure` for each ``(method, params)`` of ``work = (jobs, progress)``, in order."""
    from vimtr.progress import progress_bar

    jobs, progress = work
    return [measure(model, dataset, method, params, batch_size, device, random_seeds=random_seeds)
            for method, params in progress_bar(jobs, desc="sweep", enabled=progress)]


def load_kernels(model, jobs, batch_size=2, device="cpu"):
    """One 2-image forward per method of ``jobs`` (``(method, params)`` pairs; None: unreduced), here: the
    processes forked afterwards start with the compiled kernels in memory instead of each loading (or, in
    a fresh environment, compiling) them again. ``vimtr warmup`` uses it to fill numba's disk cache."""
    from vimtr.tools.benchmark import time_forward

    for method, params in dict(jobs[::-1]).items():  # one level per method
        vimtr.restore(model)
        if method:
            vimtr.reduce(model, method, **params)
        time_forward(model, min(2, batch_size), device=device, warmup=0, runs=1)
    vimtr.restore(model)


def _shares(jobs, processes: int, random_seeds: int) -> list[list[int]]:
    """Job indices for each process, balanced by the number of evaluations (``random``: one per seed):
    the costliest first, each to the least loaded process."""
    cost = [random_seeds if method == "random" and "seed" not in params else 1 for method, params in jobs]
    shares, load = [[] for _ in range(min(processes, len(jobs)))], [0] * min(processes, len(jobs))
    for i in sorted(range(len(jobs)), key=lambda i: -cost[i]):
        k = load.index(min(load))
        shares[k].append(i)
        load[k] += cost[i]
    return [sorted(share) for share in shares]


def plot(rows: list[dict], path_flops, path_throughput=None, title="", extra_points=(), processes: int = 1):
    """Accuracy vs GFLOPs (and vs images/s): one line per method, the baseline as a star. ``processes``: the
    sweep's (> 1: each point's images/s is one thread's, which the x label says)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    targets = [(path_flops, "gflops", "GFLOPs per image")]
    if path_throughput:
        targets.append((path_throughput, "images_per_s",
                        "throughput (images/s" + (", one thread per point)" if processes > 1 else ")")))
    base = next(r for r in rows if r["method"] == "baseline")
    for path, key, label in targets:
        fig, ax = plt.subplots(figsize=(8.6, 4.4))
        for method in dict.fromkeys(r["method"] for r in rows if r["method"] != "baseline"):
            mine = sorted((r for r in rows if r["method"] == method), key=lambda r: r[key])
            line, = ax.plot([r[key] for r in mine], [100 * r["top1"] for r in mine], marker="o",
                            label=method + (f" (mean of {len(mine[0]['seeds'])} seeds, band: min–max)"
                                            if "seeds" in mine[0] else ""))
            if all("top1_min" in r for r in mine):
                ax.fill_between([r[key] for r in mine], [100 * r["top1_min"] for r in mine],
                                [100 * r["top1_max"] for r in mine], color=line.get_color(), alpha=0.15)
        for r, style in extra_points:
            ax.plot(r[key], 100 * r["top1"], style, markersize=10, label=r["method"])
        ax.plot(base[key], 100 * base["top1"], "k*", markersize=14, label="baseline (no reduction)")
        ax.set_xlabel(label)
        ax.set_ylabel("top-1 accuracy (%)")
        ax.set_title(title or f"accuracy vs {label}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # outside: it hid points
        fig.tight_layout()
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=120)
        plt.close(fig)


def levels_for(model, methods, levels=None, params: dict | None = None, log=print) -> dict:
    """{method: its levels}, checked against ``model`` before any evaluation.

    ``levels`` given: every method must reach every level, else ``UsageError`` naming, for each method
    that cannot, the largest level it reaches. ``levels=None``: :data:`DEFAULT_LEVELS`, each method at
    those it reaches with this schedule (``log`` names any left out); a small model's schedule reaches
    less (the bundled vim_digits, 12 blocks reducing at 2, 4, ..., 10, tops out between 0.37 and 0.49)."""
    from vimtr import checks
    from vimtr.errors import UsageError

    params = dict(params or {})
    if levels is not None:
        checks.check_reductions(model, [(m, {**params, "flops_reduction": lv}) for m in methods for lv in levels],
                                "sweep", more_blocks="--interval 1")
        return {m: list(levels) for m in methods}
    out = {}
    for method in methods:
        ok, most = checks.reachable_levels(model, method, DEFAULT_LEVELS, params)
        if not ok:
            raise UsageError(f"sweep: {method} reaches none of the default levels {list(DEFAULT_LEVELS)} on "
                             f"{getattr(model, 'model_name', 'this model')} (at most {most:.3f}); pass --levels "
                             f"at or below that, or reduce at more blocks (--interval 1)")
        if len(ok) < len(DEFAULT_LEVELS):
            left = [lv for lv in DEFAULT_LEVELS if lv not in ok]
            log(f"note: {method} reaches at most {most:.3f} on {getattr(model, 'model_name', 'this model')} with "
                f"this schedule: level(s) {', '.join(f'{lv:g}' for lv in left)} left out")
        out[method] = ok
    return out


def write_rows(rows, out_dir: Path, stem="sweep"):
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=COLUMNS, extrasaction="ignore")
    w.writeheader()
    w.writerows(rows)
    atomic_write(out_dir / f"{stem}.csv", lambda f: f.write(buf.getvalue().encode()))
    write_json(out_dir / f"{stem}.json", {"rows": rows})


def add_cli(sub):
    p = sub.add_parser("sweep", help="methods × reduction levels → accuracy, GFLOPs, im/s, plots",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog="examples:\n  vimtr sweep --model vim_digits --data digits\n"
                              "  vimtr sweep --data digits-clutter --method mtr random positional --levels 0.3 "
                              "--interval 2\n"
                              "  vimtr sweep --checkpoint vim_b_midclstok_81p9acc.pth --data /imagenet/val "
                              "--method mtr utr --levels 0.2 0.3 0.4 --device cuda --out sweep_vimb/")
    p.add_argument("--model", help="registered or bundled model name")
    p.add_argument("--checkpoint", help="checkpoint to load")
    p.add_argument("--data", default="digits",
                   help="ImageFolder directory, or a built-in dataset: 'digits' (default), 'digits-clutter'")
    p.add_argument("--method", nargs="+", default=list(TRAINING_FREE), help="methods (default: all)")
    p.add_argument("--levels", type=float, nargs="+", default=None,
                   help="FLOPs reductions; each must be reachable by every method, or nothing runs (default: "
                        "0.1 … 0.5, each method at those it reaches on the model; a note names the others)")
    p.add_argument("--interval", type=int, default=None,
                   help="reduce every INTERVAL blocks (default: each method's own, 2; use 1 for shallow models)")
    p.add_argument("--random-seeds", type=int, default=RANDOM_SEEDS,
                   help=f"seeds averaged for 'random' (default {RANDOM_SEEDS}; 1 = seed 0 only)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--device", default="cpu")
    p.add_argument("--processes", type=int, default=1,
                   help="CPU only: share the points among this many one-thread processes (faster on a few "
                        "cores for small models; each point's im/s is then one thread's). Default 1")
    p.add_argument("--out", default="sweep_out", help="output folder (default sweep_out/)")
    p.set_defaults(func=run)


def run(args):
    from vimtr.data import eval_transform
    from vimtr.data.folders import builtin, load_dataset
    from vimtr.tools.benchmark import load_for_cli

    if args.processes < 1:
        raise ValueError(f"--processes must be >= 1, got {args.processes}")
    if args.random_seeds < 1:
        raise ValueError(f"--random-seeds must be >= 1, got {args.random_seeds}")
    if not args.model and not args.checkpoint and args.data in BUNDLED_FOR:
        args.model = BUNDLED_FOR[args.data]
    model = load_for_cli(args)
    params = {"interval": args.interval} if args.interval else None
    levels = levels_for(model, args.method, args.levels, params)  # before any evaluation
    dataset = load_dataset(args.data, "val", transform=eval_transform(model) if builtin(args.data) is None else None)
    rows = sweep(model, dataset, args.method, levels, args.batch_size, args.device, params=params,
                 random_seeds=args.random_seeds, processes=args.processes)
    out = Path(args.out)
    write_rows(rows, out)
    name = getattr(model, "model_name", "model")
    plot(rows, out / "acc_vs_flops.png", out / "acc_vs_throughput.png", title=f"{name} on {args.data}",
         processes=args.processes)
    print(f"{'method':<10}{'level':>7}{'top-1':>8}{'GFLOPs':>9}{'im/s':>9}")
    for r in rows:
        print(f"{r['method']:<10}{r['level']:>7.2f}{100 * r['top1']:>8.2f}{r['gflops']:>9.4f}{r['images_per_s']:>9.1f}")
    for r in rows:
        if "seeds" in r:
            print(f"{r['method']} at {r['level']:.2f}: mean of {len(r['seeds'])} seeds, top-1 from "
                  f"{100 * r['top1_min']:.2f} to {100 * r['top1_max']:.2f}, std {100 * r['top1_std']:.2f}")
    print(f"wrote {out}/sweep.csv, sweep.json, acc_vs_flops.png, acc_vs_throughput.png")
