"""Segmenter's decoders. Both map patch tokens to per-token class logits, then to the patch grid.

When the encoder reduced the tokens, the decoder runs on the reduced tokens and ``MergeState.to_grid``
sends its per-token outputs back to the patch grid (an index gather, a reduced grid or a weighted map):
the one seam between token reduction and decoding.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from timm.layers import trunc_normal_

from tokred.state import MergeState
from segm.model.vit import drop_path_rates, init_weights, make_block


def tokens_to_grid(
    y: torch.Tensor, grid: tuple[int, int], state: MergeState | None = None
) -> torch.Tensor:
    """Per-token outputs (B, T, K) -> (B, K, gh, gw), through ``state`` when the encoder reduced the tokens."""
    if state is not None:
        return state.to_grid(y)
    B, N, K = y.shape
    if N != grid[0] * grid[1]:
        raise ValueError(f"{N} patch outputs do not fill a {grid[0]}x{grid[1]} grid")
    return y.transpose(1, 2).reshape(B, K, grid[0], grid[1])


class DecoderLinear(nn.Module):
    """A linear classifier on every patch token."""

    def __init__(self, n_cls: int, patch_size: int, d_encoder: int):
        super().__init__()
        self.n_cls = n_cls
        self.patch_size = patch_size
        self.d_encoder = d_encoder
        self.head = nn.Linear(d_encoder, n_cls)
        self.apply(init_weights)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return set()

    def token_logits(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits per token: (B, T, D) -> (B, T, K)."""
        return self.head(x)

    def forward(
        self, x: torch.Tensor, im_size: tuple[int, int], state: MergeState | None = None
    ) -> torch.Tensor:
        grid = (im_size[0] // self.patch_size, im_size[1] // self.patch_size)
        return tokens_to_grid(self.token_logits(x), grid, state)


class MaskTransformer(nn.Module):
    """Segmenter's mask transformer: learned class embeddings decoded jointly with the patch tokens.

    Masks are the scalar products of L2-normalised patch and class embeddings, normalised over
    classes by ``mask_norm``.
    """

    def __init__(
        self,
        n_cls: int,
        patch_size: int,
        d_encoder: int,
        n_layers: int,
        n_heads: int,
        d_model: int,
        d_ff: int,
        drop_path_rate: float,
        dropout: float,
    ):
        super().__init__()
        self.n_cls = n_cls
        self.patch_size = patch_size
        self.d_encoder = d_encoder
        self.n_layers = n_layers
        self.d_model = d_model
        self.d_ff = d_ff
        self.scale = d_model**-0.5

        rates = drop_path_rates(drop_path_rate, n_layers)
        self.blocks = nn.ModuleList(
            [make_block(d_model, n_heads, d_ff, dropout, rates[i]) for i in range(n_layers)]
        )
        self.cls_emb = nn.Parameter(torch.randn(1, n_cls, d_model))
        self.proj_dec = nn.Linear(d_encoder, d_model)
        self.proj_patch = nn.Parameter(self.scale * torch.randn(d_model, d_model))
        self.proj_classes = nn.Parameter(self.scale * torch.randn(d_model, d_model))
        self.decoder_norm = nn.LayerNorm(d_model)
        self.mask_norm = nn.LayerNorm(n_cls)

        self.apply(init_weights)
        trunc_normal_(self.cls_emb, std=0.02)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return {"cls_emb"}

    def token_logits(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised class masks per token: (B, T, D_enc) -> (B, T, K)."""
        x = self.proj_dec(x)
        x = torch.cat((x, self.cls_emb.expand(x.shape[0], -1, -1)), dim=1)
        for blk in self.blocks:
            x = blk(x)
        x = self.decoder_norm(x)
        patches, classes = x[:, : -self.n_cls], x[:, -self.n_cls :]
        patches = patches @ self.proj_patch
        classes = classes @ self.proj_classes
        patches = patches / patches.norm(dim=-1, keepdim=True)
        classes = classes / classes.norm(dim=-1, keepdim=True)
        return self.mask_norm(patches @ classes.transpose(1, 2))

    def forward(
        self, x: torch.Tensor, im_size: tuple[int, int], state: MergeState | None = None
    ) -> torch.Tensor:
        grid = (im_size[0] // self.patch_size, im_size[1] // self.patch_size)
        return tokens_to_grid(self.token_logits(x), grid, state)
