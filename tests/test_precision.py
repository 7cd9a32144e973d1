"""Precision policy: under bf16 autocast, token reduction converts tensors a fixed number of times per forward.

A dispatch mode counts every ``aten._to_copy`` of a non-parameter tensor during one forward, leaving out
those inside ``fp32_island`` functions (the declared fp32 decisions). Autocast itself narrows the inputs
of every block's qkv and fc1 projections, so the pure model's count grows with depth; a patch type may
add a few conversions, but the same number at depth 4 and at depth 8. Islands keep their matmuls fp32.
"""

from __future__ import annotations

import collections
import sys

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from segm.model.token_reduction import PATCH_TYPES, apply_token_reduction
from tests.conftest import tiny_vit_with_parts
from tokred.bipartite import best_partners
from tokred.cts import policy_logits
from tokred.precision import compute_dtype, fp32_island
from tokred.state import MergeState

ISLAND = fp32_island(lambda: None).__code__

# Settings that reduce tokens at depth 4 and at depth 8 alike (blocks counted from 1).
SETTINGS = {
    "pure": {},
    "algm": {"selected_layers": [1, 3], "threshold": 0.0},
    "tome": {"r": 2},
    "tome_sublayer": {"ratio": 0.2},
    "evit": {"keep_rate": 0.7, "drop_layers": [2, 3]},
    "act": {"q_hashes": 4, "seed": 0},
    "expedite": {"after_layer": 2, "num_clusters": (3, 3)},
    "cts": {"num_shared": 2},
}


class CastCounter(TorchDispatchMode):
    """Counts ``_to_copy`` calls by (source dtype, target dtype), outside fp32 islands and parameters."""

    def __init__(self, parameters: set[int]):
        super().__init__()
        self.parameters = parameters
        self.counts: collections.Counter = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.ops.aten._to_copy.default and args[0].untyped_storage().data_ptr() not in self.parameters:
            if not in_island():
                self.counts[(args[0].dtype, kwargs.get("dtype", args[0].dtype))] += 1
        return func(*args, **kwargs)


def in_island() -> bool:
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code is ISLAND:
            return True
        frame = frame.f_back
    return False


def conversions(patch_type: str, depth: int) -> int:
    """Conversions outside islands in one bf16-autocast forward of a tiny model with ``depth`` blocks."""
    model = tiny_vit_with_parts(depth)
    apply_token_reduction(model, patch_type, **SETTINGS[patch_type])
    counter = CastCounter({p.untyped_storage().data_ptr() for p in model.parameters()})
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16), counter:
        model(x)
    return sum(counter.counts.values())


def test_every_vit_patch_type_is_counted():
    model = tiny_vit_with_parts(4)
    assert {name for name, reducer in PATCH_TYPES.items() if reducer.why_not(model) is None} == set(SETTINGS)


@pytest.mark.parametrize("patch_type", sorted(set(SETTINGS) - {"pure"}))
def test_conversions_do_not_grow_with_depth(patch_type):
    pure = {depth: conversions("pure", depth) for depth in (4, 8)}
    method = {depth: conversions(patch_type, depth) for depth in (4, 8)}
    assert pure[8] - pure[4] == 8  # autocast narrows the qkv and fc1 inputs of every block
    assert method[8] - method[4] == pure[8] - pure[4]
    assert 0 <= method[4] - pure[4] <= 4


def test_island_keeps_matmuls_in_fp32_under_autocast():
    metric = torch.randn(2, 9, 8, generator=torch.Generator().manual_seed(0))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        node_max, node_idx = best_partners(metric, 1)
    exact_max, exact_idx = best_partners(metric, 1)
    assert node_max.dtype == torch.float32
    assert torch.equal(node_max, exact_max) and torch.equal(node_idx, exact_idx)


def test_cts_policy_decides_in_fp32_under_autocast():
    model = tiny_vit_with_parts(4)
    apply_token_reduction(model, "cts", **SETTINGS["cts"])
    im = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        exact = policy_logits(model.policy_net, im)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = policy_logits(model.policy_net, im)
            narrowed = model.policy_net(im)["logits"]
    assert logits.dtype == torch.float32 and torch.equal(logits, exact)
    assert narrowed.dtype == torch.bfloat16


def test_compute_dtype_follows_autocast():
    x = torch.zeros(2, 3)
    assert compute_dtype(x) == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert compute_dtype(x) == torch.bfloat16
        assert compute_dtype(torch.zeros(2, dtype=torch.long)) == torch.long


def test_attention_bias_is_written_in_the_attention_dtype():
    size = torch.tensor([[[1.0], [3.0], [7.0]]])
    state = MergeState(size, None, 1, (1, 2), prop_attn=True, merged=True)
    bias = state.attn_bias(torch.bfloat16)
    assert bias.dtype == torch.bfloat16 and bias.shape == (1, 1, 1, 3)
    assert torch.equal(bias, size.log().to(torch.bfloat16).transpose(1, 2).unsqueeze(1))
