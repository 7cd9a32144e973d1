"""The ALGM patch on whole Segmenters: identity cases, round trips, gradients, options and argument errors."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from timm.models.vision_transformer import Block

import algm
from algm.patch import TurboBlock, algm_segmenter_patch, patched_layers, unpatch
from segm.model.factory import create_segmenter
from tokred.errors import UsageError
from tests.conftest import perturb_, tiny_net_kwargs


def smooth_images(batch: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    """Images with large uniform-ish regions, so that neighbouring patches are similar and merge."""
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(batch, 3, max(h // 32, 1), max(w // 32, 1), generator=gen)
    return F.interpolate(base, (h, w), mode="bilinear", align_corners=False) + 0.05 * torch.randn(batch, 3, h, w, generator=gen)


def make_model(decoder: str = "mask_transformer", backbone: str = "vit_tiny_patch16_384", crop: int = 128):
    torch.manual_seed(0)
    return perturb_(create_segmenter(tiny_net_kwargs(decoder, backbone, crop=crop))).eval()


def test_import_algm_reaches_the_patch():
    assert algm.patch.algm_segmenter_patch is algm_segmenter_patch


@pytest.mark.parametrize("decoder", ["linear", "mask_transformer"])
def test_clap_merging_nothing_gives_exactly_the_unpatched_outputs(decoder):
    model = make_model(decoder)
    x = smooth_images(2, 128, 160)
    with torch.no_grad():
        want = model(x)
        algm_segmenter_patch(model, [3], threshold=1.0)
        got = model(x)
    assert torch.equal(got, want)


def test_patch_unpatch_round_trip_and_state_dict_unchanged(tmp_path):
    model = make_model()
    keys = {k: v.clone() for k, v in model.state_dict().items()}
    x = smooth_images(1, 128, 128)
    with torch.no_grad():
        before = model(x)
        algm_segmenter_patch(model, [1, 5], threshold=0.5)
        merged = model(x)
        assert list(model.state_dict()) == list(keys)
        assert all(torch.equal(model.state_dict()[k], v) for k, v in keys.items())
        assert not torch.equal(merged, before)
        assert sum(isinstance(b, TurboBlock) for b in model.encoder.blocks) == 2
        unpatch(model)
        assert all(type(b) is Block for b in model.encoder.blocks)
        assert model.encoder.reducer.name == "pure"
        assert torch.equal(model(x), before)


def test_checkpoints_load_before_or_after_patching():
    source = make_model()
    state = source.state_dict()
    target = make_model()
    algm_segmenter_patch(target, [1, 5], threshold=0.5)
    target.load_state_dict(state, strict=True)
    algm_segmenter_patch(source, [1, 5], threshold=0.5)
    x = smooth_images(1, 128, 128)
    with torch.no_grad():
        assert torch.equal(target(x), source(x))


def test_patch_is_idempotent_and_repatching_replaces_settings():
    model = make_model()
    x = smooth_images(2, 128, 128)
    algm_segmenter_patch(model, [1, 5], threshold=0.6)
    with torch.no_grad():
        once = model(x)
        algm_segmenter_patch(model, [1, 5], threshold=0.6)
        assert torch.equal(model(x), once)
    assert [(s.kind, s.layer_idx) for s in patched_layers(model)] == [("clap", 1), ("gbm", 5)]
    algm_segmenter_patch(model, [2, 4, 9], window_size=(2, 1), threshold=0.7)
    specs = patched_layers(model)
    assert [(s.kind, s.layer_idx) for s in specs] == [("clap", 2), ("gbm", 4), ("gbm", 9)]
    assert all(s.window_size == (2, 1) and s.threshold == 0.7 for s in specs)
    assert sum(isinstance(b, TurboBlock) for b in model.encoder.blocks) == 3


def test_token_counts_and_trace_source_history():
    model = make_model()
    algm_segmenter_patch(model, [1, 5, 8], threshold=0.6, trace_source=True)
    x = smooth_images(1, 128, 128)
    with torch.no_grad():
        tokens, state = model.encoder.forward_tokens(x)
    assert len(state.history) == 3
    counts = [int(h.max()) + 1 for h in state.history]
    assert counts[0] >= counts[1] >= counts[2] == tokens.shape[1]
    assert counts[0] < 65
    assert torch.equal(state.history[-1], state.index)
    assert state.size.sum().item() == pytest.approx(64 + 1)


@pytest.mark.parametrize("decoder", ["linear", "mask_transformer"])
def test_decoder_runs_on_merged_tokens_and_unmerges(decoder):
    model = make_model(decoder)
    algm_segmenter_patch(model, [1, 5], threshold=0.6)
    x = smooth_images(2, 128, 96)
    with torch.no_grad():
        tokens, state = model.encoder.forward_tokens(x)
        per_token = model.decoder.token_logits(tokens[:, 1:])
        grid = per_token.gather(1, (state.index - 1)[..., None].expand(-1, -1, per_token.shape[-1]))
        grid = grid.transpose(1, 2).reshape(2, -1, 8, 6)
        want = F.interpolate(grid, (128, 96), mode="bilinear", align_corners=False)
        assert tokens.shape[1] < 1 + 48
        assert torch.allclose(model(x), want, atol=1e-6)


@pytest.mark.parametrize("backbone", ["vit_tiny_patch16_384", "deit_tiny_distilled_patch16_224"])
def test_any_input_size_and_distillation_token(backbone):
    model = make_model(backbone=backbone)
    algm_segmenter_patch(model, [1, 5], window_size=(2, 2), threshold=0.6)
    for size in ((128, 128), (100, 150), (64, 208)):
        with torch.no_grad():
            out = model(smooth_images(2, *size))
        assert out.shape == (2, 5, *size)
        assert torch.isfinite(out).all()


def test_gradients_reach_every_parameter_through_merges():
    model = make_model()
    model.train()
    algm_segmenter_patch(model, [1, 5], threshold=0.6)
    x = smooth_images(2, 128, 128)
    target = torch.randint(0, 5, (2, 128, 128))
    loss = F.cross_entropy(model(x), target)
    loss.backward()
    unused = {"encoder.head.weight", "encoder.head.bias"}
    for name, p in model.named_parameters():
        if name in unused:
            assert p.grad is None
        else:
            assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_proportional_attention_adds_log_size_to_the_logits():
    model = make_model()
    x = smooth_images(1, 128, 128)
    algm_segmenter_patch(model, [1, 5], threshold=0.6, prop_attn=True)
    with torch.no_grad():
        with_prop = model(x)
        algm_segmenter_patch(model, [1, 5], threshold=0.6)
        without = model(x)
        assert not torch.allclose(with_prop, without)
        algm_segmenter_patch(model, [1], threshold=1.0, prop_attn=True)
        assert torch.equal(model(x), make_model()(x))

    block = model.encoder.blocks[3]
    tokens = torch.randn(1, 7, 192)
    size = torch.tensor([1.0, 4, 1, 2, 1, 3, 1]).reshape(1, 7, 1)
    bias = size.log().transpose(1, 2).unsqueeze(1)
    attn = block.attn
    with torch.no_grad():
        got = attn(tokens, attn_mask=bias)
        qkv = attn.qkv(tokens).reshape(1, 7, 3, 3, 64).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        weights = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(64) + size.log().reshape(1, 1, 1, 7), -1)
        want = attn.proj((weights @ v).transpose(1, 2).reshape(1, 7, 192))
    assert torch.allclose(got, want, atol=1e-5)


def test_bf16_autocast_runs_with_fp32_similarities():
    model = make_model()
    algm_segmenter_patch(model, [1, 5], threshold=0.6)
    x = smooth_images(2, 128, 128)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
    assert out.shape == (2, 5, 128, 128) and torch.isfinite(out.float()).all()
    scores = algm.local_merge.window_similarity(torch.randn(1, 16, 8, dtype=torch.bfloat16), (4, 4), (2, 2))
    assert scores.dtype == torch.float32


@pytest.mark.parametrize("layers,match", [([], "non-empty"), ([5, 1], "strictly increasing"), ([1, 1], "strictly increasing"),
                                          ([0, 5], r"out of range: blocks are numbered 1\.\.12"), ([1, 13], "out of range"),
                                          ("1 5", "non-empty list"), ([1.0, 5], "non-empty list")])
def test_selected_layers_errors(layers, match):
    with pytest.raises(ValueError, match=match):
        algm_segmenter_patch(make_model(), layers)


@pytest.mark.parametrize("window,match", [((2,), "two positive ints"), ((0, 2), "two positive ints"), ((2.0, 2), "two positive ints"),
                                          ((1, 1), "single token"), ((9, 2), r"larger than the 8x8 patch grid")])
def test_window_size_errors(window, match):
    with pytest.raises(ValueError, match=match):
        algm_segmenter_patch(make_model(), [1, 5], window_size=window)


@pytest.mark.parametrize("threshold", [float("nan"), float("inf"), "0.9", None, True, 1.5, -1.01])
def test_threshold_errors(threshold):
    with pytest.raises(UsageError, match=r"threshold must be a number in \[-1, 1\], got "):
        algm_segmenter_patch(make_model(), [1, 5], threshold=threshold)


@pytest.mark.parametrize("threshold", [-1.0, 1.0])
def test_threshold_bounds_of_a_cosine_similarity_are_valid(threshold):
    model = algm_segmenter_patch(make_model(), [1, 5], threshold=threshold)
    assert patched_layers(model)[0].threshold == threshold


def test_patching_something_else_is_refused():
    with pytest.raises(UsageError, match="patch type 'algm' applies to a Segmenter or its VisionTransformer encoder "
                                         "built from timm Blocks, not Linear"):
        algm_segmenter_patch(torch.nn.Linear(2, 2), [1])


def test_a_bad_option_leaves_the_previous_patch_in_place():
    model = algm_segmenter_patch(make_model(), [1, 5], threshold=0.6)
    with pytest.raises(UsageError, match="out of range"):
        algm_segmenter_patch(model, [1, 13])
    assert [(s.kind, s.layer_idx) for s in patched_layers(model)] == [("clap", 1), ("gbm", 5)]


def test_patching_the_encoder_alone():
    model = make_model()
    algm_segmenter_patch(model.encoder, [1, 5], threshold=0.6)
    assert len(patched_layers(model)) == 2
