"""The checks every command runs on its arguments before it loads a model or starts any work.

Two stages, both here so that every command refuses bad input the same way, with one line that names the
argument, the bad value and what would be valid:

- :func:`preflight` (``vimtr.cli.main`` calls it right after parsing): everything that needs no model:
  method names and parameter names, value ranges, files, folders, sample names, devices.
- :func:`check_reductions` (a command calls it once its model is loaded, before the first forward): each
  requested reduction is built against that model without being installed, so a FLOPs level the model's
  schedule cannot reach is refused up front, naming the largest level it can reach.

Library functions keep their own checks; these only make sure a command fails before it has done work.
"""
from __future__ import annotations

import math
from pathlib import Path

from vimtr.errors import UsageError

# Photos ``vimtr info --image NAME`` takes from scikit-image (``pip install 'vimtr[images]'``).
SAMPLE_IMAGES = ("astronaut", "cat", "chelsea", "coffee")
DIGITS_PREFIX = "digits:"


# ---------------------------------------------------------------------------------------------- values
def positive_int(value, flag: str, minimum: int = 1):
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise UsageError(f"{flag} must be >= {minimum} (an integer), got {value!r}")


def fraction(value, flag: str, *, allow_zero: bool = True):
    """A FLOPs reduction level: a fraction in [0, 1) (or (0, 1) without ``allow_zero``)."""
    low_ok = value >= 0 if allow_zero else value > 0
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or not (low_ok and value < 1):
        span = "[0, 1)" if allow_zero else "(0, 1)"
        raise UsageError(f"{flag} must be a fraction in {span} (0.3 = 30% fewer FLOPs), got {value!r}")


def device(spec: str | None, flag: str = "--device"):
    """``auto``, ``cpu``, ``cuda`` or ``cuda:N`` (... any torch device string); CUDA only where there is one."""
    if spec in (None, "auto"):
        return
    import torch

    try:
        dev = torch.device(spec)
    except (RuntimeError, ValueError):
        raise UsageError(f"{flag} {spec!r} is not a device; use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"{flag} {spec}: CUDA is not available on this machine; use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise UsageError(f"{flag} {spec}: this machine has {torch.cuda.device_count()} CUDA device(s) "
                             f"(cuda:0 … cuda:{torch.cuda.device_count() - 1})")


def key_values(items, flag: str = "--param") -> dict:
    """``["r=4", "metric=x"]`` (or already-parsed pairs) -> {"r": 4, "metric": "x"}."""
    from vimtr.io import parse_param

    out = {}
    for item in items or []:
        if isinstance(item, tuple):
            key, value = item
        else:
            try:
                key, value = parse_param(item)
            except Exception as e:  # argparse.ArgumentTypeError: not a ValueError
                raise UsageError(f"{flag}: {e}") from None
        out[key] = value
    return out


# ---------------------------------------------------------------------------------------------- reductions
def method(name: str, params: dict | None = None, flag: str = "--method", label: str | None = None):
    """A registered method, parameters it takes, and a ``flops_reduction`` in [0, 1)."""
    from vimtr.reduction.api import check_param_names

    params = params or {}
    try:
        check_param_names(name, params)
    except (TypeError, ValueError) as e:
        text = str(e).removeprefix(f"{name.lower()}: ")  # the flag names the method already
        raise UsageError(f"{flag} {label or name}: {text}") from None
    if params.get("flops_reduction") is not None:
        fraction(params["flops_reduction"], f"{name}: flops_reduction")
    if "r" in params and params.get("flops_reduction") is not None:
        raise UsageError(f"{flag} {name}: give either r or flops_reduction, not both")


def check_reductions(model, requests, what: str = "", more_blocks: str = "--param interval=1") -> None:
    """Build every ``(method, params)`` of ``requests`` against ``model`` (nothing is installed). All that
    fail are reported together; an unreachable ``flops_reduction`` names the largest level the method
    reaches there. ``more_blocks``: how this command asks for a denser schedule (for the hint)."""
    from vimtr.reduction.api import make_reducer, max_flops_reduction

    problems, interval = [], None
    for name, params in requests:
        try:
            make_reducer(model, name, **params)
        except (TypeError, ValueError) as e:
            level = params.get("flops_reduction")
            if level is not None and "unreachable" in str(e):
                interval = params.get("interval", _default_interval())
                most = max_flops_reduction(model, name, **params)
                problems.append(f"{name} at {level:g} (the largest level {name} reaches is {most:.3f})")
            else:
                problems.append(str(e))
    if problems:
        where = f"{getattr(model, 'model_name', type(model).__name__)} ({len(model.layers)} blocks"
        where += f", interval={interval})" if interval else ")"
        hint = ""
        if interval is not None:
            hint = ". Ask for lower levels" + (f", or reduce at more blocks ({more_blocks})"
                                               if interval > 1 and more_blocks else "")
        raise UsageError(f"{what + ': ' if what else ''}cannot reduce {where} as asked, so nothing was run: "
                         + "; ".join(problems) + hint)


def _default_interval() -> int:
    import inspect

    from vimtr.reduction.base import TokenReducer
    return inspect.signature(TokenReducer.__init__).parameters["interval"].default


def reachable_levels(model, name: str, levels, params: dict | None = None) -> tuple[list, float]:
    """(the ``levels`` ``name`` can reach on ``model``, the largest level it reaches)."""
    from vimtr.reduction.api import make_reducer, max_flops_reduction

    params = dict(params or {})
    ok = []
    for level in levels:
        try:
            make_reducer(model, name, **params, flops_reduction=level)
            ok.append(level)
        except ValueError:
            pass
    return ok, max_flops_reduction(model, name, **params)


# ---------------------------------------------------------------------------------------------- sources
def model_source(args, weights_needed: bool = True, has_default: bool = False):
    """``--model`` / ``--checkpoint`` name something loadable. ``weights_needed``: ``--model`` alone must then
    be a bundled model (a registered architecture alone has random weights). ``has_default``: the command
    picks a model when neither is given."""
    from vimtr.models.checkpoint import bundled_models, is_hub_id
    from vimtr.models.registry import canonical_name

    bundled = bundled_models()
    model, checkpoint = getattr(args, "model", None), getattr(args, "checkpoint", None)
    if not model and not checkpoint and not has_default:
        raise UsageError(f"give --checkpoint PATH (an official or vimtr checkpoint, or a Hugging Face id) and/or "
                         f"--model NAME (a bundled model: {', '.join(bundled) or 'none'})")
    if checkpoint:
        path = Path(checkpoint).expanduser()
        if path.is_dir():
            raise UsageError(f"--checkpoint {checkpoint}: is a folder; pass the checkpoint file itself")
        if not path.exists() and checkpoint not in bundled and not is_hub_id(checkpoint):
            raise UsageError(f"--checkpoint {checkpoint}: no such file. Give a checkpoint file (official .pth, "
                             f".safetensors, a vimtr checkpoint), a Hugging Face id such as "
                             f"hustvl/Vim-tiny-midclstok, or a bundled model ({', '.join(bundled) or 'none'})")
    if model and model not in bundled:
        try:
            canonical_name(model)
        except ValueError as e:
            raise UsageError(f"--model: {e}; bundled models with weights: {', '.join(bundled) or 'none'}") from None
        if weights_needed and not checkpoint:
            raise UsageError(f"--model {model} is a registered architecture without weights; bundled models with "
                             f"weights: {', '.join(bundled) or 'none'}. For {model} pass its weights too: "
                             f"--model {model} --checkpoint PATH_OR_HF_ID")


def data_source(spec, flag: str = "--data"):
    """A built-in dataset (``digits``, ``digits-clutter``), an existing folder or an existing file (a video
    annotation list). Folders and lists are only read when the data is loaded, once the model says whether
    they must hold images or clips."""
    from vimtr.data.folders import BUILTIN, LAYOUT_HINT
    from vimtr.data.video import VIDEO_LAYOUT_HINT

    if spec is None or str(spec) in BUILTIN:
        return
    if not Path(spec).expanduser().exists():
        raise UsageError(f"{flag} {spec}: does not exist; expected {LAYOUT_HINT}; for a video model, "
                         f"{VIDEO_LAYOUT_HINT}")


def image_file(spec: str, flag: str):
    """A file PIL can decode (checked by reading it, not by its name)."""
    from PIL import Image, UnidentifiedImageError

    path = Path(spec).expanduser()
    if path.is_dir():
        raise UsageError(f"{flag} {spec}: is a folder; give an image file")
    try:
        with Image.open(path) as im:
            im.verify()
    except FileNotFoundError:
        raise UsageError(f"{flag} {spec}: no such file") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise UsageError(f"{flag} {spec}: not an image PIL can read ({type(e).__name__}: {e}); give a PNG, JPEG, "
                         f"BMP, TIFF, WebP ... file") from None


def sample_or_image(spec: str, flag: str = "--image"):
    """An image file, or one of :data:`SAMPLE_IMAGES` (with scikit-image installed)."""
    if spec in SAMPLE_IMAGES:
        try:
            import skimage.data  # noqa: F401
        except ImportError:
            raise UsageError(f"{flag} {spec}: the sample photos come from scikit-image, which is not installed: "
                             f"pip install 'vimtr[images]' (or pass an image file)") from None
        return
    if not Path(spec).expanduser().exists():
        raise UsageError(f"{flag} {spec}: no such file, and not a sample photo; sample names: "
                         f"{', '.join(SAMPLE_IMAGES)}")
    image_file(spec, flag)


def digits_count(split: str = "test") -> int:
    from vimtr.data.digits import digits_tensors

    return len(digits_tensors(split)[1])


def digits_or_image(spec: str, flag: str = "IMAGE"):
    """``digits:N`` (N a test image of the built-in set) or an image file."""
    if spec.startswith(DIGITS_PREFIX):
        index, n = spec[len(DIGITS_PREFIX):], digits_count("test")
        if not index.isdigit() or int(index) >= n:
            raise UsageError(f"{flag} {spec}: digits:N takes a test image index N from 0 to {n - 1}")
        return
    if not Path(spec).expanduser().exists():
        raise UsageError(f"{flag} {spec}: no such file (give an image file, or digits:N for test image N of the "
                         f"built-in digits set)")
    image_file(spec, flag)


# ---------------------------------------------------------------------------------------------- commands
def _info(args):
    model_source(args, weights_needed=False, has_default=True)  # vim_tiny
    if args.method:
        method(args.method, key_values(args.param))
    elif args.param:
        raise UsageError(f"--param {' '.join(args.param)} given without --method; add e.g. --method mtr")
    if args.image:
        sample_or_image(args.image)


def _demo(args):
    import vimtr
    from vimtr.models.checkpoint import bundled_models
    from vimtr.tools.demo import METHODS, SCHEDULE

    fraction(args.flops_reduction, "--flops-reduction", allow_zero=False)
    if args.retrain_epochs is not None:
        positive_int(args.retrain_epochs, "--retrain-epochs")
    if args.model not in bundled_models():
        raise UsageError(f"--model {args.model}: the demo runs a bundled model: {', '.join(bundled_models())}")
    model = vimtr.load_model(args.model)  # small: the demo's whole budget is checked before it starts
    check_reductions(model, [(m, {**SCHEDULE, "flops_reduction": args.flops_reduction}) for m in METHODS], "demo",
                     more_blocks=None)


def _engine(args):
    """``vimtr eval`` and ``vimtr retrain``."""
    model_source(args)
    data_source(args.data)
    if getattr(args, "val_data", None):
        data_source(args.val_data, "--val-data")
    positive_int(args.batch_size, "--batch-size")
    device(args.device)
    if args.flops_reduction is not None:
        fraction(args.flops_reduction, "--flops-reduction")
    if args.method and args.method.lower() != "none":
        params = dict(args.param or [])
        if args.r is not None:
            params["r"] = args.r
        if args.flops_reduction is not None:
            params["flops_reduction"] = args.flops_reduction
        method(args.method, params)


def bench_configs(args) -> dict:
    """``vimtr bench``'s ``--method`` specs parsed, as ``{label: None | (method, params)}``."""
    from vimtr.tools.benchmark import parse_methods

    try:
        return parse_methods(args.method, args.flops_reduction)
    except Exception as e:  # a malformed key=value: argparse.ArgumentTypeError
        raise UsageError(f"--method: {e}") from None


def _bench(args):
    model_source(args, weights_needed=False)
    fraction(args.flops_reduction, "--flops-reduction")
    for size in args.batch_size:
        positive_int(size, "--batch-size")
    positive_int(args.runs, "--runs")
    positive_int(args.warmup, "--warmup", minimum=0)
    device(args.device)
    dtypes = args.dtype if not args.preset else ["fp16"]
    if "fp16" in dtypes and not str(args.device).startswith("cuda"):
        raise UsageError("fp16 needs a GPU (--device cuda)" + (" (--preset rmeeto times fp16)" if args.preset else "")
                         + "; on CPU use --dtype fp32 or bf16")
    for label, config in bench_configs(args).items():
        if config is not None:
            method(config[0], config[1], label=label)


def _sweep(args):
    from vimtr.tools.sweep import BUNDLED_FOR

    model_source(args, has_default=str(args.data) in BUNDLED_FOR)  # the built-in dataset's bundled model
    data_source(args.data)
    for level in args.levels or []:
        fraction(level, "--levels", allow_zero=False)
    if args.interval is not None:
        positive_int(args.interval, "--interval")
    positive_int(args.random_seeds, "--random-seeds")
    positive_int(args.batch_size, "--batch-size")
    positive_int(args.processes, "--processes")
    device(args.device)
    if args.processes > 1 and args.device not in ("cpu", None):
        raise UsageError(f"--processes {args.processes} shares the points among CPU processes; with --device "
                         f"{args.device} use --processes 1")
    for name in args.method:
        method(name, {"interval": args.interval} if args.interval else {})


def _visualize(args):
    model_source(args, has_default=args.image.startswith(DIGITS_PREFIX))  # vim_digits
    digits_or_image(args.image)
    fraction(args.flops_reduction, "--flops-reduction", allow_zero=False)
    positive_int(args.block, "--block", minimum=0)
    for name in args.method:
        method(name)


def _warmup(args):
    from vimtr.models.checkpoint import bundled_models

    if args.model not in bundled_models() and not Path(args.model).expanduser().is_file():
        raise UsageError(f"--model {args.model}: not a bundled model ({', '.join(bundled_models())}) nor a "
                         f"checkpoint file")


CHECKS = {"info": _info, "demo": _demo, "eval": _engine, "retrain": _engine, "bench": _bench, "sweep": _sweep,
          "visualize": _visualize, "warmup": _warmup}


def preflight(args):
    """Check the parsed arguments of ``args.command`` (commands without checks here pass)."""
    check = CHECKS.get(getattr(args, "command", None))
    if check is not None:
        check(args)
