"""The shared token-reduction mechanism (``tokred``) against brute force and timm's own code.

1. ``tokred.attention`` holds against timm's ``Attention.forward`` (plain, q/k norm, scale norm, gated;
   fused and explicit; with and without an additive mask) and against hand-written keys, class rows
   and proportional attention.
2. ``tokred.bipartite`` holds against an O(T^2) Python loop written from its module docstring.
3. ``tokred.state.MergeState``: index composition, sizes, unmerge / to_grid, attention bias, reassign,
   replace (reduced grid, weighted map), unmerge_tokens, history and the source matrix, by brute force.
4. The registry and reducer protocol through ``segm.model.token_reduction`` on a tiny Segmenter.
5. No import cycles among ``segm`` / ``algm`` / ``tokred`` (imports inside functions included), and the
   layering ``tokred`` -/-> ``segm``, ``algm``; ``algm`` -/-> ``segm``.
"""

from __future__ import annotations

import ast
import inspect
import math
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import yaml
from timm.models.vision_transformer import Attention, Block

from segm.model.factory import create_segmenter
from segm.model.token_reduction import (
    PATCH_TYPES, applied_token_reduction, apply_token_reduction, remove_token_reduction,
)
from tests.conftest import perturb_, tiny_net_kwargs
from tokred.attention import attend, attention, project_out, project_qkv
from tokred.bipartite import best_partners, bipartite_destinations, bipartite_plan, merge_cap
from tokred.errors import UsageError
from tokred.reducer import Pure, Registry, TokenReducer
from tokred.state import MergeState

ROOT = Path(__file__).resolve().parents[1]
DIM, HEADS = 32, 4


# ----------------------------------------------------------------------------- 1. attention

def attention_variants() -> list[tuple[str, dict]]:
    variants = [("plain", {}), ("qk_norm", dict(qk_norm=True, norm_layer=nn.LayerNorm)),
                ("scale_norm", dict(scale_norm=True, norm_layer=nn.LayerNorm))]
    if "gated" in inspect.signature(Attention.__init__).parameters:
        variants.append(("gated", dict(gated=True)))
    return variants


def make_attention(kwargs: dict, fused: bool, seed: int = 0) -> Attention:
    torch.manual_seed(seed)
    attn = Attention(DIM, num_heads=HEADS, qkv_bias=True, **kwargs)
    with torch.no_grad():  # every weight non-trivial, norms included (initialised to 1 / 0)
        for p in attn.parameters():
            p.add_(0.3 * torch.randn_like(p))
    attn.fused_attn = fused
    return attn.eval()


def hand_qk(attn: Attention, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """q and k (B, heads, T, hd) from the qkv weights, after the q / k norms."""
    B, T, _ = x.shape
    d = attn.attn_dim
    W, b = attn.qkv.weight, attn.qkv.bias

    def part(i: int, norm: nn.Module) -> torch.Tensor:
        y = x @ W[i * d:(i + 1) * d].T + b[i * d:(i + 1) * d]
        return norm(y.reshape(B, T, attn.num_heads, attn.head_dim).transpose(1, 2))

    return part(0, attn.q_norm), part(1, attn.k_norm)


def random_mask(B: int, T: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(B, 1, 1, T, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("with_mask", [False, True])
@pytest.mark.parametrize("name,kwargs", attention_variants(), ids=[v[0] for v in attention_variants()])
def test_attention_override_matches_timm_forward(name, kwargs, fused, with_mask):
    attn = make_attention(kwargs, fused)
    B, T = 2, 7
    x = torch.randn(B, T, DIM, generator=torch.Generator().manual_seed(2))
    mask = random_mask(B, T) if with_mask else None
    with torch.no_grad():
        want = attn(x, attn_mask=mask)
        got = attention(attn, x, mask, keys=True, cls_attn=True)
        parts = project_out(attn, attend(attn, *project_qkv(attn, x), mask), x)
        plain = attention(attn, x, mask)
        q, k = hand_qk(attn, x)
    assert torch.allclose(got.out, want, atol=1e-6)
    assert torch.allclose(parts, want, atol=1e-6)
    assert plain.keys is None and plain.cls_attn is None and torch.equal(plain.out, want)
    assert got.keys.shape == (B, T, attn.head_dim)
    assert torch.allclose(got.keys, k.mean(1), atol=1e-6)
    logits = torch.einsum("bhd,bhtd->bht", q[:, :, 0], k) * attn.head_dim ** -0.5
    if mask is not None:
        logits = logits + mask[:, :, 0]
    assert got.cls_attn.shape == (B, HEADS, T)
    assert torch.allclose(got.cls_attn, logits.softmax(-1), atol=1e-6)
    assert torch.allclose(got.cls_attn.sum(-1), torch.ones(B, HEADS), atol=1e-6)


def test_attention_changes_with_the_mask():
    """Guard for the test above: the mask really enters (the variants are not insensitive to it)."""
    attn = make_attention({}, True)
    x = torch.randn(2, 7, DIM)
    with torch.no_grad():
        assert not torch.allclose(attention(attn, x, random_mask(2, 7), keys=True).out,
                                  attention(attn, x, None, keys=True).out, atol=1e-3)


@pytest.mark.parametrize("fused", [True, False])
def test_proportional_attention_is_softmax_plus_log_size(fused):
    attn = make_attention({}, fused)
    B, T = 2, 6
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(B, T, DIM, generator=gen)
    size = torch.randint(1, 6, (B, T), generator=gen).float()
    mask = size.log()[:, None, None, :]
    with torch.no_grad():
        d = attn.attn_dim
        q, k, v = (x @ attn.qkv.weight[i * d:(i + 1) * d].T + attn.qkv.bias[i * d:(i + 1) * d] for i in range(3))
        q, k, v = (t.reshape(B, T, HEADS, -1).transpose(1, 2) for t in (q, k, v))
        w = (q @ k.transpose(-1, -2) / math.sqrt(attn.head_dim) + size.log()[:, None, None, :]).softmax(-1)
        want = attn.proj((w @ v).transpose(1, 2).reshape(B, T, d))
        got = attention(attn, x, mask, keys=True).out
        timm_out = attn(x, attn_mask=mask)
        unmasked = attn(x)
    assert torch.allclose(got, want, atol=1e-6)
    assert torch.allclose(timm_out, want, atol=1e-6)
    assert not torch.allclose(unmasked, want, atol=1e-3)


# ----------------------------------------------------------------------------- 2. bipartite matcher

def brute_dest(metric: torch.Tensor, r: int, n_prefix: int) -> list[int]:
    """The docstring's rules, one image (T, c), by loops."""
    T = metric.shape[0]
    r = min(r, (T - n_prefix) // 2)
    unit = [row / max(float(row.norm()), 1e-8) for row in metric.double()]
    A, Bset = list(range(0, T, 2)), list(range(1, T, 2))
    best = {}
    for a in A[1:]:  # the class token is never a source
        cands = [b for b in Bset if not (n_prefix == 2 and b == 1)]
        if cands:
            best[a] = max((float(unit[a] @ unit[b]), b) for b in cands)
    sources = sorted(best, key=lambda a: -best[a][0])[:r]
    kept = [a for a in A if a not in sources]
    order = kept + Bset if n_prefix == 1 else [0, 1] + kept[1:] + Bset[1:]
    pos = {t: i for i, t in enumerate(order)}
    return [pos[t] if t in pos else pos[best[t][1]] for t in range(T)]


def brute_merge(x: torch.Tensor, size: torch.Tensor, dest: list[int], n_out: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Size-weighted mean per destination row, one image: x (T, C), size (T,)."""
    out, sizes = torch.zeros(n_out, x.shape[1], dtype=torch.float64), torch.zeros(n_out, dtype=torch.float64)
    for t, j in enumerate(dest):
        out[j] += size[t] * x[t].double()
        sizes[j] += size[t]
    return out / sizes[:, None], sizes


CASES = [(1, (2, 3)), (1, (3, 3)), (2, (2, 3)), (2, (3, 3)), (1, (1, 2)), (2, (1, 2))]  # T = 7, 10, 8, 11, 3, 4


@pytest.mark.parametrize("n_prefix,grid", CASES)
def test_bipartite_plan_matches_brute_force(n_prefix, grid):
    T = n_prefix + grid[0] * grid[1]
    cap = merge_cap(T, n_prefix)
    assert cap == (T - n_prefix) // 2
    gen = torch.Generator().manual_seed(T * 10 + n_prefix)
    B, C = 3, 5
    metric = torch.randn(B, T, 4, generator=gen)
    x = torch.randn(B, T, C, generator=gen)
    for r in sorted({0, 1, 2, cap, cap + 3}):
        want = [brute_dest(metric[b], r, n_prefix) for b in range(B)]
        n_want = T - min(r, cap)
        assert all(sorted(set(w)) == list(range(n_want)) for w in want)
        node_max, node_idx = best_partners(metric, n_prefix)
        direct = bipartite_destinations(node_max, node_idx, T, min(r, cap), n_prefix)
        assert direct.tolist() == want, f"r={r}"
        dest, n_out = bipartite_plan(metric, r, n_prefix)
        if min(r, cap) <= 0:
            assert dest is None and n_out == T
            continue
        assert n_out == n_want and dest.tolist() == want, f"r={r}"
        state = MergeState.start(x, n_prefix, grid)
        merged = state.merge(x, dest, n_out)
        for b in range(B):
            ref, ref_size = brute_merge(x[b], torch.ones(T), want[b], n_out)
            assert torch.allclose(merged[b].double(), ref, atol=1e-6)
            assert torch.equal(state.size[b, :, 0].double(), ref_size)
            assert want[b][:n_prefix] == list(range(n_prefix))  # prefix tokens stay in front, unmerged


def test_best_partners_protects_class_and_distillation_tokens():
    metric = torch.randn(2, 8, 3)
    for n_prefix in (1, 2):
        node_max, node_idx = best_partners(metric, n_prefix)
        assert node_max.shape == node_idx.shape == (2, 4)
        assert torch.isinf(node_max[:, 0]).all() and (node_max[:, 0] < 0).all()
        assert torch.isfinite(node_max[:, 1:]).all()
        if n_prefix == 2:
            assert (node_idx[:, 1:] != 0).all()


@pytest.mark.parametrize("n_prefix", [0, 3])
def test_bipartite_rejects_other_prefix_counts(n_prefix):
    with pytest.raises(UsageError):
        bipartite_plan(torch.randn(1, 9, 4), 2, n_prefix)
    with pytest.raises(UsageError):
        best_partners(torch.randn(1, 9, 4), n_prefix)


def test_bipartite_plan_without_merging_returns_none():
    for r in (0, -1):
        assert bipartite_plan(torch.randn(2, 9, 4), r, 1) == (None, 9)


# ----------------------------------------------------------------------------- 3. MergeState

def two_steps(prop_attn: bool = False, trace_source: bool = False, n_prefix: int = 1, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    B, grid, C = 3, (3, 4), 6
    T = n_prefix + 12
    x0 = torch.randn(B, T, C, generator=gen)
    state = MergeState.start(x0, n_prefix, grid, prop_attn=prop_attn, trace_source=trace_source)
    d1, n1 = bipartite_plan(torch.randn(B, T, 4, generator=gen), 3, n_prefix)
    x1 = state.merge(x0, d1, n1)
    index1 = state.index.clone()
    d2, n2 = bipartite_plan(torch.randn(B, n1, 4, generator=gen), 2, n_prefix)
    x2 = state.merge(x1, d2, n2)
    return state, x0, x1, x2, d1, d2, index1


@pytest.mark.parametrize("n_prefix", [1, 2])
def test_merge_state_two_steps_by_brute_force(n_prefix):
    state, x0, x1, x2, d1, d2, index1 = two_steps(n_prefix=n_prefix)
    B, T0, C = x0.shape
    N, n2 = T0 - n_prefix, x2.shape[1]
    final = [[d2[b, d1[b, t]].item() for t in range(T0)] for b in range(B)]  # original row -> final row
    assert torch.equal(index1, d1[:, n_prefix:])
    assert state.index.tolist() == [row[n_prefix:] for row in final]
    assert state.merged and not state.is_raster and state.num_tokens == n2 == x2.shape[1]
    for b in range(B):
        counts = [final[b].count(j) for j in range(n2)]
        assert state.size[b, :, 0].tolist() == counts
        ref = torch.stack([x0[b][[t for t in range(T0) if final[b][t] == j]].double().mean(0) for j in range(n2)])
        assert torch.allclose(x2[b].double(), ref, atol=1e-6)  # size-weighted mean of means = mean of patches
    y = torch.randn(B, n2 - n_prefix, 5)
    gh, gw = state.patch_grid
    assert (gh, gw) == (3, 4)
    un, g = state.unmerge(y), state.to_grid(y)
    assert un.shape == (B, N, 5) and g.shape == (B, 5, gh, gw)
    for b in range(B):
        for p in range(N):
            row = final[b][n_prefix + p] - n_prefix
            assert torch.equal(un[b, p], y[b, row])
            assert torch.equal(g[b, :, p // gw, p % gw], y[b, row])


def test_merge_state_start():
    x = torch.randn(2, 7, 3)
    state = MergeState.start(x, 1, (2, 3))
    assert state.index.tolist() == [list(range(1, 7))] * 2
    assert torch.equal(state.size, torch.ones(2, 7, 1)) and state.is_raster and not state.merged
    y = torch.randn(2, 6, 4)
    assert torch.equal(state.to_grid(y), y.transpose(1, 2).reshape(2, 4, 2, 3))
    with pytest.raises(UsageError):
        MergeState.start(torch.randn(2, 8, 3), 1, (2, 3))
    with pytest.raises(UsageError):
        MergeState.start(torch.randn(2, 7, 3), 2, (2, 3))


def test_attn_bias():
    plain, *_ = two_steps(prop_attn=False)
    assert plain.attn_bias(torch.float32) is None
    x = torch.randn(3, 13, 6)
    fresh = MergeState.start(x, 1, (3, 4), prop_attn=True)
    assert fresh.attn_bias(torch.float32) is None
    state, *_ = two_steps(prop_attn=True)
    bias = state.attn_bias(torch.float64)
    T = state.num_tokens
    assert bias.shape == (3, 1, 1, T) and bias.dtype == torch.float64
    assert torch.equal(bias[:, 0, 0], state.size[..., 0].log().double())
    assert (bias > 0).any()


def test_reassign_changes_the_map_not_the_tokens():
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(2, 7, 3, generator=gen)
    keep = x.clone()
    state = MergeState.start(x, 1, (2, 3))
    dest = torch.tensor([[0, 1, 1, 2, 3, 3, 1], [0, 2, 1, 1, 3, 2, 3]])
    assert state.reassign(dest, 4) is None
    assert torch.equal(x, keep)
    assert state.index.tolist() == dest[:, 1:].tolist()
    assert state.size[..., 0].tolist() == [[1, 3, 1, 2], [1, 2, 2, 2]]
    assert state.merged


def test_replace_with_a_reduced_grid():
    state, *_ = two_steps()
    x = torch.randn(3, 1 + 6, 4)
    assert state.replace(x, out_grid=(2, 3)) is x
    assert state.index is None and state.patch_grid == (2, 3)
    assert torch.equal(state.size, torch.ones(3, 7, 1))
    y = torch.randn(3, 6, 5)
    assert torch.equal(state.to_grid(y), y.transpose(1, 2).reshape(3, 5, 2, 3))
    with pytest.raises(ValueError):
        state.unmerge(y)
    with pytest.raises(ValueError):
        state.replace(torch.randn(3, 8, 4), out_grid=(2, 3))
    with pytest.raises(ValueError):
        state.replace(x)
    with pytest.raises(ValueError):
        state.replace(x, index=torch.ones(3, 12, dtype=torch.long), out_grid=(2, 3))


def test_replace_with_a_weighted_map():
    gen = torch.Generator().manual_seed(7)
    B, grid, n_prefix, T, k = 2, (3, 4), 1, 6, 3
    state = MergeState.start(torch.randn(B, 13, 4), n_prefix, grid)
    idx = torch.randint(n_prefix, T, (B, 12, k), generator=gen)
    w = torch.rand(B, 12, k, generator=gen)
    size = torch.rand(B, T, 1, generator=gen) + 1
    state.replace(torch.randn(B, T, 4), index=idx, weight=w, size=size)
    assert state.size is size and state.merged
    y = torch.randn(B, T - n_prefix, 5, generator=gen)
    want = torch.zeros(B, 12, 5)
    for b in range(B):
        for p in range(12):
            for j in range(k):
                want[b, p] += w[b, p, j] * y[b, idx[b, p, j] - n_prefix]
    assert torch.allclose(state.unmerge(y), want, atol=1e-6)
    assert torch.allclose(state.to_grid(y), want.transpose(1, 2).reshape(B, 5, 3, 4), atol=1e-6)


@pytest.mark.parametrize("n_prefix", [1, 2])
def test_unmerge_tokens_restores_one_token_per_patch(n_prefix):
    state, x0, x1, x2, *_ = two_steps(prop_attn=True, n_prefix=n_prefix)
    index = state.index.clone()
    full = state.unmerge_tokens(x2)
    B, T0, C = x0.shape
    assert full.shape == (B, T0, C)
    assert torch.equal(full[:, :n_prefix], x2[:, :n_prefix])
    for b in range(B):
        for p in range(T0 - n_prefix):
            assert torch.equal(full[b, n_prefix + p], x2[b, index[b, p]])
    assert state.index.tolist() == [list(range(n_prefix, T0))] * B
    assert torch.equal(state.size, torch.ones(B, T0, 1)) and state.weight is None
    assert not state.merged and state.is_raster and state.attn_bias(torch.float32) is None


def test_trace_source_history_and_source_matrix():
    quiet, *_ = two_steps(trace_source=False)
    assert quiet.history == []
    state, x0, x1, x2, d1, d2, index1 = two_steps(trace_source=True)
    assert len(state.history) == 2
    assert torch.equal(state.history[0], index1) and torch.equal(state.history[1], state.index)
    state.merge(x2, None, x2.shape[1])
    assert len(state.history) == 3 and torch.equal(state.history[2], state.index)
    S = state.source_matrix()
    B, N = state.index.shape
    n_rows = int(state.index.max()) - state.n_prefix + 1
    assert S.shape == (B, n_rows, N)
    assert set(S.unique().tolist()) <= {0.0, 1.0}
    assert torch.equal(S.sum(1), torch.ones(B, N))  # every patch belongs to exactly one token
    for b in range(B):
        for p in range(N):
            assert S[b, state.index[b, p] - state.n_prefix, p] == 1
    assert torch.equal(S.sum(2), state.size[:, state.n_prefix:state.n_prefix + n_rows, 0])
    assert torch.equal(state.source_matrix(state.history[0]).sum(1), torch.ones(B, N))


# ----------------------------------------------------------------------------- 4. registry and protocol

@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    model = tiny_segmenter()
    im = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        pure = model(im)
    return model, im, pure


def test_registry_refuses_duplicates_and_nameless_classes():
    reg = Registry()

    class One(TokenReducer):
        name = "one"

    class Other(TokenReducer):
        name = "one"

    class Nameless(TokenReducer):
        pass

    assert reg.register(One) is One and list(reg) == ["one"] and len(reg) == 1 and "one" in reg
    with pytest.raises(ValueError, match="'one'"):
        reg.register(Other)
    with pytest.raises(ValueError, match="Nameless"):
        reg.register(Nameless)
    assert reg["one"] is One and isinstance(reg.create("one"), One)
    with pytest.raises(UsageError, match="one"):
        reg["two"]


def test_patch_types_and_unknown_names(tiny):
    model, *_ = tiny
    assert {"pure", "algm", "tome", "tome_sublayer"} <= set(PATCH_TYPES)
    assert PATCH_TYPES["pure"] is Pure
    for call in (lambda: PATCH_TYPES["no_such"], lambda: apply_token_reduction(model, "no_such")):
        with pytest.raises(UsageError) as err:
            call()
        assert "no_such" in str(err.value) and all(name in str(err.value) for name in PATCH_TYPES)
    assert applied_token_reduction(model) == ("pure", {})


@pytest.mark.parametrize("patch_type", list(PATCH_TYPES))
def test_unknown_option_lists_the_options(tiny, patch_type):
    model, *_ = tiny
    with pytest.raises(UsageError) as err:
        apply_token_reduction(model, patch_type, bogus_option=1)
    msg = str(err.value)
    assert "bogus_option" in msg and all(o.name in msg for o in PATCH_TYPES[patch_type].options)
    assert applied_token_reduction(model) == ("pure", {})


def test_options_are_keyword_only(tiny):
    model, *_ = tiny
    with pytest.raises(TypeError):
        apply_token_reduction(model, "tome", 8)


def tiny_segmenter():
    net = {**tiny_net_kwargs(), "policy_method": "policy_net", "policy_schedule": (8, 2)}  # every type applies (CTS too)
    return perturb_(create_segmenter(net)).eval()


VIT_TYPES = [name for name, cls in PATCH_TYPES.items() if cls.why_not(tiny_segmenter()) is None]


@pytest.mark.parametrize("patch_type", VIT_TYPES)
def test_patch_adds_nothing_and_removes_cleanly(tiny, patch_type):
    model, im, pure = tiny
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    keys = list(model.state_dict())
    settings = apply_token_reduction(model, patch_type, **fitting(patch_type, model))
    try:
        assert {n: p for n, p in model.named_parameters()}.keys() == params.keys()
        assert list(model.state_dict()) == keys
        assert applied_token_reduction(model) == (patch_type, settings)
        with torch.no_grad():
            out = model(im)
        assert out.shape == pure.shape and torch.isfinite(out).all()
    finally:
        remove_token_reduction(model)
    assert all(type(b) is Block and not hasattr(b, "spec") for b in model.encoder.blocks)
    assert applied_token_reduction(model) == ("pure", {})
    assert all(torch.equal(p, params[n]) for n, p in model.named_parameters())
    with torch.no_grad():
        assert torch.equal(model(im), pure)


def block_layout(model) -> list[tuple[type, object]]:
    return [(type(b), getattr(b, "spec", None)) for b in model.encoder.blocks]


@pytest.mark.parametrize("second", VIT_TYPES)
@pytest.mark.parametrize("first", VIT_TYPES)
def test_second_patch_replaces_the_first(tiny, first, second):
    model, im, pure = tiny
    try:
        apply_token_reduction(model, second, **fitting(second, model))
        alone = block_layout(model)
        remove_token_reduction(model)
        apply_token_reduction(model, first, **fitting(first, model))
        settings = apply_token_reduction(model, second, **fitting(second, model))
        assert block_layout(model) == alone
        assert applied_token_reduction(model) == (second, settings)
    finally:
        remove_token_reduction(model)
    assert all(type(b) is Block for b in model.encoder.blocks)


def fitting(patch_type: str, model) -> dict:
    """The mildest sweep point of a patch type on ``model``: options that fit its tiny grid."""
    return PATCH_TYPES[patch_type].sweep(model.encoder)[0]


NON_DEFAULT = {"tome": dict(r=(3, -0.5), prop_attn=False), "tome_sublayer": dict(ratio=0.3),
               "evit": dict(keep_rate=0.5, drop_layers=[2, 5], fuse_token=False),
               "act": dict(q_hashes=8, seed=3, layers=[1, 4]),
               "expedite": dict(after_layer=3, num_clusters=(2, 3), n_iters=2, reconstruct=True, recon_k=2),
               "algm": dict(selected_layers=[2, 4], window_size=(2, 1), threshold=0.5)}


def is_plain(value) -> bool:
    if isinstance(value, list):
        return all(is_plain(v) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and is_plain(v) for k, v in value.items())
    return value is None or isinstance(value, (bool, int, float, str))


@pytest.mark.parametrize("options", ["default", "custom"])
@pytest.mark.parametrize("patch_type", VIT_TYPES)
def test_settings_rebuild_and_survive_yaml(tiny, patch_type, options):
    model, *_ = tiny
    kwargs = NON_DEFAULT.get(patch_type, {}) if options == "custom" else fitting(patch_type, model)
    try:
        applied = apply_token_reduction(model, patch_type, **kwargs)
        reducer = model.encoder.reducer
        for settings in (PATCH_TYPES.create(patch_type, **kwargs).settings(), applied):
            assert is_plain(settings), settings
            assert yaml.safe_load(yaml.safe_dump(settings)) == settings
        assert type(reducer)(**reducer.settings()).settings() == reducer.settings() == applied
        again = apply_token_reduction(model, patch_type, **applied)
        assert again == applied
    finally:
        remove_token_reduction(model)


# ----------------------------------------------------------------------------- 5. import graph

PACKAGES = ("segm", "algm", "tokred")


def module_files() -> dict[str, Path]:
    mods = {}
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            mods[".".join(parts)] = path
    return mods


def imports_of(module: str, path: Path, known: set[str]) -> set[str]:
    """Every module of the three packages that ``module`` imports, anywhere in its body."""
    is_pkg = path.name == "__init__.py"
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".")
                base = base[:len(base) - node.level + (1 if is_pkg else 0)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module
            for a in node.names:
                sub = f"{target}.{a.name}"
                found.add(sub if sub in known else target)
        elif (isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) == "import_module"
              and node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
            found.add(node.args[0].value)
    own = [p for p in found if p.split(".")[0] in PACKAGES]
    parents = {".".join(module.split(".")[:i]) for i in range(1, module.count(".") + 1)}
    if is_pkg:
        parents.add(module)
    return {m for m in own if m not in parents}


def import_graph() -> dict[str, set[str]]:
    mods = module_files()
    return {m: imports_of(m, p, set(mods)) for m, p in mods.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    color, stack = {}, []

    def visit(m: str) -> list[str] | None:
        color[m] = 1
        stack.append(m)
        for n in sorted(graph.get(m, ())):
            if color.get(n) == 1:
                return stack[stack.index(n):] + [n]
            if n not in color and (cycle := visit(n)):
                return cycle
        stack.pop()
        color[m] = 2
        return None

    for m in sorted(graph):
        if m not in color and (cycle := visit(m)):
            return cycle
    return None


def test_import_graph_resolves_and_has_no_cycle():
    graph = import_graph()
    assert {"tokred.state", "algm.patch", "segm.model.token_reduction"} <= graph.keys()
    assert "tokred.state" in graph["tokred.blocks"] and "algm.patch" in graph["segm.model.token_reduction"]
    unresolved = {(m, n) for m, deps in graph.items() for n in deps if n not in graph}
    assert not unresolved, f"imports of modules that do not exist: {sorted(unresolved)}"
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_find_cycle_reports_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_layering_of_the_packages():
    graph = import_graph()
    bad = {(m, n) for m, deps in graph.items() for n in deps
           if (m.split(".")[0] == "tokred" and n.split(".")[0] in ("segm", "algm"))
           or (m.split(".")[0] == "algm" and n.split(".")[0] == "segm")}
    assert not bad, sorted(bad)
