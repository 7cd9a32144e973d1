"""Reading checkpoints and matching state dicts: a safe ``torch.load``, strict key and shape checks with
one-line messages naming the file and the keys, fp16 -> fp32, and wrapper prefixes (``module.``) removed."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import torch
import torch.nn as nn

from tokred.errors import UsageError


def describe_keys(keys: list[str], limit: int = 10) -> str:
    """``N (first, second, ...)``: how many keys and the first ``limit`` of them."""
    shown = ", ".join(keys[:limit])
    return f"{len(keys)} ({shown}{', ...' if len(keys) > limit else ''})"


def check_state_dict(model: nn.Module, state_dict: Mapping[str, torch.Tensor], source: str) -> None:
    """Raise a one-line error naming missing / unexpected keys (up to 10) or the first shape mismatch."""
    own = model.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing keys {describe_keys(missing)}")
        if unexpected:
            parts.append(f"unexpected keys {describe_keys(unexpected)}")
        raise UsageError(f"{source} does not match the model: " + "; ".join(parts))
    for key, value in state_dict.items():
        if tuple(value.shape) != tuple(own[key].shape):
            raise UsageError(
                f"{source}: '{key}' has shape {tuple(value.shape)} in the checkpoint "
                f"but {tuple(own[key].shape)} in the model"
            )


def to_float32(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Floating-point tensors cast to float32 (fp16 checkpoints), others unchanged."""
    return {k: v.float() if v.is_floating_point() else v for k, v in state_dict.items()}


def unwrap(data: Any, keys: tuple[str, ...]) -> Any:
    """The state dict inside a checkpoint: ``data[key]`` for each of ``keys`` present, in order (e.g.
    ``("model", "state_dict")``: this codebase's and Segmenter's layout, then mmsegmentation's)."""
    for key in keys:
        if isinstance(data, dict) and key in data:
            data = data[key]
    return data


def strip_prefix(state_dict: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """``state_dict`` without ``prefix`` when every key has it (DDP's ``module.``), else unchanged."""
    if state_dict and all(k.startswith(prefix) for k in state_dict):
        return {k[len(prefix) :]: v for k, v in state_dict.items()}
    return dict(state_dict)


def read_checkpoint(path: Path, weights_only: bool = True) -> dict[str, Any]:
    """``torch.load`` on CPU; with ``weights_only`` (default) no arbitrary code can run from the file."""
    try:
        return torch.load(path, map_location="cpu", weights_only=weights_only)
    except Exception as err:
        if weights_only and "weights_only" in str(err):
            raise UsageError(
                f"{path} holds Python objects that a safe load refuses; if you trust the file, "
                "call load_model(path, weights_only=False)"
            ) from None
        raise UsageError(f"{path} could not be read as a checkpoint: {err}") from None
