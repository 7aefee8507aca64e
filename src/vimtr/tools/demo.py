"""``vimtr demo`` (what ``make demo`` runs): the bundled Vim with and without each reduction, side by side.

On the bundled ``vim_digits_clutter`` model and the built-in ``digits-clutter`` test split (a digit at a
random place and scale on a cluttered 48×48 canvas, 144 patch tokens + a middle class token): the baseline,
the training-free methods (``mtr``, ``rmeeto``, ``tome``, ``evit``, ``utr``, ``random``, ``positional``) at
one FLOPs reduction (default 30%), and ``rmeeto`` after a short R-MeeTo re-training (distillation from the
unreduced model). Prints a table and writes to ``--out``: ``results.json``, ``acc_vs_flops.png`` (several
reduction levels), ``acc_vs_throughput.png`` and ``token_maps.png``. ``--model vim_digits`` runs it on
the former bundled model (centred digits, 64 tokens; its own recipe was ``--retrain-epochs 12
--retrain-lr 4e-3``, see docs/demo-history.md).

Every method uses the papers' schedule: it reduces before every other block (blocks 2, 4, …, 10 of the
bundled model's 12), with the number of tokens per step derived from the FLOPs target, so all methods
compare at equal FLOPs. ``random`` is the mean over 5 seeds (its spread is printed under the table);
``positional`` drops the first tokens in raster order, content-blind. The table's im/s and speed-ups come
from one timing of all its rows' models taking turns (fastest of 4 rounds of one batch of 128). The
sweep's points are shared between two one-thread processes (one per core); the throughput plot shows each
point's own accuracy pass, one thread's, the re-trained point measured the same way.

On the project's shared 2-core CPU machine (kernels compiled beforehand by ``vimtr warmup``, as ``make
install`` does) the whole run took ~205 s: sweep 44, re-training 139 (8 epochs), timing 19, figures 2
(docs/demo.md). ``--quick`` takes ~30 s.
"""
from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path

import torch

import vimtr
from vimtr.io import write_json
from vimtr.tools import sweep as sweep_tool
from vimtr.tools.visualize import token_map_figure

METHODS = sweep_tool.TRAINING_FREE  # the table's methods: those `vimtr sweep` runs by default (and warmup compiles)
DEFAULT_MODEL = "vim_digits_clutter"
SCHEDULE = {"interval": 2}  # see the module docstring


# The re-training (see retrain_rmeeto). The batch is the global one: it is split between the processes,
# so the recipe is the same on any machine (only float rounding differs).
RETRAIN = {"epochs": 8, "batch_size": 32, "lr": 1e-3, "augment": True, "drop_path": 0.0, "processes": 2}
SWEEP_PROCESSES = 2  # one-thread processes sharing the sweep's points (one per core, at most this many)
TIMING_ROUNDS = 4  # alternating timing rounds for the table's im/s (see time_table_rows)
TIMING_BATCH = 128
LEVELS = (0.1, 0.2, 0.3, 0.4)  # the sweep's FLOPs reductions (the plots), besides --flops-reduction
# --quick (what the tests run, < 1 min): the one level, 3 random seeds, 1 epoch on a quarter of the train
# split, the timing on batches of 32 (a forward of 128 on 144 tokens is ~1 s: 9 models x 3 rounds of it alone
# would take half the minute).
QUICK = {"levels": (), "random_seeds": 3, "train_fraction": 0.25, "timing_rounds": 2, "timing_batch": 32}


def dataset_of(model_name: str) -> str:
    """The built-in dataset a bundled model was trained on, from its card (``dataset.name``)."""
    import json

    from vimtr.data.folders import BUILTIN
    from vimtr.models.checkpoint import assets_dir, bundled_models

    if model_name not in bundled_models():
        raise ValueError(f"demo: --model must be a bundled model ({', '.join(bundled_models())}), got {model_name!r}")
    card = json.loads(assets_dir().joinpath(f"{model_name}.json").read_text())
    name = card.get("dataset", {}).get("name")
    if name not in BUILTIN:
        raise ValueError(f"demo: the card of {model_name} names dataset {name!r}; the demo runs on a built-in "
                         f"one ({', '.join(BUILTIN)})")
    return name


def retrain_rmeeto(model_name: str, flops_reduction: float, epochs: int = RETRAIN["epochs"], seed: int = 0,
                   progress=True, lr: float = RETRAIN["lr"], batch_size: int = RETRAIN["batch_size"],
                   train_fraction: float = 1.0, augment: bool = RETRAIN["augment"],
                   drop_path: float | None = RETRAIN["drop_path"], processes: int | None = None, model=None):
    """R-MeeTo's recipe in miniature: a reduced copy of the bundled model learns from labels + the
    unreduced teacher on its dataset's train split. Returns (the re-trained student in eval mode, a summary).

    The recipe (``RETRAIN``): 8 epochs on the bundled model's own training data (``digits-clutter``: a fresh
    canvas per train digit every epoch), batch 32, lr 1e-3 (half the bundled model's own peak) with 10
    warm-up steps, no drop-path. The train split has 1,437 digits, so that is 360 optimiser steps on 11,496
    canvases (ImageNet's 3 epochs are 3.8 M). On ``vim_digits_clutter`` the training-free ``rmeeto`` is 350
    of 360 test images against the teacher's 355 (within a point needs 352); 3 epochs at lr 1e-4, 4e-4 or
    1e-3 gave 350, 348, 349, 6 at 4e-4 351, 8 at 1e-3 354 (seed 0; seeds 1, 2: 346, 353). 8
    epochs fit the demo's 5 minutes on 2 cores (~140 s of re-training). Drop-path 0 as Vim-Ti's own
    training (R-MeeTo keeps the model's 0.1): over a few hundred steps its noise costs more than its
    regularisation gives.

    It runs in ``processes`` one-thread processes with DDP (default: one per core, at most 2), the global
    batch split between them: on a 2-core machine that is faster than one process with two threads, which
    small batches use poorly. Call it under ``if __name__ == "__main__":`` in a script (the processes are
    forked on Linux, spawned elsewhere: ``vimtr.engine.distributed.spawn_cpu``). ``model``: the unreduced
    model already loaded in this process, to build the returned student from (default: load
    ``model_name`` again)."""
    from vimtr.engine import distributed

    world = distributed.cpu_workers(RETRAIN["processes"] if processes is None else processes)
    while batch_size % world:  # every process takes an equal share of the global batch
        world -= 1
    settings = dict(epochs=epochs, batch_size=batch_size // world, lr=lr, warmup_steps=10, distill_weight=0.5,
                    drop_path=drop_path, seed=seed, progress=progress, train_fraction=train_fraction)
    import tempfile
    from safetensors.torch import load_file

    if world > 1 and model is not None:  # the forked processes then start with the training kernels loaded
        load_training_kernels(model, flops_reduction)
    with tempfile.TemporaryDirectory(prefix="vimtr-demo-") as tmp:
        weights = str(Path(tmp) / "student.safetensors")
        summary = distributed.spawn_cpu(_retrain_worker, world, model_name, flops_reduction, settings, augment,
                                        weights, dataset_of(model_name))
        base = vimtr.load_model(model_name) if model is None else vimtr.restore(copy.deepcopy(model))
        student = vimtr.reduce(base, "rmeeto", flops_reduction=flops_reduction, **SCHEDULE)
        student.load_state_dict(load_file(weights))
    summary["processes"] = world
    return student.eval(), summary


def load_training_kernels(model, flops_reduction):
    """A 2-image forward + backward of a throw-away ``rmeeto`` student of ``model``, here: processes forked
    afterwards inherit the compiled kernels instead of each loading them (or, in a fresh environment,
    compiling them) again. ``vimtr warmup`` uses it to fill numba's disk cache."""
    student = vimtr.reduce(vimtr.restore(copy.deepcopy(model)), "rmeeto", flops_reduction=flops_reduction,
                           **SCHEDULE).train()
    with torch.random.fork_rng(devices=[]):  # drop-path draws here must not move the run's random stream
        student(torch.randn(2, *model.input_size)).square().mean().backward()


def _retrain_worker(model_name, flops_reduction, settings, augment, weights_path, data):
    """One process of :func:`retrain_rmeeto` (or the only one): re-train, rank 0 writes the weights."""
    from safetensors.torch import save

    from vimtr.data.folders import builtin
    from vimtr.engine import distributed
    from vimtr.engine.train import retrain
    from vimtr.io import atomic_write

    teacher = vimtr.load_model(model_name).eval()
    student = vimtr.reduce(copy.deepcopy(teacher), "rmeeto", flops_reduction=flops_reduction, **SCHEDULE)
    train = builtin(data).training_set("train") if augment else builtin(data).dataset("train")
    summary = retrain(student, train, teacher=teacher, augment=False, log=lambda *a: None, **settings)
    if distributed.context().is_main:
        state = {k: v.contiguous() for k, v in student.state_dict().items()}
        atomic_write(weights_path, lambda f: f.write(save(state)))
    return {"steps": summary["steps"], "train_minutes": summary["train_minutes"], "minutes": summary["minutes"],
            "global_batch": summary["config"]["global_batch"]}


def run_demo(out="demo_out", flops_reduction=0.3, quick=False, retrain_epochs=None, model_name=DEFAULT_MODEL,
             progress=True, log=print, retrain_lr: float = RETRAIN["lr"],
             retrain_batch_size: int = RETRAIN["batch_size"], retrain_augment: bool = RETRAIN["augment"],
             retrain_drop_path: float | None = RETRAIN["drop_path"], retrain_processes: int | None = None) -> dict:
    from vimtr.data.folders import builtin

    data = dataset_of(model_name)
    images = builtin(data)
    start = time.time()
    phases, mark = {}, [start]  # wall seconds of each part, in results.json: where the demo's time goes

    def lap(name):  # closes the part that began at the previous lap; returns its end
        now = time.time()
        phases[name], mark[0] = now - mark[0], now
        return now

    torch.manual_seed(0)
    out = Path(out)
    model = vimtr.load_model(model_name).eval()
    test = images.dataset("test")
    levels = QUICK["levels"] if quick else LEVELS
    epochs = retrain_epochs if retrain_epochs is not None else (1 if quick else RETRAIN["epochs"])

    log(f"vimtr demo: {model_name} ({sum(p.numel() for p in model.parameters()):,} parameters, "
        f"{model.num_patches} patch tokens), {data} test split ({len(test)} images), {flops_reduction:.0%} FLOPs "
        f"reduction")
    from vimtr.engine.distributed import cpu_workers

    processes = cpu_workers(SWEEP_PROCESSES)
    sweep_rows = sweep_tool.sweep(model, test, METHODS, sorted(set(levels) | {flops_reduction}), progress=progress,
                                  params=SCHEDULE, random_seeds=QUICK["random_seeds"] if quick else sweep_tool.RANDOM_SEEDS,
                                  processes=processes)
    t0 = lap("sweep")
    base = sweep_rows[0]
    rows = [base] + [r for r in sweep_rows[1:] if abs(r["level"] - flops_reduction) < 1e-9]

    log(f"re-training rmeeto for {epochs} epoch(s) with distillation from the unreduced model"
        f"{' on augmented images' if retrain_augment else ''} ...")
    student, summary = retrain_rmeeto(model_name, flops_reduction, epochs, progress=progress, lr=retrain_lr,
                                      batch_size=retrain_batch_size, augment=retrain_augment,
                                      drop_path=retrain_drop_path,
                                      train_fraction=QUICK["train_fraction"] if quick else 1.0,
                                      processes=retrain_processes, model=model)
    threads = torch.get_num_threads()
    torch.set_num_threads(1 if processes > 1 else threads)  # its plot point measured as the sweep's were
    try:
        retrained = sweep_tool.measure(student, test, "rmeeto", {**SCHEDULE, "flops_reduction": flops_reduction},
                                       base=base)
    finally:
        torch.set_num_threads(threads)
    retrained.update(method="rmeeto_retrained", retrain_minutes=(time.time() - t0) / 60, retrain_epochs=epochs,
                     retrain_processes=summary["processes"], retrain_augment=retrain_augment,
                     retrain_drop_path=retrain_drop_path)
    rows.append(retrained)
    lap("retrain")
    rows = [dict(r) for r in rows]  # the table's copies: the plots keep each point's own timing
    time_table_rows(rows, model, student, flops_reduction, batch_size=QUICK["timing_batch"] if quick else TIMING_BATCH,
                    rounds=QUICK["timing_rounds"] if quick else TIMING_ROUNDS)
    lap("timing")

    sweep_tool.plot(sweep_rows, out / "acc_vs_flops.png", out / "acc_vs_throughput.png",
                    title=f"{model_name} on {data} (training-free; ★ = unreduced)",
                    extra_points=[(retrained, "P")], processes=processes)
    x, _ = images.tensors("test")
    token_map_figure(model, x[:1], images.to_image(x[0]),
                     {"mtr": ("mtr", {**SCHEDULE, "flops_reduction": flops_reduction}),
                      "rmeeto": ("rmeeto", {**SCHEDULE, "flops_reduction": flops_reduction})},
                     out / "token_maps.png", title=f"{model_name}: merged token groups at "
                                                   f"{flops_reduction:.0%} fewer FLOPs")
    result = {"model": model_name, "dataset": f"{data}/test", "patch_tokens": model.num_patches, "flops_reduction": flops_reduction, "quick": quick,
              "rows": [{k: r.get(k) for k in ("method", "top1", "gflops", "flops_saved", "images_per_s", "top5",
                                              "speedup", "final_tokens", "retrain_minutes", "retrain_epochs",
                                              "retrain_augment", "retrain_drop_path", "retrain_processes", "seeds",
                                              "top1_std", "top1_min", "top1_max")
                        if r.get(k) is not None} for r in rows],
              "sweep": sweep_rows}
    lap("figures")
    result.update(seconds=time.time() - start, phase_seconds=phases)
    write_json(out / "results.json", result)
    log(format_table(rows))
    log(f"wrote {out}/results.json, acc_vs_flops.png, acc_vs_throughput.png, token_maps.png "
        f"({result['seconds']:.0f} s: " + ", ".join(f"{k} {v:.0f}" for k, v in phases.items()) + ")")
    return result


def time_table_rows(rows, model, student, flops_reduction, batch_size=TIMING_BATCH, rounds=TIMING_ROUNDS):
    """The table's im/s and speed-up, timed side by side: every row's model in turn, ``rounds`` times, one
    batch each, the fastest forward kept (``time_alternating``). On this small model a forward is ~0.2 s
    and one-off timings vary by ±10-20% on a shared 2-core machine: timed one after the other, the same
    reduction (rmeeto, rmeeto_retrained) came out at speed-ups 0.4 apart. ``random`` is timed at seed 0.
    The plots' throughput is each sweep point's accuracy pass (one sample each, one thread's)."""
    from vimtr.tools.benchmark import time_alternating

    reduced = lambda m, method: vimtr.reduce(copy.deepcopy(m), method, flops_reduction=flops_reduction, **SCHEDULE)
    # (sweep_tool.measure leaves the models it measured unreduced: each is reduced here again.)
    models = {"baseline": vimtr.restore(copy.deepcopy(model)), "rmeeto_retrained": reduced(student, "rmeeto")}
    models.update({method: reduced(model, method) for method in METHODS})
    best = time_alternating(models, batch_size, rounds)
    for r in rows:
        r["images_per_s"] = batch_size / best[r["method"]]
        r["speedup"] = best["baseline"] / best[r["method"]]


def format_table(rows) -> str:
    base = rows[0]
    lines = [f"| {'method':<17}| GFLOPs | FLOPs saved | top-1  | Δ top-1 | im/s   | speed-up |",
             "|------------------|--------|-------------|--------|---------|--------|----------|"]
    for r in rows:
        lines.append(f"| {r['method']:<17}| {r['gflops']:.4f} | {100 * r['flops_saved']:>10.1f}% "
                     f"| {100 * r['top1']:>5.2f}% | {100 * (r['top1'] - base['top1']):>+6.2f}  "
                     f"| {r['images_per_s']:>6.0f} | {r['speedup']:>7.2f}× |")
    for r in rows:
        if "seeds" in r:
            lines.append(f"{r['method']}: mean of {len(r['seeds'])} seeds (top-1 from {100 * r['top1_min']:.2f}% "
                         f"to {100 * r['top1_max']:.2f}%, std {100 * r['top1_std']:.2f})")
    return "\n".join(lines)


def add_cli(sub):
    p = sub.add_parser("demo", help="the bundled model with and without each reduction (what `make demo` runs)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog="examples:\n  vimtr demo\n  vimtr demo --quick --out /tmp/demo\n"
                              "  vimtr demo --flops-reduction 0.4\n"
                              "  vimtr demo --model vim_digits --retrain-epochs 12 --retrain-lr 4e-3  # the former "
                              "bundled model and its recipe")
    p.add_argument("--out", default="demo_out", help="output folder (default demo_out/)")
    p.add_argument("--flops-reduction", type=float, default=0.3, help="common FLOPs reduction (default 0.3)")
    p.add_argument("--quick", action="store_true",
                   help="one reduction level, 3 random seeds, 1 re-training epoch on a quarter of the train split")
    p.add_argument("--retrain-epochs", type=int, default=None,
                   help=f"re-training epochs (default {RETRAIN['epochs']}; quick 1)")
    p.add_argument("--retrain-lr", type=float, default=RETRAIN["lr"],
                   help=f"re-training learning rate (default {RETRAIN['lr']:g}, batch {RETRAIN['batch_size']})")
    p.add_argument("--retrain-batch-size", type=int, default=RETRAIN["batch_size"],
                   help=f"re-training batch, over all processes (default {RETRAIN['batch_size']})")
    p.add_argument("--retrain-augment", action=argparse.BooleanOptionalAction, default=RETRAIN["augment"],
                   help="re-train on the bundled model's augmentation, random affine maps (default: on)")
    p.add_argument("--retrain-drop-path", type=float, default=RETRAIN["drop_path"],
                   help=f"the student's drop-path rate while it re-trains (default {RETRAIN['drop_path']:g}; "
                        f"the model's own is 0.1)")
    p.add_argument("--retrain-processes", type=int, default=None,
                   help=f"one-thread processes for the re-training (default: one per core, at most "
                        f"{RETRAIN['processes']}; the batch is split between them)")
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help=f"bundled model (default {DEFAULT_MODEL}; vim_digits: the centred digits on 64 tokens)")
    p.set_defaults(func=run)


def run(args):
    for flag, value in (("--retrain-processes", args.retrain_processes), ("--retrain-batch-size",
                                                                           args.retrain_batch_size)):
        if value is not None and value < 1:
            raise ValueError(f"{flag} must be >= 1, got {value}")
    if not 0.0 <= args.retrain_drop_path < 1.0:
        raise ValueError(f"--retrain-drop-path must be in [0, 1), got {args.retrain_drop_path}")
    if not 0.0 < args.flops_reduction < 1.0:
        raise ValueError(f"--flops-reduction must be in (0, 1), got {args.flops_reduction}")
    run_demo(args.out, args.flops_reduction, args.quick, args.retrain_epochs, args.model,
             retrain_lr=args.retrain_lr, retrain_batch_size=args.retrain_batch_size,
             retrain_augment=args.retrain_augment, retrain_drop_path=args.retrain_drop_path,
             retrain_processes=args.retrain_processes)
