"""ACT, adaptive clustering attention (Zheng et al., 2020), as Expedite runs it on Segmenter: queries only.

In every selected block the queries (after the ``1/sqrt(head_dim)`` scaling) of every (image, head) row
are hashed with E2LSH exactly as Expedite's ACT does: one draw per call of ``a ~ N(0, I)`` (head_dim x
q_hashes) and ``b ~ U[0, 1)``, ``h_m = floor((a_m . q + b_m) / 8)``, each hash's row minimum subtracted,
codes packed as ``sum_m h_m << 2m`` in int64 (values of 4 and more spill into the next hash's bits and
high hashes overflow: the reference's aliasing, kept). Queries with equal codes form a cluster (ids in
ascending code order); attention runs once per cluster centroid (the mean of its queries) against all
keys, and every query receives its cluster's output. The sequence length never changes.

Pure PyTorch, batched over images and heads: ``sort`` -> ``diff`` -> ``cumsum`` cluster ids,
``scatter_add`` centroids, one padded fused attention call (padding clusters are empty and unused), a
gather back. ``seed=None`` draws fresh projections every forward, as upstream; an integer seed fixes
them (block ``i`` uses ``seed + i``), so outputs and FLOP counts are reproducible.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn
from timm.models.vision_transformer import Attention

from tokred.attention import attend, project_out, project_qkv
from tokred.blocks import ReductionBlock, swap_block
from tokred.options import Option, block_numbers, check_depth, integer
from tokred.precision import fp32_island
from tokred.profiling import section
from tokred.reducer import TokenReducer
from tokred.state import MergeState

BUCKET_WIDTH = 8.0


Projections = tuple[torch.Tensor, torch.Tensor]


def hash_projections(d: int, n_hashes: int, generator: torch.Generator | None = None,
                     device: torch.device | str = "cpu") -> Projections:
    """E2LSH's random projection ``a`` (d, n_hashes) and offsets ``b`` (n_hashes, 1) in fp32: randn, then rand."""
    a = torch.randn(d, n_hashes, generator=generator, device=device, dtype=torch.float32)
    b = torch.rand(n_hashes, 1, generator=generator, device=device, dtype=torch.float32)
    return a, b


@fp32_island
def e2lsh_codes(q: torch.Tensor, projections: Projections) -> torch.Tensor:
    """ACT's packed E2LSH code of every query: (R, T, d) -> (R, T) int64, computed in fp32."""
    a, b = (t.to(q.device) for t in projections)
    n_hashes = a.shape[1]
    hashes = torch.floor(((q.float() @ a).transpose(1, 2) + b) / BUCKET_WIDTH).long()
    hashes = hashes - hashes.min(dim=-1, keepdim=True).values
    shifts = 2 * torch.arange(n_hashes, device=q.device, dtype=torch.long)
    return (hashes << shifts.view(1, -1, 1)).sum(dim=1)


@fp32_island
def cluster_ids(codes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Clusters of equal codes per row: ids (R, T) in ascending code order, member counts (R, C), and C.

    ``C`` is the largest cluster count of any row; rows with fewer clusters have zero counts at the end.
    """
    sorted_codes, order = codes.sort(dim=1)
    starts = torch.ones_like(sorted_codes)
    starts[:, 1:] = (sorted_codes[:, 1:] != sorted_codes[:, :-1]).long()
    ids = torch.empty_like(order).scatter_(1, order, starts.cumsum(dim=1) - 1)
    n_clusters = int(ids.max()) + 1
    counts = torch.zeros(ids.shape[0], n_clusters, device=ids.device).scatter_add_(1, ids, torch.ones_like(ids, dtype=torch.float32))
    return ids, counts, n_clusters


@fp32_island
def centroid_queries(rows: torch.Tensor, ids: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Mean query of every cluster (R, C, d), summed in fp32 as the reference does, in the queries' dtype."""
    d = rows.shape[-1]
    members = ids.unsqueeze(-1).expand(-1, -1, d)
    sums = rows.new_zeros(rows.shape[0], counts.shape[1], d, dtype=torch.float32).scatter_add(1, members, rows.float())
    return (sums / counts.clamp_min(1).unsqueeze(-1)).to(rows.dtype)


def clustered_attention(attn: Attention, x: torch.Tensor, projections: Projections, stats: list | None = None
                        ) -> torch.Tensor:
    """timm's attention on ``x`` with ACT's query clustering by the hash ``projections``; ``stats`` gets
    (max clusters, mean clusters per row) as tensors, so that a compiled forward never specialises on them."""
    q, k, v = project_qkv(attn, x)
    B, H, T, d = q.shape
    q = q * attn.scale
    rows = q.reshape(B * H, T, d)
    with section("cluster"):
        with torch.no_grad():
            ids, counts, n_clusters = cluster_ids(e2lsh_codes(rows, projections))
        centroids = centroid_queries(rows, ids, counts).reshape(B, H, n_clusters, d)
    out = attend(attn, centroids, k, v, scale=1.0).reshape(B * H, n_clusters, -1)
    with section("unmerge"):
        heads = out.gather(1, ids.unsqueeze(-1).expand(-1, -1, out.shape[-1])).reshape(B, H, T, -1)
    if stats is not None:
        per_row = counts.clamp(max=1).sum(dim=1)
        stats.append((per_row.amax(), per_row.mean()))
    return project_out(attn, heads, x)


@dataclass(frozen=True)
class ClusterSpec:
    """What one ACT block does: hash rounds, and its projections drawn once from its seed (None: fresh every
    forward). Seeded projections are drawn on the CPU when the block is patched, so that the forward holds
    no generator (a compiled forward could not trace one)."""

    q_hashes: int
    seed: int | None
    projections: Projections | None = field(default=None, compare=False, repr=False)


class ACTBlock(ReductionBlock):
    """A block whose attention clusters its queries; the MLP and the sequence length are unchanged."""

    spec: ClusterSpec

    def forward(self, x: torch.Tensor, state: MergeState) -> torch.Tensor:  # type: ignore[override]
        spec = self.spec
        projections = spec.projections
        if projections is None:
            projections = hash_projections(self.attn.head_dim, spec.q_hashes, device=x.device)
        stats = state.scratch.setdefault("act_clusters", [])
        out = clustered_attention(self.attn, self.norm1(x), projections, stats)
        x = x + self.drop_path1(self.ls1(out))
        return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))


def optional_seed(value: object) -> int | None:
    """``None`` (fresh projections every forward) or a non-negative integer seed."""
    if value is None:
        return None
    return integer("seed", 0)(value)


class ACT(TokenReducer):
    """ACT: queries clustered by E2LSH in every (selected) block, attention once per cluster."""

    name = "act"
    summary = "ACT: E2LSH query clustering, attention once per cluster (Zheng et al., 2020; Expedite's setting)"
    options = (
        Option("q_hashes", 32, "E2LSH hash rounds, 1..32 (fewer rounds, coarser clusters).",
               integer("q_hashes", 1, 32), value_type=int),
        Option("seed", None, "Seed of the hash projections (default: fresh every forward, as upstream; "
               "segm.flops and the benchmarks fix 0).", optional_seed, value_type=int, measure_default=0),
        Option("layers", None, "Blocks (from 1) that cluster their queries (default: all).",
               block_numbers("layers", allow_none=True), value_type=int, nargs="+"),
    )

    @classmethod
    def sweep(cls, encoder: nn.Module) -> list[dict[str, Any]]:
        """Expedite's rows: 32, 24 and 16 hash rounds."""
        return [{"q_hashes": q} for q in (32, 24, 16)]

    def prepare(self, encoder: nn.Module) -> None:
        depth = len(encoder.blocks)
        layers = self.config["layers"] or list(range(1, depth + 1))
        check_depth("layers", layers, depth)
        self.config["layers"] = list(layers)

    def apply(self, encoder: nn.Module) -> None:
        seed, q_hashes = self.config["seed"], self.config["q_hashes"]
        for number in self.config["layers"]:
            block = encoder.blocks[number - 1]
            spec = ClusterSpec(q_hashes, None)
            if seed is not None:
                generator = torch.Generator().manual_seed(seed + number)
                spec = ClusterSpec(q_hashes, seed + number, hash_projections(block.attn.head_dim, q_hashes, generator))
            swap_block(block, ACTBlock, spec)

