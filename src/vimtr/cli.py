"""``vimtr <command>``: thin. Each command lives in its own module, which registers its parser with
``add_cli(subparsers)`` and does the work; this file only collects them.

Command modules import torch, and torch takes seconds to import. So ``vimtr COMMAND ...`` imports only
that command's module, and ``vimtr --help`` imports none: it lists the commands from ``COMMAND_HELP``
(a test checks that those lines match what the modules declare). A module missing from ``COMMAND_HELP``
still works; it is imported to list it."""
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

# module -> (command, its one-line help), for `vimtr --help` without importing the modules.
COMMAND_HELP = {
    "vimtr.tools.info": ("info", "parameters, FLOPs, tokens and top-5 classes of a model"),
    "vimtr.tools.demo": ("demo", "the bundled model with and without each reduction (what `make demo` runs)"),
    "vimtr.engine.evaluate": ("eval", "accuracy, loss, FLOPs and throughput of a (reduced) model"),
    "vimtr.engine.train": ("retrain", "re-train a token-reduced model (R-MeeTo recipe)"),
    "vimtr.tools.benchmark": ("bench", "throughput/latency with and without reductions (JSON out)"),
    "vimtr.tools.sweep": ("sweep", "methods × reduction levels → accuracy, GFLOPs, im/s, plots"),
    "vimtr.tools.reproduce": ("reproduce", "run a paper's table on your checkpoints and data"),
    "vimtr.tools.visualize": ("visualize", "merged-token groups and importance heat-maps as PNG"),
    "vimtr.tools.warmup": ("warmup", "compile the CPU kernels into numba's disk cache (make install runs it)"),
}


def build_parser(command: str | None = None, lazy: bool = False) -> argparse.ArgumentParser:
    """The ``vimtr`` parser. ``lazy``: only ``command``'s module is imported and given its full parser;
    the other commands are listed from ``COMMAND_HELP`` (enough for ``vimtr --help`` and for argparse to
    name the valid commands)."""
    parser = argparse.ArgumentParser(
        prog="vimtr", description="Token reduction for Vision Mamba (MTR, R-MeeTo and baselines).",
        epilog="Run 'vimtr COMMAND --help' for a command's options and examples.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        declared = COMMAND_HELP.get(name)
        if lazy and declared and declared[0] != command:
            sub.add_parser(declared[0], help=declared[1], add_help=False)
            continue
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
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(command=argv[0] if argv else None, lazy=True)
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
        from vimtr import checks

        checks.preflight(args)  # every argument checked before a model is loaded or any work starts
        return args.func(args) or 0
    except (ValueError, TypeError, OSError) as e:
        # Bad input (a value, a file, a folder, a permission): one clear line, not a stack trace (set
        # VIMTR_DEBUG=1 for the trace).
        if os.environ.get("VIMTR_DEBUG"):
            raise
        print(f"vimtr {args.command}: error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print(f"vimtr {args.command}: interrupted", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
