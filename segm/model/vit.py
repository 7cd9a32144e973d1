"""ViT encoder built from timm ``Block``s, with the parameter names of the official Segmenter checkpoints."""

from __future__ import annotations

import math
from functools import partial
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import trunc_normal_
from timm.models.vision_transformer import Block

from tokred.blocks import run_block
from tokred.errors import UsageError
from tokred.reducer import Pure, TokenReducer
from tokred.state import MergeState


def init_weights(module: nn.Module) -> None:
    """Segmenter's initialisation: truncated-normal (std 0.02) linear weights, zero biases, unit LayerNorms."""
    if isinstance(module, nn.Linear):
        trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


def make_block(dim: int, n_heads: int, d_ff: int, dropout: float, drop_path: float) -> Block:
    """A pre-norm timm ``Block`` configured like Segmenter's: qkv bias, exact GELU, LayerNorm eps 1e-5.

    ``dropout`` acts on the attention probabilities, after the attention projection and twice in the MLP,
    exactly where Segmenter applies it.
    """
    return Block(
        dim=dim,
        num_heads=n_heads,
        mlp_ratio=d_ff / dim,
        qkv_bias=True,
        proj_drop=dropout,
        attn_drop=dropout,
        drop_path=drop_path,
        norm_layer=partial(nn.LayerNorm, eps=1e-5),
        act_layer=nn.GELU,
    )


def drop_path_rates(rate: float, n_layers: int) -> list[float]:
    """Stochastic-depth rate of each layer: ``linspace(0, rate, n_layers)`` (computed on the CPU)."""
    return torch.linspace(0, rate, n_layers, device="cpu").tolist()


def resize_pos_embed(
    pos_embed: torch.Tensor,
    grid_old: Sequence[int] | None,
    grid_new: Sequence[int],
    n_extra: int,
) -> torch.Tensor:
    """Resize a ``[1, n_extra + gh*gw, D]`` position embedding to another grid.

    The extra-token embeddings are kept; the grid part is resized bilinearly (align_corners=False,
    no antialias), as the reference does. ``grid_old=None`` means a square grid.
    """
    tokens, grid = pos_embed[:, :n_extra], pos_embed[0, n_extra:]
    if grid_old is None:
        side = int(math.sqrt(grid.shape[0]))
        grid_old = (side, side)
    gh_old, gw_old = grid_old
    if gh_old * gw_old != grid.shape[0]:
        raise ValueError(
            f"position embedding has {grid.shape[0]} grid entries, not {gh_old}x{gw_old}"
        )
    gh, gw = grid_new
    grid = grid.reshape(1, gh_old, gw_old, -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=(gh, gw), mode="bilinear", align_corners=False, antialias=False)
    grid = grid.permute(0, 2, 3, 1).reshape(1, gh * gw, -1)
    return torch.cat([tokens, grid], dim=1)


class PatchEmbedding(nn.Module):
    """Non-overlapping ``P x P`` patches projected by a strided convolution."""

    def __init__(self, image_size: Sequence[int], patch_size: int, embed_dim: int, channels: int):
        super().__init__()
        if image_size[0] % patch_size or image_size[1] % patch_size:
            raise UsageError(
                f"image_size {tuple(image_size)} is not a multiple of the patch size {patch_size}"
            )
        self.image_size = tuple(image_size)
        self.patch_size = patch_size
        self.grid_size = (image_size[0] // patch_size, image_size[1] // patch_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.proj = nn.Conv2d(channels, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, im: torch.Tensor) -> torch.Tensor:
        return self.proj(im).flatten(2).transpose(1, 2)


class VisionTransformer(nn.Module):
    """Segmenter's ViT encoder: ``[cls, (dist), patches] + pos_embed`` through timm Blocks and a final norm.

    Inputs must be multiples of the patch size (the Segmenter pads them); the position embedding is
    resized on the fly to any grid, square or not.
    """

    def __init__(
        self,
        image_size: Sequence[int] | int,
        patch_size: int,
        n_layers: int,
        d_model: int,
        d_ff: int,
        n_heads: int,
        n_cls: int = 1000,
        dropout: float = 0.1,
        drop_path_rate: float = 0.0,
        distilled: bool = False,
        channels: int = 3,
    ):
        super().__init__()
        if isinstance(image_size, int):
            image_size = (image_size, image_size)
        self.patch_embed = PatchEmbedding(image_size, patch_size, d_model, channels)
        self.patch_size = patch_size
        self.n_layers = n_layers
        self.d_model = d_model
        self.d_ff = d_ff
        self.n_heads = n_heads
        self.n_cls = n_cls
        self.distilled = bool(distilled)
        self.num_prefix_tokens = 1 + self.distilled
        self.dropout = nn.Dropout(dropout)

        self.cls_token = nn.Parameter(torch.zeros(1, 1, d_model))
        if self.distilled:
            self.dist_token = nn.Parameter(torch.zeros(1, 1, d_model))
        self.pos_embed = nn.Parameter(
            torch.zeros(1, self.num_prefix_tokens + self.patch_embed.num_patches, d_model)
        )
        if self.distilled:
            self.head_dist = nn.Linear(d_model, n_cls)

        rates = drop_path_rates(drop_path_rate, n_layers)
        self.blocks = nn.ModuleList(
            [make_block(d_model, n_heads, d_ff, dropout, rates[i]) for i in range(n_layers)]
        )
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, n_cls)
        self.reducer: TokenReducer = Pure()

        trunc_normal_(self.pos_embed, std=0.02)
        trunc_normal_(self.cls_token, std=0.02)
        if self.distilled:
            trunc_normal_(self.dist_token, std=0.02)
        self.apply(init_weights)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return {"pos_embed", "cls_token", "dist_token"}

    def pos_embed_for(self, grid: tuple[int, int]) -> torch.Tensor:
        """The position embedding for a ``gh x gw`` patch grid (resized when it differs from training)."""
        if grid == self.patch_embed.grid_size:
            return self.pos_embed
        return resize_pos_embed(self.pos_embed, self.patch_embed.grid_size, grid, self.num_prefix_tokens)

    def prefix_tokens(self, batch: int) -> torch.Tensor:
        """The class (and distillation) tokens of a batch, (B, num_prefix_tokens, D), before position embedding."""
        prefix = [self.cls_token.expand(batch, -1, -1)]
        if self.distilled:
            prefix.append(self.dist_token.expand(batch, -1, -1))
        return torch.cat(prefix, dim=1)

    def embed(self, im: torch.Tensor) -> torch.Tensor:
        """Patch tokens with the prefix tokens prepended and the position embedding added."""
        B, _, H, W = im.shape
        P = self.patch_size
        if H % P or W % P:
            raise UsageError(f"input size {H}x{W} is not a multiple of the patch size {P}; pad it first")
        x = torch.cat([self.prefix_tokens(B), self.patch_embed(im)], dim=1)
        return self.dropout(x + self.pos_embed_for((H // P, W // P)))

    def forward_tokens(self, im: torch.Tensor) -> tuple[torch.Tensor, MergeState]:
        """All output tokens (prefix included, after the final norm) and the token-reduction state.

        The encoder's ``reducer`` (``Pure`` unless a patch type is applied) builds the input tokens and
        their ``MergeState``, its blocks reduce them, and it may act on the normed output.
        """
        reducer = self.reducer
        x, state = reducer.start(self, im)
        for blk in self.blocks:
            x = run_block(blk, x, state)
        return reducer.finish(self, self.norm(x), state), state

    def forward(self, im: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        """Output tokens if ``return_features``, otherwise the ImageNet logits (mean of both heads if distilled)."""
        x, _ = self.forward_tokens(im)
        if return_features:
            return x
        logits = self.head(x[:, 0])
        if self.distilled:
            logits = (logits + self.head_dist(x[:, 1])) / 2
        return logits
