"""Why does a method rank where it does in the demo's table? Variants of ``mtr`` and ``positional`` on a bundled
model at the demo's schedule and FLOPs, training-free: top-1 on its test split, one JSON file.

    PYTHONPATH=src python benchmarks/demo_diagnostics.py [--model vim_digits_clutter] [--flops-reduction 0.3]
        [--out benchmarks/results/demo_diagnostics.json]

Each variant changes one parameter of a method (its docstring says what each means), plus ``mtr_inverted``:
MTR with its importance negated (the most important tokens merged first), registered here through the
documented extension point, which says whether Δ's ranking carries any signal on the model. These are
diagnostics for docs/demo.md, not candidates for defaults: choosing a default on the test split would be
tuning the test set. Random pruning's expectation is ``vimtr sweep``'s (``--random-seeds 30``).
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

from vimtr.cli import tune_cpu_threads

tune_cpu_threads()  # GOMP_SPINCOUNT as the CLI sets it, before torch loads libgomp

import vimtr  # noqa: E402
from vimtr.reduction import register  # noqa: E402
from vimtr.reduction.mtr import MTR  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
VARIANTS = [
    ("mtr", {}), ("mtr_inverted", {}),
    ("mtr", {"weighted": True}), ("mtr", {"prune": True}), ("mtr", {"feature": "residual"}),
    ("mtr", {"keep_ratio": 0.0}), ("mtr", {"pool": "token_max"}), ("mtr", {"pool": "channel_max"}),
    ("mtr", {"score": "B"}), ("mtr", {"score": "C"}), ("mtr", {"score": "cls"}), ("mtr", {"order": False}),
    ("positional", {}), ("positional", {"cls": "proportional"}), ("positional", {"pattern": "stride"}),
]


@register
class InvertedMTR(MTR):
    """MTR ranking by −importance: a broken copy on purpose, to see how much the ranking matters."""
    name = "mtr_inverted"

    def score(self, state):
        return -super().score(state)


def main(argv=None):
    from vimtr.data.folders import builtin
    from vimtr.engine.evaluate import evaluate
    from vimtr.tools.demo import DEFAULT_MODEL, SCHEDULE, dataset_of

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=DEFAULT_MODEL, help=f"a bundled model (default {DEFAULT_MODEL})")
    p.add_argument("--flops-reduction", type=float, default=0.3)
    p.add_argument("--out", type=Path, default=RESULTS / "demo_diagnostics.json")
    args = p.parse_args(argv)

    model = vimtr.load_model(args.model).eval()
    test = builtin(dataset_of(args.model)).dataset("test")
    rows = [{"method": "baseline", "params": {}, "top1": evaluate(model, test, progress=False)["top1"]}]
    for method, params in VARIANTS:
        reduced = vimtr.reduce(copy.deepcopy(model), method, flops_reduction=args.flops_reduction, **SCHEDULE,
                               **params)
        rows.append({"method": method, "params": params, "top1": evaluate(reduced, test, progress=False)["top1"],
                     "gflops": vimtr.flops(reduced) / 1e9})
        print(f"{method:13s} {json.dumps(params):28s} {100 * rows[-1]['top1']:6.2f}%", flush=True)
    from vimtr.io import write_json

    write_json(args.out, {"model": args.model, "flops_reduction": args.flops_reduction, "schedule": SCHEDULE,
                          "rows": rows})
    print(f"wrote {args.out}")


if __name__ == "__main__":
    sys.exit(main())
