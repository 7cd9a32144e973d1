"""Expedite (Liang et al., NeurIPS 2022): token clustering after block alpha, optional token reconstruction.

After block ``after_layer`` (alpha, counted from 1; Expedite's 0-based ``location`` is alpha - 1) the
patch tokens, as a ``gh x gw`` map, are clustered into an ``h x w`` grid exactly as Expedite's
``TokenClusteringBlock``: centroids start as ``adaptive_avg_pool2d`` of the map, every token starts in
the cell that nearest resizing of the cell-id grid gives it, and may only be assigned to centroids
within ``window_size // 2`` cells of that cell (a ``1e16`` distance penalty elsewhere); ``n_iters``
rounds of soft assignment ``softmax_j(-temperature * |x_i - c_j|^2)`` (assignments detached) update
the centroids as assignment-weighted means (denominator clamped at 1e-16). The class (and
distillation) tokens are kept in front: ``[cls, (dist), h*w centroids in raster order]``; no position
embedding is re-added. The distances are the reference's expansion ``|x|^2 + |c|^2 - 2 x.c`` over all
token/centroid pairs: one matrix product per round (B x h*w x N, about 2 % of ViT-L's FLOPs at
640) is faster than gathering the ``(2 rho + 1)^2`` neighbourhood of every token, and it is the
reference's arithmetic to the last bit of the masking.

``reconstruct=False`` (Expedite's shipped Segmenter configs): the later blocks, the final norm and the
decoder run on the ``h x w`` grid and the masks are upsampled from it to the image in one resize (the
merge state's reduced grid). ``reconstruct=True`` (the paper): after the final norm every patch token is
rebuilt from the normed clustered tokens ``Y`` as ``sum_j W_ij Y_j`` with ``W_ij = exp(-t_r |F_i - S_j|^2)``
(``F`` = patch tokens right after block alpha, ``S`` = centroids right after clustering, both un-normed,
in fp32, no max-subtraction), entries below a row's ``recon_k``-th largest zeroed (ties kept) and rows
L2-normalised (``F.normalize``); then the normal decoder on the full grid (the merge state's weighted
map). Rows that underflow to (near) zero give zero tokens, as in the reference, and a warning counts them.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.models.vision_transformer import Block

from tokred.bipartite import check_prefix
from tokred.blocks import ReductionBlock, swap_block
from tokred.errors import UsageError
from tokred.options import Option, boolean, integer, is_int, one_of, real
from tokred.precision import compute_dtype, fp32_island
from tokred.profiling import section
from tokred.reducer import TokenReducer
from tokred.state import MergeState

MASK_PENALTY = 1e16

# Expedite's published Segmenter ViT-L/16 rows: (alpha, h x w) per dataset crop (README of the reference).
PRESETS: dict[str, tuple[int, tuple[int, int]]] = {
    "ade20k_a16_28": (16, (28, 28)),
    "ade20k_a10_28": (10, (28, 28)),
    "ade20k_a8_20": (8, (20, 20)),
    "cityscapes_a18_32": (18, (32, 32)),
    "cityscapes_a12_32": (12, (32, 32)),
    "cityscapes_a10_24": (10, (24, 24)),
    "pcontext_a14_20": (14, (20, 20)),
    "pcontext_a12_15": (12, (15, 15)),
    "pcontext_a8_15": (8, (15, 15)),
}


def check_num_clusters(value: Any) -> tuple[int, int]:
    """An ``(h, w)`` pair of positive ints, or an int that is the count of a square grid (784 = 28 x 28)."""
    if is_int(value) and value > 0:
        side = math.isqrt(value)
        if side * side != value:
            raise UsageError(f"num_clusters {value} is not a square number; give (h, w) for other grids")
        return (side, side)
    if isinstance(value, (list, tuple)) and len(value) == 2 and all(is_int(v) and v > 0 for v in value):
        return (int(value[0]), int(value[1]))
    raise UsageError(f"num_clusters must be a positive square number or an (h, w) pair of positive ints, got {value!r}")


def clusters_from_cli(values: tuple[int, ...]) -> int | tuple[int, ...]:
    """``--expedite-num-clusters 784`` -> 784, ``--expedite-num-clusters 28 28`` -> (28, 28)."""
    return values[0] if len(values) == 1 else tuple(values)


def odd_window(value: Any) -> int:
    """The clustering window: a positive odd int."""
    if not is_int(value) or value < 1 or value % 2 == 0:
        raise UsageError(f"window_size must be a positive odd integer, got {value!r}")
    return int(value)


def positive(name: str) -> Any:
    """A check for a finite number > 0."""
    return real(name, 0.0, math.inf, low_open=True, high_open=True)


def pairwise_sq_dist(tokens: torch.Tensor, centres: torch.Tensor) -> torch.Tensor:
    """``|t|^2 + |c|^2 - 2 t.c`` for every token (B, N, C) and centre (B, M, C): (B, N, M), the reference's expansion."""
    return (tokens.square().sum(-1, keepdim=True) + centres.square().sum(-1).unsqueeze(1)
            - 2 * tokens @ centres.transpose(1, 2))


@fp32_island
def cluster_tokens(tokens: torch.Tensor, grid: tuple[int, int], clusters: tuple[int, int], n_iters: int,
                   temperature: float, radius: int) -> torch.Tensor:
    """Expedite's token clustering of (B, gh*gw, C) raster tokens into (B, h*w, C) centroids (raster), fp32."""
    B, N, C = tokens.shape
    gh, gw = grid
    h, w = clusters
    x = tokens.float()
    centres = F.adaptive_avg_pool2d(x.transpose(1, 2).reshape(B, C, gh, gw), (h, w)).flatten(2).transpose(1, 2)
    with torch.no_grad():
        cell_ids = torch.arange(h * w, device=x.device, dtype=torch.float32).reshape(1, 1, h, w)
        cell = F.interpolate(cell_ids, size=(gh, gw), mode="nearest").flatten().long()
        target = torch.arange(h * w, device=x.device)
        near = ((cell[:, None] // w - target[None] // w).abs() <= radius) & ((cell[:, None] % w - target[None] % w).abs() <= radius)
        penalty = (~near).float() * MASK_PENALTY
    for _ in range(n_iters):
        assign = (-(pairwise_sq_dist(x, centres) + penalty) * temperature).softmax(dim=2).detach()
        centres = assign.transpose(1, 2) @ x / assign.sum(dim=1).unsqueeze(-1).clamp(min=1e-16)
    return centres


@fp32_island
def reconstruction_map(before: torch.Tensor, centres: torch.Tensor, k: int, temperature: float
                       ) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Expedite's kNN reconstruction weights as a sparse map: indices and L2-normalised weights (B, N, k').

    ``k'`` is ``k`` (at most the number of centroids), more where weights tie at a row's k-th value.
    Also returns how many rows are (near) zero after fp32 underflow.
    """
    weight = torch.exp(-temperature * pairwise_sq_dist(before.float(), centres.float()))
    M = weight.shape[-1]
    k = min(k, M)
    kth = weight.topk(k, dim=2).values[..., -1:]
    live = kth > 0
    width = max(int(((weight >= kth) & live).sum(dim=2).max()), k)
    values, index = weight.topk(width, dim=2)
    values = torch.where(values >= kth, values, torch.zeros_like(values))
    n_weak = int((values.norm(dim=2) < 1e-12).sum())
    return index, F.normalize(values, dim=2), n_weak


@dataclass(frozen=True)
class ClusterSpec:
    """The clustering step after one block."""

    num_clusters: tuple[int, int]
    n_iters: int
    temperature: float
    radius: int
    reconstruct: bool


class ClusteringBlock(ReductionBlock):
    """A timm block followed by Expedite's token clustering of its output patch tokens."""

    spec: ClusterSpec

    def forward(self, x: torch.Tensor, state: MergeState) -> torch.Tensor:  # type: ignore[override]
        x = Block.forward(self, x, attn_mask=state.attn_bias(compute_dtype(x)))
        spec = self.spec
        n = state.n_prefix
        (gh, gw), (h, w) = state.grid, spec.num_clusters
        if not state.is_raster:
            raise ValueError("Expedite's clustering needs the raster patch grid as its input")
        if h > gh or w > gw:
            raise UsageError(f"num_clusters {h}x{w} is larger than the {gh}x{gw} patch grid of this input")
        patches = x[:, n:]
        with section("cluster"):
            centres = cluster_tokens(patches, (gh, gw), (h, w), spec.n_iters, spec.temperature, spec.radius)
        if spec.reconstruct:
            state.scratch["expedite"] = (patches, centres)
        return state.replace(torch.cat([x[:, :n], centres.to(x.dtype)], dim=1), out_grid=(h, w))


class Expedite(TokenReducer):
    """Expedite's hourglass: clustering after block alpha, then (optionally) reconstruction after the norm."""

    name = "expedite"
    summary = "Expedite: token clustering after block alpha, optional reconstruction (Liang et al., NeurIPS 2022)"
    options = (
        Option("preset", None, "A published ViT-L row: " + ", ".join(PRESETS) + " (sets after_layer and num_clusters).",
               one_of("preset", tuple(PRESETS), allow_none=True), value_type=str,
               choices=tuple(PRESETS)),
        Option("after_layer", 10, "alpha: the block (from 1) after which tokens are clustered, 1..depth-1.",
               integer("after_layer", 1), value_type=int),
        Option("num_clusters", (28, 28), "Clustered grid: h w, or one square count (784 = 28 x 28).",
               check_num_clusters, value_type=int, nargs="+", from_cli=clusters_from_cli),
        Option("n_iters", 5, "Soft-assignment rounds.", integer("n_iters", 0), value_type=int),
        Option("temperature", 0.02, "Multiplier of -distance in the assignment softmax, > 0.",
               positive("temperature"), value_type=float),
        Option("window_size", 5, "Odd side of the centroid neighbourhood a token may join.", odd_window,
               value_type=int),
        Option("reconstruct", False, "Rebuild every patch token after the final norm (the paper) instead of "
               "decoding the clustered grid (the published configs).", boolean("reconstruct"), value_type=bool),
        Option("recon_k", 20, "Centroids per patch in the reconstruction (>= h*w keeps all).",
               integer("recon_k", 1), value_type=int),
        Option("recon_temperature", 0.02, "Multiplier of -distance in the reconstruction weights, > 0.",
               positive("recon_temperature"), value_type=float),
    )

    def __init__(self, **options: Any):
        preset = options.get("preset")
        if preset is not None:
            one_of("preset", tuple(PRESETS))(preset)
            alpha, grid = PRESETS[preset]
            given = {"after_layer": options.get("after_layer", alpha), "num_clusters": options.get("num_clusters", grid)}
            if given["after_layer"] != alpha or check_num_clusters(given["num_clusters"]) != grid:
                raise UsageError(f"preset {preset!r} is after_layer {alpha} with num_clusters {grid[0]}x{grid[1]}; "
                                 "drop the preset or the other values")
            options = {**options, "after_layer": alpha, "num_clusters": grid}
        super().__init__(**options)

    @classmethod
    def sweep(cls, encoder: nn.Module) -> list[dict[str, Any]]:
        """Expedite's ADE20K rows (alpha 16 / 10 / 8 of 24 blocks; 28x28 / 28x28 / 20x20 of 40x40) scaled to the model."""
        depth = len(encoder.blocks)
        gh, gw = encoder.patch_embed.grid_size
        points = []
        for alpha, side in ((16, 28), (10, 28), (8, 20)):
            points.append({"after_layer": min(max(round(depth * alpha / 24), 1), depth - 1),
                           "num_clusters": [max(round(gh * side / 40), 1), max(round(gw * side / 40), 1)]})
        return points

    def prepare(self, encoder: nn.Module) -> None:
        check_prefix(encoder.num_prefix_tokens)
        depth = len(encoder.blocks)
        alpha = self.config["after_layer"]
        if not 1 <= alpha <= depth - 1:
            raise UsageError(f"after_layer {alpha} out of range: clustering after blocks 1..{depth - 1} of {depth}")
        gh, gw = encoder.patch_embed.grid_size
        h, w = self.config["num_clusters"]
        if h > gh or w > gw:
            raise UsageError(f"num_clusters {h}x{w} is larger than the {gh}x{gw} patch grid")

    def apply(self, encoder: nn.Module) -> None:
        c = self.config
        spec = ClusterSpec(c["num_clusters"], c["n_iters"], c["temperature"], c["window_size"] // 2, c["reconstruct"])
        swap_block(encoder.blocks[c["after_layer"] - 1], ClusteringBlock, spec)

    def finish(self, encoder: nn.Module, x: torch.Tensor, state: MergeState) -> torch.Tensor:
        if not self.config["reconstruct"]:
            return x
        before, centres = state.scratch.pop("expedite")
        with section("reconstruct"):
            index, weight, n_weak = reconstruction_map(before, centres, self.config["recon_k"],
                                                       self.config["recon_temperature"])
        if n_weak:
            warnings.warn(f"Expedite reconstruction: {n_weak} of {index.shape[0] * index.shape[1]} patch tokens "
                          "have (near) zero weights after fp32 underflow and are rebuilt as (near) zero, as in the "
                          "reference; a smaller recon_temperature avoids it", stacklevel=2)
        state.replace(x, index=state.n_prefix + index, weight=weight)
        return state.unmerge_tokens(x)

