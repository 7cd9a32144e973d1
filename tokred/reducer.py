"""The token-reduction protocol every patch type implements, and the registry that names them.

An encoder holds one ``TokenReducer`` and runs ``start -> blocks -> norm -> finish``:

- ``start(encoder, im)`` builds the tokens that enter the first block and their ``MergeState`` (hook a);
- blocks the reducer swapped to a ``ReductionBlock`` subclass receive the state (``forward(x, state)``):
  between attention and MLP (b), after the block (c), inside attention (d); every other block is a
  plain timm ``Block`` that gets ``state.attn_bias`` (proportional attention) as its mask;
- ``finish(encoder, x, state)`` acts on the normed output tokens (e);
- the decoders send per-token outputs back to the patch grid with ``state.to_grid`` (f).

A reducer adds no parameters, so checkpoints load before or after it is applied. ``install`` replaces
whatever reducer an encoder holds; ``uninstall`` restores plain timm blocks.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any, ClassVar, Iterator

import torch
import torch.nn as nn
from timm.models.vision_transformer import Block

from tokred.blocks import ReductionBlock, restore_blocks
from tokred.errors import UsageError
from tokred.options import Option
from tokred.state import MergeState

ENCODER_ATTRIBUTES = ("blocks", "embed", "norm", "num_prefix_tokens", "patch_size", "reducer")


def vit_encoder_of(model: nn.Module, patch_type: str) -> nn.Module:
    """The ViT encoder of a Segmenter (or the encoder itself); a ``UsageError`` for anything else."""
    encoder = getattr(model, "encoder", model)
    blocks = getattr(encoder, "blocks", None)
    fits = (
        all(hasattr(encoder, name) for name in ENCODER_ATTRIBUTES)
        and len(blocks) > 0
        and all(type(b) is Block or isinstance(b, ReductionBlock) for b in blocks)
    )
    if not fits:
        raise UsageError(
            f"patch type '{patch_type}' applies to a Segmenter or its VisionTransformer encoder built from "
            f"timm Blocks, not {type(model).__name__}"
        )
    return encoder


def plain(value: Any) -> Any:
    """``value`` with tuples turned into lists, recursively: what YAML and JSON write and read back."""
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    return value


class TokenReducer:
    """Base class of the patch types: options, the six hooks, and the settings a run records.

    Subclasses set ``name``, ``summary``, ``options`` and ``model_parts`` (the modules beside the encoder that
    the method needs, e.g. CTS's ``policy_net``), and override what they need: ``prepare``
    (check and resolve settings against the model, without changing it), ``apply`` (swap blocks),
    ``start`` and ``finish``. ``self.config`` holds the checked option values.
    """

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    options: ClassVar[tuple[Option, ...]] = ()
    model_parts: ClassVar[tuple[str, ...]] = ()  # attributes of the model beside the encoder that it runs

    def __init__(self, **options: Any):
        by_name = {o.name: o for o in self.options}
        unknown = sorted(set(options) - set(by_name))
        if unknown:
            known = ", ".join(by_name) or "none"
            raise UsageError(f"patch type '{self.name}' has no option {', '.join(unknown)}; its options: {known}")
        self.config: dict[str, Any] = {
            o.name: o.check(copy.deepcopy(options[o.name]) if o.name in options else o.default)
            for o in self.options
        }
        self.trace_source = False

    @classmethod
    def target(cls, model: nn.Module) -> nn.Module:
        """The module this patch type acts on (the ViT encoder), or a ``UsageError``."""
        return vit_encoder_of(model, cls.name)

    @classmethod
    def why_not(cls, model: nn.Module) -> str | None:
        """Why this patch type does not apply to ``model`` (``None`` when it does)."""
        try:
            cls.target(model)
        except UsageError as err:
            return str(err)
        return None

    @classmethod
    def sweep(cls, encoder: nn.Module) -> list[dict[str, Any]]:
        """Settings of the main knob worth comparing on ``encoder``, mildest first (default: the defaults)."""
        return [{}]

    def bind(self, model: nn.Module) -> None:
        """Keep what the method needs from the whole model, beyond its target (default: nothing)."""

    def prepare(self, encoder: nn.Module) -> None:
        """Check the settings against ``encoder`` (depth, grid) and resolve model-dependent defaults."""

    def input_multiple(self, encoder: nn.Module) -> int:
        """Inputs are padded to a multiple of this (default: the patch size)."""
        return encoder.patch_size

    def apply(self, encoder: nn.Module) -> None:
        """Install the block overrides; ``encoder`` holds no other reduction at this point."""

    def remove(self, encoder: nn.Module) -> None:
        """Undo ``apply``."""
        restore_blocks(encoder)

    def start(self, encoder: nn.Module, im: torch.Tensor) -> tuple[torch.Tensor, MergeState]:
        """Hook (a): the tokens entering the first block and their state (default: every patch)."""
        x = encoder.embed(im)
        P = encoder.patch_size
        state = MergeState.start(
            x,
            n_prefix=encoder.num_prefix_tokens,
            grid=(im.shape[2] // P, im.shape[3] // P),
            prop_attn=self.config.get("prop_attn", False),
            trace_source=self.trace_source,
        )
        return x, state

    def finish(self, encoder: nn.Module, x: torch.Tensor, state: MergeState) -> torch.Tensor:
        """Hook (e): the output tokens after the final norm (default: unchanged)."""
        return x

    def settings(self) -> dict[str, Any]:
        """The applied option values as plain YAML/JSON types; ``type(self)(**settings)`` rebuilds it."""
        return plain(self.config)

    def __repr__(self) -> str:
        options = ", ".join(f"{k}={v!r}" for k, v in self.settings().items())
        return f"{self.name}({options})"


class Pure(TokenReducer):
    """No token reduction: every block is a plain block on every token, in any model family."""

    name = "pure"
    summary = "no token reduction"

    @classmethod
    def target(cls, model: nn.Module) -> nn.Module:
        return reducer_host(model)


class Registry(Mapping):
    """Patch types by name, in registration order; a name can be registered once."""

    def __init__(self) -> None:
        self._types: dict[str, type[TokenReducer]] = {}

    def register(self, cls: type[TokenReducer]) -> type[TokenReducer]:
        """Add a patch type (usable as a class decorator); a second one of the same name is refused."""
        if not cls.name:
            raise ValueError(f"{cls.__name__} has no patch-type name")
        if cls.name in self._types:
            raise ValueError(f"patch type '{cls.name}' is already registered ({self._types[cls.name].__qualname__})")
        self._types[cls.name] = cls
        return cls

    def __getitem__(self, name: str) -> type[TokenReducer]:
        if name not in self._types:
            raise UsageError(f"unknown patch type '{name}'; known patch types: {', '.join(self._types)}")
        return self._types[name]

    def __contains__(self, name: object) -> bool:
        return name in self._types

    def __iter__(self) -> Iterator[str]:
        return iter(self._types)

    def __len__(self) -> int:
        return len(self._types)

    def create(self, name: str, **options: Any) -> TokenReducer:
        """A reducer of patch type ``name`` with checked ``options``."""
        return self[name](**options)


def install(model: nn.Module, reducer: TokenReducer, trace_source: bool = False) -> nn.Module:
    """Apply ``reducer`` to ``model`` in place, replacing any reduction it had; returns the patched module.

    The settings are checked against the model before anything changes, so a bad option leaves the
    model as it was.
    """
    target = reducer.target(model)
    reducer.bind(model)
    reducer.prepare(target)
    reducer.trace_source = bool(trace_source)
    target.reducer.remove(target)
    target.reducer = Pure()
    reducer.apply(target)
    target.reducer = reducer
    return target


def reducer_host(model: nn.Module) -> nn.Module:
    """The module holding a model's reducer: its ViT encoder, its MiT backbone, or the module itself."""
    for candidate in (getattr(model, "encoder", None), getattr(model, "backbone", None), model):
        if candidate is not None and hasattr(candidate, "reducer"):
            return candidate
    raise UsageError(f"{type(model).__name__} holds no token reduction")


def uninstall(model: nn.Module) -> None:
    """Remove whatever reduction ``model`` (or its encoder / backbone) holds."""
    target = reducer_host(model)
    target.reducer.remove(target)
    target.reducer = Pure()
