"""``build_from_checkpoint(checkpoint)``: official Vim / VideoMamba checkpoints (and vimtr's own) as vimtr models.

``vimtr.load_model`` (:mod:`vimtr.loading`) calls it and re-applies a recorded token reduction.

What it reads:

* official ``.pth`` files: a ``torch.save``d dict with ``model``, ``model_ema``, ``optimizer``,
  ``lr_scheduler``, ``epoch``, ``scaler`` and ``args`` (an ``argparse.Namespace``); VideoMamba video
  checkpoints are flat state dicts; ``module.``-prefixed (DDP) state dicts; ``.safetensors``;
* an in-memory state dict; a Hugging Face repo id (``hustvl/Vim-tiny-midclstok[:file]``); a bundled
  model name (``src/vimtr/assets/<name>.safetensors`` + ``<name>.json``);
* checkpoints written by vimtr itself (a ``"vimtr"`` record: model name, config, token reduction).

Pickles are only ever read with ``weights_only=True``; the one non-default global official files need,
``argparse.Namespace``, is allow-listed. Without ``name`` the architecture is inferred from the tensor
shapes. Anything that does not fit raises a single :class:`CheckpointError` that names the file, the
offending keys with expected and found shapes, and what the checkpoint looks like.
"""
from __future__ import annotations

import argparse
import importlib.resources
import inspect
import itertools
import json
import logging
import math
import os
import re
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn

from vimtr.models.adapt_weights import inflate_image_weights, resample_pos_embed
from vimtr.models.hub import HF_DEFAULT_FILES, hub_download, is_hub_id
from vimtr.models.registry import canonical_name, create_model, list_models, model_config
from vimtr.models.safe_pickle import SAFE_GLOBALS, torch_load_weights  # noqa: F401 (SAFE_GLOBALS re-exported)
from vimtr.models.videomamba import VideoMamba
from vimtr.models.vim import VisionMamba

__all__ = ["CheckpointError", "CheckpointWarning", "build_from_checkpoint", "assets_dir", "HF_DEFAULT_FILES",
           "is_hub_id"]

logger = logging.getLogger(__name__)


class CheckpointError(ValueError):
    """A checkpoint could not be read or does not fit the model; the message says why."""


class CheckpointWarning(UserWarning):
    """Something about a loaded checkpoint was assumed or dropped (also in ``model.checkpoint_info``)."""


_MAX_LISTED = 5  # offending keys shown in an error message


def assets_dir():
    """Where bundled models live (a Traversable); a function so tests can point it elsewhere."""
    return importlib.resources.files("vimtr") / "assets"


# ============================================================================ small records
@dataclass
class _Source:
    """A checkpoint once read: the top-level dict plus what error messages and hints need."""
    label: str  # how messages name it (the file path, repo:file, bundled:name, <state dict>)
    obj: Mapping  # the top-level mapping (official dict, flat state dict, vimtr dict)
    hint: str = ""  # a file name, for the class-token layout hint
    fmt: str = "state dict"


@dataclass
class _Notices:
    items: list = field(default_factory=list)

    def warn(self, msg: str):
        """Something assumed or dropped: worth a warning as well as a line in checkpoint_info."""
        self.items.append(msg)
        warnings.warn(msg, CheckpointWarning, stacklevel=2)

    def note(self, msg: str):
        """Something the caller asked for (e.g. a pos-embed resample): recorded and logged only."""
        self.items.append(msg)
        logger.info(msg)


def _shape(t) -> str:
    return str(tuple(t.shape)) if isinstance(t, torch.Tensor) else type(t).__name__


def _describe(name: str, overrides: Mapping) -> str:
    if not overrides:
        return name
    return f"{name}({', '.join(f'{k}={v}' for k, v in sorted(overrides.items()))})"


# ============================================================================ reading
def _read(checkpoint) -> _Source:
    if isinstance(checkpoint, Mapping):
        return _Source("<state dict>", checkpoint, fmt=_format(checkpoint))
    if not isinstance(checkpoint, (str, os.PathLike)):
        raise CheckpointError(f"checkpoint must be a file path, a Hugging Face repo id, a bundled model name or a "
                              f"state dict, got {type(checkpoint).__name__}")
    text = os.fspath(checkpoint)
    path = Path(text).expanduser()
    if path.is_file():
        return _read_file(path, label=str(path), hint=path.name)
    if path.exists():
        raise CheckpointError(f"{text}: is not a file (a directory?); pass the checkpoint file itself")
    bundled = _read_bundled(text)
    if bundled is not None:
        return bundled
    if is_hub_id(text):
        repo, _, filename = text.partition(":")
        local, filename = hub_download(repo, filename or None, text, CheckpointError)
        return _read_file(Path(local), label=f"{repo}:{filename}", hint=filename)
    raise CheckpointError(f"{text}: no such file. load_model takes a checkpoint file, a Hugging Face repo id "
                          f"such as 'hustvl/Vim-tiny-midclstok' (optionally 'repo:filename'), a bundled model "
                          f"name ({', '.join(bundled_models()) or 'none installed'}) or a state dict")


def _read_file(path: Path, label: str, hint: str) -> _Source:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        try:
            obj = load_file(str(path), device="cpu")
        except Exception as e:  # SafetensorError, OSError: a truncated or foreign file
            raise CheckpointError(f"{label}: not a readable safetensors file ({_first_line(e)})") from None
        return _Source(label, obj, hint, "safetensors")
    obj = torch_load_weights(path, label, CheckpointError)
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{label}: holds a {type(obj).__name__}, not a checkpoint dict or state dict")
    return _Source(label, obj, hint, _format(obj))


def _format(obj: Mapping) -> str:
    return "vimtr" if "vimtr" in obj else "official" if isinstance(obj.get("model"), Mapping) else "state dict"


def _first_line(e: BaseException) -> str:
    """``Type: first line of the message`` (torch's messages run to paragraphs)."""
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0]}" if text else type(e).__name__


def bundled_models() -> list[str]:
    """Names of the models shipped inside the package (``load_model(name)`` loads them)."""
    try:
        return sorted(p.name[:-5] for p in assets_dir().iterdir()
                      if p.name.endswith(".json") and assets_dir().joinpath(p.name[:-5] + ".safetensors").is_file())
    except (OSError, FileNotFoundError):
        return []


def _read_bundled(name: str) -> _Source | None:
    """A bundled model: ``<name>.safetensors`` + a JSON card ``{"model": ..., "config": {...}}``."""
    if not re.fullmatch(r"[\w.-]+", name):
        return None
    root = assets_dir()
    weights, card_file = root.joinpath(f"{name}.safetensors"), root.joinpath(f"{name}.json")
    if not (weights.is_file() and card_file.is_file()):
        return None
    from safetensors.torch import load as load_bytes
    label = f"bundled model {name!r}"
    try:
        card = json.loads(card_file.read_text())
        state = load_bytes(weights.read_bytes())
    except Exception as e:
        raise CheckpointError(f"{label}: unreadable ({type(e).__name__}: {e})") from None
    if not isinstance(card, Mapping) or not isinstance(card.get("model"), str):
        raise CheckpointError(f"{label}: its card {name}.json needs a 'model' key naming a registered model")
    # A bundled model is described exactly like a vimtr-written checkpoint, so one code path serves both.
    record = {"model_name": card["model"], "config": card.get("config") or {}, "reduction": card.get("reduction")}
    dataset = card.get("dataset")
    if isinstance(dataset, Mapping) and isinstance(dataset.get("normalisation"), Mapping):
        record["normalisation"] = dict(dataset["normalisation"])  # eval_transform normalises with it
    return _Source(label, {"model": state, "vimtr": record}, name, "bundled")


# ============================================================================ picking the weights
def _state_dict(src: _Source, use_ema: bool) -> dict[str, torch.Tensor]:
    obj = src.obj
    if use_ema:
        ema = obj.get("model_ema")
        if not isinstance(ema, Mapping) or not ema:
            raise CheckpointError(f"{src.label}: use_ema=True but the checkpoint has no 'model_ema' weights "
                                  f"(top-level keys: {', '.join(map(str, list(obj)[:8]))})")
        sd = ema
    else:
        # Official files nest the weights under 'model'; others use 'state_dict' or DeepSpeed's 'module'.
        sd = next((obj[k] for k in ("model", "state_dict", "module") if isinstance(obj.get(k), Mapping)), obj)
    tensors = {str(k): v for k, v in sd.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise CheckpointError(f"{src.label}: holds no weights (no tensors; top-level keys: "
                              f"{', '.join(map(str, list(obj)[:8])) or 'none'})")
    if all(k.startswith("module.") for k in tensors):  # saved from a DistributedDataParallel wrapper
        tensors = {k[len("module."):]: v for k, v in tensors.items()}
    return tensors


def _drop_distill_head(sd: dict, notices: _Notices) -> dict:
    # VideoMamba-M/B distillation heads serve training only; logits come from `head`.
    dropped = [k for k in sd if k.startswith("distill_head.")]
    if dropped:
        notices.warn(f"ignored VideoMamba's self-distillation head ({', '.join(dropped)}): unused at inference")
    return {k: v for k, v in sd.items() if not k.startswith("distill_head.")}


# ============================================================================ architecture inference
def _foreign_kind(sd: Mapping) -> str | None:
    """Recognise checkpoints of other model families, to say what the file is instead."""
    if any(re.match(r"blocks\.\d+\.attn\.", k) for k in sd):
        dim = next((v.shape[-1] for k, v in sd.items() if k in ("cls_token", "pos_embed")), "?")
        depth = len({m.group(1) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k))})
        return f"a Vision Transformer (ViT/DeiT: embed_dim {dim}, {depth} blocks), not a Vision Mamba model"
    if "backbone.embedding.weight" in sd or "lm_head.weight" in sd:
        emb = sd.get("backbone.embedding.weight", sd.get("lm_head.weight"))
        depth = len({m.group(1) for k in sd if (m := re.match(r"backbone\.layers\.(\d+)\.", k))})
        return (f"a text Mamba language model (mamba_ssm MambaLMHeadModel: vocabulary {emb.shape[0]}, "
                f"d_model {emb.shape[1]}, {depth} layers), not a Vision Mamba model")
    return None


def _family(name: str) -> str:
    """'video', or the image class-token layout 'middle' (Vim) / 'first' (VideoMamba image)."""
    cls, cfg = model_config(name)
    return "video" if issubclass(cls, VideoMamba) else cfg["cls_position"]


def _registered_config(name: str) -> dict:
    """A registered model's full configuration: constructor defaults overlaid with its registry entry."""
    cls, cfg = model_config(name)
    full = {}
    for klass in reversed(cls.__mro__):
        if isinstance(klass, type) and issubclass(klass, VisionMamba):
            full.update({p.name: p.default for p in inspect.signature(klass.__init__).parameters.values()
                         if p.default is not inspect.Parameter.empty})
    full.update(cfg)
    if full.get("stride") is None:  # None means "= patch_size"
        full["stride"] = full["patch_size"]
    return full


def _ckpt_args(obj: Mapping) -> dict:
    args = obj.get("args")
    return vars(args) if isinstance(args, argparse.Namespace) else dict(args) if isinstance(args, Mapping) else {}


def _declared_layout(obj: Mapping) -> str | None:
    """The image class-token layout the checkpoint's own ``args.model`` declares, if it names one."""
    model_arg = _ckpt_args(obj).get("model")
    if not isinstance(model_arg, str):
        return None
    try:
        family = _family(canonical_name(model_arg))
        if family != "video":
            return family
    except ValueError:  # not a registered name: judge by the official naming
        pass
    lowered = model_arg.lower()
    return "first" if "videomamba" in lowered else "middle" if "vim" in lowered else None


def _named_layout(file_name: str) -> str | None:
    """The layout the official file names state: ``videomamba_*`` (first), ``vim_*`` / ``*midclstok*`` (middle)."""
    name = file_name.lower()
    if "videomamba" in name:
        return "first"
    if "midclstok" in name or "middle_cls" in name or re.match(r"vim[_-]", name):
        return "middle"
    return None


def _layout(src: _Source, notices: _Notices | None) -> str:
    """Vim (middle class token) or VideoMamba image (first): their state dicts have identical keys. The
    checkpoint's ``args.model`` decides, else its file name (recorded as a notice), else Vim with a warning."""
    declared = _declared_layout(src.obj)
    if declared is not None:
        return declared
    named = _named_layout(src.hint)
    if named is not None:
        if notices is not None:
            notices.note(f"class token placed {named} ({'VideoMamba' if named == 'first' else 'Vim'}) as the file "
                         f"name {src.hint!r} says; pass name= to choose")
        return named
    if notices is not None:
        notices.warn("the checkpoint does not say whether it is Vim or VideoMamba (no args.model, and its file name "
                     "does not say); assuming Vim (class token in the middle). For VideoMamba image weights pass "
                     "name='videomamba_...'")
    return "middle"


def _check_declared_layout(src: _Source, model: nn.Module, notices: _Notices):
    # Vim and VideoMamba image weights load into each other without a key error; say so if name= crossed them.
    declared = _declared_layout(src.obj)
    if declared and not isinstance(model, VideoMamba) and declared != model.cls_position:
        notices.warn(f"the checkpoint's args.model ({_ckpt_args(src.obj)['model']!r}) puts the class token "
                     f"{declared}, but {model.model_name} puts it {model.cls_position}: outputs will not match "
                     f"the original model")


def _geometry(grid: int, patch: int, allow_stride: bool, sizes: list[int]) -> tuple[int, int]:
    """(img_size, stride) giving a ``grid``×``grid`` patch grid, grid = (img − patch)//stride + 1.

    Each candidate image size (the checkpoint's args.input_size, then 224) is tried with stride = patch,
    then (Vim only) with a smaller stride that tiles it exactly (27×27 at 224 → stride 8). Failing
    that the grid is taken as non-overlapping patches of a larger image (28×28 → 448).
    """
    for img in sizes:
        if (img - patch) % patch == 0 and (img - patch) // patch + 1 == grid:
            return img, patch
        if allow_stride:
            for stride in range(patch - 1, 0, -1):
                if (img - patch) % stride == 0 and (img - patch) // stride + 1 == grid:
                    return img, stride
    return grid * patch, patch


def _infer_config(sd: Mapping, src: _Source, notices: _Notices | None) -> tuple[str, dict]:
    """Registered name + overrides from the tensor shapes; raises CheckpointError for foreign weights."""
    return _closest_registered(*_shape_config(sd, src, notices))


def _shape_config(sd: Mapping, src: _Source, notices: _Notices | None) -> tuple[str, dict]:
    """(family, configuration) read from the tensor shapes; raises CheckpointError for foreign weights."""
    foreign = _foreign_kind(sd)
    if foreign:
        raise CheckpointError(f"{src.label}: not a Vision Mamba checkpoint: it looks like {foreign}. vimtr "
                              f"loads Vim / VideoMamba weights ({', '.join(list_models())})")
    needed = ("cls_token", "pos_embed", "patch_embed.proj.weight", "layers.0.mixer.A_log")
    absent = [k for k in needed if k not in sd]
    if absent:
        raise CheckpointError(f"{src.label}: does not look like a Vim / VideoMamba checkpoint: missing "
                              f"{', '.join(absent)}; its first keys are {', '.join(list(sd)[:_MAX_LISTED])}")
    weight, pos = sd["patch_embed.proj.weight"], sd["pos_embed"]
    patches = pos.shape[1] - 1 if pos.dim() == 3 else -1
    grid = math.isqrt(max(patches, 0))
    if grid * grid != patches or weight.dim() not in (4, 5):
        raise CheckpointError(f"{src.label}: pos_embed {_shape(pos)} / patch_embed.proj.weight {_shape(weight)} "
                              f"do not describe a square patch grid")
    patch = weight.shape[-1]
    cfg = dict(
        embed_dim=sd["cls_token"].shape[-1],
        depth=1 + max(int(m.group(1)) for k in sd if (m := re.match(r"layers\.(\d+)\.", k))),
        d_state=sd["layers.0.mixer.A_log"].shape[1],
        patch_size=patch,
        in_chans=weight.shape[1],
        num_classes=sd["head.weight"].shape[0] if "head.weight" in sd else 0,
    )
    if weight.dim() == 5 or "temporal_pos_embedding" in sd:
        family = "video"
        kernel = weight.shape[2] if weight.dim() == 5 else 1
        frames = sd["temporal_pos_embedding"].shape[1] * kernel if "temporal_pos_embedding" in sd else None
        cfg.update(img_size=grid * patch, kernel_size=kernel)  # VideoMamba has no stride option
        if frames is not None:
            cfg["num_frames"] = frames
    else:
        family = _layout(src, notices)
        input_size = _ckpt_args(src.obj).get("input_size")
        sizes = list(dict.fromkeys(([input_size] if isinstance(input_size, int) else []) + [224]))
        cfg["img_size"], cfg["stride"] = _geometry(grid, patch, family == "middle", sizes)
    return family, cfg


# What a flat video checkpoint's shapes fix even when the caller names the model: official K400/SSv2 files
# differ only in these, and a named build at the registry's defaults could not load them.
_VIDEO_GEOMETRY = ("depth", "img_size", "num_frames", "kernel_size", "num_classes", "d_state")


def _named_video_geometry(name: str, sd: Mapping, src: _Source, notices: _Notices) -> dict:
    """For a named video model and video weights of its width: the overrides that build it at the weights'
    geometry (frames, image size, depth, classes). Anything else (image weights to inflate, another width)
    gets none: the inflation or the strict loader's report handles it."""
    if _family(name) != "video":
        return {}
    try:
        family, cfg = _shape_config(sd, src, None)
    except CheckpointError:
        return {}
    ref = _registered_config(name)
    if family != "video" or cfg["embed_dim"] != ref["embed_dim"]:
        return {}
    out = {k: cfg[k] for k in _VIDEO_GEOMETRY if k in cfg and ref.get(k) != cfg[k]}
    if out:
        notices.note(f"built {name} at the checkpoint's geometry: {', '.join(f'{k}={v}' for k, v in out.items())}")
    return out


def _closest_registered(family: str, cfg: dict) -> tuple[str, dict]:
    """The registered model of that family needing the fewest overrides to match ``cfg``, and those overrides.

    Ties go to the one with the same width, then the same depth, then the first registered.
    """
    def overrides(name):
        ref = _registered_config(name)
        return {k: v for k, v in cfg.items() if ref.get(k) != v}

    def score(name):
        diff = overrides(name)
        return -len(diff), "embed_dim" not in diff, "depth" not in diff
    best = max((n for n in list_models() if _family(n) == family), key=score)  # max keeps the first of equals
    return best, overrides(best)


def _looks_like(sd: Mapping, src: _Source) -> str | None:
    """For error messages: what the weights appear to be, or None."""
    foreign = _foreign_kind(sd)
    if foreign:
        return foreign
    try:
        return _describe(*_infer_config(sd, src, notices=None))
    except Exception:
        return None


# ============================================================================ strict loading
def _load_strict(model: nn.Module, sd: Mapping, src: _Source, what: str, raw_sd: Mapping):
    expected = model.state_dict()
    wrong = [f"{k}: expected {_shape(v)}, found {_shape(sd[k])}" for k, v in expected.items()
             if k in sd and sd[k].shape != v.shape]
    missing = [f"{k}: missing (expected {_shape(v)})" for k, v in expected.items() if k not in sd]
    extra = [f"{k}: unexpected (found {_shape(v)})" for k, v in sd.items() if k not in expected]
    if wrong or missing or extra:
        counts = ", ".join(f"{n} {label}" for n, label in
                           ((len(wrong), "with the wrong shape"), (len(missing), "missing"), (len(extra), "unexpected"))
                           if n)
        # Round-robin over the three kinds, so a listing shows e.g. both what is missing and what is extra.
        listed = [item for group in itertools.zip_longest(wrong, missing, extra) for item in group if item]
        lines = "\n  ".join(listed[:_MAX_LISTED])
        looks = _looks_like(raw_sd, src)
        hint = (f"\nThe checkpoint looks like {looks}." if looks else "") + \
            ("\nLoad it without name= to infer the architecture." if looks and "not a Vision Mamba" not in looks
             else "")
        raise CheckpointError(f"{src.label}: the weights do not fit {what} ({counts}):\n  {lines}{hint}")
    try:
        model.load_state_dict(sd, strict=True)
    except RuntimeError as e:  # e.g. a dtype that cannot be copied
        raise CheckpointError(f"{src.label}: could not load into {what}: {_first_line(e)}") from None


# ============================================================================ vimtr-written checkpoints
def _vimtr_record(src: _Source) -> dict | None:
    record = src.obj.get("vimtr")
    if record is None:
        return None
    ok = (isinstance(record, Mapping) and isinstance(record.get("model_name"), str)
          and isinstance(record.get("config", {}), Mapping))
    reduction = record.get("reduction") if isinstance(record, Mapping) else None
    ok = ok and (reduction is None or (isinstance(reduction, Mapping) and isinstance(reduction.get("method"), str)))
    if not ok:
        raise CheckpointError(f"{src.label}: malformed 'vimtr' record {record!r}: expected {{'model_name': str, "
                              f"'config': dict, 'reduction': None or {{'method': str, 'params': dict}}}}")
    return dict(record)


def _record_overrides(record: dict, src: _Source) -> tuple[str, dict]:
    try:
        name = canonical_name(record["model_name"])
    except ValueError as e:
        raise CheckpointError(f"{src.label}: written for model {record['model_name']!r}, which is not "
                              f"registered here: {e}") from None
    # Keep only what differs from the registry, so a full dumped config (model.config) rebuilds too.
    ref = _registered_config(name)
    return name, {k: v for k, v in (record.get("config") or {}).items() if ref.get(k, object()) != v}


# ============================================================================ the entry point
def build_from_checkpoint(checkpoint, name: str | None = None, use_ema: bool = False, **overrides) -> nn.Module:
    """A vimtr model (eval mode) with a checkpoint's weights: :func:`vimtr.load_model`'s arguments and result
    (see there), without re-applying the token reduction a vimtr-written checkpoint records, which stays in
    ``checkpoint_info['reduction']`` for the layer above (:mod:`vimtr.loading`). Failures: :class:`CheckpointError`.
    """
    src = _read(checkpoint)
    notices = _Notices()
    record = _vimtr_record(src)
    raw_sd = _state_dict(src, use_ema)
    sd = _drop_distill_head(raw_sd, notices)

    if name is not None:
        try:
            name = canonical_name(name)
        except ValueError as e:  # unknown name: the registry's message lists close matches
            raise CheckpointError(f"{src.label}: {e}") from None
    if record is not None:  # vimtr-written or bundled: the file says exactly what to build
        arch, cfg = _record_overrides(record, src)
        if name is not None and name != arch:
            raise CheckpointError(f"{src.label}: was written by vimtr for {arch}, not {name}; omit name=")
    elif name is None:
        arch, cfg = _infer_config(sd, src, notices)
    else:
        arch, cfg = name, _named_video_geometry(name, sd, src, notices)
    cfg.update(overrides)
    what = _describe(arch, cfg)
    try:
        model = create_model(arch, **cfg)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{src.label}: cannot build {what}: {e}") from None

    if name is not None:
        _check_declared_layout(src, model, notices)
    sd = inflate_image_weights(sd, model, notices)
    sd = resample_pos_embed(sd, model, notices)
    _load_strict(model, sd, src, what, raw_sd)
    model.eval()
    model.checkpoint_info = {"file": src.label, "format": src.fmt, "name": arch,
                             "inferred": name is None and record is None, "overrides": dict(cfg),
                             "description": what, "ema": use_ema,
                             "reduction": record.get("reduction") if record else None, "notices": notices.items,
                             "normalisation": record.get("normalisation") if record else None}
    logger.info("loaded %s (%s%s) as %s", src.label, src.fmt, ", EMA" if use_ema else "", what)
    return model
