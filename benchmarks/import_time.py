"""What ``import vimtr`` costs: fresh interpreters timing three statements, median of ``--reps`` each.

    PYTHONPATH=src python benchmarks/import_time.py [--reps 5] [--out FILE.json]

1. ``import torch``                                   (the floor: vimtr needs torch)
2. ``import torch, vimtr``
3. ``import vimtr; vimtr.create_model('vim_tiny')``   (what building a model pulls in: models, ops, not timm)

Each is timed inside its subprocess (``time.perf_counter`` around the statement), so interpreter start-up
is not counted; the three alternate, so load from other processes hits them alike. Also records which heavy
modules statement 3 imported (timm, torchvision, numba). Target: ``vimtr_over_torch_s`` ≤ 1 s. Writes JSON
(default benchmarks/results/import_time.json).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
STATEMENTS = {
    "torch": "import torch",
    "torch_vimtr": "import torch, vimtr",
    "vimtr_create_model": "import vimtr; vimtr.create_model('vim_tiny')",
}
_PROBE = """
import json, sys, time
t0 = time.perf_counter()
exec({stmt!r})
t = time.perf_counter() - t0
print(json.dumps({{"seconds": t, "loaded": [m for m in ("timm", "torchvision", "numba") if m in sys.modules]}}))
"""


def run_once(stmt: str) -> dict:
    done = subprocess.run([sys.executable, "-c", _PROBE.format(stmt=stmt)], capture_output=True, text=True,
                          env=os.environ.copy(), timeout=300)
    if done.returncode != 0:
        raise RuntimeError(f"{stmt!r} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--out", type=Path, default=RESULTS / "import_time.json")
    args = p.parse_args(argv)
    runs = {k: [] for k in STATEMENTS}
    loaded = {}
    for name, stmt in STATEMENTS.items():  # one untimed round: the OS file cache, __pycache__
        run_once(stmt)
    for _ in range(args.reps):
        for name, stmt in STATEMENTS.items():
            r = run_once(stmt)
            runs[name].append(r["seconds"])
            loaded[name] = r["loaded"]
    med = {k: statistics.median(v) for k, v in runs.items()}
    result = {"benchmark": "import_time", "python": sys.version.split()[0], "reps": args.reps,
              "loadavg": list(os.getloadavg()), "median_s": med, "runs_s": runs, "heavy_modules_loaded": loaded,
              "vimtr_over_torch_s": med["torch_vimtr"] - med["torch"],
              "create_model_over_torch_s": med["vimtr_create_model"] - med["torch"]}
    for k, v in med.items():
        print(f"{STATEMENTS[k]:48s} {v:6.2f} s  (median of {args.reps}; loads {', '.join(loaded[k]) or 'none of timm, torchvision, numba'})")
    print(f"import vimtr costs {result['vimtr_over_torch_s']:.2f} s over import torch (target ≤ 1 s)")
    from vimtr.io import write_json  # temp file + rename
    write_json(args.out, result)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    sys.exit(main())
