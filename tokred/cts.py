"""CTS, content-aware token sharing (Lu, de Geus, Dubbelman, CVPR 2023): one token per uniform superpatch.

Before the first block, the model's policy network scores every 2 x 2 superpatch (32 x 32 pixels at
patch 16); per image the ``num_shared`` superpatches with the highest share score,
``softmax(logits.float(), dim=1)[:, 1]`` in raster order, are ranked by a **stable** descending sort
(ties keep raster order) and each becomes one token: its 16 x 16 patch of the image downsampled by 0.5
(bilinear, align_corners False, i.e. the 2 x 2 mean), embedded by the same patch-embedding convolution,
with the same 0.5 downsampling of the (grid-resized) position embedding. The sequence is
``[cls, (dist), non-shared patches in raster order, shared tokens in raster order of their cells]``;
the blocks run unchanged and every patch of a shared superpatch receives its token's decoder output
through the merge state's index map. Unlike the published code, any grid of even size works (inputs are
padded to a multiple of twice the patch size), non-square inputs included.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from tokred.errors import UsageError
from tokred.options import Option, integer
from tokred.precision import fp32_island
from tokred.profiling import section
from tokred.reducer import TokenReducer, vit_encoder_of
from tokred.state import MergeState


def optional_count(name: str) -> Any:
    """A check for ``None`` or an int >= 0."""
    check = integer(name, 0)
    return lambda value: None if value is None else check(value)


@fp32_island
def share_ranking(logits: torch.Tensor) -> torch.Tensor:
    """Superpatch cells (B, h2 * w2) from most to least shareable; ties keep raster order."""
    scores = torch.softmax(logits.float(), dim=1)[:, 1].flatten(1)
    return scores.argsort(dim=1, descending=True, stable=True)


@fp32_island
def policy_logits(policy: nn.Module, im: torch.Tensor) -> torch.Tensor:
    """The policy network's shareability logits, in fp32 under autocast: they rank the superpatches, a
    decision like every other method's (and a depthwise-convolution network in emulated bf16 is slow)."""
    return policy(im)["logits"]


def to_patches(im: torch.Tensor, patch: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, gh * gw, C, patch, patch) in raster order."""
    B, C, H, W = im.shape
    gh, gw = H // patch, W // patch
    return im.reshape(B, C, gh, patch, gw, patch).permute(0, 2, 4, 1, 3, 5).reshape(B, gh * gw, C, patch, patch)


def sharing_layout(ranking: torch.Tensor, grid: tuple[int, int], num_shared: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Which patches stay and which cells are shared, and every patch's row among the patch tokens.

    Returns ``kept`` (B, N - 4S) patch indices ascending, ``shared`` (B, S) cell indices ascending and
    ``rows`` (B, N): the token of every patch (kept patches first, then shared cells).
    """
    B = ranking.shape[0]
    gh, gw = grid
    device = ranking.device
    cell_of = ((torch.arange(gh, device=device) // 2)[:, None] * (gw // 2) + (torch.arange(gw, device=device) // 2)[None]).flatten()
    shared = ranking[:, :num_shared].sort(dim=1).values
    is_shared = torch.zeros(B, ranking.shape[1], dtype=torch.bool, device=device)
    is_shared.scatter_(1, shared, torch.ones_like(shared, dtype=torch.bool))
    patch_shared = is_shared[:, cell_of]
    n_kept = gh * gw - 4 * num_shared
    kept = torch.where(patch_shared, gh * gw, torch.arange(gh * gw, device=device)).sort(dim=1).values[:, :n_kept]
    shared_rank = torch.full_like(is_shared, -1, dtype=torch.long)
    shared_rank.scatter_(1, shared, torch.arange(num_shared, device=device).expand(B, -1))
    kept_rank = (~patch_shared).long().cumsum(dim=1) - 1
    rows = torch.where(patch_shared, n_kept + shared_rank[:, cell_of], kept_rank)
    return kept, shared, rows


class TokenSharing(TokenReducer):
    """CTS: the policy network's most shareable superpatches enter the encoder as one token each."""

    name = "cts"
    summary = "CTS: a policy network picks 2x2 superpatches that share one token (Lu et al., CVPR 2023)"
    options = (
        Option("num_shared", None, "Superpatches shared per image (default: the model's policy schedule).",
               optional_count("num_shared"), value_type=int, flag="--num-tokens-shared"),
        Option("num_not_shared", None, "Patches left unshared; only checked (it is N - 4 x num_shared).",
               optional_count("num_not_shared"), value_type=int, flag="--num-tokens-notshared",
               derived=True),
    )
    model_parts = ("policy_net",)

    @classmethod
    def target(cls, model: nn.Module) -> nn.Module:
        encoder = vit_encoder_of(model, cls.name)
        if getattr(model, "policy_net", None) is None:
            raise UsageError("patch type 'cts' needs a model with a policy network: train one with "
                             "python -m segm.policy.train and build the model with --policynet-ckpt")
        return encoder

    @classmethod
    def sweep(cls, encoder: nn.Module) -> list[dict[str, Any]]:
        """About 10, 20 and 30 % of the patch tokens removed (S shared cells remove 3S tokens)."""
        gh, gw = encoder.patch_embed.grid_size
        return [{"num_shared": round(share * gh * gw / 3)} for share in (0.1, 0.2, 0.3)]

    def bind(self, model: nn.Module) -> None:
        self.model = model
        self.policy = model.policy_net
        schedule = getattr(model, "policy_schedule", None)
        if self.config["num_shared"] is None:
            if schedule is None:
                raise UsageError("cts: give num_shared (--num-tokens-shared); the model records no policy schedule")
            self.config["num_shared"] = int(schedule[1])

    def prepare(self, encoder: nn.Module) -> None:
        gh, gw = encoder.patch_embed.grid_size
        cells = (gh // 2) * (gw // 2)
        shared = self.config["num_shared"]
        if shared > cells:
            raise UsageError(f"num_shared {shared} is more than the {cells} superpatches of the {gh}x{gw} patch grid")
        not_shared = gh * gw - 4 * shared
        if self.config["num_not_shared"] not in (None, not_shared):
            raise UsageError(f"num_not_shared {self.config['num_not_shared']} does not match num_shared {shared} on the "
                             f"{gh}x{gw} grid: {gh * gw} - 4 x {shared} = {not_shared}")
        self.config["num_not_shared"] = not_shared

    def apply(self, encoder: nn.Module) -> None:
        """Record the schedule on the model, as CTS's ``policy_schedule`` (not shared, shared)."""
        self.model.policy_schedule = (self.config["num_not_shared"], self.config["num_shared"])

    def input_multiple(self, encoder: nn.Module) -> int:
        return 2 * encoder.patch_size

    def start(self, encoder: nn.Module, im: torch.Tensor) -> tuple[torch.Tensor, MergeState]:
        P = encoder.patch_size
        B, _, H, W = im.shape
        if H % (2 * P) or W % (2 * P):
            raise UsageError(f"token sharing needs an input that is a multiple of {2 * P}, got {H}x{W}")
        grid = (H // P, W // P)
        shared_count = self.config["num_shared"]
        if shared_count > (grid[0] // 2) * (grid[1] // 2):
            raise UsageError(f"num_shared {shared_count} is more than the superpatches of a {H}x{W} input")
        with torch.no_grad():
            logits = policy_logits(self.policy, im)
            with section("share"):
                kept, shared, rows = sharing_layout(share_ranking(logits), grid, shared_count)
        C = im.shape[1]
        half = F.interpolate(im, scale_factor=0.5, mode="bilinear", align_corners=False, recompute_scale_factor=False)
        pieces = torch.cat([to_patches(im, P).gather(1, kept[:, :, None, None, None].expand(-1, -1, C, P, P)),
                            to_patches(half, P).gather(1, shared[:, :, None, None, None].expand(-1, -1, C, P, P))], 1)
        strip = pieces.permute(0, 2, 3, 1, 4).reshape(B, C, P, pieces.shape[1] * P)
        tokens = encoder.patch_embed(strip)
        pos = encoder.pos_embed_for(grid)
        n_prefix = encoder.num_prefix_tokens
        D = pos.shape[-1]
        pos_grid = pos[:, n_prefix:].transpose(1, 2).reshape(1, D, *grid)
        pos_half = F.interpolate(pos_grid, scale_factor=0.5, mode="bilinear", align_corners=False,
                                 recompute_scale_factor=False).flatten(2).transpose(1, 2)
        pos_tokens = torch.cat([pos[:, n_prefix:].expand(B, -1, -1).gather(1, kept[..., None].expand(-1, -1, D)),
                                pos_half.expand(B, -1, -1).gather(1, shared[..., None].expand(-1, -1, D))], 1)
        x = torch.cat([encoder.prefix_tokens(B) + pos[:, :n_prefix], tokens + pos_tokens], dim=1)
        x = encoder.dropout(x)
        size = torch.ones(B, x.shape[1], 1, device=im.device)
        size[:, n_prefix + kept.shape[1]:] = 4
        return x, MergeState.start(x, n_prefix, grid, trace_source=self.trace_source, index=n_prefix + rows, size=size)
