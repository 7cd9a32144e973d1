"""SegFormer++ (Kienzle et al., MIPR 2024): token merging inside the efficient attention of a MiT backbone.

Per stage, as SegFormer++'s mmseg configs define it (``tome_cfg``), two independent knobs act in every
block's attention; the Mix-FFN and the residual stream always stay at full resolution:

- **KV merging** (``kv_mode``) on the key/value tokens after the spatial reduction (the reduced, normed
  tokens are also the metric); merged keys and values are never unmerged.
- **Q merging** (``q_mode``) on the queries (the block's LayerNorm output, also the metric); attention
  runs for the merged queries and its output is copied back to every member (unmerged).

Modes: ``bsm`` is tomesd's 2D bipartite matching without randomness: one destination per
``sy x sx`` cell of the grid, its top-left token; all other tokens (leftover rows and columns included)
are sources, each matched to its most similar destination anywhere (cosine); the ``r = int(n x ratio)``
best-matched sources (at most all of them) merge into their destinations (plain mean, destination
included). ``n2d`` is ``avg_pool2d`` with kernel = stride = ``s`` (ceil mode) and, for queries, nearest
upsampling back; ``n1d`` the same along the sequence. No sizes, no proportional attention. The presets are
the mmseg configs' (the stand-alone package's torch-hub presets for ``fast`` and ``2x2`` use mode names
its backbone does not know, so they merge nothing).
"""

from __future__ import annotations

import copy
import functools
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from tokred.errors import UsageError
from tokred.options import Option, is_int, is_real, one_of
from tokred.precision import fp32_island
from tokred.profiling import section
from tokred.reducer import TokenReducer
from tokred.state import merge_mean

MODES = ("bsm", "n2d", "n1d")
STAGE_KEYS = ("q_mode", "kv_mode", "q_r", "kv_r", "q_sx", "q_sy", "kv_sx", "kv_sy", "q_s", "kv_s")

PRESETS: dict[str, list[dict[str, Any]]] = {
    "hq": [dict(kv_mode="bsm", kv_r=0.6, kv_sx=2, kv_sy=2)] * 2 + [dict(q_mode="bsm", q_r=0.8, q_sx=4, q_sy=4)] * 2,
    "fast": [dict(kv_mode="bsm", kv_r=0.9, kv_sx=4, kv_sy=4)] * 2 + [dict(q_mode="bsm", q_r=0.9, q_sx=4, q_sy=4)] * 2,
    "2x2": [dict(q_mode="n2d", q_s=(2, 2))] * 4,
}


@dataclass(frozen=True)
class SideMerge:
    """How one side (queries or keys/values) of a stage's attention is reduced."""

    mode: str
    ratio: float = 0.0
    stride: tuple[int, int] = (1, 1)
    size: tuple[int, ...] = ()


@dataclass(frozen=True)
class StageMerge:
    """The query and key/value reductions of the blocks of one stage (``None``: that side untouched)."""

    q: SideMerge | None
    kv: SideMerge | None


def _positive_ints(value: Any, count: int | None, what: str) -> tuple[int, ...]:
    values = tuple(value) if isinstance(value, (list, tuple)) else (value,)
    if not values or (count is not None and len(values) != count) or not all(is_int(v) and v > 0 for v in values):
        raise UsageError(f"{what} must be {'a positive int' if count == 1 else f'{count or 1}+ positive ints'}, got {value!r}")
    return tuple(int(v) for v in values)


def side_merge(stage: dict[str, Any], side: str, number: int) -> SideMerge | None:
    """The ``q`` or ``kv`` settings of stage ``number`` (1-based) from its mmseg-style ``tome_cfg`` dict."""
    mode = stage.get(f"{side}_mode")
    if mode in (None, "none"):
        return None
    where = f"stage {number} {side}"
    one_of(f"{where}_mode", MODES)(mode)
    if mode == "bsm":
        ratio = stage.get(f"{side}_r")
        if not is_real(ratio) or not 0 <= ratio < 1:
            raise UsageError(f"{where}_r must be a merge ratio in [0, 1), got {ratio!r}")
        sx = _positive_ints(stage.get(f"{side}_sx"), 1, f"{where}_sx")[0]
        sy = _positive_ints(stage.get(f"{side}_sy"), 1, f"{where}_sy")[0]
        return SideMerge("bsm", float(ratio), (sy, sx))
    size = stage.get(f"{side}_s")
    return SideMerge(mode, size=_positive_ints(size, 2 if mode == "n2d" else 1, f"{where}_s"))


def check_stages(value: Any) -> list[dict[str, Any]] | None:
    """Four per-stage dicts with SegFormer++'s ``tome_cfg`` keys (q_mode, kv_mode, q_r, ..., q_s, kv_s)."""
    if value is None:
        return None
    if not isinstance(value, (list, tuple)) or len(value) != 4 or not all(isinstance(s, dict) for s in value):
        raise UsageError(f"stages must be a list of 4 dicts (one per MiT stage), got {value!r}")
    for number, stage in enumerate(value, start=1):
        unknown = sorted(set(stage) - set(STAGE_KEYS))
        if unknown:
            raise UsageError(f"stage {number} has unknown keys {', '.join(unknown)}; known: {', '.join(STAGE_KEYS)}")
        side_merge(stage, "q", number)
        side_merge(stage, "kv", number)
    return [dict(stage) for stage in value]


def stages_from_cli(text: str) -> Any:
    """``--segformerpp-stages`` takes the four stage dicts as YAML/JSON text."""
    import yaml

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise UsageError(f"--segformerpp-stages is not valid YAML: {err}") from None


def grid_split(h: int, w: int, sy: int, sx: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Source and destination positions of an ``h x w`` raster: destinations are the top-left token of every
    ``sy x sx`` cell (tomesd with ``no_rand``), in the order tomesd's argsort gives them."""
    hsy, wsx = h // sy, w // sx
    marks = torch.zeros(hsy, wsx, sy * sx, device=device, dtype=torch.int64)
    marks[..., 0] = -1
    marks = marks.view(hsy, wsx, sy, sx).transpose(1, 2).reshape(hsy * sy, wsx * sx)
    if hsy * sy < h or wsx * sx < w:
        full = torch.zeros(h, w, device=device, dtype=torch.int64)
        full[: hsy * sy, : wsx * sx] = marks
        marks = full
    order = marks.reshape(1, -1, 1).argsort(dim=1)[0, :, 0]
    n_dst = hsy * wsx
    return order[n_dst:], order[:n_dst]


@fp32_island
def bipartite_2d(metric: torch.Tensor, hw: tuple[int, int], stride: tuple[int, int], ratio: float
                 ) -> tuple[torch.Tensor | None, int]:
    """``(dest, n_out)`` of tomesd's 2D bipartite matching on ``metric`` (B, h*w, c); ``dest`` None when nothing merges.

    ``dest`` sends every token to its row in the merged sequence ``[unmerged sources, destinations]``.
    """
    B, N, _ = metric.shape
    r = int(N * ratio)
    src, dst = grid_split(hw[0], hw[1], stride[0], stride[1], metric.device)
    if r <= 0 or dst.numel() == 0:
        return None, N
    with torch.no_grad():
        unit = metric.float()
        unit = unit / unit.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        scores = unit[:, src] @ unit[:, dst].transpose(1, 2)
        r = min(src.numel(), r)
        node_max, node_idx = scores.max(dim=-1)
        edge = node_max.argsort(dim=-1, descending=True)
        n_unm = src.numel() - r
        dest = torch.empty(B, N, dtype=torch.long, device=metric.device)
        dest[:, dst] = n_unm + torch.arange(dst.numel(), device=metric.device)
        merged, unmerged = edge[:, :r], edge[:, r:]
        source_rows = torch.empty(B, src.numel(), dtype=torch.long, device=metric.device)
        source_rows.scatter_(1, unmerged, torch.arange(n_unm, device=metric.device).expand(B, -1))
        source_rows.scatter_(1, merged, n_unm + node_idx.gather(1, merged))
        dest[:, src] = source_rows
    return dest, n_unm + dst.numel()


def reduce_tokens(x: torch.Tensor, hw: tuple[int, int], side: SideMerge
                  ) -> tuple[torch.Tensor, Callable[[torch.Tensor], torch.Tensor]]:
    """The reduced tokens of ``x`` (B, h*w, C) and the function that copies per-token outputs back to h*w."""
    B, N, C = x.shape
    if side.mode == "bsm":
        dest, n_out = bipartite_2d(x, hw, side.stride, side.ratio)
        if dest is None:
            return x, lambda y: y
        return merge_mean(x, dest, n_out), lambda y: y.gather(1, dest.unsqueeze(-1).expand(-1, -1, y.shape[-1]))
    if side.mode == "n2d":
        pooled = F.avg_pool2d(x.transpose(1, 2).reshape(B, C, *hw), kernel_size=side.size, stride=side.size, ceil_mode=True)
        small = pooled.shape[2:]

        def back(y: torch.Tensor) -> torch.Tensor:
            grid = y.transpose(1, 2).reshape(B, y.shape[-1], *small)
            return F.interpolate(grid, size=hw).flatten(2).transpose(1, 2)

        return pooled.flatten(2).transpose(1, 2), back
    pooled = F.avg_pool1d(x.transpose(1, 2), kernel_size=side.size, stride=side.size, ceil_mode=True).transpose(1, 2)
    return pooled, lambda y: F.interpolate(y.transpose(1, 2), size=N).transpose(1, 2)


class MergingAttention:
    """Mixin over a MiT ``EfficientAttention`` (``kv_tokens``, ``attend``): SegFormer++'s Q and KV merging."""

    spec: StageMerge

    def forward(self, x: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
        kv, kv_hw = self.kv_tokens(x, hw)
        if self.spec.kv is not None:
            with section("merge"):
                kv = reduce_tokens(kv, kv_hw, self.spec.kv)[0]
        if self.spec.q is None:
            return self.attend(x, kv)
        with section("merge"):
            queries, back = reduce_tokens(x, hw, self.spec.q)
        out = self.attend(queries, kv)
        with section("unmerge"):
            return back(out)


@functools.cache
def merging_class(base: type) -> type:
    """The merging subclass of an attention class (made once per class, so swapping keeps the layout)."""
    return type(f"Merging{base.__name__}", (MergingAttention, base), {})


def mit_backbone_of(model: nn.Module, patch_type: str) -> nn.Module:
    """The MiT backbone of a SegFormer (or the backbone itself); a ``UsageError`` for anything else."""
    backbone = getattr(model, "backbone", model)
    stages = getattr(backbone, "layers", None)
    fits = (
        hasattr(backbone, "reducer") and stages is not None and len(stages) == 4
        and all(hasattr(block.attn, "kv_tokens") and hasattr(block.attn, "attend") for stage in stages for block in stage[1])
    )
    if not fits:
        raise UsageError(f"patch type '{patch_type}' applies to a SegFormer with a MiT backbone, not {type(model).__name__}")
    return backbone


class SegFormerPP(TokenReducer):
    """SegFormer++: per-stage query and key/value merging in a MiT backbone's attention."""

    name = "segformerpp"
    summary = "SegFormer++: 2D token merging in MiT attention, presets hq / fast / 2x2 (Kienzle et al., MIPR 2024)"
    options = (
        Option("preset", "hq", "Merging of the four stages: " + ", ".join(PRESETS) + " (the mmseg configs of SegFormer++).",
               one_of("preset", tuple(PRESETS), allow_none=True), value_type=str, choices=tuple(PRESETS)),
        Option("stages", None, "Four per-stage dicts with SegFormer++'s tome_cfg keys (q_mode, kv_mode, q_r, kv_r, "
               "q_sx, q_sy, kv_sx, kv_sy, q_s, kv_s); replaces the preset.", check_stages, value_type=str,
               from_cli=stages_from_cli),
    )

    @classmethod
    def target(cls, model: nn.Module) -> nn.Module:
        return mit_backbone_of(model, cls.name)

    @classmethod
    def sweep(cls, encoder: nn.Module) -> list[dict[str, Any]]:
        """The published presets, mildest first."""
        return [{"preset": "hq"}, {"preset": "2x2"}, {"preset": "fast"}]

    def prepare(self, encoder: nn.Module) -> None:
        if self.config["stages"] is not None:
            self.config["preset"] = None
        elif self.config["preset"] is None:
            raise UsageError("segformerpp needs a preset or four stage settings")

    def stage_settings(self) -> list[dict[str, Any]]:
        """The four ``tome_cfg`` dicts in use."""
        return self.config["stages"] if self.config["stages"] is not None else copy.deepcopy(PRESETS[self.config["preset"]])

    def apply(self, encoder: nn.Module) -> None:
        for number, (stage, settings) in enumerate(zip(encoder.layers, self.stage_settings()), start=1):
            spec = StageMerge(side_merge(settings, "q", number), side_merge(settings, "kv", number))
            for block in stage[1]:
                block.attn.__class__ = merging_class(type(block.attn))
                block.attn.spec = spec

    def remove(self, encoder: nn.Module) -> None:
        for stage in encoder.layers:
            for block in stage[1]:
                if isinstance(block.attn, MergingAttention):
                    block.attn.__class__ = type(block.attn).__bases__[1]
                    del block.attn.spec
