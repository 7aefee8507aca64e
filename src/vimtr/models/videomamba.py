"""VideoMamba (OpenGVLab) video models: frame-major tokens, spatial + temporal position embeddings.

The image VideoMamba models are :class:`vimtr.models.vim.VisionMamba` with the class token first and
the two scan directions summed (see the registry). The video model differs only in its embedding:
a Conv3d tubelet patchify, a spatial ``pos_embed`` (1, 1+HW, C) shared by all frames, a
``temporal_pos_embedding`` (1, T, C), and one class token in front of T·HW frame-major patch tokens.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from vimtr.models.vim import VisionMamba


class PatchEmbed3D(nn.Module):
    def __init__(self, img_size=224, patch_size=16, kernel_size=1, in_chans=3, embed_dim=192):
        super().__init__()
        self.img_size = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
        self.grid_size = tuple(s // patch_size for s in self.img_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1]  # per frame
        self.in_chans, self.tubelet_size = in_chans, kernel_size
        self.proj = nn.Conv3d(in_chans, embed_dim, kernel_size=(kernel_size, patch_size, patch_size),
                              stride=(kernel_size, patch_size, patch_size))

    def forward(self, x):
        return self.proj(x)  # (B, C, T', H', W')


class VideoMamba(VisionMamba):
    def __init__(self, num_frames=8, kernel_size=1, **kwargs):
        self.num_frames, self.kernel_size = num_frames, kernel_size
        kwargs.setdefault("cls_position", "first")
        kwargs.setdefault("divide_out", False)
        if kwargs["cls_position"] != "first":
            raise ValueError("VideoMamba video models put the class token first")
        kwargs.pop("stride", None)
        super().__init__(**kwargs)
        self.temporal_pos_embedding = nn.Parameter(torch.zeros(1, num_frames // kernel_size, self.embed_dim))

    def _make_patch_embed(self, img_size, patch_size, stride, in_chans, embed_dim):
        return PatchEmbed3D(img_size, patch_size, self.kernel_size, in_chans, embed_dim)

    @property
    def num_tokens(self) -> int:
        return 1 + (self.num_frames // self.kernel_size) * self.num_patches

    @property
    def input_size(self) -> tuple:
        return (self.patch_embed.in_chans, self.num_frames, *self.patch_embed.img_size)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        x = self.patch_embed(x)
        B, C, T, H, W = x.shape
        x = x.permute(0, 2, 3, 4, 1).reshape(B, T, H * W, C)
        # Officially the class token is prepended to every frame, given pos_embed[0], and one copy kept;
        # all copies are equal, so we add pos_embed[0] to it once.
        cls = (self.cls_token + self.pos_embed[:, :1]).expand(B, -1, -1)
        x = x + self.pos_embed[:, 1:].unsqueeze(1)  # spatial, shared by all frames
        x = x + self.temporal_pos_embedding.unsqueeze(2)  # (1, T, 1, C): one row per frame
        x = torch.cat((cls, x.reshape(B, T * H * W, C)), dim=1)
        return self.pos_drop(x)
