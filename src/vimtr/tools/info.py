"""``vimtr info``: what a model is — parameters, FLOPs under each convention, tokens per block, and,
with ``--image``, its top-5 classes for a photo (ImageNet class names from timm)."""
from __future__ import annotations

import argparse

import torch

import vimtr


def describe(model) -> dict:
    d = {"model": getattr(model, "model_name", type(model).__name__),
         "parameters": sum(p.numel() for p in model.parameters()), "input_size": list(model.input_size),
         "tokens": getattr(model, "num_tokens", model.num_patches + 1), "cls_index": model.initial_cls_index,
         "gflops": {c: vimtr.flops(model, convention=c) / 1e9 for c in ("full", "rmeeto", "fvcore")}}
    if model.reducer is not None:
        d["reduction"] = model.reduction
        d["tokens_per_block"] = list(model.reducer.lengths)
    return d


@torch.no_grad()
def top5(model, image) -> list[tuple[str, float]]:
    from vimtr.data import eval_transform

    x = eval_transform(model)(image).unsqueeze(0)
    prob = model(x).softmax(-1)[0]
    p, idx = prob.topk(min(5, prob.numel()))  # a head with fewer than 5 classes lists them all
    names = _class_names(prob.numel())
    return [(names(i), float(v)) for v, i in zip(p.tolist(), idx.tolist())]


def _class_names(n):
    if n == 1000:
        from timm.data import ImageNetInfo
        info = ImageNetInfo()
        return lambda i: info.index_to_description(i)
    return lambda i: f"class {i}"


def add_cli(sub):
    p = sub.add_parser("info", help="parameters, FLOPs, tokens and top-5 classes of a model",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog="examples:\n  vimtr info --model vim_tiny --method rmeeto --param r=5\n"
                              "  vimtr info --checkpoint vim_t_midclstok_76p1acc.pth --image chelsea")
    p.add_argument("--model", default=None, help="registered or bundled model name (default vim_tiny)")
    p.add_argument("--checkpoint", help="checkpoint to load")
    p.add_argument("--method", help="apply a reduction first")
    p.add_argument("--param", action="append", default=[], metavar="KEY=VALUE", help="method parameter")
    p.add_argument("--image", help="image file (any mode: converted to the model's channels), or a scikit-image "
                                   "sample photo: astronaut, cat, chelsea, coffee")
    p.set_defaults(func=run)


def run(args):
    from vimtr import checks
    from vimtr.tools.benchmark import load_for_cli

    if not args.model and not args.checkpoint:
        args.model = "vim_tiny"
    model = load_for_cli(args, allow_random=True)
    if args.method:
        params = checks.key_values(args.param)
        checks.check_reductions(model, [(args.method, params)], "info")
        vimtr.reduce(model, args.method, **params)
    d = describe(model)
    print(f"model        {d['model']}  input {tuple(d['input_size'])}  tokens {d['tokens']} "
          f"(class token at {d['cls_index']})")
    print(f"parameters   {d['parameters']:,}")
    print("GFLOPs       " + "  ".join(f"{k} {v:.3f}" for k, v in d["gflops"].items()))
    if "tokens_per_block" in d:
        print(f"reduction    {d['reduction']['method']}: tokens per block {d['tokens_per_block']}")
    if args.image:
        from PIL import Image
        if args.image in checks.SAMPLE_IMAGES:
            import skimage.data
            image = Image.fromarray(getattr(skimage.data, args.image)())
        else:
            image = Image.open(args.image)  # any mode: eval_transform converts it to the model's channels
        for name, p in top5(model, image):
            print(f"  {p:6.2%}  {name}")
