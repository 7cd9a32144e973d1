"""ToMe and Expedite's per-sublayer ToMe on whole Segmenters, held against brute-force forwards.

The brute force follows methods.md §1.1-1.6 (``tome``) and §1.9 (``tome_sublayer``), not the
implementation. It runs one image at a time in float64 on a double copy of the model:

- attention is ``softmax(q k^T / sqrt(hd) + log size) v`` computed from each block's ``qkv`` / ``proj``
  weights (the blocks' q/k norms, layer scales and output norm are checked to be identities);
- ToMe merges after the attention residual and before the MLP, with the keys averaged over heads as
  the metric; the matching loops over the A tokens (even positions; the class token A[0] is never a
  source, nothing merges into a distillation token B[0]), picks the ``min(r, (T - prefix) // 2)`` A
  tokens with the highest best cosine similarity and merges each into its best B token; the output
  order is ``[unmerged A ascending, all B]`` or ``[cls, dist, other unmerged A, other B]``;
- a step is a one-hot group matrix G (T_new, T_old): tokens become ``G (x * size) / G size``, sizes
  ``G size`` and the dense source matrix (T, N) of the patches each token holds becomes ``G S``;
- the decoder's ``token_logits`` run on the merged patch tokens, every patch receives its token's row
  (``S^T y``), and the grid is upsampled bilinearly (align_corners=False) like ``Segmenter.forward``;
- ``tome_sublayer`` merges the LayerNorm output ``u`` by plain mean (``r = int(T * ratio)``, metric
  ``u``) before each of attention and MLP, and copies every merged output back to its members (``G^T y``).

Each brute force also records its smallest decision margin (gap between the r-th and (r+1)-th best
similarity, between a source's best and second-best partner) so that a near tie in a fixture, where
float32 and float64 may legitimately decide differently, is reported as such.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.models.vision_transformer import Block

from segm.model.factory import create_segmenter
from segm.model.token_reduction import apply_token_reduction, remove_token_reduction
from tokred.errors import UsageError
from tokred.tome import parse_r
from tests.conftest import perturb_, tiny_net_kwargs

VIT, DEIT = "vit_tiny_patch16_384", "deit_tiny_distilled_patch16_224"
ATOL = 1e-4
MARGIN = 1e-5
INF = math.inf
DEPTH = 12
SCHEDULE = [16, 14, 13, 11, 10, 8, 7, 5, 4, 2, 1, 0]  # parse_r((8, -1.0), 12)


pytestmark = pytest.mark.usefixtures("one_thread")


def make_model(decoder: str = "linear", backbone: str = VIT, seed: int = 0, **net) -> nn.Module:
    torch.manual_seed(seed)
    kwargs = tiny_net_kwargs(decoder, backbone, crop=64)
    kwargs.update(net)
    return perturb_(create_segmenter(kwargs), seed).eval()


def images(batch: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 3, h, w, generator=torch.Generator().manual_seed(seed))


def double_copy(model: nn.Module) -> nn.Module:
    """The float64 copy the brute force runs on; its blocks must be plain pre-norm blocks it can mirror."""
    ref = copy.deepcopy(model).double().eval()
    for blk in ref.encoder.blocks:
        assert type(blk) is Block
        for m in (blk.attn.q_norm, blk.attn.k_norm, blk.attn.norm, blk.ls1, blk.ls2):
            assert isinstance(m, nn.Identity)
        assert getattr(blk.attn, "gate", None) is None
    return ref


# ----------------------------------------------------------------------------------------- brute force


def bf_attention(blk: Block, u: torch.Tensor, bias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One image's attention output (T, C) and its keys averaged over heads (T, hd); ``bias`` (T,) per key."""
    T, C = u.shape
    h = blk.attn.num_heads
    q, k, v = blk.attn.qkv(u).reshape(T, 3, h, C // h).permute(1, 2, 0, 3)
    logits = q @ k.transpose(1, 2) * (C // h) ** -0.5
    if bias is not None:
        logits = logits + bias
    heads = logits.softmax(-1) @ v
    return blk.attn.proj(heads.transpose(0, 1).reshape(T, C)), k.mean(0)


def dot(a: list[float], b: list[float]) -> float:
    return sum(x * y for x, y in zip(a, b))


def bf_match(metric: torch.Tensor, r: int, n_prefix: int) -> tuple[torch.Tensor | None, float]:
    """The group matrix (T - r, T) of one bipartite step on ``metric`` (T, c), and its decision margin."""
    T = metric.shape[0]
    r = min(r, (T - n_prefix) // 2)
    if r <= 0:
        return None, INF
    unit = (metric / metric.norm(dim=-1, keepdim=True)).tolist()
    a_pos, b_pos = list(range(0, T, 2)), list(range(1, T, 2))
    cols = [j for j in range(len(b_pos)) if not (n_prefix == 2 and j == 0)]
    best, gap = {}, {}
    for i in range(1, len(a_pos)):  # A[0] is the class token: never a source
        sims = sorted(((dot(unit[a_pos[i]], unit[b_pos[j]]), j) for j in cols), reverse=True)
        best[i] = sims[0]
        gap[i] = sims[0][0] - sims[1][0] if len(sims) > 1 else INF
    order = sorted(best, key=lambda i: -best[i][0])
    src = set(order[:r])
    margin = min([gap[i] for i in src] + ([best[order[r - 1]][0] - best[order[r]][0]] if r < len(order) else []))
    kept = [[a] for i, a in enumerate(a_pos) if i not in src]
    into_b = [[b] + [a_pos[i] for i in sorted(src) if best[i][1] == j] for j, b in enumerate(b_pos)]
    groups = kept[:1] + into_b[:1] + kept[1:] + into_b[1:] if n_prefix == 2 else kept + into_b
    g = torch.zeros(len(groups), T, dtype=torch.float64)
    for t, members in enumerate(groups):
        g[t, members] = 1.0
    assert g.shape[0] == T - r and torch.equal(g.sum(0), torch.ones(T, dtype=torch.float64))
    return g, margin


@dataclass
class BfOut:
    """One image's brute-force result: logits (K, H, W), final tokens, sizes, source (T, N), margin."""

    logits: torch.Tensor
    tokens: torch.Tensor
    size: torch.Tensor
    source: torch.Tensor
    margin: float


def bf_decode(model: nn.Module, x: torch.Tensor, source: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
    p = model.encoder.num_prefix_tokens
    assert not source[:p].any()
    y = model.decoder.token_logits(x[None, p:])[0]
    patches = source[p:].T @ y
    grid = patches.T.reshape(1, -1, hw[0] // 16, hw[1] // 16)
    return F.interpolate(grid, size=hw, mode="bilinear", align_corners=False)[0]


def start(model: nn.Module, im: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    x = model.encoder.embed(im[None])[0]
    p = model.encoder.num_prefix_tokens
    N = x.shape[0] - p
    source = torch.cat([torch.zeros(p, N), torch.eye(N)]).double()
    return x, torch.ones(x.shape[0], dtype=torch.float64), source


def bf_tome(model: nn.Module, im: torch.Tensor, r_list: list[int], prop_attn: bool = True) -> BfOut:
    """ToMe Segmenter forward of one image (3, H, W) on the double model."""
    p = model.encoder.num_prefix_tokens
    x, size, source = start(model, im)
    margin = INF
    for blk, r in zip(model.encoder.blocks, r_list):
        out, keys = bf_attention(blk, blk.norm1(x), size.log() if prop_attn else None)
        x = x + out
        g, m = bf_match(keys, r, p)
        if g is not None:
            x = g @ (x * size[:, None]) / (g @ size)[:, None]
            size, source, margin = g @ size, g @ source, min(margin, m)
        x = x + blk.mlp(blk.norm2(x))
    x = model.encoder.norm(x)
    return BfOut(bf_decode(model, x, source, tuple(im.shape[1:])), x, size, source, margin)


def bf_sublayer(fn, u: torch.Tensor, ratio: float, p: int) -> tuple[torch.Tensor, float]:
    g, margin = bf_match(u, int(u.shape[0] * ratio), p)
    if g is None:
        return fn(u), INF
    return g.T @ fn(g @ u / g.sum(1, keepdim=True)), margin


def bf_tome_sublayer(model: nn.Module, im: torch.Tensor, ratio: float) -> BfOut:
    """Per-sublayer merge -> compute -> copy back, on the full residual stream."""
    p = model.encoder.num_prefix_tokens
    x, size, source = start(model, im)
    margin = INF
    for blk in model.encoder.blocks:
        out, m1 = bf_sublayer(lambda u: bf_attention(blk, u)[0], blk.norm1(x), ratio, p)
        x = x + out
        out, m2 = bf_sublayer(blk.mlp, blk.norm2(x), ratio, p)
        x = x + out
        margin = min(margin, m1, m2)
    x = model.encoder.norm(x)
    return BfOut(bf_decode(model, x, source, tuple(im.shape[1:])), x, size, source, margin)


def token_count(T: int, p: int, r_list: list[int]) -> int:
    for r in r_list:
        T -= min(r, (T - p) // 2)
    return T


def assert_matches(model: nn.Module, x: torch.Tensor, bfs: list[BfOut]) -> None:
    """``model(x)``, its encoder tokens, sizes and source matrices equal the brute force per image."""
    with torch.no_grad():
        got = model(x)
        tokens, state = model.encoder.forward_tokens(x)
    source = state.source_matrix() if state.index is not None and not state.is_raster else None
    for b, bf in enumerate(bfs):
        assert bf.margin > MARGIN, f"fixture has a near tie ({bf.margin:.2e}); pick another seed"
        assert got[b].shape == bf.logits.shape
        assert torch.allclose(got[b].double(), bf.logits, atol=ATOL), (got[b].double() - bf.logits).abs().max()
        assert tokens[b].shape == bf.tokens.shape
        assert torch.allclose(tokens[b].double(), bf.tokens, atol=ATOL), (tokens[b].double() - bf.tokens).abs().max()
        assert torch.equal(state.size[b, :, 0].double(), bf.size)
        if source is not None:
            assert torch.equal(source[b].double(), bf.source[model.encoder.num_prefix_tokens:])


# --------------------------------------------------------------------------------------- brute force


TOME_CASES = [
    pytest.param("linear", VIT, (128, 128), 8, [8] * DEPTH, True, id="linear-r8"),
    pytest.param("mask_transformer", VIT, (128, 128), 8, [8] * DEPTH, True, id="mask-r8"),
    pytest.param("linear", DEIT, (128, 128), 8, [8] * DEPTH, True, id="linear-deit-r8"),
    pytest.param("mask_transformer", DEIT, (96, 128), 8, [8] * DEPTH, True, id="mask-deit-r8-nonsquare"),
    pytest.param("linear", VIT, (64, 96), 100, [100] * DEPTH, True, id="linear-cap-binds"),
    pytest.param("mask_transformer", DEIT, (80, 112), 40, [40] * DEPTH, True, id="mask-deit-cap-binds-odd-grid"),
    pytest.param("mask_transformer", VIT, (96, 128), (8, -1.0), SCHEDULE, True, id="mask-schedule-nonsquare"),
    pytest.param("linear", DEIT, (128, 112), (8, -1.0), SCHEDULE, True, id="linear-deit-schedule"),
    pytest.param("linear", VIT, (128, 128), 8, [8] * DEPTH, False, id="linear-no-prop"),
    pytest.param("mask_transformer", DEIT, (112, 80), 8, [8] * DEPTH, False, id="mask-deit-no-prop"),
    pytest.param("mask_transformer", VIT, (80, 80), [4, 0, 6], [4, 0, 6] + [0] * 9, True, id="mask-list"),
]


@pytest.mark.parametrize("decoder,backbone,hw,r,r_list,prop_attn", TOME_CASES)
def test_tome_matches_bruteforce(decoder, backbone, hw, r, r_list, prop_attn):
    model = make_model(decoder, backbone)
    ref = double_copy(model)
    x = images(2, *hw, seed=hw[0] + hw[1])
    with torch.no_grad():
        pure = model(x)
        bfs = [bf_tome(ref, im.double(), r_list, prop_attn) for im in x]
    settings = apply_token_reduction(model, "tome", r=r, prop_attn=prop_attn)
    assert settings == {"r": r if isinstance(r, int) else r_list, "prop_attn": prop_attn}
    p = model.encoder.num_prefix_tokens
    n = p + (hw[0] // 16) * (hw[1] // 16)
    assert all(bf.tokens.shape[0] == token_count(n, p, r_list) < n for bf in bfs)
    assert_matches(model, x, bfs)
    assert not torch.allclose(model(x), pure, atol=1e-3)


def test_proportional_attention_changes_the_bruteforce():
    """The prop_attn cases above are not vacuous: log(size) changes the outputs."""
    ref = double_copy(make_model("linear", DEIT))
    im = images(1, 128, 128)[0].double()
    with torch.no_grad():
        on, off = bf_tome(ref, im, [8] * DEPTH, True), bf_tome(ref, im, [8] * DEPTH, False)
    assert (on.logits - off.logits).abs().max() > 1e-2


SUBLAYER_CASES = [
    pytest.param("linear", VIT, (128, 128), 0.2, id="linear-0.2"),
    pytest.param("mask_transformer", VIT, (96, 128), 0.3, id="mask-0.3-nonsquare"),
    pytest.param("linear", DEIT, (80, 112), 0.3, id="linear-deit-0.3-odd-grid"),
    pytest.param("mask_transformer", DEIT, (128, 128), 0.2, id="mask-deit-0.2"),
    pytest.param("linear", DEIT, (64, 64), 0.75, id="linear-deit-cap-binds"),
]


@pytest.mark.parametrize("decoder,backbone,hw,ratio", SUBLAYER_CASES)
def test_tome_sublayer_matches_bruteforce(decoder, backbone, hw, ratio):
    model = make_model(decoder, backbone)
    ref = double_copy(model)
    x = images(2, *hw, seed=hw[0] * hw[1])
    with torch.no_grad():
        pure = model(x)
        bfs = [bf_tome_sublayer(ref, im.double(), ratio) for im in x]
    assert apply_token_reduction(model, "tome_sublayer", ratio=ratio) == {"ratio": ratio}
    with torch.no_grad():
        tokens, state = model.encoder.forward_tokens(x)
    n = model.encoder.num_prefix_tokens + (hw[0] // 16) * (hw[1] // 16)
    assert tokens.shape == (2, n, 192) and state.is_raster  # the residual stream never shrinks
    assert_matches(model, x, bfs)
    assert not torch.allclose(model(x), pure, atol=1e-3)


# ------------------------------------------------------------------------------------ identity cases


@pytest.mark.parametrize("backbone", [VIT, DEIT])
@pytest.mark.parametrize("decoder", ["linear", "mask_transformer"])
def test_merging_nothing_is_exactly_the_pure_model(decoder, backbone):
    model = make_model(decoder, backbone)
    x = images(2, 96, 128)
    with torch.no_grad():
        pure = model(x)
        apply_token_reduction(model, "tome", r=0)
        assert torch.equal(model(x), pure)
        apply_token_reduction(model, "tome", r=[0, 0])
        assert torch.equal(model(x), pure)
        apply_token_reduction(model, "tome_sublayer", ratio=0.0)
        assert torch.equal(model(x), pure)
        apply_token_reduction(model, "tome", r=8)
        assert not torch.allclose(model(x), pure, atol=1e-3)
        remove_token_reduction(model)
        assert all(type(b) is Block for b in model.encoder.blocks)
        assert torch.equal(model(x), pure)


def paired_images(batch: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    """Images whose patch columns come in identical pairs: patch 2j equals patch 2j+1 in raster order."""
    half = images(batch, h, w // 2, seed)
    return half.reshape(batch, 3, h, w // 32, 1, 16).expand(-1, -1, -1, -1, 2, -1).reshape(batch, 3, h, w)


@pytest.mark.parametrize("backbone", [VIT, DEIT])
def test_merging_exact_duplicates_with_proportional_attention_is_lossless(backbone):
    """Merging two identical tokens into one of size 2 changes nothing: with log(2) added to its logit the
    merged key weighs exactly as much as the two duplicate keys did, and the MLP and linear head act per
    token. Only the first block merges (all pairs at once); later merges would mix different tokens."""
    model = make_model("linear", backbone)
    with torch.no_grad():
        model.encoder.pos_embed.zero_()
    h, w = 96, 128
    x = paired_images(2, h, w)
    n, p = (h // 16) * (w // 16), model.encoder.num_prefix_tokens
    with torch.no_grad():
        pure = model(x)
        pure_tokens, _ = model.encoder.forward_tokens(x)
        apply_token_reduction(model, "tome", r=[n // 2], prop_attn=True)
        got = model(x)
        tokens, state = model.encoder.forward_tokens(x)
    assert tokens.shape == (2, p + n // 2, 192)
    assert torch.equal(state.index[:, 0::2], state.index[:, 1::2])  # each pair shares one token
    assert torch.equal(state.size[:, p:], torch.full((2, n // 2, 1), 2.0))
    assert torch.allclose(got, pure, atol=1e-5), (got - pure).abs().max()
    assert torch.allclose(tokens[:, :p], pure_tokens[:, :p], atol=1e-5)
    assert torch.allclose(state.unmerge(tokens[:, p:]), pure_tokens[:, p:], atol=1e-5)
    with torch.no_grad():
        apply_token_reduction(model, "tome", r=[n // 2], prop_attn=False)
        assert not torch.allclose(model(x), pure, atol=1e-3)


def test_distillation_token_stays_second_and_is_never_merged():
    model = make_model("linear", DEIT)
    x = images(2, 128, 128, seed=5)
    n, r = 64, 8
    captured = []
    model.encoder.blocks[0].register_forward_hook(lambda m, i, o: captured.append(o))
    with torch.no_grad():
        model.encoder.forward_tokens(x)
        apply_token_reduction(model, "tome", r=[r], trace_source=True)
        tokens, state = model.encoder.forward_tokens(x)
    pure0, tome0 = captured
    assert tome0.shape == (2, 2 + n - r, 192) and tokens.shape == tome0.shape
    assert len(state.history) == 1 and torch.equal(state.history[0], state.index)
    assert torch.allclose(tome0[:, :2], pure0[:, :2], atol=1e-6)  # cls and dist rows as without merging
    assert torch.equal(state.size[:, :2], torch.ones(2, 2, 1))
    index = state.index
    assert int(index.min()) == 2  # no patch is held by the class or distillation row
    n_unm = n // 2 - r  # even patches sit at even positions (A), odd patches at odd positions (B)
    assert torch.equal(index[:, 1::2], torch.arange(2 + n_unm, 2 + n // 2 + n_unm).expand(2, -1))
    for b in range(2):
        even = index[b, 0::2]
        assert torch.equal(even[even < 2 + n_unm], torch.arange(2, 2 + n_unm))
        assert int((even >= 2 + n_unm).sum()) == r
        for q in range(n):
            row = int(index[b, q])
            if state.size[b, row, 0] == 1:
                assert torch.allclose(tome0[b, row], pure0[b, 2 + q], atol=1e-6)


@pytest.mark.parametrize("patch_type,options", [("tome", {"r": 8}), ("tome", {"r": (8, -1.0), "prop_attn": False}),
                                                ("tome_sublayer", {"ratio": 0.3})])
@pytest.mark.parametrize("backbone", [VIT, DEIT])
def test_a_batch_equals_each_image_alone(patch_type, options, backbone):
    model = make_model("mask_transformer", backbone)
    apply_token_reduction(model, patch_type, trace_source=True, **options)
    x = images(2, 96, 128, seed=3)
    with torch.no_grad():
        both = model(x)
        alone = torch.cat([model(x[:1]), model(x[1:])])
        _, state = model.encoder.forward_tokens(x)
    assert both.shape == (2, 5, 96, 128)
    assert torch.allclose(both, alone, atol=1e-5), (both - alone).abs().max()
    if patch_type == "tome":  # the images merged different tokens in the first block
        assert not torch.equal(state.history[0][0], state.history[0][1])


# --------------------------------------------------------------------------------- schedules, errors


def test_parse_r_schedules():
    assert parse_r((8, -1.0), 12) == SCHEDULE
    assert parse_r((16, 0.5), 12) == [8, 9, 10, 12, 13, 15, 16, 18, 19, 21, 22, 24]
    assert parse_r((16, -1), 12) == [32, 29, 26, 23, 20, 17, 14, 11, 8, 5, 2, 0]
    assert parse_r((16, 0.0), 12) == [16] * 12
    assert parse_r(5, 12) == [5] * 12
    assert parse_r([4, 4, 2], 12) == [4, 4, 2] + [0] * 9
    assert parse_r([1] * 12, 12) == [1] * 12


def test_settings_record_the_resolved_schedule():
    model = make_model()
    assert apply_token_reduction(model, "tome") == {"r": 8, "prop_attn": True}
    assert apply_token_reduction(model, "tome", r=5, prop_attn=False) == {"r": 5, "prop_attn": False}
    assert apply_token_reduction(model, "tome", r=(8, -1.0)) == {"r": SCHEDULE, "prop_attn": True}
    assert apply_token_reduction(model, "tome", r=(16, 0.5))["r"] == [8, 9, 10, 12, 13, 15, 16, 18, 19, 21, 22, 24]
    assert apply_token_reduction(model, "tome", r=[4, 4, 2])["r"] == [4, 4, 2] + [0] * 9
    assert apply_token_reduction(model, "tome_sublayer") == {"ratio": 0.2}


R_RULE = r"an int >= 0, \(r, inflect\) with inflect in \[-1, 1\], or a list of ints >= 0 \(one per block\)"


@pytest.mark.parametrize("patch_type,options,match", [
    ("tome", {"r": -1}, rf"^r must be {R_RULE}; got -1$"),
    ("tome", {"r": 8.0}, rf"^r must be {R_RULE}; got 8\.0$"),
    ("tome", {"r": True}, rf"^r must be {R_RULE}; got True$"),
    ("tome", {"r": [4, -1]}, rf"^r must be {R_RULE}; got \[4, -1\]$"),
    ("tome", {"r": (-8, 0.5)}, rf"^r must be {R_RULE}; got \(-8, 0\.5\)$"),
    ("tome", {"r": (8, 1.5)}, r"^r schedule \(8, 1\.5\): inflect must lie in \[-1, 1\]$"),
    ("tome", {"r": (8, -1.01)}, r"^r schedule \(8, -1\.01\): inflect must lie in \[-1, 1\]$"),
    ("tome", {"r": [1] * 13}, r"^r lists 13 blocks but the encoder has 12$"),
    ("tome", {"prop_attn": 1}, r"^prop_attn must be True or False, got 1$"),
    ("tome", {"ratio": 0.3}, r"^patch type 'tome' has no option ratio; its options: r, prop_attn$"),
    ("tome_sublayer", {"ratio": 1.0}, r"^ratio must be a number in \[0, 1\), got 1\.0$"),
    ("tome_sublayer", {"ratio": -0.1}, r"^ratio must be a number in \[0, 1\), got -0\.1$"),
    ("tome_sublayer", {"r": 8}, r"^patch type 'tome_sublayer' has no option r; its options: ratio$"),
])
def test_option_errors_leave_the_model_unchanged(patch_type, options, match):
    model = make_model()
    apply_token_reduction(model, "tome", r=3)
    with pytest.raises(UsageError, match=match):
        apply_token_reduction(model, patch_type, **options)
    assert model.encoder.reducer.name == "tome" and model.encoder.reducer.settings() == {"r": 3, "prop_attn": True}


@pytest.mark.parametrize("patch_type", ["tome", "tome_sublayer"])
def test_something_that_is_not_a_segmenter_is_refused(patch_type):
    with pytest.raises(UsageError, match=rf"^patch type '{patch_type}' applies to a Segmenter or its "
                                         r"VisionTransformer encoder built from timm Blocks, not Linear$"):
        apply_token_reduction(torch.nn.Linear(2, 2), patch_type)


# ---------------------------------------------------------------------------------------- gradients


def test_gradients_flow_through_merges_in_train_mode():
    """The gradient of a loss on ``model(x)`` in train mode (no stochastic layers) equals the brute force's."""
    model = make_model("linear", DEIT, drop_path_rate=0.0).train()
    ref = double_copy(model).train()
    apply_token_reduction(model, "tome", r=8)
    x = images(2, 96, 96, seed=11)
    weight = torch.randn(2, 5, 96, 96, generator=torch.Generator().manual_seed(12))
    (model(x) * weight).sum().backward()
    bfs = [bf_tome(ref, im.double(), [8] * DEPTH) for im in x]
    (torch.stack([bf.logits for bf in bfs]) * weight.double()).sum().backward()
    assert all(bf.margin > MARGIN and bf.tokens.shape[0] == token_count(38, 2, [8] * DEPTH) for bf in bfs)
    for name in ("encoder.blocks.0.attn.qkv.weight", "encoder.blocks.5.mlp.fc1.weight", "encoder.pos_embed",
                 "encoder.dist_token", "decoder.head.weight", "decoder.head.bias"):
        got, want = model.get_parameter(name).grad, ref.get_parameter(name).grad
        assert got is not None and got.abs().sum() > 0, name
        err = (got.double() - want).norm() / want.norm()
        assert err < 1e-4, (name, float(err))
