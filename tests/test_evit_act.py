"""EViT (``evit``) and ACT (``act``) on whole Segmenters, held against brute forces written from methods.md §3-4.

EViT brute force (one image at a time, float64 copy of the model, Python loops):

- attention from each block's ``qkv`` / ``proj`` weights with an explicit ``exp / sum`` softmax;
- in a pruning block (1-based ``drop_layers``), after the attention residual: the head-mean class row over
  the non-prefix tokens, ``K = ceil(keep_rate * count)``, the K best by a Python sort (score order), the
  fused token ``sum_j a_j x_j`` over the pruned tokens, and each pruned token's nearest kept token (squared
  distance on that residual stream); the sequence becomes ``[cls, (dist), kept, (fused)]``;
- the decoder's ``token_logits`` on the final patch tokens, then Expedite's reverse walk (drop the fused
  slot, write the kept rows back, fill a pruned row from its nearest kept row or from the fused slot),
  then the raster grid and a bilinear upsampling as in ``Segmenter.forward``.

Every brute force records its smallest decision margin (K-th vs (K+1)-th score, best vs second-best
distance) so that a near tie in a fixture is reported as such, not as a wrong implementation.

ACT brute force: E2LSH codes per query with Python integers (wrapped to int64), clusters by a dict over
the sorted distinct codes, centroids as member means, explicit softmax per centroid, copied to members.
"""

from __future__ import annotations

import copy
import functools
import math
import re
from dataclasses import dataclass

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.models.vision_transformer import Block

from segm.measure import flop_analysis
from segm.model.factory import create_segmenter
from segm.model.token_reduction import apply_token_reduction, remove_token_reduction
from tokred.act import ACTBlock, cluster_ids, clustered_attention, e2lsh_codes, hash_projections
from tokred.errors import UsageError
from tokred.evit import EViTBlock
from tests.conftest import perturb_, tiny_net_kwargs

VIT, DEIT = "vit_tiny_patch16_384", "deit_tiny_distilled_patch16_224"
LINEAR, MASK = "linear", "mask_transformer"
QKV_GAIN = 4.0  # sharpens the (random-weight) attention so that the top-K is well separated
SCORE_MARGIN = 1e-6
DIST_MARGIN = 1e-2
INT64 = 2**64


pytestmark = pytest.mark.usefixtures("one_thread")


@functools.lru_cache(maxsize=None)
def _base(decoder: str, backbone: str, gain: float) -> nn.Module:
    torch.manual_seed(0)
    model = perturb_(create_segmenter(tiny_net_kwargs(decoder, backbone, crop=64))).eval()
    with torch.no_grad():
        for blk in model.encoder.blocks:
            blk.attn.qkv.weight.mul_(gain)
    return model


def make_model(decoder: str = LINEAR, backbone: str = VIT, gain: float = QKV_GAIN) -> nn.Module:
    return copy.deepcopy(_base(decoder, backbone, gain))


def images(batch: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 3, h, w, generator=torch.Generator().manual_seed(seed))


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def double_copy(model: nn.Module) -> nn.Module:
    ref = copy.deepcopy(model).double().eval()
    for blk in ref.encoder.blocks:
        assert type(blk) is Block
        identities = (blk.attn.q_norm, blk.attn.k_norm, blk.attn.norm, blk.ls1, blk.ls2)
        assert all(isinstance(m, nn.Identity) for m in identities)
    return ref


def full_message(text: str) -> str:
    return "^" + re.escape(text) + "$"


# ------------------------------------------------------------------------------------------ EViT brute force


def softmax(z: torch.Tensor) -> torch.Tensor:
    e = (z - z.max(dim=-1, keepdim=True).values).exp()
    return e / e.sum(dim=-1, keepdim=True)


def bf_attention(blk: Block, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One image's attention output (T, C) and its post-softmax probabilities (heads, T, T)."""
    T, C = u.shape
    h = blk.attn.num_heads
    qkv = u @ blk.attn.qkv.weight.T + blk.attn.qkv.bias
    q, k, v = qkv.reshape(T, 3, h, C // h).permute(1, 2, 0, 3)
    probs = softmax(q @ k.transpose(1, 2) * (C // h) ** -0.5)
    out = (probs @ v).transpose(0, 1).reshape(T, C) @ blk.attn.proj.weight.T + blk.attn.proj.bias
    return out, probs


@dataclass
class Stage:
    count: int
    kept: list[int]
    pruned: list[int]
    nearest: dict[int, int]


@dataclass
class Margins:
    score: float = math.inf
    dist: float = math.inf


def bf_prune(x: torch.Tensor, probs: torch.Tensor, n: int, keep_rate: float, fuse: bool, restore: str,
             margins: Margins) -> tuple[torch.Tensor, Stage | None]:
    count = x.shape[0] - n
    K = math.ceil(keep_rate * count)
    if K >= count:
        return x, None
    scores = probs[:, 0, n:].mean(0).tolist()
    order = sorted(range(count), key=lambda j: -scores[j])
    kept, pruned = order[:K], sorted(order[K:])
    margins.score = min(margins.score, scores[order[K - 1]] - scores[order[K]])
    feats = x[n:]
    rows = [x[i] for i in range(n)] + [feats[j] for j in kept]
    if fuse:
        fused = torch.zeros_like(x[0])
        for j in pruned:
            fused = fused + scores[j] * feats[j]
        rows.append(fused)
    nearest = {}
    if restore == "nearest":
        for j in pruned:
            dists = sorted((float(((feats[j] - feats[k]) ** 2).sum()), r) for r, k in enumerate(kept))
            nearest[j] = dists[0][1]
            if len(dists) > 1:
                margins.dist = min(margins.dist, dists[1][0] - dists[0][0])
    return torch.stack(rows), Stage(count, kept, pruned, nearest)


def bf_encoder(ref: nn.Module, im: torch.Tensor, layers, keep_rate, fuse, restore, margins: Margins):
    """One image (3, H, W) -> final normed tokens (T', C) and the pruning stages."""
    enc = ref.encoder
    n = enc.num_prefix_tokens
    x = enc.embed(im[None].double())[0]
    stages = []
    for number, blk in enumerate(enc.blocks, start=1):
        out, probs = bf_attention(blk, blk.norm1(x))
        x = x + out
        if number in layers:
            x, stage = bf_prune(x, probs, n, keep_rate, fuse, restore, margins)
            if stage is not None:
                stages.append(stage)
        x = x + blk.mlp(blk.norm2(x))
    return enc.norm(x), stages


def bf_restore(y: torch.Tensor, stages: list[Stage], fuse: bool, restore: str) -> torch.Tensor:
    """Expedite's reverse walk over per-token rows y (T', K) -> one row per patch (N, K)."""
    for st in reversed(stages):
        cur = y[:-1] if fuse else y
        rows: list = [None] * st.count
        for r, j in enumerate(st.kept):
            rows[j] = cur[r]
        for j in st.pruned:
            rows[j] = cur[st.nearest[j]] if restore == "nearest" else y[-1]
        y = torch.stack(rows)
    return y


def bf_evit_segmenter(ref: nn.Module, ims: torch.Tensor, layers, keep_rate, fuse, restore):
    margins = Margins()
    n = ref.encoder.num_prefix_tokens
    H, W = ims.shape[2:]
    grids = []
    for im in ims:
        tokens, stages = bf_encoder(ref, im, layers, keep_rate, fuse, restore, margins)
        y = bf_restore(ref.decoder.token_logits(tokens[None, n:])[0], stages, fuse, restore)
        assert y.shape[0] == (H // 16) * (W // 16)
        grids.append(y.T.reshape(-1, H // 16, W // 16))
    out = F.interpolate(torch.stack(grids), size=(H, W), mode="bilinear", align_corners=False)
    return out, margins


def evit(model, keep_rate=0.7, drop_layers=(2, 4, 6), fuse_token=True, restore="nearest"):
    return apply_token_reduction(model, "evit", keep_rate=keep_rate, drop_layers=list(drop_layers),
                                 fuse_token=fuse_token, restore=restore)


# ----------------------------------------------------------------------------------------------- EViT tests


@pytest.mark.parametrize("backbone", [VIT, DEIT])
@pytest.mark.parametrize("decoder", [LINEAR, MASK])
def test_keep_rate_one_is_exactly_the_pure_model(decoder, backbone):
    model = make_model(decoder, backbone)
    x = images(2, 64, 96)
    with torch.no_grad():
        want = model(x)
        settings = evit(model, keep_rate=1.0, drop_layers=(1, 4, 7, 10, 12))
        assert settings == {"keep_rate": 1.0, "drop_layers": [1, 4, 7, 10, 12], "fuse_token": True,
                            "restore": "nearest"}
        assert sum(isinstance(b, EViTBlock) for b in model.encoder.blocks) == 5
        tokens, state = model.encoder.forward_tokens(x)
        assert tokens.shape[1] == model.encoder.num_prefix_tokens + 24 and state.is_raster
        assert torch.equal(model(x), want)


def test_default_settings():
    model = make_model()
    assert apply_token_reduction(model, "evit") == {"keep_rate": 0.7, "drop_layers": [4, 7, 10], "fuse_token": True,
                                                    "restore": "nearest"}
    assert [i + 1 for i, b in enumerate(model.encoder.blocks) if isinstance(b, EViTBlock)] == [4, 7, 10]
    assert apply_token_reduction(model, "act") == {"q_hashes": 32, "seed": None, "layers": list(range(1, 13))}
    assert all(isinstance(b, ACTBlock) for b in model.encoder.blocks)


MODES = [(True, "nearest"), (False, "nearest"), (True, "fused")]


@pytest.mark.parametrize("fuse,restore", MODES, ids=["fuse-nearest", "nofuse-nearest", "fuse-fused"])
@pytest.mark.parametrize("keep_rate", [0.5, 0.7, 0.9])
@pytest.mark.parametrize("backbone", [VIT, DEIT])
@pytest.mark.parametrize("decoder", [LINEAR, MASK])
def test_segmenter_forward_matches_brute_force(decoder, backbone, keep_rate, fuse, restore):
    model = make_model(decoder, backbone)
    ref = double_copy(model)
    layers = (2, 4, 6)  # the fused token of block 2 is scored again in blocks 4 and 6
    evit(model, keep_rate, layers, fuse, restore)
    x = images(2, 64, 96, seed=1)
    with torch.no_grad():
        got = model(x)
        want, margins = bf_evit_segmenter(ref, x, layers, keep_rate, fuse, restore)
    assert margins.score > SCORE_MARGIN, f"fixture near tie in the top-K: {margins.score:.2e}"
    assert margins.dist > DIST_MARGIN, f"fixture near tie in a nearest kept token: {margins.dist:.2e}"
    assert got.shape == (2, 5, 64, 96)
    assert torch.allclose(got, want.float(), atol=1e-4), (got - want).abs().max()


def test_brute_force_restore_modes_are_told_apart():
    """The fixture of the brute-force test does distinguish the two restorations and fusion on/off."""
    model = make_model(LINEAR, VIT)
    x = images(2, 64, 96, seed=1)
    outs = []
    with torch.no_grad():
        for fuse, restore in MODES:
            evit(model, 0.5, (2, 4, 6), fuse, restore)
            outs.append(model(x))
    for i in range(3):
        for j in range(i):
            assert (outs[i] - outs[j]).abs().max() > 1e-2


@pytest.mark.parametrize("kind", ["evit-deit-mask", "evit-vit-fused", "act"])
def test_a_batch_equals_each_image_alone(kind):
    if kind == "act":
        model = make_model(MASK, VIT, gain=1.0)
        apply_token_reduction(model, "act", q_hashes=6, seed=11)
    elif kind == "evit-deit-mask":
        model = make_model(MASK, DEIT)
        evit(model, 0.5, (1, 3, 5, 9))
    else:
        model = make_model(LINEAR, VIT)
        evit(model, 0.7, (2, 4, 6), restore="fused")
    x = images(2, 96, 64, seed=2)
    with torch.no_grad():
        both = model(x)
        alone = torch.cat([model(x[:1]), model(x[1:])])
    assert both.shape == (2, 5, 96, 64)
    assert torch.allclose(both, alone, atol=1e-5)


@pytest.mark.parametrize("restore", ["nearest", "fused"])
@pytest.mark.parametrize("backbone", [VIT, DEIT])
def test_pruning_block_keeps_brute_force_top_k_and_fuses_the_rest(backbone, restore, monkeypatch):
    model = make_model(LINEAR, backbone)
    ref = double_copy(model)
    n = model.encoder.num_prefix_tokens
    layers = (3, 6)
    evit(model, 0.6, layers, True, restore)
    seen = []
    original = EViTBlock.reduce

    def recording(self, x, attn, state):
        before = state.index.clone()
        out = original(self, x, attn, state)
        seen.append((self, x.clone(), before, state.index.clone(), out.clone()))
        return out

    monkeypatch.setattr(EViTBlock, "reduce", recording)
    inputs = {}
    for number in layers:
        model.encoder.blocks[number - 1].register_forward_pre_hook(
            lambda mod, args, number=number: inputs.__setitem__(number, args[0].clone()))
    x = images(2, 64, 96, seed=3)
    with torch.no_grad():
        model.encoder.forward_tokens(x)
    assert [s[0] for s in seen] == [model.encoder.blocks[i - 1] for i in layers]
    counts = [24, math.ceil(0.6 * 24) + 1]
    for (blk, mid, before, after, out), number, count in zip(seen, layers, counts):
        K = math.ceil(0.6 * count)
        assert out.shape == (2, n + K + 1, 192)
        for b in range(2):
            x_in = inputs[number][b].double()
            ref_blk = ref.encoder.blocks[number - 1]
            with torch.no_grad():
                attn_out, probs = bf_attention(ref_blk, ref_blk.norm1(x_in))
            x_mid = x_in + attn_out
            assert torch.allclose(mid[b].double(), x_mid, atol=1e-5)
            scores = probs[:, 0, n:].mean(0).tolist()
            assert len(scores) == count
            order = sorted(range(count), key=lambda j: -scores[j])
            gaps = [scores[order[i]] - scores[order[i + 1]] for i in range(count - 1)]
            assert min(gaps) > SCORE_MARGIN, f"fixture near tie in the scores: {min(gaps):.2e}"
            kept, pruned = order[:K], sorted(order[K:])
            fused = torch.zeros(192, dtype=torch.float64)
            for j in pruned:
                fused += scores[j] * x_mid[n + j]
            want = torch.stack([x_mid[i] for i in range(n)] + [x_mid[n + j] for j in kept] + [fused])
            assert torch.allclose(out[b].double(), want, atol=1e-5)
            # the patch map: kept rows go to their rank, pruned ones to their nearest kept row or the fused slot
            dest = {}
            for r, j in enumerate(kept):
                dest[n + j] = n + r
            for j in pruned:
                if restore == "fused":
                    dest[n + j] = n + K
                else:
                    d = [float(((x_mid[n + j] - x_mid[n + k]) ** 2).sum()) for k in kept]
                    dest[n + j] = n + d.index(min(d))
            assert after[b].tolist() == [dest[i] for i in before[b].tolist()]


@pytest.mark.parametrize("fuse", [True, False])
@pytest.mark.parametrize("backbone", [VIT, DEIT])
def test_token_counts(backbone, fuse):
    model = make_model(MASK, backbone)
    n = model.encoder.num_prefix_tokens
    evit(model, 0.5, (2, 4), fuse, "nearest")
    count = 16
    for _ in range(2):
        count = math.ceil(0.5 * count) + fuse
    assert count == (6 if fuse else 4)
    with torch.no_grad():
        tokens, state = model.encoder.forward_tokens(images(2, 64, 64))
        assert tokens.shape == (2, n + count, 192)
        assert state.index.shape == (2, 16) and int(state.index.max()) < n + count
        assert model(images(2, 64, 64)).shape == (2, 5, 64, 64)
    # a stage with K equal to the count prunes nothing and adds no fused token
    evit(model, 0.99, (1,), fuse, "nearest")
    with torch.no_grad():
        tokens, state = model.encoder.forward_tokens(images(1, 64, 64))
    assert tokens.shape == (1, n + 16, 192) and state.is_raster


def test_remove_restores_the_pure_model():
    model = make_model(MASK, DEIT)
    x = images(1, 64, 96)
    with torch.no_grad():
        want = model(x)
        evit(model, 0.5)
        assert not torch.allclose(model(x), want, atol=1e-3)
        remove_token_reduction(model)
        assert all(type(b) is Block for b in model.encoder.blocks)
        assert torch.equal(model(x), want)


# ----------------------------------------------------------------------------------------- ACT brute force


def scaled_queries(attn: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """(B, T, C) -> queries (B * heads, T, hd) scaled by hd ** -0.5, from the qkv weights."""
    B, T, C = x.shape
    h = attn.num_heads
    q = (x @ attn.qkv.weight.T + attn.qkv.bias).reshape(B, T, 3, h, C // h)[:, :, 0].transpose(1, 2)
    return q.reshape(B * h, T, C // h) * (C // h) ** -0.5


def wrap64(value: int) -> int:
    value %= INT64
    return value - INT64 if value >= INT64 // 2 else value


def bf_codes(rows: torch.Tensor, n_hashes: int, seed: int) -> tuple[list[list[int]], float]:
    """Per-query E2LSH codes with the draws of ``Generator(seed)`` (randn, then rand); and the bucket margin."""
    g = gen(seed)
    d = rows.shape[-1]
    a = torch.randn(d, n_hashes, generator=g).double().tolist()
    b = torch.rand(n_hashes, generator=g).double().tolist()
    q = rows.double().tolist()
    codes, margin = [], math.inf
    for row in q:
        hashes = []
        for m in range(n_hashes):
            vals = [(sum(a[i][m] * qt[i] for i in range(d)) + b[m]) / 8.0 for qt in row]
            margin = min([margin] + [abs(v - round(v)) for v in vals])
            hashes.append([math.floor(v) for v in vals])
        lows = [min(h) for h in hashes]
        codes.append([wrap64(sum((hashes[m][t] - lows[m]) << (2 * m) for m in range(n_hashes)))
                      for t in range(len(row))])
    return codes, margin


def bf_groups(codes: list[list[int]]) -> tuple[list[list[int]], list[list[int]], int]:
    """Cluster ids (ascending code order) and counts per row, padded to the largest cluster count."""
    ids, counts = [], []
    for row in codes:
        rank = {c: i for i, c in enumerate(sorted(set(row)))}
        ids.append([rank[c] for c in row])
        counts.append([row.count(c) for c in sorted(rank)])
    width = max(len(c) for c in counts)
    return ids, [c + [0] * (width - len(c)) for c in counts], width


def bf_clustered_attention(attn: nn.Module, x: torch.Tensor, n_hashes: int, seed: int) -> tuple[torch.Tensor, int]:
    B, T, C = x.shape
    h, d = attn.num_heads, C // attn.num_heads
    qkv = (x.double() @ attn.qkv.weight.double().T + attn.qkv.bias.double()).reshape(B, T, 3, h, d)
    k, v = qkv[:, :, 1].transpose(1, 2).reshape(B * h, T, d), qkv[:, :, 2].transpose(1, 2).reshape(B * h, T, d)
    rows = scaled_queries(attn, x)
    codes, _ = bf_codes(rows, n_hashes, seed)
    ids, _, width = bf_groups(codes)
    heads = torch.zeros(B * h, T, d, dtype=torch.float64)
    for r in range(B * h):
        for c in set(ids[r]):
            members = [t for t in range(T) if ids[r][t] == c]
            centroid = sum(rows[r, t].double() for t in members) / len(members)
            o = softmax(centroid @ k[r].T) @ v[r]
            for t in members:
                heads[r, t] = o
    heads = heads.reshape(B, h, T, d).transpose(1, 2).reshape(B, T, C)
    return heads @ attn.proj.weight.double().T + attn.proj.bias.double(), width


def an_attention() -> nn.Module:
    return make_model(gain=1.0).encoder.blocks[2].attn


# ------------------------------------------------------------------------------------------------ ACT tests


def test_distinct_codes_give_exact_attention():
    attn = an_attention()
    x = 20 * torch.randn(2, 10, 192, generator=gen(0))
    with torch.no_grad():
        rows = scaled_queries(attn, x)
        ids, counts, n_clusters = cluster_ids(e2lsh_codes(rows, hash_projections(64, 32, gen(7))))
        assert n_clusters == 10 and torch.equal(counts, torch.ones(6, 10))
        assert torch.equal(ids.sort(dim=1).values, torch.arange(10).expand(6, -1))
        stats = []
        got = clustered_attention(attn, x, hash_projections(attn.head_dim, 32, gen(7)), stats)
        want = attn(x)
    assert got.shape == (2, 10, 192)
    assert torch.allclose(got, want, atol=1e-5)
    assert stats[0][0] == 10 and float(stats[0][1]) == 10.0


def test_identical_queries_collapse_to_one_cluster_per_row():
    attn = an_attention()
    x = torch.randn(2, 1, 192, generator=gen(1)).expand(2, 9, 192).contiguous()
    with torch.no_grad():
        ids, counts, n_clusters = cluster_ids(e2lsh_codes(scaled_queries(attn, x), hash_projections(64, 32, gen(3))))
        assert n_clusters == 1 and torch.equal(ids, torch.zeros(6, 9, dtype=torch.long))
        assert torch.equal(counts, torch.full((6, 1), 9.0))
        stats = []
        got = clustered_attention(attn, x, hash_projections(attn.head_dim, 32, gen(3)), stats)
        assert torch.allclose(got, attn(x), atol=1e-5)
    assert stats[0][0] == 1 and float(stats[0][1]) == 1.0


@pytest.mark.parametrize("n_hashes,scale", [(2, 1.0), (4, 3.0), (32, 1.0)])
def test_clustered_attention_matches_brute_force(n_hashes, scale):
    attn = an_attention()
    x = scale * torch.randn(2, 13, 192, generator=gen(n_hashes))
    with torch.no_grad():
        stats = []
        got = clustered_attention(attn, x, hash_projections(attn.head_dim, n_hashes, gen(5)), stats)
        want, width = bf_clustered_attention(attn, x, n_hashes, 5)
    assert stats[0][0] == width
    if n_hashes < 32:
        assert width < 13  # clusters with several members are exercised
    assert torch.allclose(got.double(), want, atol=1e-5)


@pytest.mark.parametrize("n_hashes,scale", [(5, 40.0), (32, 60.0), (32, 0.3)])
def test_code_packing_matches_brute_force(n_hashes, scale):
    rows = scale * torch.randn(3, 7, 16, generator=gen(2))
    got = e2lsh_codes(rows, hash_projections(rows.shape[-1], n_hashes, gen(9)))
    want, margin = bf_codes(rows, n_hashes, 9)
    assert margin > 1e-5, f"fixture near a bucket boundary: {margin:.2e}"
    assert got.dtype == torch.int64 and got.shape == (3, 7)
    assert got.tolist() == want


def test_code_packing_spills_and_overflows_as_upstream():
    """Hash values of 4 and more spill into the next hash's bits; hash 31 shifts by 62 and wraps in int64."""
    rows = 60 * torch.randn(1, 7, 16, generator=gen(2))
    want, _ = bf_codes(rows, 32, 9)
    assert any(c < 0 for c in want[0]) or any(c >= 2**62 for c in want[0])
    assert e2lsh_codes(rows, hash_projections(rows.shape[-1], 32, gen(9))).tolist() == want


def test_cluster_ids_match_a_brute_force_grouping():
    pool = torch.randint(-(2**62), 2**62, (6,), generator=gen(4))
    codes = pool[torch.randint(0, 6, (5, 11), generator=gen(5))]
    codes[3] = pool[2]  # one row with a single cluster
    codes[4, :6] = torch.tensor([0, -1, 2**62, -(2**62), 0, -1])
    ids, counts, n_clusters = cluster_ids(codes)
    want_ids, want_counts, width = bf_groups(codes.tolist())
    assert n_clusters == width
    assert ids.tolist() == want_ids
    assert counts.tolist() == want_counts


def test_fresh_projections_without_a_seed():
    rows = 10 * torch.randn(4, 12, 16, generator=gen(6))
    torch.manual_seed(0)
    first, second = (e2lsh_codes(rows, hash_projections(rows.shape[-1], 32)) for _ in range(2))
    assert not torch.equal(first, second)
    model = make_model(LINEAR, VIT, gain=1.0)
    settings = apply_token_reduction(model, "act", q_hashes=4)
    assert settings == {"q_hashes": 4, "seed": None, "layers": list(range(1, 13))}
    x = images(1, 64, 96)
    with torch.no_grad():
        assert not torch.equal(model(x), model(x))


def test_a_fixed_seed_is_reproducible_and_another_seed_differs():
    model = make_model(MASK, VIT, gain=1.0)
    x = images(2, 64, 96)
    with torch.no_grad():
        pure = model(x)
        apply_token_reduction(model, "act", q_hashes=4, seed=3)
        first, second = model(x), model(x)
        apply_token_reduction(model, "act", q_hashes=4, seed=4)
        other = model(x)
    assert first.shape == (2, 5, 64, 96)
    assert torch.equal(first, second)
    assert (first - other).abs().max() > 1e-3
    assert (first - pure).abs().max() > 1e-3


def test_selected_layers_only_and_the_sequence_length_never_changes():
    model = make_model(LINEAR, DEIT, gain=1.0)
    ref = copy.deepcopy(model)
    apply_token_reduction(model, "act", q_hashes=3, seed=20, layers=[1])
    blocks = model.encoder.blocks
    assert isinstance(blocks[0], ACTBlock) and blocks[0].spec.q_hashes == 3
    assert all(type(b) is Block for b in blocks[1:])
    x = images(2, 64, 96)
    with torch.no_grad():
        tokens, state = model.encoder.forward_tokens(x)
        enc = ref.encoder
        h = enc.embed(x)
        blk = enc.blocks[0]
        stats = []
        h = h + clustered_attention(blk.attn, blk.norm1(h), hash_projections(blk.attn.head_dim, 3, gen(21)), stats)  # block 1 draws from seed + 1
        h = h + blk.mlp(blk.norm2(h))
        for blk in enc.blocks[1:]:
            h = blk(h)
        want = enc.norm(h)
    assert stats[0][0] < 26  # block 1 did cluster
    assert tokens.shape == (2, 2 + 24, 192) and state.is_raster
    assert [c for c, _ in state.scratch["act_clusters"]] == [stats[0][0]]
    assert torch.allclose(tokens, want, atol=1e-5)
    apply_token_reduction(model, "act", q_hashes=2, seed=0)
    with torch.no_grad():
        tokens, state = model.encoder.forward_tokens(x)
    assert tokens.shape == (2, 26, 192) and state.is_raster and len(state.scratch["act_clusters"]) == 12


# --------------------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize("patch_type,options,message", [
    ("evit", {"keep_rate": 0}, "keep_rate must be a number in (0, 1], got 0"),
    ("evit", {"keep_rate": 1.5}, "keep_rate must be a number in (0, 1], got 1.5"),
    ("evit", {"drop_layers": []}, "drop_layers must be a non-empty list of block numbers counted from 1, got []"),
    ("evit", {"drop_layers": [7, 4]}, "drop_layers must be strictly increasing, got [7, 4]"),
    ("evit", {"drop_layers": [0, 5]}, "drop_layers [0, 5] out of range: blocks are numbered 1..12"),
    ("evit", {"drop_layers": [4, 13]}, "drop_layers [4, 13] out of range: blocks are numbered 1..12"),
    ("evit", {"fuse_token": False, "restore": "fused"},
     "restore='fused' copies the fused token's output: it needs fuse_token=True"),
    ("evit", {"restore": "other"}, "restore must be one of nearest, fused; got 'other'"),
    ("act", {"q_hashes": 0}, "q_hashes must be an integer in 1..32, got 0"),
    ("act", {"q_hashes": 33}, "q_hashes must be an integer in 1..32, got 33"),
    ("act", {"seed": -1}, "seed must be an integer >= 0, got -1"),
    ("act", {"layers": [3, 13]}, "layers [3, 13] out of range: blocks are numbered 1..12"),
])
def test_option_errors_are_one_line_and_leave_the_model_unchanged(patch_type, options, message):
    model = make_model()
    with pytest.raises(UsageError, match=full_message(message)) as caught:
        apply_token_reduction(model, patch_type, **options)
    assert "\n" not in str(caught.value)
    assert all(type(b) is Block for b in model.encoder.blocks)


# ---------------------------------------------------------------------------------------------------- FLOPs


def sdpa_flops(model: nn.Module, x: torch.Tensor) -> tuple[int, int]:
    analysis = flop_analysis(model, x)
    return analysis.total(), analysis.by_operator()["scaled_dot_product_attention"]


def test_flops_fall_with_evit_and_act_counts_its_clusters():
    model = make_model(LINEAR, VIT, gain=1.0)
    x = images(2, 64, 96)
    B, H, d, T = 2, 3, 64, 25
    with torch.no_grad():
        pure_total, pure_sdpa = sdpa_flops(model, x)
        assert pure_sdpa == 12 * T * T * d * 2 * H * B

        evit(model, 0.5, (4, 7, 10))
        evit_total, evit_sdpa = sdpa_flops(model, x)
        lengths = []
        n_tokens = 24
        for number in range(1, 13):
            lengths.append(1 + n_tokens)
            if number in (4, 7, 10):
                n_tokens = math.ceil(0.5 * n_tokens) + 1
        assert evit_sdpa == sum(t * t for t in lengths) * d * 2 * H * B
        assert evit_total < pure_total

        apply_token_reduction(model, "act", q_hashes=8, seed=0)
        act_total, act_sdpa = sdpa_flops(model, x)
        _, state = model.encoder.forward_tokens(x)
    clusters = [c for c, _ in state.scratch["act_clusters"]]
    assert len(clusters) == 12 and min(clusters) < T
    assert act_sdpa == sum(clusters) * T * d * 2 * H * B
    assert act_total < pure_total
    # everything else is counted as in the pure model, plus the hash projection (B h T d q_hashes per block)
    assert act_total - pure_total == act_sdpa - pure_sdpa + 12 * B * H * T * d * 8
