"""Vision Mamba (hustvl/Vim) and the image VideoMamba, which shares its structure.

One class serves both: Vim puts the class token in the middle of the patch sequence (index M//2) and
averages the two scan directions; VideoMamba's image models put it first and sum the directions.
Parameter names are the official ones, so official state dicts load untouched.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from vimtr.models.layers import Block, DropPath, PatchEmbed, RMSNorm
from vimtr.models.token_state import TokenState


def trunc_normal_(tensor: torch.Tensor, std: float = 1.0, a: float = -2.0, b: float = 2.0) -> torch.Tensor:
    """Normal(0, std²) truncated to [a, b] (absolute bounds), by the inverse-CDF method timm's
    ``trunc_normal_`` uses: the same values as timm for the same random state (torch's own sampler draws
    differently), so a seeded ``create_model`` initialises exactly as the official code."""
    def cdf(x):
        return (1.0 + math.erf(x / math.sqrt(2.0))) / 2.0

    with torch.no_grad():
        tensor.uniform_(2 * cdf(a / std) - 1, 2 * cdf(b / std) - 1)
        tensor.erfinv_().mul_(std * math.sqrt(2.0)).add_(0.0)
        return tensor.clamp_(min=a, max=b)


def lecun_normal_(tensor: torch.Tensor) -> torch.Tensor:
    """timm's ``lecun_normal_``: a standard normal truncated to ±2, scaled to variance 1 / fan_in
    (0.8796 is the standard deviation of that truncated normal)."""
    fan_in = tensor[0].numel()  # input channels × kernel size, of an (out, in, *kernel) weight
    with torch.no_grad():
        trunc_normal_(tensor)
        return tensor.mul_(math.sqrt(1.0 / fan_in) / 0.87962566103423978).add_(0.0)


class VisionMamba(nn.Module):
    # A reduction step's row map for hidden and residual may go into the next block's add + RMSNorm (see
    # TokenState.fuse_merge). False: every reduction is applied by the reducer itself.
    fuse_merges = True

    def __init__(self, img_size=224, patch_size=16, stride=None, depth=24, embed_dim=192, d_state=16,
                 in_chans=3, num_classes=1000, drop_rate=0.0, drop_path_rate=0.1, norm_eps=1e-5,
                 cls_position="middle", divide_out=True, fc_drop_rate=0.0):
        super().__init__()
        if cls_position not in ("middle", "first"):
            raise ValueError(f"cls_position must be 'middle' or 'first', got {cls_position!r}")
        stride = patch_size if stride is None else stride
        self.num_classes = num_classes
        self.embed_dim = self.num_features = embed_dim
        self.depth, self.d_state, self.cls_position = depth, d_state, cls_position
        self.patch_embed = self._make_patch_embed(img_size, patch_size, stride, in_chans, embed_dim)
        self.num_patches = self.patch_embed.num_patches
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, self._pos_len(), embed_dim))
        self.pos_drop = nn.Dropout(drop_rate)
        self.head_drop = nn.Dropout(fc_drop_rate) if fc_drop_rate > 0 else nn.Identity()
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        self.layers = nn.ModuleList(
            Block(embed_dim, d_state=d_state, norm_eps=norm_eps, divide_out=divide_out) for _ in range(depth))
        self.set_drop_path(drop_path_rate)
        self.norm_f = RMSNorm(embed_dim, eps=norm_eps)
        self.reducer = None  # see vimtr.models.token_state: the one hook token reduction uses
        self._init_weights()

    def set_drop_path(self, rate: float):
        """Stochastic depth for training: block i drops its branch with probability rate·i/(depth−1) (the
        official linear schedule), the final add with ``rate``. Rate 0 puts identities in, so training also
        takes the fused CPU add + RMSNorm. Changes nothing at inference; ``config`` keeps the built rate."""
        if not 0.0 <= rate < 1.0:
            raise ValueError(f"drop-path rate must be in [0, 1), got {rate!r}")
        for block, r in zip(self.layers, torch.linspace(0, rate, len(self.layers)).tolist()):
            block.drop_path = DropPath(r) if r > 0 else nn.Identity()
        self.drop_path = DropPath(rate) if rate > 0 else nn.Identity()

    # ---------------------------------------------------------------- pieces a subclass may replace
    def _make_patch_embed(self, img_size, patch_size, stride, in_chans, embed_dim):
        return PatchEmbed(img_size, patch_size, stride, in_chans, embed_dim)

    def _pos_len(self) -> int:
        return self.num_patches + 1

    @property
    def initial_cls_index(self) -> int:
        return self.num_patches // 2 if self.cls_position == "middle" else 0

    @property
    def input_size(self) -> tuple:
        """The (C, H, W) this model takes."""
        return (self.patch_embed.in_chans, *self.patch_embed.img_size)

    def check_input(self, x: torch.Tensor):
        expected = self.input_size
        if x.dim() != len(expected) + 1 or tuple(x.shape[1:]) != expected:
            raise ValueError(f"{type(self).__name__} expects input of shape (batch, {', '.join(map(str, expected))})"
                             f", got {tuple(x.shape)}; resize/crop with vimtr.data.eval_transform(model) or "
                             f"build the model with img_size=... (and load_model(..., img_size=...) to "
                             f"interpolate the position embedding)")

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Patch embedding, class token inserted at :attr:`initial_cls_index`, position embedding added."""
        self.check_input(x)
        x = self.patch_embed(x)
        pos = self.initial_cls_index
        cls = self.cls_token.expand(x.shape[0], -1, -1)
        x = torch.cat((x[:, :pos], cls, x[:, pos:]), dim=1)
        return self.pos_drop(x + self.pos_embed)

    # ---------------------------------------------------------------- init (official scheme)
    def _init_weights(self):
        trunc_normal_(self.pos_embed, std=0.02)
        if self.cls_position == "middle":
            trunc_normal_(self.cls_token, std=0.02)
        for m in (self.patch_embed, self.head):
            for mod in m.modules():
                if isinstance(mod, nn.Linear):
                    trunc_normal_(mod.weight, std=0.02)
                    nn.init.zeros_(mod.bias)
                elif isinstance(mod, (nn.Conv2d, nn.Conv3d)):
                    lecun_normal_(mod.weight)
                    nn.init.zeros_(mod.bias)
        for layer in self.layers:  # GPT-2 style: zero Linear biases (but dt), rescale out_proj
            for mod in layer.modules():
                if isinstance(mod, nn.Linear) and mod.bias is not None and not getattr(mod.bias, "_no_reinit", False):
                    nn.init.zeros_(mod.bias)
            w = layer.mixer.out_proj.weight
            nn.init.kaiming_uniform_(w, a=math.sqrt(5))
            with torch.no_grad():
                w /= math.sqrt(self.depth)

    def no_weight_decay(self):
        return {"pos_embed", "cls_token", "temporal_pos_embedding"}

    # ---------------------------------------------------------------- forward
    def forward_tokens(self, x: torch.Tensor) -> TokenState:
        """Run the blocks; returns the final state, ``state.hidden`` being the ``norm_f`` output (B, L, C)."""
        # fuse_merge: each Block takes a reducer's pending row map into its add + RMSNorm (TokenState).
        state = TokenState(hidden=self.embed(x), residual=None, cls_index=self.initial_cls_index,
                           fuse_merge=self.fuse_merges)
        reducer = self.reducer
        for i, layer in enumerate(self.layers):
            if reducer is not None:
                state = reducer(i, state)
            state.hidden, state.residual, aux = layer(state.hidden, state.residual, want_aux=state.requests,
                                                      row_map=state.pending, decay_steps=state.decay_steps())
            state.aux, state.pending, state.requests = aux or {}, None, frozenset()
        residual = state.residual + self.drop_path(state.hidden).float()
        state.hidden = self.norm_f(residual, out_dtype=state.hidden.dtype)
        state.residual, state.aux = residual, {}
        if reducer is not None and hasattr(reducer, "finish"):
            reducer.finish(self, state)
        return state

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The class-token features: ``norm_f`` output at the class token's (final) index, (B, C)."""
        state = self.forward_tokens(x)
        return state.hidden[:, state.cls_index]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.head_drop(self.forward_features(x)))
