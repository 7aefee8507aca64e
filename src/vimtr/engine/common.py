"""What ``vimtr eval`` and ``vimtr retrain`` share: model/reduction options, value parsing, error reporting."""
from __future__ import annotations

import argparse
import contextlib
import sys

import torch

from vimtr.io import jsonable, parse_param, parse_value, write_json  # noqa: F401 (re-exported)
from vimtr.errors import UsageError

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


# ---------------------------------------------------------------------------------------------- values
def parse_r(text: str):
    """``--r 11`` (tokens per reducing block) or ``--r 0,0,11,...`` (one entry per block)."""
    value = parse_value(text)
    ok = isinstance(value, int) and not isinstance(value, bool) or (
        isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) for v in value))
    if not ok:
        raise argparse.ArgumentTypeError(f"--r takes an int or a comma-separated list of ints, got {text!r}")
    return value


# ---------------------------------------------------------------------------------------------- options
class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Examples in the epilog kept as written; defaults shown where there is one worth showing."""

    def _get_help_string(self, action):
        quiet = action.default is None or action.default is False or action.default == [] or \
            action.default == argparse.SUPPRESS  # identity checks: a default of 0 is worth showing
        if quiet or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def add_model_args(p: argparse.ArgumentParser):
    g = p.add_argument_group("model")
    g.add_argument("--model", metavar="NAME",
                   help="bundled model with weights (e.g. vim_digits), or with --checkpoint the registered "
                        "architecture to build (default: inferred from the checkpoint)")
    g.add_argument("--checkpoint", metavar="PATH",
                   help="weights: an official .pth, a vimtr checkpoint (restores its reduction), a .safetensors "
                        "or a Hugging Face id such as hustvl/Vim-tiny-midclstok")
    g.add_argument("--ema", action="store_true", help="use the checkpoint's model_ema weights")


def add_reduction_args(p: argparse.ArgumentParser):
    g = p.add_argument_group("token reduction (default: whatever the checkpoint records, usually none)")
    g.add_argument("--method", metavar="NAME",
                   help="reduction method (vimtr.list_methods(): mtr, rmeeto, tome, ...) or 'none' to remove "
                        "a recorded one")
    # --num-prune (R-MeeTo's name) is the spelling that works under torchrun, whose own parser rejects
    # "--r" anywhere on the command line as an ambiguous abbreviation of --rdzv-*/--role/--run-path.
    g.add_argument("--r", "--num-prune", dest="r", type=parse_r, metavar="R",
                   help="tokens removed per reducing block (or one per block); under torchrun write --num-prune")
    g.add_argument("--flops-reduction", type=float, metavar="F", help="target FLOPs reduction, e.g. 0.3")
    g.add_argument("--param", type=parse_param, action="append", default=[], metavar="KEY=VALUE",
                   help="further method parameter (repeatable), e.g. --param interval=2 --param metric=x")


def add_runtime_args(p: argparse.ArgumentParser, workers: int):
    g = p.add_argument_group("runtime")
    g.add_argument("--device", default="auto", help="auto (GPU of this rank if any), cpu, cuda, cuda:N")
    g.add_argument("--workers", type=int, default=workers, help="data loader processes")
    g.add_argument("--on-corrupt", choices=("skip", "fail"), default="skip",
                   help="undecodable image: skip it with a warning and count it, or stop naming the file")
    g.add_argument("--no-progress", action="store_true", help="no progress bars")


def add_video_args(p: argparse.ArgumentParser, test_views: bool):
    g = p.add_argument_group("video (videomamba_video_* models)")
    g.add_argument("--num-frames", type=int, metavar="T",
                   help="frames sampled per clip (8/16/32/64); must be what the model takes (default: the model's)")
    g.add_argument("--data-root", metavar="DIR",
                   help="where an annotation list's relative paths start (VideoMamba's --prefix; default: the "
                        "list's folder)")
    if test_views:
        g.add_argument("--test-views", default="1x1", metavar="CLIPSxCROPS",
                       help="views per video: temporal clips x spatial crops (VideoMamba's K400 test: 4x3)")
        g.add_argument("--view-average", choices=("softmax", "logits"), default="softmax",
                       help="how the views' outputs are averaged (softmax: VideoMamba's test)")


_VIDEO_FLAGS = (("num_frames", None, "--num-frames"), ("data_root", None, "--data-root"),
                ("test_views", "1x1", "--test-views"))


def video_args_apply(args, model) -> bool:
    """Whether ``--data`` is read as video (a video model); video flags given to an image model are an error."""
    from vimtr.data.video import is_video_model
    if is_video_model(model):
        return True
    given = [flag for name, default, flag in _VIDEO_FLAGS if getattr(args, name, default) != default]
    if given:
        raise UsageError(f"{', '.join(given)} apply to video models (videomamba_video_*); "
                         f"{getattr(model, 'model_name', 'this model')} is an image model")
    return False


def video_dataset(args, model, spec, split: str, views=None):
    """The video dataset ``--data``/``--val-data`` names, read at the model's frames and size (evaluation mode)."""
    from vimtr.data import video
    frames, size = video.model_geometry(model)
    if args.num_frames is not None and args.num_frames != frames:
        raise UsageError(f"--num-frames {args.num_frames}: {getattr(model, 'model_name', 'the model')} takes {frames} "
                         f"frames (its temporal position embedding); use --num-frames {frames} or a checkpoint "
                         f"trained for {args.num_frames} frames")
    if spec == "digits":
        raise UsageError("--data digits is an image set; a video model needs an annotation list or a folder of clips")
    views = video.Views.parse(views if views is not None else getattr(args, "test_views", "1x1"))
    dataset = video.load_video_dataset(spec, split, num_frames=frames, size=size, views=views,
                                       on_corrupt=args.on_corrupt, root=args.data_root)
    video.check_video_data(model, dataset)
    return dataset


def reduction_spec(args) -> dict | None | str:
    """``None`` (keep the checkpoint's), ``"none"`` (remove), or ``{"method", "params"}`` from the options."""
    params = dict(args.param or [])
    if args.r is not None:
        params["r"] = args.r
    if args.flops_reduction is not None:
        params["flops_reduction"] = args.flops_reduction
    if args.method is None:
        if params:
            raise UsageError(f"reduction parameters {sorted(params)} given without --method; add e.g. --method mtr")
        return None
    if args.method.lower() == "none":
        return "none"
    return {"method": args.method, "params": params}


def apply_reduction(model, spec):
    import vimtr
    if spec is None:
        return model
    if spec == "none":
        return vimtr.restore(model)
    try:
        return vimtr.reduce(model, spec["method"], **spec["params"])
    except (TypeError, ValueError) as e:
        raise UsageError(f"cannot apply --method {spec['method']} with {spec['params']}: {e}") from None


def load_from_args(args):
    """The model named by --model/--checkpoint (eval mode, on CPU), before any --method is applied."""
    from vimtr.loading import CheckpointError, load_model
    if not args.model and not args.checkpoint:
        raise UsageError("give --checkpoint PATH (official or vimtr checkpoint) and/or --model NAME")
    source = args.checkpoint or args.model
    try:
        return load_model(source, name=args.model if args.checkpoint else None, use_ema=args.ema)
    except CheckpointError as e:
        hint = ""
        if not args.checkpoint:
            hint = (f"; --model alone needs a bundled model with weights. For a registered architecture pass its "
                    f"weights too: --model {args.model} --checkpoint PATH_OR_HF_ID")
        raise UsageError(f"{e}{hint}") from None


def amp_dtype(spec: str | None, device: torch.device):
    """None (fp32) or the autocast dtype; ``auto`` is bf16 on GPU, fp32 elsewhere."""
    if spec in (None, "none", "fp32"):
        return None
    if spec == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    if spec not in AMP_DTYPES:
        raise UsageError(f"--amp must be bf16, fp16 or none, got {spec!r}")
    if device.type != "cuda":
        raise UsageError(f"--amp {spec} needs a CUDA device (running on {device}); drop --amp for fp32 on CPU")
    return AMP_DTYPES[spec]


def autocast(device: torch.device, dtype):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def check_batch_size(batch_size: int, what: str = "--batch-size"):
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise UsageError(f"{what} must be a positive integer, got {batch_size!r}")


def unwrap(model):
    """The model inside a DistributedDataParallel wrapper (or the model itself)."""
    from torch.nn.parallel import DistributedDataParallel
    return model.module if isinstance(model, DistributedDataParallel) else model


@contextlib.contextmanager
def cli_errors(command: str):
    """Bad input ends the command with one clear line (no traceback); anything else is a bug and raises."""
    from vimtr.models.checkpoint import CheckpointError
    try:
        yield
    except (UsageError, CheckpointError) as e:
        raise SystemExit(f"vimtr {command}: error: {e}") from None


def main_entry(add_cli, command: str, argv=None):
    """``python -m vimtr.engine.<module> ARGS`` runs ``vimtr <command> ARGS`` (works under torchrun too)."""
    parser = argparse.ArgumentParser(prog="vimtr")
    add_cli(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args([command, *(sys.argv[1:] if argv is None else argv)])
    from vimtr import checks

    with cli_errors(command):
        checks.preflight(args)
    return args.func(args)


def execute(command: str, body, args):
    """Run a command's ``body(args, ctx)`` with one-line errors and the process group set up and torn down
    (what ``vimtr eval`` and ``vimtr retrain`` share); returns its results on every rank."""
    from vimtr.engine import distributed

    with cli_errors(command):
        ctx = distributed.setup(args.device)
        try:
            return body(args, ctx)
        finally:
            distributed.cleanup()
