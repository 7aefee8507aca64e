"""Adapting checkpoint weights to the model being built (for :mod:`vimtr.models.checkpoint`): image weights
inflated into a video model, the position embedding resampled to another image size. ``notices`` collects
what was changed (``.note``/``.warn``)."""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from vimtr.models.videomamba import VideoMamba


def shape_text(t) -> str:
    return str(tuple(t.shape)) if isinstance(t, torch.Tensor) else type(t).__name__


def inflate_image_weights(sd: dict, model: nn.Module, notices) -> dict:
    """Image weights into a video model, as VideoMamba's ``inflate_weight``: 2-D kernel in the centre slice."""
    weight, target = sd.get("patch_embed.proj.weight"), model.patch_embed.proj.weight
    if not (isinstance(model, VideoMamba) and weight is not None and weight.dim() == 4 and target.dim() == 5):
        return sd
    sd = dict(sd)
    frames = target.shape[2]
    inflated = weight.new_zeros(weight.shape[:2] + (frames,) + weight.shape[2:])
    inflated[:, :, frames // 2] = weight
    sd["patch_embed.proj.weight"] = inflated
    notices.note(f"inflated the 2-D patch embedding {shape_text(weight)} into the centre temporal slice of the 3-D "
                 f"kernel {shape_text(inflated)}")
    if "temporal_pos_embedding" not in sd:
        sd["temporal_pos_embedding"] = model.temporal_pos_embedding.detach().clone()  # zeros at construction
        notices.warn("the image checkpoint has no temporal_pos_embedding: it stays zero")
    own_head = {k: v for k, v in model.state_dict().items() if k.startswith("head.")}
    ckpt_head = {k: v for k, v in sd.items() if k.startswith("head.")}
    if ckpt_head and {k: v.shape for k, v in ckpt_head.items()} != {k: v.shape for k, v in own_head.items()}:
        sd = {k: v for k, v in sd.items() if not k.startswith("head.")}
        sd.update({k: v.clone() for k, v in own_head.items()})
        notices.warn(f"dropped the checkpoint's head ({shape_text(ckpt_head.get('head.weight'))}): it does not fit "
                     f"num_classes={model.num_classes}; the head keeps its random initialisation")
    return sd


def resample_pos_embed(sd: dict, model: nn.Module, notices) -> dict:
    """Bicubic resample of the patch rows of pos_embed to the model's grid; the class row is kept aside.

    Vim's class row sits at M//2 (M = patch count), VideoMamba's at 0, so it is taken out before the
    resample and put back at the new M'//2 (or 0). For video models pos_embed is the spatial one.
    """
    pos, target = sd.get("pos_embed"), model.pos_embed
    if pos is None or pos.shape == target.shape or pos.dim() != 3 or pos.shape[-1] != target.shape[-1]:
        return sd  # nothing to do, or a mismatch the strict check reports
    old_m, new_m = pos.shape[1] - 1, target.shape[1] - 1
    old_grid, new_grid = math.isqrt(old_m), list(model.patch_embed.grid_size)
    if old_grid * old_grid != old_m or new_grid[0] * new_grid[1] != new_m:
        return sd
    middle = model.cls_position == "middle"
    old_i, new_i = (old_m // 2, new_m // 2) if middle else (0, 0)
    cls_row = pos[:, old_i:old_i + 1]
    rows = torch.cat((pos[:, :old_i], pos[:, old_i + 1:]), dim=1)
    # antialias=False: the official fine-tune code (Vim main.py, VideoMamba) calls F.interpolate(bicubic) plainly.
    from timm.layers import resample_abs_pos_embed  # here: timm (and torchvision) take ~2 s to import
    rows = resample_abs_pos_embed(rows, new_size=new_grid, old_size=[old_grid, old_grid], num_prefix_tokens=0,
                                  interpolation="bicubic", antialias=False)
    sd = dict(sd)
    sd["pos_embed"] = torch.cat((rows[:, :new_i], cls_row, rows[:, new_i:]), dim=1)
    notices.note(f"pos_embed resampled (bicubic) from a {old_grid}x{old_grid} to a {new_grid[0]}x{new_grid[1]} "
                 f"patch grid; class row kept at index {new_i}")
    return sd
