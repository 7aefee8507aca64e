"""Which short re-training brings the demo's reduced model back? One R-MeeTo recipe per run, on a bundled model.

    PYTHONPATH=src python benchmarks/retrain_recipes.py [--model vim_digits_clutter] [--epochs 8] [--lr 1e-3]
        [--temperature 4 --ce-weight 0 --distill-weight 1] [--freeze 'in_proj|out_proj'] [--no-augment]
        [--drop-path 0.1] [--seed 1] [--processes 2] [--out FILE.jsonl]

The demo's ``rmeeto_retrained`` row (``vimtr.tools.demo.retrain_rmeeto``: rmeeto at 30% fewer FLOPs,
blocks 2, 4, …, 10; the demo's ``RETRAIN`` recipe: epochs of the bundled model's own training variation,
batch 32, 10 warm-up steps, drop-path 0, CE with label smoothing 0.1 + 0.5·KL to the unreduced model) with
one or more of its settings changed. ``--model vim_digits`` re-trains the former demo model (its recipe was
``--epochs 12 --lr 4e-3``). Appends one JSON line per run (the settings, top-1 and the number of correct
test images, the unreduced model's, both models' top-1 on the fixed train split, and the training seconds)
to ``--out`` (default benchmarks/results/retrain_recipes.jsonl). Accuracy, not speed, is the result: runs
may share the machine (``OMP_NUM_THREADS=1 NUMBA_NUM_THREADS=1`` and two at a time on two cores is how
docs/performance.md's figures were made; the thread count changes the rounding and so the run).
``--processes 2`` re-trains exactly as ``vimtr demo`` does (its two one-thread processes, its rounding).
"""
from __future__ import annotations

import argparse
import copy
import json
import re
import sys
import time
from pathlib import Path

from vimtr.cli import tune_cpu_threads

tune_cpu_threads()  # GOMP_SPINCOUNT as the CLI sets it, before torch loads libgomp

import torch  # noqa: E402

import vimtr  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def main(argv=None):
    from vimtr.data.folders import builtin
    from vimtr.engine.evaluate import evaluate
    from vimtr.engine.train import retrain
    from vimtr.tools.demo import DEFAULT_MODEL, RETRAIN, SCHEDULE, dataset_of, retrain_rmeeto

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--epochs", type=int, default=RETRAIN["epochs"])
    p.add_argument("--lr", type=float, default=RETRAIN["lr"])
    p.add_argument("--batch-size", type=int, default=RETRAIN["batch_size"])
    p.add_argument("--label-smoothing", type=float, default=0.1)
    p.add_argument("--distill-weight", type=float, default=0.5)
    p.add_argument("--ce-weight", type=float, default=1.0)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--drop-path", type=float, default=RETRAIN["drop_path"],
                   help="the student's top drop-path rate while it trains (the model's own: 0.1)")
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--warmup-steps", type=int, default=10)
    p.add_argument("--augment", action=argparse.BooleanOptionalAction, default=RETRAIN["augment"],
                   help="the bundled model's own training data variation (digits: random affine maps; "
                        "digits-clutter: fresh canvases)")
    p.add_argument("--freeze", default="", help="regex: parameters whose names match are not trained")
    p.add_argument("--flops-reduction", type=float, default=0.3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help=f"the bundled model (default {DEFAULT_MODEL}, the demo's); its card names the dataset")
    p.add_argument("--checkpoint", default=None,
                   help="the unreduced model from a file train_digits wrote for --model (default: the bundled one)")
    p.add_argument("--processes", type=int, default=1,
                   help="> 1: re-train as the demo does, through vimtr.tools.demo.retrain_rmeeto in this many "
                        "one-thread processes (its rounding; only the demo's own settings may be changed)")
    p.add_argument("--out", type=Path, default=RESULTS / "retrain_recipes.jsonl")
    args = p.parse_args(argv)

    torch.manual_seed(0)
    data = builtin(dataset_of(args.model))
    teacher = vimtr.load_model(args.checkpoint or args.model, name=args.model).eval()
    test, train = data.dataset("test"), data.dataset("train")
    if args.augment:  # the bundled model's training variation, each read seeded by the trainer
        train = data.training_set("train")
    t0 = time.perf_counter()
    if args.processes > 1:
        changed = [k for k in ("label_smoothing", "distill_weight", "ce_weight", "temperature", "weight_decay",
                               "warmup_steps", "freeze") if getattr(args, k) != p.get_default(k)]
        if changed or args.checkpoint:
            p.error(f"--processes > 1 runs the demo's re-training, which has no setting for: "
                    f"{', '.join(changed) or 'checkpoint'}")
        student, _ = retrain_rmeeto(args.model, args.flops_reduction, args.epochs, seed=args.seed, progress=False,
                                    lr=args.lr, batch_size=args.batch_size, augment=args.augment,
                                    drop_path=args.drop_path, processes=args.processes, model=teacher)
    else:
        student = vimtr.reduce(copy.deepcopy(teacher), "rmeeto", flops_reduction=args.flops_reduction, **SCHEDULE)
        if args.freeze:
            for name, param in student.named_parameters():
                if re.search(args.freeze, name):
                    param.requires_grad_(False)
        retrain(student, train, teacher=teacher, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                warmup_steps=args.warmup_steps, drop_path=args.drop_path, distill_weight=args.distill_weight,
                ce_weight=args.ce_weight,
                distill_temperature=args.temperature, label_smoothing=args.label_smoothing,
                weight_decay=args.weight_decay, augment=False, seed=args.seed, progress=False, log=lambda *a: None)
    seconds = time.perf_counter() - t0
    top1 = evaluate(student.eval(), test, batch_size=128, progress=False)["top1"]
    base = evaluate(vimtr.restore(copy.deepcopy(teacher)), test, batch_size=128, progress=False)["top1"]
    train_split = data.dataset("train")  # how well each fits the data it learnt from (its fixed train split)
    train_top1 = evaluate(student, train_split, batch_size=128, progress=False)["top1"]
    base_train_top1 = evaluate(teacher, train_split, batch_size=128, progress=False)["top1"]
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "out"}
    rec = {"settings": settings, "top1": top1, "correct": round(top1 * len(test)),
           "baseline_correct": round(base * len(test)), "delta_points": 100 * (top1 - base),
           "train_top1": train_top1, "baseline_train_top1": base_train_top1,
           "train_seconds": seconds, "threads": 1 if args.processes > 1 else torch.get_num_threads()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "a") as f:  # one line per run: runs in parallel append whole lines
        f.write(json.dumps(rec) + "\n")
    print(f"{rec['correct']}/{len(test)} correct ({100 * top1:.2f}%, {rec['delta_points']:+.2f} points vs the "
          f"unreduced {rec['baseline_correct']}); train split {100 * train_top1:.1f}% (unreduced "
          f"{100 * base_train_top1:.1f}%); {seconds:.0f} s of training")


if __name__ == "__main__":
    sys.exit(main())
