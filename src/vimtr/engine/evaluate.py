"""Evaluation: ``evaluate(model, dataset)`` and ``vimtr eval``; exact under torchrun.

Each rank evaluates indices ``rank::world`` (no padding, no sample twice) and the integer counts and
the summed loss are all-reduced, so totals are those of a single process.

Images and video clips alike: a sample whose tensor has one axis more than the model's input is a set of
views of one video (VideoMamba's clips × crops test protocol); the model's outputs over the views are
averaged (``view_average``: ``"softmax"`` probabilities, as VideoMamba's test merges them, or raw
``"logits"``) before accuracy and loss.
"""
from __future__ import annotations

import platform
import time

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

import vimtr
from vimtr.data import folders as data
from vimtr.engine import common, distributed
from vimtr.errors import UsageError
from vimtr.progress import progress_bar

RESULT_KEYS = ("images", "top1", "top5", "loss", "gflops", "gflops_rmeeto", "params", "tokens_per_block",
               "corrupt", "skipped", "wall_s", "images_per_s", "world_size", "config")
# For video models "images" is "clips" and "images_per_s" is "clips_per_s"; a "protocol" is added.
VIEW_AVERAGES = ("softmax", "logits")


def tokens_per_block(model) -> list[int]:
    """Tokens entering each block in the last forward (the reduction's trace), or the full length."""
    trace = getattr(model, "reduction_trace", None)
    if trace and trace.get("tokens"):
        return [int(t) for t in trace["tokens"]]
    reducer = getattr(model, "reducer", None)
    if reducer is not None:
        return list(reducer.lengths)
    return [int(getattr(model, "num_tokens", model.num_patches + 1))] * len(model.layers)


def model_summary(model) -> dict:
    return {"model": getattr(model, "model_name", type(model).__name__),
            "model_config": dict(getattr(model, "config", {}) or {}),
            "reduction": getattr(model, "reduction", None)}


def make_loader(dataset, batch_size: int, ctx: distributed.Context, workers: int = 0) -> DataLoader:
    common.check_batch_size(batch_size)
    return DataLoader(dataset, batch_size=batch_size, sampler=range(ctx.rank, len(dataset), ctx.world),
                      num_workers=data.loader_workers(dataset, workers), collate_fn=data.collate_skip,
                      pin_memory=ctx.device.type == "cuda",
                      # An explicit generator: creating the iterator must not draw from the global RNG,
                      # or an evaluation would shift the training run's random stream.
                      generator=torch.Generator(), persistent_workers=False)


def combine_views(logits: torch.Tensor, how: str = "softmax") -> torch.Tensor:
    """(B, V, K) per-view outputs -> (B, K) scores: the mean of the logits, or the log of the mean softmax
    (VideoMamba's merge: per-view softmax averaged; its log keeps the ranking and gives the loss)."""
    if how == "logits":
        return logits.mean(dim=1)
    if how == "softmax":
        return logits.float().softmax(dim=-1).mean(dim=1).log()
    raise UsageError(f"view_average must be one of {VIEW_AVERAGES}, got {how!r}")


def forward_views(net, x: torch.Tensor, how: str = "softmax") -> torch.Tensor:
    """The model's scores for a batch: plain inputs, or (B, V, ...) sets of views averaged by ``how``."""
    if x.dim() != len(net.input_size) + 2:
        return net(x)
    B, V = x.shape[:2]
    return combine_views(net(x.flatten(0, 1)).view(B, V, -1), how)


def _dataset_of(loader_or_dataset):
    return loader_or_dataset.dataset if isinstance(loader_or_dataset, DataLoader) else loader_or_dataset


def evaluate(model, loader_or_dataset, *, batch_size: int = 128, device="cpu", amp=None, progress: bool = True,
             workers: int = 0, config: dict | None = None, desc: str = "eval", view_average: str = "softmax") -> dict:
    """Top-1/top-5 accuracy, mean cross-entropy, FLOPs and throughput of ``model`` on a dataset or loader.

    ``loader_or_dataset``: a dataset of ``(input tensor, label)`` (under torchrun each rank takes
    indices ``rank::world``), or a DataLoader over this rank's share. A video dataset
    (:func:`vimtr.data.video.load_video_dataset`) may give several views per clip, combined by
    ``view_average`` (see :func:`combine_views`). Counts are summed across ranks when torch.distributed is
    initialised. ``amp``: None (fp32) or ``torch.bfloat16``/``torch.float16``.
    Returns a dict with the keys of :data:`RESULT_KEYS` (accuracies are fractions in [0, 1]); for a video
    model ``clips``/``clips_per_s`` replace ``images``/``images_per_s`` and ``protocol`` says how the clips
    were read. ``skipped`` names the unreadable files (their count is ``corrupt``).
    """
    if view_average not in VIEW_AVERAGES:
        raise UsageError(f"view_average must be one of {VIEW_AVERAGES}, got {view_average!r}")
    ctx = distributed.context(device)
    net = common.unwrap(model)
    was_training = net.training
    net.eval().to(ctx.device)
    if isinstance(loader_or_dataset, DataLoader):
        loader = loader_or_dataset
    else:
        if len(loader_or_dataset) == 0:
            raise UsageError(f"{desc}: the dataset {data.describe(loader_or_dataset)!r} is empty")
        loader = make_loader(loader_or_dataset, batch_size, ctx, workers)
    classes = getattr(net, "num_classes", None)
    k5 = min(5, classes) if classes else 5
    sums = torch.zeros(3, dtype=torch.float64, device=ctx.device)  # correct@1, correct@5, loss
    images, skipped = 0, []
    start = time.perf_counter()
    bar = progress_bar(loader, desc=desc, enabled=progress and ctx.is_main)
    with torch.inference_mode():
        for batch in bar:
            x, y, bad = data.unpack(batch)
            skipped += bad
            if x is None:
                continue
            x, y = x.to(ctx.device, non_blocking=True), y.to(ctx.device, non_blocking=True)
            with common.autocast(ctx.device, amp):
                logits = forward_views(net, x, view_average)
            logits = logits.float()
            if classes and (y.min() < 0 or y.max() >= classes):
                raise UsageError(f"{desc}: label {int(y.max())} outside the model's {classes} classes")
            top = logits.topk(k5, dim=-1).indices
            hit = top == y[:, None]
            sums += torch.stack((hit[:, 0].sum().double(), hit.any(-1).sum().double(),
                                 F.cross_entropy(logits, y, reduction="sum").double()))
            images += len(y)
    totals = distributed.all_reduce_sum([images, len(skipped), *sums.tolist()], ctx)
    skipped = sorted(name for names in distributed.all_gather(skipped, ctx) for name in names)
    wall = time.perf_counter() - start
    n, corrupt, c1, c5, loss = totals.tolist()
    n = int(n)
    net.train(was_training)
    video = len(net.input_size) == 4  # (C, T, H, W): clips, not images
    unit = "clips" if video else "images"
    result = {
        unit: n,
        "top1": c1 / n if n else float("nan"),
        "top5": c5 / n if n else float("nan"),
        "top5_k": k5,
        "correct_top1": int(c1),
        "correct_top5": int(c5),
        "loss": loss / n if n else float("nan"),
        "gflops": vimtr.flops(net, convention="full") / 1e9,
        "gflops_rmeeto": vimtr.flops(net, convention="rmeeto") / 1e9,
        "params": sum(p.numel() for p in net.parameters()),
        "tokens_per_block": tokens_per_block(net),
        "corrupt": int(corrupt),
        "skipped": skipped,
        "wall_s": wall,
        f"{unit}_per_s": n / wall if wall > 0 else float("nan"),
        "world_size": ctx.world,
        "config": {**model_summary(net), "batch_size": getattr(loader, "batch_size", batch_size),
                   "device": str(ctx.device), "amp": None if amp is None else str(amp).replace("torch.", ""),
                   "torch": torch.__version__, "vimtr": vimtr.__version__, "host": platform.node(),
                   **(config or {})},
    }
    protocol = getattr(_dataset_of(loader_or_dataset), "protocol", None)
    if video and callable(protocol):
        result["protocol"] = {**protocol(), "view_average": view_average}
    return result


def format_table(result: dict) -> str:
    unit = "clips" if "clips" in result else "images"
    red = result["config"].get("reduction")
    red_text = "none" if not red else f"{red['method']} " + ", ".join(
        f"{k}={v}" for k, v in red["params"].items() if k in ("r", "flops_reduction") or k == "interval")
    tokens = result["tokens_per_block"]
    rows = [
        ("model", result["config"]["model"]),
        ("reduction", red_text),
        (unit, f"{result[unit]}" + (f"  ({result['corrupt']} unreadable, skipped)" if result["corrupt"] else "")),
        ("top-1", f"{100 * result['top1']:.2f} %"),
        (f"top-{result['top5_k']}", f"{100 * result['top5']:.2f} %"),
        ("loss", f"{result['loss']:.4f}"),
        ("GFLOPs (full / R-MeeTo)", f"{result['gflops']:.3f} / {result['gflops_rmeeto']:.3f}"),
        ("parameters", f"{result['params'] / 1e6:.2f} M"),
        ("tokens per block", " ".join(map(str, tokens)) if len(set(tokens)) > 1 else f"{tokens[0]} (all blocks)"),
        ("wall time", f"{result['wall_s']:.1f} s on {result['world_size']} process(es), {result['config']['device']}"),
        (f"{unit}/s", f"{result[f'{unit}_per_s']:.1f}"),
    ]
    if "protocol" in result:
        p = result["protocol"]
        rows.insert(3, ("protocol", f"{p['num_frames']} frames, {p.get('test_views', '1x1')} views "
                                    f"({p['view_average']} averaged), {p['size']} px"))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


# ---------------------------------------------------------------------------------------------- CLI
EPILOG = """\
examples:
  vimtr eval --model vim_digits --data digits
  vimtr eval --checkpoint vim_t_midclstok_76p1acc.pth --data /data/imagenet/val --json vim_t.json
  vimtr eval --checkpoint vim_b_midclstok_81p9acc.pth --ema --method mtr --flops-reduction 0.4 \\
      --data /data/imagenet/val --amp bf16 --batch-size 256
  vimtr eval --checkpoint vim_s_midclstok_80p5acc.pth --method rmeeto --r 11 --param ordered=true \\
      --data /data/imagenet/val
  torchrun --nproc_per_node 8 -m vimtr eval --checkpoint runs/vim_s_r11/best.pt --data /data/imagenet/val

  # video (VideoMamba K400 test protocol: 8 frames, 4 temporal clips x 3 spatial crops)
  vimtr eval --checkpoint videomamba_t16_k400_f8_res224.pth --data k400/val.csv --data-root k400/videos \
      --num-frames 8 --test-views 4x3 --method rmeeto --num-prune 88 --batch-size 8 --json k400.json

--data DIR is an ImageFolder (one folder per class; ImageNet's sorted synset folders give the official
class indices); a DIR holding val/ uses DIR/val. For video models --data is an annotation list
("path label" per line, as VideoMamba's val.csv) or a folder of class folders holding clips (video files
or folders of extracted frames). JSON keys: images (clips for video), top1, top5 (fractions), loss,
gflops (full convention), gflops_rmeeto, params, tokens_per_block, corrupt, skipped (unreadable files by
name), wall_s, images_per_s (clips_per_s), config; for video also protocol.
"""


def add_cli(subparsers):
    p = subparsers.add_parser("eval", help="accuracy, loss, FLOPs and throughput of a (reduced) model",
                              description="Evaluate a Vision Mamba model, optionally token-reduced, on an "
                                          "ImageFolder or the built-in digits set. Exact under torchrun.",
                              epilog=EPILOG, formatter_class=common.HelpFormatter)
    common.add_model_args(p)
    common.add_reduction_args(p)
    g = p.add_argument_group("data and output")
    g.add_argument("--data", required=True, metavar="DIR|LIST|digits",
                   help="ImageFolder (ImageNet val layout) or digits; for a video model an annotation list or a "
                        "folder of class folders holding clips")
    g.add_argument("--batch-size", type=int, default=128, help="per process (videos, each with all its views)")
    g.add_argument("--amp", choices=("bf16", "fp16"), help="autocast on GPU (default fp32)")
    g.add_argument("--json", metavar="PATH", help="write the results here (atomically)")
    common.add_video_args(p, test_views=True)
    common.add_runtime_args(p, workers=4)
    p.set_defaults(func=run)
    return p


def run(args) -> int:
    """The ``vimtr eval`` command: 0 on success (bad input exits with a one-line message)."""
    execute(args)
    return 0


def execute(args) -> dict:
    """Run the command and return its results (rank 0 and the others alike)."""
    return common.execute("eval", _run, args)


def _run(args, ctx: distributed.Context):
    common.check_batch_size(args.batch_size)
    amp = common.amp_dtype(args.amp, ctx.device)
    model = common.load_from_args(args)
    common.apply_reduction(model, common.reduction_spec(args))
    if common.video_args_apply(args, model):
        dataset = common.video_dataset(args, model, args.data, "val")
    else:
        transform = None
        if args.data != data.DIGITS:
            from vimtr.data import eval_transform
            transform = eval_transform(model)
        dataset = data.load_dataset(args.data, "val", transform=transform, on_corrupt=args.on_corrupt)
        data.check_classes(model, dataset)
        data.check_image_model(model, dataset)
    config = {"checkpoint": args.checkpoint, "ema": args.ema, "data": data.describe(dataset),
              "on_corrupt": args.on_corrupt, "command": "eval"}
    result = evaluate(model, dataset, batch_size=args.batch_size, device=ctx.device, amp=amp,
                      progress=not args.no_progress, workers=args.workers, config=config,
                      view_average=args.view_average)
    if ctx.is_main:
        print(format_table(result), flush=True)
        if args.json:
            common.write_json(args.json, result)
    return result


if __name__ == "__main__":
    common.main_entry(add_cli, "eval")
