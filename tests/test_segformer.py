"""SegFormer (MiT-B0..B5 + all-MLP head) and SegFormer++ merging, checked against hand computations.

Key layout and parameter counts on the meta device; efficient attention, Mix-FFN, the stages and the head
recomputed by hand in float64; tomesd's 2D matcher, 2D / 1D pooling against brute-force loops; presets'
token counts; batch independence; mmseg checkpoints (import_mmseg, load_model, the original release's
layout); one-line errors; optimizer groups; and training / resume / eval / flops end to end (MiT-B0).
"""

from __future__ import annotations

import copy
import json
import math
import signal
import subprocess
import threading
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import yaml
from click.testing import CliRunner

from segm.config import training_defaults
from segm.model.factory import create_segmenter, load_model, net_kwargs_for
from segm.model.mit import EfficientAttention, MixVisionTransformer
from segm.model.segformer import SegFormer, SegformerHead, create_segformer, from_original_release
from segm.model.token_reduction import apply_token_reduction, remove_token_reduction
from segm.optim import create_optimizer
from segm.scripts.import_mmseg import main as import_mmseg
from tests.conftest import SUBPROCESS_ENV, has_log_line, kill_when, module_cmd, perturb_, read_log
from tokred.errors import UsageError
from tokred.segformerpp import MergingAttention, SideMerge, bipartite_2d, grid_split, reduce_tokens

REPO = Path(__file__).resolve().parents[1]
ARCH = {  # embed_dims, blocks per stage, head channels (mmseg's MiT-B0 ... B5)
    "mit_b0": (32, [2, 2, 2, 2], 256), "mit_b1": (64, [2, 2, 2, 2], 256), "mit_b2": (64, [3, 4, 6, 3], 768),
    "mit_b3": (64, [3, 4, 18, 3], 768), "mit_b4": (64, [3, 8, 27, 3], 768), "mit_b5": (64, [3, 6, 40, 3], 768),
}
HEADS, SR, KERNELS = (1, 2, 5, 8), (8, 4, 2, 1), (7, 3, 3, 3)
PRESETS = ("hq", "fast", "2x2")


pytestmark = pytest.mark.usefixtures("one_thread")


def randomise_(model: nn.Module, seed: int = 0) -> nn.Module:
    """perturb_ plus random BatchNorm statistics, so that every parameter and buffer matters."""
    perturb_(model, seed)
    gen = torch.Generator().manual_seed(seed + 1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(0.2 * torch.randn(m.running_mean.shape, generator=gen))
            m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=gen))
    return model.eval()


def b0(n_cls: int = 5, seed: int = 0) -> SegFormer:
    torch.manual_seed(seed)
    return randomise_(create_segmenter(net_kwargs_for("mit_b0", "segformer", n_cls, 64)), seed)


def tiny_mit(seed: int = 0) -> MixVisionTransformer:
    torch.manual_seed(seed)
    return randomise_(MixVisionTransformer(embed_dims=8, num_layers=[1, 1, 1, 1], num_heads=[1, 2, 2, 4],
                                           drop_path_rate=0.0), seed)


def image(*shape: int, seed: int = 0, dtype=torch.float32) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


# ---------------------------------------------------------------- hand-written reference computations
def ln(x, norm):
    assert norm.eps == 1e-6
    mean, var = x.mean(-1, keepdim=True), x.var(-1, unbiased=False, keepdim=True)
    return (x - mean) / torch.sqrt(var + 1e-6) * norm.weight + norm.bias


def to_map(x, hw):
    return x.transpose(1, 2).reshape(x.shape[0], x.shape[2], *hw)


def hand_kv(attn: EfficientAttention, x, hw):
    if attn.sr_ratio == 1:
        return x
    s = attn.sr_ratio
    m = to_map(x, hw)[:, :, : hw[0] // s * s, : hw[1] // s * s]  # kernel = stride = s: non-overlapping patches
    B, C, H, W = m.shape
    patches = m.reshape(B, C, H // s, s, W // s, s).permute(0, 2, 4, 1, 3, 5).reshape(B, -1, C * s * s)
    return ln(patches @ attn.sr.weight.reshape(C, -1).T + attn.sr.bias, attn.norm)


def hand_attention(attn: EfficientAttention, x, hw):
    """softmax(q k^T / sqrt(d)) v per head, q from x, k and v from the reduced tokens, then out_proj."""
    kv = hand_kv(attn, x, hw)
    W, b, heads = attn.attn.in_proj_weight, attn.attn.in_proj_bias, attn.attn.num_heads
    B, T, C = x.shape
    d = C // heads
    q, k, v = (t @ W[i * C:(i + 1) * C].T + b[i * C:(i + 1) * C] for i, t in enumerate((x, kv, kv)))
    q, k, v = (t.reshape(B, -1, heads, d).transpose(1, 2) for t in (q, k, v))
    out = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d), dim=-1) @ v
    return out.transpose(1, 2).reshape(B, T, C) @ attn.attn.out_proj.weight.T + attn.attn.out_proj.bias


def hand_ffn(ffn, x, hw):
    """1x1 conv (a linear map), depth-wise 3x3 conv as a sum of 9 shifts, exact GELU, 1x1 conv."""
    fc1, dw, fc2 = ffn.layers[0], ffn.layers[1], ffn.layers[4]
    h = to_map(x @ fc1.weight[:, :, 0, 0].T + fc1.bias, hw)
    padded = F.pad(h, (1, 1, 1, 1))
    conv = sum(dw.weight[:, 0, i, j][None, :, None, None] * padded[:, :, i:i + hw[0], j:j + hw[1]]
               for i in range(3) for j in range(3)) + dw.bias[None, :, None, None]
    act = 0.5 * conv * (1 + torch.erf(conv / math.sqrt(2)))
    return act.flatten(2).transpose(1, 2) @ fc2.weight[:, :, 0, 0].T + fc2.bias


def hand_backbone(backbone: MixVisionTransformer, x):
    outs = []
    for embed, blocks, norm in backbone.layers:
        p = embed.projection
        m = F.conv2d(x, p.weight, p.bias, stride=p.stride, padding=p.kernel_size[0] // 2)
        hw = m.shape[2:]
        t = ln(m.flatten(2).transpose(1, 2), embed.norm)
        for blk in blocks:
            t = t + hand_attention(blk.attn, ln(t, blk.norm1), hw)
            t = t + hand_ffn(blk.ffn, ln(t, blk.norm2), hw)
        x = to_map(ln(t, norm), hw)
        outs.append(x)
    return outs


def hand_conv_bn_relu(module, x):
    y = torch.einsum("oc,bchw->bohw", module.conv.weight[:, :, 0, 0], x)
    bn = module.bn
    y = (y - bn.running_mean[:, None, None]) / torch.sqrt(bn.running_var[:, None, None] + 1e-5)
    return torch.relu(y * bn.weight[:, None, None] + bn.bias[:, None, None])


def hand_segformer(model: SegFormer, im):
    feats = hand_backbone(model.backbone, im)
    head = model.decode_head
    maps = [F.interpolate(hand_conv_bn_relu(c, f), size=feats[0].shape[2:], mode="bilinear", align_corners=False)
            for c, f in zip(head.convs, feats)]
    fused = hand_conv_bn_relu(head.fusion_conv, torch.cat(maps, 1))
    logits = torch.einsum("kc,bchw->bkhw", head.conv_seg.weight[:, :, 0, 0], fused) + head.conv_seg.bias[:, None, None]
    return F.interpolate(logits, size=im.shape[2:], mode="bilinear", align_corners=False)


# ---------------------------------------------------------------- 1. key layout, shapes, parameter counts
def expected_state(embed: int, layers: list[int], channels: int, n_cls: int) -> dict[str, tuple[int, ...]]:
    """mmseg 1.x's SegFormer state dict: every key and shape, from the architecture."""
    keys: dict[str, tuple[int, ...]] = {}
    cin = 3
    for s, (depth, k) in enumerate(zip(layers, KERNELS)):
        C = embed * HEADS[s]
        pre = f"backbone.layers.{s}"
        keys.update({f"{pre}.0.projection.weight": (C, cin, k, k), f"{pre}.0.projection.bias": (C,),
                     f"{pre}.0.norm.weight": (C,), f"{pre}.0.norm.bias": (C,),
                     f"{pre}.2.weight": (C,), f"{pre}.2.bias": (C,)})
        for j in range(depth):
            b = f"{pre}.1.{j}"
            keys.update({f"{b}.norm1.weight": (C,), f"{b}.norm1.bias": (C,), f"{b}.attn.attn.in_proj_weight": (3 * C, C),
                         f"{b}.attn.attn.in_proj_bias": (3 * C,), f"{b}.attn.attn.out_proj.weight": (C, C),
                         f"{b}.attn.attn.out_proj.bias": (C,), f"{b}.norm2.weight": (C,), f"{b}.norm2.bias": (C,),
                         f"{b}.ffn.layers.0.weight": (4 * C, C, 1, 1), f"{b}.ffn.layers.0.bias": (4 * C,),
                         f"{b}.ffn.layers.1.weight": (4 * C, 1, 3, 3), f"{b}.ffn.layers.1.bias": (4 * C,),
                         f"{b}.ffn.layers.4.weight": (C, 4 * C, 1, 1), f"{b}.ffn.layers.4.bias": (C,)})
            if SR[s] > 1:
                keys.update({f"{b}.attn.sr.weight": (C, C, SR[s], SR[s]), f"{b}.attn.sr.bias": (C,),
                             f"{b}.attn.norm.weight": (C,), f"{b}.attn.norm.bias": (C,)})
        cin = C

    def conv_module(name: str, cin: int) -> None:
        keys[f"{name}.conv.weight"] = (channels, cin, 1, 1)
        for p in ("weight", "bias", "running_mean", "running_var"):
            keys[f"{name}.bn.{p}"] = (channels,)
        keys[f"{name}.bn.num_batches_tracked"] = ()

    for i in range(4):
        conv_module(f"decode_head.convs.{i}", embed * HEADS[i])
    conv_module("decode_head.fusion_conv", 4 * channels)
    keys.update({"decode_head.conv_seg.weight": (n_cls, channels, 1, 1), "decode_head.conv_seg.bias": (n_cls,)})
    return keys


def parameter_count(embed: int, layers: list[int], channels: int, n_cls: int) -> tuple[int, int]:
    """(backbone, head) parameters, summed layer by layer."""
    backbone, cin = 0, 3
    for s, (depth, k) in enumerate(zip(layers, KERNELS)):
        C = embed * HEADS[s]
        block = 2 * C + (3 * C * C + 3 * C) + (C * C + C) + 2 * C + (4 * C * C + 4 * C) + (9 * 4 * C + 4 * C) + (4 * C * C + C)
        block += (SR[s] ** 2 * C * C + C + 2 * C) if SR[s] > 1 else 0
        backbone += k * k * cin * C + C + 2 * C + depth * block + 2 * C
        cin = C
    head = sum(embed * h * channels + 2 * channels for h in HEADS) + 4 * channels * channels + 2 * channels
    return backbone, head + channels * n_cls + n_cls


@pytest.mark.parametrize("name", sorted(ARCH))
def test_mit_keys_shapes_and_parameter_counts(name):
    embed, layers, channels = ARCH[name]
    net = net_kwargs_for(name, "segformer", 19, 512)
    assert (net["family"], net["embed_dims"], net["num_layers"], net["num_heads"], net["sr_ratios"]) == \
        ("mit", embed, layers, list(HEADS), list(SR))
    assert net["decoder"]["channels"] == channels and net["normalization"] == "imagenet"
    with torch.device("meta"):
        model = create_segmenter(net)
    assert isinstance(model, SegFormer)
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == expected_state(embed, layers, channels, 19)
    assert [len(stage[1]) for stage in model.backbone.layers] == layers
    assert model.backbone.widths == [embed * h for h in HEADS]
    assert {m.eps for m in model.modules() if isinstance(m, nn.LayerNorm)} == {1e-6}
    assert {m.eps for m in model.modules() if isinstance(m, nn.BatchNorm2d)} == {1e-5}
    n_backbone = sum(p.numel() for p in model.backbone.parameters())
    n_total = sum(p.numel() for p in model.parameters())
    assert (n_backbone, n_total - n_backbone) == parameter_count(embed, layers, channels, 19)
    published = {"mit_b0": 3.7e6, "mit_b1": 13.7e6, "mit_b2": 27.4e6, "mit_b3": 47.3e6, "mit_b4": 64.1e6, "mit_b5": 84.7e6}
    assert abs(n_total - published[name]) < 0.1e6
    if name == "mit_b0":
        assert (n_backbone, n_total) == (3_319_392, 3_720_051)
    if name == "mit_b2":
        assert n_total == 27_364_307


def test_family_training_defaults_follow_mmseg():
    for dataset, (epochs, batch, crop, stride) in {"cityscapes": (430, 8, 1024, 768), "ade20k": (127, 16, 512, 512)}.items():
        d = training_defaults("mit_b2", dataset)
        assert (d["opt"], d["learning_rate"], d["weight_decay"], d["min_lr"], d["poly_power"], d["warmup_iters"],
                d["head_lr_mult"]) == ("adamw", 6e-5, 0.01, 0.0, 1.0, 1500, 10.0)
        sizes = (d["epochs"], d["batch_size"], d["crop_size"], d["window_size"], d["window_stride"])
        assert sizes == (epochs, batch, crop, crop, stride)
    assert training_defaults("vit_tiny_patch16_384", "ade20k")["opt"] == "sgd"


# ---------------------------------------------------------------- 2. attention, Mix-FFN, grids, whole model
def test_efficient_attention_equals_explicit_softmax_and_torch_multihead_attention():
    mit = tiny_mit().double()
    hw = (9, 13)
    for stage in mit.layers:
        blk = stage[1][0]
        C = blk.attn.attn.out_proj.in_features
        x = image(2, hw[0] * hw[1], C, seed=C, dtype=torch.float64)
        with torch.no_grad():
            got = blk.attn(x, hw)
            assert torch.allclose(got, hand_attention(blk.attn, x, hw), atol=1e-12, rtol=0)
            mha = nn.MultiheadAttention(C, blk.attn.attn.num_heads, batch_first=True, dtype=torch.float64)
            mha.load_state_dict(blk.attn.attn.state_dict(), strict=True)
            kv, kv_hw = blk.attn.kv_tokens(x, hw)
            s = blk.attn.sr_ratio
            assert kv_hw == (hw[0] // s, hw[1] // s) and kv.shape == (2, kv_hw[0] * kv_hw[1], C)
            assert torch.allclose(got, mha(x, kv, kv, need_weights=False)[0], atol=1e-12, rtol=0)
            assert torch.allclose(blk.ffn(x, hw), hand_ffn(blk.ffn, x, hw), atol=1e-12, rtol=0)


@pytest.mark.parametrize("size", [(64, 64), (67, 99), (134, 198), (37, 45)])
def test_overlap_patch_embedding_grids_and_output_shapes(size):
    mit = tiny_mit()
    model = SegFormer(mit, SegformerHead(mit.widths, 16, 3), 3).eval()
    with torch.no_grad():
        feats = mit(image(1, 3, *size))
        out = model(image(2, 3, *size))
    h, w = -(-size[0] // 4), -(-size[1] // 4)
    want = []
    for width in mit.widths:
        want.append((1, width, h, w))
        h, w = -(-h // 2), -(-w // 2)
    assert [tuple(f.shape) for f in feats] == want
    assert out.shape == (2, 3, *size)


@pytest.mark.parametrize("size", [(64, 64), (64, 96), (67, 99)])
def test_segformer_forward_equals_hand_run_stages_and_head(size):
    model = b0().double()
    im = image(2, 3, *size, dtype=torch.float64)
    with torch.no_grad():
        got = model(im)
        want = hand_segformer(model, im)
    assert got.shape == (2, 5, *size)
    assert torch.allclose(got, want, atol=1e-10, rtol=0)


# ---------------------------------------------------------------- 3. the 2D matcher, pooling, brute force
def brute_bsm(x: torch.Tensor, h: int, w: int, sy: int, sx: int, ratio: float):
    """One sample (N, C): destinations, sources by similarity, r, merged destination means, unmerged output."""
    N = h * w
    dst = [i * w + j for i in range(0, h // sy * sy, sy) for j in range(0, w // sx * sx, sx)]
    src = [p for p in range(N) if p not in dst]
    unit = x.double() / x.double().norm(dim=-1, keepdim=True)
    best = {}
    for s in src:
        sims = [float(unit[s] @ unit[d]) for d in dst]
        k = max(range(len(dst)), key=sims.__getitem__)
        best[s] = (sims[k], dst[k])
    r = min(int(N * ratio), len(src))
    order = sorted(src, key=lambda s: -best[s][0])
    merged = order[:r]
    mean = {d: x[[d] + [s for s in merged if best[s][1] == d]].mean(0) for d in dst}
    back = torch.stack([mean[p] if p in mean else mean[best[p][1]] if p in merged else x[p] for p in range(N)])
    return dst, src, order[r:], r, mean, back


@pytest.mark.parametrize("h,w,stride,ratio", [
    (7, 10, (4, 4), 0.5), (7, 10, (2, 3), 0.3), (7, 10, (2, 3), 0.95), (10, 7, (3, 2), 0.6), (8, 8, (2, 2), 0.6),
    (5, 6, (1, 1), 0.5),
])
def test_bipartite_2d_matches_a_brute_force_loop(h, w, stride, ratio):
    B, C = 2, 6
    x = image(B, h * w, C, seed=h * 100 + w + stride[0])
    src, dst = grid_split(h, w, *stride, torch.device("cpu"))
    merged, back = reduce_tokens(x, (h, w), SideMerge("bsm", ratio, stride))
    for b in range(B):
        want_dst, want_src, kept, r, mean, want_back = brute_bsm(x[b], h, w, *stride, ratio)
        assert sorted(dst.tolist()) == want_dst and sorted(src.tolist()) == want_src
        assert len(want_dst) == (h // stride[0]) * (w // stride[1])
        assert merged.shape == (B, h * w - r, C)
        n_unm = len(kept)
        assert torch.allclose(merged[b, :n_unm], x[b, kept], atol=1e-6)
        assert torch.allclose(merged[b, n_unm:], torch.stack([mean[d] for d in dst.tolist()]), atol=1e-6)
        assert torch.allclose(back(merged)[b], want_back, atol=1e-6)
    dest, n_out = bipartite_2d(x, (h, w), stride, ratio)
    if stride == (1, 1):  # every token is a destination: nothing can merge
        assert n_out == h * w and torch.equal(back(merged), x)
    else:
        assert n_out == h * w - min(int(h * w * ratio), src.numel())
        assert dest.shape == (B, h * w) and int(dest.max()) == n_out - 1


def test_bipartite_2d_with_ratio_zero_or_no_destination_merges_nothing():
    x = image(1, 12, 4)
    assert bipartite_2d(x, (3, 4), (2, 2), 0.0) == (None, 12)
    assert bipartite_2d(x, (3, 4), (4, 4), 0.9) == (None, 12)  # 3 // 4 = 0 destination rows
    merged, back = reduce_tokens(x, (3, 4), SideMerge("bsm", 0.0, (2, 2)))
    assert merged is x and back(x) is x


def brute_pool2d(x, h, w, kh, kw):
    oh, ow = -(-h // kh), -(-w // kw)
    grid = x.reshape(x.shape[0], h, w, -1)
    pooled = torch.stack([grid[:, i * kh:(i + 1) * kh, j * kw:(j + 1) * kw].mean((1, 2))
                          for i in range(oh) for j in range(ow)], 1)
    return pooled, (oh, ow)


@pytest.mark.parametrize("h,w,size", [(7, 10, (3, 2)), (7, 10, (2, 3)), (6, 9, (2, 2)), (64, 64, (2, 2))])
def test_n2d_is_ceil_mode_average_pooling_with_nearest_upsampling_back(h, w, size):
    x = image(2, h * w, 3, seed=h + w)
    pooled, back = reduce_tokens(x, (h, w), SideMerge("n2d", size=size))
    want, (oh, ow) = brute_pool2d(x, h, w, *size)
    assert pooled.shape == (2, oh * ow, 3)
    assert torch.allclose(pooled, want, atol=1e-6)
    y = image(2, oh * ow, 4, seed=1)
    # nearest: output row i reads input row floor(i * in / out)
    rows = [(i * oh) // h * ow + (j * ow) // w for i in range(h) for j in range(w)]
    assert torch.equal(back(y), y[:, rows])


@pytest.mark.parametrize("n,s", [(70, 4), (64, 2), (9, 3)])
def test_n1d_pools_along_the_sequence_and_copies_back(n, s):
    x = image(2, n, 3, seed=n)
    pooled, back = reduce_tokens(x, (1, n), SideMerge("n1d", size=(s,)))
    m = -(-n // s)
    want = torch.stack([x[:, i * s:(i + 1) * s].mean(1) for i in range(m)], 1)
    assert torch.allclose(pooled, want, atol=1e-6)
    y = image(2, m, 4, seed=2)
    assert torch.equal(back(y), y[:, [(i * m) // n for i in range(n)]])


# ---------------------------------------------------------------- 4. ratio 0, removal
def test_ratio_zero_equals_the_unmerged_model_and_removal_restores_it():
    model = b0()
    x = image(2, 3, 64, 96)
    with torch.no_grad():
        pure = model(x)
        zero = dict(q_mode="bsm", q_r=0, q_sx=2, q_sy=2, kv_mode="bsm", kv_r=0.0, kv_sx=2, kv_sy=2)
        settings = apply_token_reduction(model, "segformerpp", stages=[zero] * 4)
        assert settings == {"preset": None, "stages": [zero] * 4}
        assert all(isinstance(b.attn, MergingAttention) for b in model.backbone.blocks)
        assert torch.equal(model(x), pure)
        assert apply_token_reduction(model, "segformerpp", preset="hq") == {"preset": "hq", "stages": None}
        assert not torch.allclose(model(x), pure, atol=1e-3)
        remove_token_reduction(model)
        assert all(type(b.attn) is EfficientAttention and not hasattr(b.attn, "spec") for b in model.backbone.blocks)
        assert model.backbone.reducer.name == "pure"
        assert torch.equal(model(x), pure)


# ---------------------------------------------------------------- 5. presets: token counts
def test_preset_token_counts_of_the_worked_example():
    """MiT-B5 at 1024 x 1024: KV grids of stages 1/2 are 32 x 32, queries 64 x 64 (stage 3) and 32 x 32 (stage 4)."""
    def kept(h, w, stride, ratio):
        n_out = bipartite_2d(image(1, h * w, 8), (h, w), stride, ratio)[1]
        merged, _ = reduce_tokens(image(1, h * w, 8), (h, w), SideMerge("bsm", ratio, stride))
        assert merged.shape[1] == n_out
        return n_out

    assert kept(32, 32, (2, 2), 0.6) == 410 and kept(32, 32, (4, 4), 0.9) == 103  # stages 1/2 KV: hq, fast
    assert kept(64, 64, (4, 4), 0.8) == 820 and kept(64, 64, (4, 4), 0.9) == 410  # stage 3 queries
    assert kept(32, 32, (4, 4), 0.8) == 205 and kept(32, 32, (4, 4), 0.9) == 103  # stage 4 queries
    assert reduce_tokens(image(1, 4096, 8), (64, 64), SideMerge("n2d", size=(2, 2)))[0].shape == (1, 1024, 8)


def attention_lengths(model: SegFormer, x: torch.Tensor) -> list[set[tuple[int, int]]]:
    """Per stage, the (queries, keys) lengths each block's PackedAttention receives."""
    seen: list[set[tuple[int, int]]] = [set() for _ in model.backbone.layers]
    hooks = [blk.attn.attn.register_forward_pre_hook(lambda m, args, s=s: seen[s].add((args[0].shape[1], args[1].shape[1])))
             for s, stage in enumerate(model.backbone.layers) for blk in stage[1]]
    with torch.no_grad():
        model(x)
    for hook in hooks:
        hook.remove()
    return seen


def test_preset_token_counts_in_a_b0_forward():
    """128 x 128: grids 32, 16, 8, 4; KV grids (sr 8, 4, 2, 1) all 4 x 4 = 16 tokens.
    hq: KV 16 - min(int(9.6), 12) = 7; queries 64 - min(int(51.2), 60) = 13, 16 - min(int(12.8), 15) = 4.
    fast: KV 16 - min(int(14.4), 15) = 2; queries 64 - 57 = 7, 16 - 14 = 2.  2x2: queries pooled to 16, 8, 4, 2 squared."""
    model = b0()
    x = image(1, 3, 128, 128)
    want = {
        "pure": [(1024, 16), (256, 16), (64, 16), (16, 16)],
        "hq": [(1024, 7), (256, 7), (13, 16), (4, 16)],
        "fast": [(1024, 2), (256, 2), (7, 16), (2, 16)],
        "2x2": [(256, 16), (64, 16), (16, 16), (4, 16)],
    }
    assert attention_lengths(model, x) == [{p} for p in want["pure"]]
    for preset in PRESETS:
        apply_token_reduction(model, "segformerpp", preset=preset)
        assert attention_lengths(model, x) == [{p} for p in want[preset]], preset


# ---------------------------------------------------------------- 6. batch independence
@pytest.mark.parametrize("preset", PRESETS)
def test_a_batch_of_two_equals_each_image_alone(preset):
    model = b0()
    apply_token_reduction(model, "segformerpp", preset=preset)
    for size in [(64, 64), (64, 96), (67, 99)]:
        x = image(2, 3, *size, seed=size[1])
        with torch.no_grad():
            together = model(x)
            alone = torch.cat([model(x[:1]), model(x[1:])])
        assert together.shape == (2, 5, *size)
        assert torch.allclose(together, alone, atol=1e-5, rtol=0), size


# ---------------------------------------------------------------- 7. checkpoints
def invoke_import(*args: str):
    return CliRunner().invoke(import_mmseg, [str(a) for a in args])


def test_mmseg_checkpoint_round_trip_through_import_mmseg(tmp_path):
    model = b0(n_cls=19)
    ckpt = tmp_path / "segformer_mit-b0.pth"
    torch.save({"meta": {"mmseg_version": "1.2.2", "iter": 160000}, "state_dict": model.state_dict()}, ckpt)
    result = invoke_import(ckpt, "--backbone", "mit_b0", "--dataset", "cityscapes")
    assert result.exit_code == 0, result.output
    assert f"wrote {tmp_path / 'variant.yml'}; {ckpt} loads as a mit_b0 SegFormer for cityscapes" in result.output
    variant = yaml.safe_load((tmp_path / "variant.yml").read_text())
    assert variant["net_kwargs"] == net_kwargs_for("mit_b0", "segformer", 19, 1024)
    assert variant["dataset_kwargs"] == {"dataset": "cityscapes", "image_size": 1024, "crop_size": 1024,
                                         "normalization": "imagenet"}
    assert variant["inference_kwargs"] == {"im_size": 1024, "window_size": 1024, "window_stride": 768}
    loaded, _ = load_model(ckpt)
    assert isinstance(loaded, SegFormer) and not loaded.training
    x = image(2, 3, 64, 96)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))

    again = invoke_import(ckpt, "--backbone", "mit_b0", "--dataset", "cityscapes")
    assert again.exit_code == 2
    assert again.stderr.strip() == f"error: {tmp_path / 'variant.yml'} exists; pass --overwrite to replace it"
    assert invoke_import(ckpt, "--backbone", "mit_b0", "--dataset", "cityscapes", "--overwrite").exit_code == 0
    vit = invoke_import(ckpt, "--backbone", "vit_tiny_patch16_384", "--dataset", "cityscapes", "--overwrite")
    assert vit.exit_code == 2
    assert vit.stderr.strip() == ("error: --backbone vit_tiny_patch16_384 is not a MiT backbone; mmseg SegFormer "
                                  "checkpoints use mit_b0 ... mit_b5")


def test_a_checkpoint_of_neither_layout_fails_in_one_line_and_leaves_no_variant(tmp_path):
    bad = tmp_path / "new" / "bad.pth"
    bad.parent.mkdir()
    torch.save({"meta": {}, "state_dict": {"foo.weight": torch.zeros(1)}}, bad)
    result = invoke_import(bad, "--backbone", "mit_b0", "--dataset", "cityscapes")
    keys = list(b0(n_cls=19).state_dict())
    assert result.exit_code == 2
    assert result.stderr.strip() == (f"error: {bad} does not match the model: missing keys {len(keys)} "
                                     f"({', '.join(keys[:10])}, ...); unexpected keys 1 (foo.weight)")
    assert keys[:2] == ["backbone.layers.0.0.projection.weight", "backbone.layers.0.0.projection.bias"]
    assert not (bad.parent / "variant.yml").exists()
    (bad.parent / "variant.yml").write_text("previous: true\n")
    result = invoke_import(bad, "--backbone", "mit_b0", "--dataset", "cityscapes", "--overwrite")
    assert result.exit_code == 2 and len(result.stderr.strip().splitlines()) == 1
    assert (bad.parent / "variant.yml").read_text() == "previous: true\n"


def original_release(backbone: MixVisionTransformer) -> dict[str, torch.Tensor]:
    """The backbone's weights in the original SegFormer release's names (linear Mix-FFN, q / kv split)."""
    out = {"head.weight": torch.randn(1000, 256), "head.bias": torch.randn(1000)}
    for s, (embed, blocks, norm) in enumerate(backbone.layers, start=1):
        out.update({f"patch_embed{s}.proj.weight": embed.projection.weight, f"patch_embed{s}.proj.bias": embed.projection.bias,
                    f"patch_embed{s}.norm.weight": embed.norm.weight, f"patch_embed{s}.norm.bias": embed.norm.bias,
                    f"norm{s}.weight": norm.weight, f"norm{s}.bias": norm.bias})
        for j, blk in enumerate(blocks):
            p, C = f"block{s}.{j}", blk.norm1.weight.shape[0]
            a, f = blk.attn, blk.ffn.layers
            out.update({f"{p}.norm1.weight": blk.norm1.weight, f"{p}.norm1.bias": blk.norm1.bias,
                        f"{p}.norm2.weight": blk.norm2.weight, f"{p}.norm2.bias": blk.norm2.bias,
                        f"{p}.attn.q.weight": a.attn.in_proj_weight[:C], f"{p}.attn.q.bias": a.attn.in_proj_bias[:C],
                        f"{p}.attn.kv.weight": a.attn.in_proj_weight[C:], f"{p}.attn.kv.bias": a.attn.in_proj_bias[C:],
                        f"{p}.attn.proj.weight": a.attn.out_proj.weight, f"{p}.attn.proj.bias": a.attn.out_proj.bias,
                        f"{p}.mlp.fc1.weight": f[0].weight[:, :, 0, 0], f"{p}.mlp.fc1.bias": f[0].bias,
                        f"{p}.mlp.dwconv.dwconv.weight": f[1].weight, f"{p}.mlp.dwconv.dwconv.bias": f[1].bias,
                        f"{p}.mlp.fc2.weight": f[4].weight[:, :, 0, 0], f"{p}.mlp.fc2.bias": f[4].bias})
            if a.sr_ratio > 1:
                out.update({f"{p}.attn.sr.weight": a.sr.weight, f"{p}.attn.sr.bias": a.sr.bias,
                            f"{p}.attn.norm.weight": a.norm.weight, f"{p}.attn.norm.bias": a.norm.bias})
    return {k: v.detach().clone().contiguous() for k, v in out.items()}


def test_original_release_weights_convert_to_the_same_weights(tmp_path):
    source = b0().backbone
    converted = from_original_release(original_release(source))
    own = source.state_dict()
    assert list(converted) != [] and set(converted) == set(own)
    assert all(torch.equal(converted[k], own[k]) for k in own)
    for layout, data in {"original": {"state_dict": original_release(source)},
                         "mmseg": {"meta": {}, "state_dict": {f"backbone.{k}": v for k, v in own.items()}}}.items():
        path = tmp_path / f"{layout}.pth"
        torch.save(data, path)
        torch.manual_seed(7)
        model = create_segformer(net_kwargs_for("mit_b0", "segformer", 5, 64), pretrained=path).eval()
        x = image(1, 3, 64, 96)
        with torch.no_grad():
            assert torch.equal(model.backbone(x)[3], source(x)[3]), layout


# ---------------------------------------------------------------- 8. errors
def one_line_error(call, *args, **kwargs) -> str:
    with pytest.raises(UsageError) as err:
        call(*args, **kwargs)
    assert "\n" not in str(err.value)
    return str(err.value)


def test_usage_errors(tiny_model):
    model = b0()
    assert one_line_error(apply_token_reduction, model, "tome", r=2) == (
        "patch type 'tome' applies to a Segmenter or its VisionTransformer encoder built from timm Blocks, not SegFormer")
    assert one_line_error(apply_token_reduction, tiny_model[0], "segformerpp", preset="hq") == (
        "patch type 'segformerpp' applies to a SegFormer with a MiT backbone, not Segmenter")
    assert one_line_error(apply_token_reduction, model, "segformerpp", preset="turbo") == (
        "preset must be one of hq, fast, 2x2; got 'turbo'")
    base = [dict(q_mode="bsm", q_r=0.5, q_sx=2, q_sy=2) for _ in range(4)]
    for ratio in (1.0, -0.1, 1.5):
        stages = copy.deepcopy(base)
        stages[2]["q_r"] = ratio
        assert one_line_error(apply_token_reduction, model, "segformerpp", stages=stages) == (
            f"stage 3 q_r must be a merge ratio in [0, 1), got {ratio!r}")
    stages = copy.deepcopy(base)
    stages[1]["kv_ratio"] = 0.5
    assert one_line_error(apply_token_reduction, model, "segformerpp", stages=stages) == (
        "stage 2 has unknown keys kv_ratio; known: q_mode, kv_mode, q_r, kv_r, q_sx, q_sy, kv_sx, kv_sy, q_s, kv_s")
    assert "stages must be a list of 4 dicts" in one_line_error(apply_token_reduction, model, "segformerpp", stages=base[:3])
    assert all(type(b.attn) is EfficientAttention for b in model.backbone.blocks)  # nothing applied
    assert one_line_error(net_kwargs_for, "vit_tiny_patch16_384", "segformer", 5, 64) == (
        "decoder 'segformer' does not decode the vit backbone vit_tiny_patch16_384; use linear or mask_transformer")
    assert one_line_error(net_kwargs_for, "mit_b0", "linear", 5, 64) == (
        "decoder 'linear' does not decode the mit backbone mit_b0; use segformer")


# ---------------------------------------------------------------- 9. optimizer groups
def test_optimizer_groups_follow_mmseg_rules():
    model = b0()
    opt = create_optimizer(model, "adamw", 6e-5, 0.01, head_lr_mult=10)
    names = {id(p): n for n, p in model.named_parameters()}
    got: dict[tuple[float, float], set[str]] = {}
    for group in opt.param_groups:
        got.setdefault((round(group["lr"], 12), group["weight_decay"]), set()).update(names[id(p)] for p in group["params"])
    assert sum(len(g["params"]) for g in opt.param_groups) == len(names)
    all_names = set(names.values())
    head = {n for n in all_names if n.startswith("decode_head.")}
    no_decay = {n for n in all_names - head if "norm" in n}
    assert got == {(6e-4, 0.01): head, (6e-5, 0.0): no_decay, (6e-5, 0.01): all_names - head - no_decay}
    assert "backbone.layers.0.1.0.attn.norm.weight" in no_decay and "backbone.layers.3.0.norm.bias" in no_decay
    assert "backbone.layers.0.2.weight" not in no_decay  # the stage norm is named layers.{i}.2 in mmseg
    assert "backbone.layers.0.1.0.attn.attn.in_proj_bias" in all_names - head - no_decay
    assert type(opt).__name__ == "AdamW"


# ---------------------------------------------------------------- 10. training, resume, eval, flops
TRAIN = ["--dataset", "synthetic", "--backbone", "mit_b0", "--decoder", "segformer", "--no-pretrained",
         "--warmup-iters", "1", "--im-size", "64", "--crop-size", "64", "--window-size", "64", "--window-stride", "64",
         "--batch-size", "4", "--eval-freq", "1", "--seed", "0", "--num-workers", "0", "--device", "cpu",
         "--max-images", "8", "--epochs", "2"]


def train_process(run: Path, **pipes) -> subprocess.Popen:
    return subprocess.Popen(module_cmd("segm.train", "--log-dir", str(run), *TRAIN), cwd=REPO, text=True,
                            env=SUBPROCESS_ENV, **pipes)


def cli(command, *args) -> str:
    """A click command in this process (as ``python -m`` runs it); its stdout."""
    result = CliRunner().invoke(command, [str(a) for a in args], catch_exceptions=False)
    assert result.exit_code == 0, result.output[-3000:]
    return result.stdout


def test_mit_b0_trains_resumes_after_sigkill_evaluates_and_counts_flops(tmp_path):
    from segm.eval.miou import main as miou_main
    from segm.flops import main as flops_main
    from segm.train import main as train_main

    straight, crashed = tmp_path / "straight", tmp_path / "crashed"
    proc = train_process(crashed, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    killer = threading.Thread(target=kill_when, args=(proc, has_log_line(crashed)))
    killer.start()
    cli(train_main, "--log-dir", straight, *TRAIN)  # the uninterrupted run, meanwhile
    killer.join()
    assert proc.wait() == -signal.SIGKILL, "the run finished before it could be killed"
    assert len(read_log(crashed)) == 1
    resumed = train_process(crashed, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, err[-3000:]
    assert "Resuming from" in out
    want, got = read_log(straight), read_log(crashed)
    assert [r["epoch"] for r in got] == [0, 1] and [r["num_updates"] for r in got] == [2, 4]
    assert [r["train_loss"] for r in got] == pytest.approx([r["train_loss"] for r in want], rel=1e-6)
    assert got[1]["val_mean_iou"] == want[1]["val_mean_iou"]
    variant = yaml.safe_load((straight / "variant.yml").read_text())
    opt = variant["optimizer_kwargs"]
    assert (opt["opt"], opt["lr"], opt["weight_decay"], opt["min_lr"], opt["poly_power"], opt["iter_warmup"],
            opt["head_lr_mult"], opt["iter_max"]) == ("adamw", 6e-5, 0.01, 0.0, 1.0, 1.0, 10.0, 4)
    model, _ = load_model(straight / "checkpoint.pth")
    assert isinstance(model, SegFormer) and model.n_cls == 16

    miou = cli(miou_main, straight / "checkpoint.pth", "synthetic", "--num-workers", "0", "--device", "cpu",
               "--frac-dataset", "0.125", "--im-size", "64", "--window-size", "64", "--window-stride", "64")
    # the same 8 validation images, windows and weights as the last evaluation of training
    assert f"mean_iou: {want[1]['val_mean_iou']}" in miou.splitlines()
    assert "images: 8, window 64, stride 64, short side 64" in miou
    flops = cli(flops_main, "--model-dir", straight, "--breakdown", "--patch-type", "segformerpp", "--device", "cpu",
                "--max-images", "2")
    rows = {cells[0]: cells[1] for line in flops.splitlines() if line.startswith("| stage ")
            for cells in [[c.strip() for c in line.strip("|").split("|")]] if cells[0] != "stage"}
    # crop 64, hq: grids 16, 8, 4, 2; KV 2x2 -> 2 (stages 1, 2); queries 4x4 -> 4 (stage 3), 2x2 unmerged (stage 4)
    tokens = {1: "256.0 / 256.0 / 2.0", 2: "64.0 / 64.0 / 2.0", 3: "16.0 / 4.0 / 4.0", 4: "4.0 / 4.0 / 4.0"}
    assert rows == {k: v for s in range(1, 5) for k, v in
                    {f"stage {s} patch embed": "", f"stage {s} block 1": tokens[s], f"stage {s} block 2": tokens[s],
                     f"stage {s} norm": ""}.items()}
    record = json.loads(next(line for line in flops.splitlines() if line.startswith("{")))
    assert (record["patch_type"], record["settings"], record["images"]) == ("segformerpp", {"preset": "hq", "stages": None}, 2)
    assert f"GFlops: {record['gflops']:.4f}" in flops and record["gflops"] > 0
