"""How long the command line takes to answer: fresh processes, median of several runs.

    PYTHONPATH=src python benchmarks/cli_startup.py [--runs 7] [--out FILE.json]

Times, each in a new Python process (what a user waits for): ``vimtr --help`` (lists the commands without
importing any command module, so no torch), ``vimtr eval --help`` (imports that one command's module),
``python -c "import torch"`` and ``python -c "import vimtr"`` for scale. The runs of the different
commands take turns, so a change in the machine's load hits them alike. Writes JSON (default
benchmarks/results/cli_startup.json) with every sample, the median and the spread of each.
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from vimtr.io import write_json  # imports torch here, in the parent: the timed processes are fresh

RESULTS = Path(__file__).resolve().parent / "results"
CASES = {
    "vimtr --help": ["-m", "vimtr", "--help"],
    "vimtr eval --help": ["-m", "vimtr", "eval", "--help"],
    "import torch": ["-c", "import torch"],
    "import vimtr": ["-c", "import vimtr"],
}


def run_once(args: list[str]) -> float:
    t0 = time.perf_counter()
    done = subprocess.run([sys.executable, *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                          env=os.environ.copy())
    seconds = time.perf_counter() - t0
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(args)} failed ({done.returncode}): {done.stderr.strip()[-500:]}")
    return seconds


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--runs", type=int, default=7, help="fresh processes per case (default 7)")
    p.add_argument("--out", type=Path, default=RESULTS / "cli_startup.json")
    args = p.parse_args(argv)

    samples = {case: [] for case in CASES}
    for case in CASES:  # one untimed run each: the first start reads the files from disk
        run_once(CASES[case])
    for _ in range(args.runs):
        for case, cmd in CASES.items():
            samples[case].append(run_once(cmd))
    cases = {case: {"median_s": statistics.median(s), "min_s": min(s), "max_s": max(s), "samples_s": s}
             for case, s in samples.items()}
    result = {"python": sys.version.split()[0], "logical_cpus": os.cpu_count(),
              "loadavg_at_end": list(os.getloadavg()), "runs": args.runs, "cases": cases,
              "help_vs_import_torch": cases["vimtr --help"]["median_s"] / cases["import torch"]["median_s"]}
    write_json(args.out, result)
    for case, c in cases.items():
        print(f"{case:<20} median {c['median_s']:.3f} s  (min {c['min_s']:.3f}, max {c['max_s']:.3f})")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    sys.exit(main())
