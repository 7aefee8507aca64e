"""``vimtr <command>``: thin. Each command lives in its own module, which registers its parser with
``add_cli(subparsers)`` and does the work; this file only collects them."""
from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

# Modules that define commands, in the order ``vimtr --help`` lists them.
COMMAND_MODULES = (
    "vimtr.tools.info",
    "vimtr.tools.demo",
    "vimtr.engine.evaluate",
    "vimtr.engine.train",
    "vimtr.tools.benchmark",
    "vimtr.tools.sweep",
    "vimtr.tools.reproduce",
    "vimtr.tools.visualize",
    "vimtr.tools.warmup",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vimtr", description="Token reduction for Vision Mamba (MTR, R-MeeTo and baselines).",
        epilog="Run 'vimtr COMMAND --help' for a command's options and examples.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name != name:  # a real missing dependency inside the module: report it
                raise
            continue
        module.add_cli(sub)
    return parser


def tune_cpu_threads():
    """Process-wide tuning the command line applies for itself (never ``import vimtr``): PyTorch's OpenMP
    workers (libgomp) spin for a while after every parallel op, and on a 2-core machine a spinning worker
    takes a core from the CPU kernels' own threads between torch ops (Vim-Ti batch-8 forward 593 ms with
    the default spin, ~400 ms with 30,000; docs/performance.md). libgomp reads the variable when torch is
    first imported, so this runs before any command module imports torch; a value already in the
    environment wins. Library users can export ``GOMP_SPINCOUNT=30000`` themselves."""
    os.environ.setdefault("GOMP_SPINCOUNT", "30000")


def main(argv=None):
    tune_cpu_threads()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
        return args.func(args) or 0
    except (ValueError, TypeError, FileNotFoundError) as e:
        # Bad input: one clear line, not a stack trace (set VIMTR_DEBUG=1 for the trace).
        if os.environ.get("VIMTR_DEBUG"):
            raise
        print(f"vimtr {args.command}: error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
