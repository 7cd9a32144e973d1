"""Token reduction by name: the registry of patch types and the public calls.

    from segm.model.token_reduction import apply_token_reduction, remove_token_reduction, PATCH_TYPES
    apply_token_reduction(model, "tome", r=8, prop_attn=False)   # returns the applied settings
    remove_token_reduction(model)                                  # back to pure

Adding a method means writing its module (a ``tokred.TokenReducer`` subclass: its options, its block
overrides, its hooks) and adding it to ``PATCH_TYPES`` below; the command-line options, ``variant.yml``
and every command follow from the registry. Nothing else in ``segm`` names a method.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch.nn as nn

from algm.patch import ALGM
from tokred.act import ACT
from tokred.cts import TokenSharing
from tokred.evit import EViT
from tokred.expedite import Expedite
from tokred.segformerpp import SegFormerPP
from tokred.reducer import Pure, Registry, install, reducer_host, uninstall
from tokred.tome import ToMe, ToMeSublayer

PATCH_TYPES = Registry()
for _patch_type in (Pure, ALGM, ToMe, ToMeSublayer, EViT, ACT, Expedite, TokenSharing, SegFormerPP):
    PATCH_TYPES.register(_patch_type)

VARIANT_KEY = "token_reduction"
LEGACY_ALGM_KEYS = {"selected_layers": "selected_layers", "merging_window_size": "window_size", "threshold": "threshold"}


def apply_token_reduction(model: nn.Module, patch_type: str, *, trace_source: bool = False, **options: Any) -> dict[str, Any]:
    """Apply ``patch_type`` with keyword ``options`` to ``model`` in place; returns the applied settings.

    A second call replaces the first; ``"pure"`` removes any reduction. ``trace_source`` keeps the
    patch -> token map of every step in the merge state (for visualisation); it is not a setting.
    """
    reducer = PATCH_TYPES.create(patch_type, **options)
    install(model, reducer, trace_source=trace_source)
    return reducer.settings()


def measurement_options(patch_type: str, options: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """``options`` with the measurement defaults of the options not given (a fixed seed), and those defaults.

    FLOP counts and benchmarks use them so that a randomised method counts the same every run.
    """
    fixed = {o.name: o.measure_default for o in PATCH_TYPES[patch_type].options
             if o.measure_default is not None and options.get(o.name) is None}
    return {**options, **fixed}, fixed


def remove_token_reduction(model: nn.Module) -> None:
    """Back to the pure model (plain timm blocks, every patch token)."""
    uninstall(model)


def applied_token_reduction(model: nn.Module) -> tuple[str, dict[str, Any]]:
    """The patch type applied to ``model`` and its settings (``("pure", {})`` when none)."""
    reducer = reducer_host(model).reducer
    return reducer.name, reducer.settings()


def variant_entry(patch_type: str, settings: Mapping[str, Any]) -> dict[str, Any]:
    """What ``variant.yml`` records of a run's token reduction."""
    return {"patch_type": patch_type, "settings": dict(settings)}


def variant_token_reduction(variant: Mapping[str, Any]) -> tuple[str, dict[str, Any]] | None:
    """The patch type and settings a ``variant.yml`` records, or ``None`` when it records none.

    Reads this codebase's ``token_reduction`` entry, or the ``dataset_kwargs`` keys of the published
    ALGM code (``patch_type``, ``selected_layers``, ``merging_window_size``, ``threshold``). Derived
    options are left out: they follow from the others, which a command may change.
    """
    entry = variant.get(VARIANT_KEY)
    if entry:
        patch_type, settings = entry["patch_type"], dict(entry.get("settings") or {})
        if patch_type in PATCH_TYPES:
            for option in PATCH_TYPES[patch_type].options:
                if option.derived:
                    settings.pop(option.name, None)
        return patch_type, settings
    kwargs = variant.get("dataset_kwargs") or {}
    patch_type = kwargs.get("patch_type")
    if patch_type is None:
        return None
    if patch_type != "algm":
        return patch_type, {}
    return "algm", {new: kwargs[old] for old, new in LEGACY_ALGM_KEYS.items() if kwargs.get(old) is not None}
