"""Token-reduction patch types selectable by name (``--patch-type``): ``pure`` (none) and ``algm``."""

from __future__ import annotations

from typing import Sequence

import torch.nn as nn

import algm.patch

PATCH_TYPES = ("pure", "algm")


def default_selected_layers(depth: int) -> list[int]:
    """ALGM's published layers: 1 and 5 for 12-block encoders (Ti/S/B), 1 and 7 for 24-block ones (L)."""
    return [1, 7] if depth >= 24 else [1, 5]


def apply_token_reduction(
    model: nn.Module,
    patch_type: str,
    selected_layers: Sequence[int] | None = None,
    window_size: Sequence[int] = (2, 2),
    threshold: float = 0.88,
    trace_source: bool = False,
) -> list[int] | None:
    """Patch ``model`` in place with ``patch_type``; returns the selected layers used (``None`` for ``pure``)."""
    if patch_type not in PATCH_TYPES:
        raise ValueError(f"unknown patch type '{patch_type}'; known patch types: {', '.join(PATCH_TYPES)}")
    if patch_type == "pure":
        algm.patch.unpatch(model)
        return None
    encoder = getattr(model, "encoder", model)
    layers = list(selected_layers) if selected_layers else default_selected_layers(len(encoder.blocks))
    algm.patch.algm_segmenter_patch(
        model, layers, window_size=tuple(window_size), threshold=threshold, trace_source=trace_source
    )
    return layers
