"""Named configurations, ``create_model(name, **overrides)`` and ``list_models()`` (timm-style)."""
from __future__ import annotations

import difflib

from vimtr.models.videomamba import VideoMamba
from vimtr.models.vim import VisionMamba

# name -> (class, default config). Vim: middle class token, directions averaged (hustvl/Vim).
# VideoMamba image: class token first, directions summed; video adds frames (OpenGVLab/VideoMamba).
_VIM = dict(cls_position="middle", divide_out=True, patch_size=16, depth=24)
_VMI = dict(cls_position="first", divide_out=False, patch_size=16)
_VMV = dict(cls_position="first", divide_out=False, patch_size=16, num_frames=8, num_classes=400)
_REGISTRY: dict[str, tuple[type, dict]] = {
    "vim_tiny": (VisionMamba, dict(_VIM, embed_dim=192)),
    "vim_small": (VisionMamba, dict(_VIM, embed_dim=384)),
    "vim_base": (VisionMamba, dict(_VIM, embed_dim=768)),
    "vim_tiny_stride8": (VisionMamba, dict(_VIM, embed_dim=192, stride=8)),
    "vim_small_stride8": (VisionMamba, dict(_VIM, embed_dim=384, stride=8)),
    "videomamba_tiny": (VisionMamba, dict(_VMI, embed_dim=192, depth=24)),
    "videomamba_small": (VisionMamba, dict(_VMI, embed_dim=384, depth=24)),
    "videomamba_middle": (VisionMamba, dict(_VMI, embed_dim=576, depth=32)),
    "videomamba_base": (VisionMamba, dict(_VMI, embed_dim=768, depth=24)),
    "videomamba_video_tiny": (VideoMamba, dict(_VMV, embed_dim=192, depth=24)),
    "videomamba_video_small": (VideoMamba, dict(_VMV, embed_dim=384, depth=24)),
    "videomamba_video_middle": (VideoMamba, dict(_VMV, embed_dim=576, depth=32)),
    # Our small Vim for the bundled demo model (vimtr.load_model("vim_digits") has trained weights).
    "vim_digits": (VisionMamba, dict(_VIM, depth=12, embed_dim=48, img_size=32, patch_size=4, in_chans=1,
                                     num_classes=10, drop_path_rate=0.1)),
    # The default demo model: digits anywhere on a cluttered 48×48 canvas, 144 patch tokens
    # (vimtr.load_model("vim_digits_clutter"); data spec "digits-clutter").
    "vim_digits_clutter": (VisionMamba, dict(_VIM, depth=12, embed_dim=48, img_size=48, patch_size=4, in_chans=1,
                                             num_classes=10, drop_path_rate=0.1)),
}

_SUFFIX = "bimambav2_final_pool_mean_abs_pos_embed_with_midclstok_div2"
ALIASES = {
    f"vim_tiny_patch16_224_{_SUFFIX}": "vim_tiny",
    f"vim_small_patch16_224_{_SUFFIX}": "vim_small",
    "vim_base_patch16_224_bimambav2_final_pool_mean_abs_pos_embed_with_middle_cls_token_div2": "vim_base",
    f"vim_tiny_patch16_stride8_224_{_SUFFIX}": "vim_tiny_stride8",
    f"vim_small_patch16_stride8_224_{_SUFFIX}": "vim_small_stride8",
}

OVERRIDES = ("depth", "embed_dim", "img_size", "patch_size", "stride", "num_classes", "in_chans", "d_state",
             "drop_rate", "drop_path_rate", "num_frames", "kernel_size", "fc_drop_rate", "norm_eps")


def list_models(include_aliases: bool = False) -> list[str]:
    names = list(_REGISTRY)
    return names + list(ALIASES) if include_aliases else names


def canonical_name(name: str) -> str:
    name = ALIASES.get(name, name)
    if name not in _REGISTRY:
        near = difflib.get_close_matches(name, list(_REGISTRY) + list(ALIASES), n=3)
        hint = f" Did you mean {', '.join(near)}?" if near else ""
        raise ValueError(f"unknown model {name!r}.{hint} Registered models: {', '.join(_REGISTRY)}")
    return name


def model_config(name: str, **overrides) -> tuple[type, dict]:
    cls, cfg = _REGISTRY[canonical_name(name)]
    bad = sorted(set(overrides) - set(OVERRIDES))
    if bad:
        raise TypeError(f"create_model({name!r}): unknown override(s) {bad}; valid: {', '.join(OVERRIDES)}")
    if cls is VisionMamba and {"num_frames", "kernel_size"} & set(overrides):
        raise TypeError(f"{name} is an image model: num_frames/kernel_size apply to videomamba_video_* models")
    return cls, {**cfg, **overrides}


def create_model(name: str, **overrides):
    """Build a registered model (random official init). ``overrides`` change its configuration."""
    cls, cfg = model_config(name, **overrides)
    model = cls(**cfg)
    model.model_name = canonical_name(name)
    model.config = {k: v for k, v in cfg.items()}
    return model
