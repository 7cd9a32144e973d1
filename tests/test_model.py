"""Encoder / decoder structure (official key names and shapes), forward shapes, attention, pos-embed resizing."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from segm.config import backbone_config, known_names
from segm.model.factory import create_segmenter, net_kwargs_for
from segm.model.inference import upsample_logits
from segm.model.vit import make_block, resize_pos_embed
from tests.conftest import perturb_, tiny_net_kwargs


def expected_keys(backbone: str, decoder: str, n_cls: int, crop: int) -> dict[str, tuple]:
    """The official Segmenter state-dict keys and shapes, written out from the published layout."""
    cfg = backbone_config(backbone)
    D, P, L = cfg["d_model"], cfg["patch_size"], cfg["n_layers"]
    n_tok = (1 + cfg["distilled"]) + (crop // P) ** 2
    keys = {"encoder.cls_token": (1, 1, D)}
    if cfg["distilled"]:
        keys["encoder.dist_token"] = (1, 1, D)
    keys["encoder.pos_embed"] = (1, n_tok, D)
    keys["encoder.patch_embed.proj.weight"] = (D, 3, P, P)
    keys["encoder.patch_embed.proj.bias"] = (D,)
    if cfg["distilled"]:
        keys["encoder.head_dist.weight"] = (1000, D)
        keys["encoder.head_dist.bias"] = (1000,)

    def block(prefix: str) -> None:
        for norm in ("norm1", "norm2"):
            keys[f"{prefix}.{norm}.weight"] = (D,)
            keys[f"{prefix}.{norm}.bias"] = (D,)
        keys[f"{prefix}.attn.qkv.weight"] = (3 * D, D)
        keys[f"{prefix}.attn.qkv.bias"] = (3 * D,)
        keys[f"{prefix}.attn.proj.weight"] = (D, D)
        keys[f"{prefix}.attn.proj.bias"] = (D,)
        keys[f"{prefix}.mlp.fc1.weight"] = (4 * D, D)
        keys[f"{prefix}.mlp.fc1.bias"] = (4 * D,)
        keys[f"{prefix}.mlp.fc2.weight"] = (D, 4 * D)
        keys[f"{prefix}.mlp.fc2.bias"] = (D,)

    for i in range(L):
        block(f"encoder.blocks.{i}")
    keys["encoder.norm.weight"] = (D,)
    keys["encoder.norm.bias"] = (D,)
    keys["encoder.head.weight"] = (1000, D)
    keys["encoder.head.bias"] = (1000,)
    if decoder == "linear":
        keys["decoder.head.weight"] = (n_cls, D)
        keys["decoder.head.bias"] = (n_cls,)
    else:
        keys["decoder.cls_emb"] = (1, n_cls, D)
        keys["decoder.proj_patch"] = (D, D)
        keys["decoder.proj_classes"] = (D, D)
        for i in range(2):
            block(f"decoder.blocks.{i}")
        keys["decoder.proj_dec.weight"] = (D, D)
        keys["decoder.proj_dec.bias"] = (D,)
        keys["decoder.decoder_norm.weight"] = (D,)
        keys["decoder.decoder_norm.bias"] = (D,)
        keys["decoder.mask_norm.weight"] = (n_cls,)
        keys["decoder.mask_norm.bias"] = (n_cls,)
    return keys


VIT_BACKBONES = [name for name in known_names("model") if backbone_config(name).get("family", "vit") == "vit"]


@pytest.mark.parametrize("decoder", ["linear", "mask_transformer"])
@pytest.mark.parametrize("backbone", VIT_BACKBONES)
def test_state_dict_keys_and_shapes_match_official_layout(backbone, decoder):
    crop = 512 if backbone_config(backbone)["patch_size"] != 32 else 640
    with torch.device("meta"):
        model = create_segmenter(net_kwargs_for(backbone, decoder, n_cls=150, crop_size=crop))
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    want = expected_keys(backbone, decoder, 150, crop)
    assert got == want  # same keys and shapes (timm orders a block's keys norm1, attn, norm2, mlp)
    assert not list(model.buffers())


def test_layer_norm_eps_gelu_and_drop_path_rates():
    model = create_segmenter(net_kwargs_for("vit_tiny_patch16_384", "mask_transformer", 5, 64, drop_path_rate=0.1))
    norms = [m for m in model.modules() if isinstance(m, torch.nn.LayerNorm)]
    assert norms and all(m.eps == 1e-5 for m in norms)
    gelus = [m for m in model.modules() if isinstance(m, torch.nn.GELU)]
    assert gelus and all(m.approximate == "none" for m in gelus)
    rates = [getattr(b.drop_path1, "drop_prob", 0.0) for b in model.encoder.blocks]
    assert rates == pytest.approx(torch.linspace(0, 0.1, 12).tolist())
    assert all(isinstance(b.drop_path1, torch.nn.Identity) for b in model.decoder.blocks)
    assert model.decoder.blocks[0].attn.attn_drop.p == 0.1
    assert model.encoder.dropout.p == 0.0


@pytest.mark.parametrize("decoder", ["linear", "mask_transformer"])
@pytest.mark.parametrize("backbone", ["vit_tiny_patch16_384", "deit_tiny_distilled_patch16_224"])
@pytest.mark.parametrize("size", [(64, 64), (50, 77), (96, 33), (17, 130)])
def test_forward_shapes_any_size(decoder, backbone, size):
    torch.manual_seed(0)
    model = create_segmenter(tiny_net_kwargs(decoder, backbone)).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, *size))
    assert out.shape == (2, 5, *size)
    assert torch.isfinite(out).all()


def test_padding_does_not_leak_into_unpadded_pixels_beyond_patch_grid():
    """Output at an unpadded size equals the output of the explicitly zero-padded input, cropped."""
    torch.manual_seed(0)
    model = perturb_(create_segmenter(tiny_net_kwargs("linear"))).eval()
    im = torch.randn(1, 3, 50, 70)
    padded = F.pad(im, (0, 80 - 70, 0, 64 - 50))
    with torch.no_grad():
        a = model(im)
        b = model(padded)[:, :, :50, :70]
    assert torch.allclose(a, b, atol=1e-5)


def brute_bilinear(grid: torch.Tensor, out_h: int, out_w: int) -> torch.Tensor:
    """Bilinear resize of a [h, w, D] grid with half-pixel centres (align_corners=False), by loops."""
    h, w, _ = grid.shape
    out = torch.zeros(out_h, out_w, grid.shape[2], dtype=torch.float64)
    g = grid.double()

    def coord(i, n_in, n_out):
        x = (i + 0.5) * n_in / n_out - 0.5
        x = max(x, 0.0)
        x0 = min(int(math.floor(x)), n_in - 1)
        x1 = min(x0 + 1, n_in - 1)
        return x0, x1, x - x0

    for i in range(out_h):
        y0, y1, fy = coord(i, h, out_h)
        for j in range(out_w):
            x0, x1, fx = coord(j, w, out_w)
            out[i, j] = ((1 - fy) * ((1 - fx) * g[y0, x0] + fx * g[y0, x1])
                         + fy * ((1 - fx) * g[y1, x0] + fx * g[y1, x1]))
    return out


def test_logits_are_upsampled_channels_last_on_cpu_with_the_bilinear_values():
    torch.manual_seed(0)
    logits = torch.randn(2, 7, 4, 6)
    got = upsample_logits(logits, (16, 21))
    assert got.shape == (2, 7, 16, 21) and got.is_contiguous(memory_format=torch.channels_last)
    for b in range(2):
        want = brute_bilinear(logits[b].permute(1, 2, 0), 16, 21).permute(2, 0, 1).float()
        assert torch.allclose(got[b], want, atol=1e-5, rtol=0)
    model = create_segmenter(tiny_net_kwargs("mask_transformer")).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 64, 64)).is_contiguous(memory_format=torch.channels_last)


def test_logits_are_upsampled_in_fp16_under_fp16_autocast_and_in_fp32_otherwise():
    torch.manual_seed(0)
    logits = torch.randn(1, 7, 4, 6)

    def reference(x):
        return F.interpolate(x, (16, 21), mode="bilinear", align_corners=False)

    with torch.autocast("cpu", dtype=torch.float16):
        got = upsample_logits(logits, (16, 21))
    assert got.dtype == torch.float16 and torch.allclose(got.float(), reference(logits.half()).float(), atol=2e-3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = upsample_logits(logits.bfloat16(), (16, 21))
    assert got.dtype == torch.float32 and torch.allclose(got, reference(logits.bfloat16().float()), atol=1e-6)
    assert upsample_logits(logits.double(), (16, 21)).dtype == torch.float64


@pytest.mark.parametrize("old,new,n_extra", [((4, 4), (6, 3), 1), ((5, 3), (2, 7), 2), ((3, 3), (3, 3), 1)])
def test_resize_pos_embed_matches_bruteforce_bilinear(old, new, n_extra):
    torch.manual_seed(0)
    D = 8
    pos = torch.randn(1, n_extra + old[0] * old[1], D)
    out = resize_pos_embed(pos, old if old[0] != old[1] else None, new, n_extra)
    assert out.shape == (1, n_extra + new[0] * new[1], D)
    assert torch.equal(out[:, :n_extra], pos[:, :n_extra])
    want = brute_bilinear(pos[0, n_extra:].reshape(*old, D), *new).reshape(-1, D)
    assert torch.allclose(out[0, n_extra:].double(), want, atol=1e-6)


def test_encoder_uses_resized_pos_embed_for_other_grids():
    torch.manual_seed(0)
    model = create_segmenter(tiny_net_kwargs("linear")).eval()
    enc = model.encoder
    im = torch.randn(1, 3, 48, 80)
    want = resize_pos_embed(enc.pos_embed, (4, 4), (3, 5), 1)
    assert torch.equal(enc.pos_embed_for((3, 5)), want)
    assert enc.pos_embed_for((4, 4)) is enc.pos_embed
    tokens = enc.embed(im)
    patches = enc.patch_embed(im)
    assert torch.allclose(tokens[:, 1:], patches + want[:, 1:], atol=1e-6)
    assert torch.allclose(tokens[:, :1], enc.cls_token + want[:, :1], atol=1e-6)


def test_timm_block_equals_naive_attention_block():
    """Our timm Block (fused attention) computes softmax(Q K^T / sqrt(d)) V as Segmenter's block does."""
    torch.manual_seed(0)
    dim, heads = 48, 3
    block = perturb_(make_block(dim, heads, 4 * dim, dropout=0.1, drop_path=0.2)).eval()
    x = torch.randn(2, 11, dim)

    def naive(x):
        B, N, C = x.shape
        hd = C // heads
        y = F.layer_norm(x, (C,), block.norm1.weight, block.norm1.bias, eps=1e-5)
        qkv = y @ block.attn.qkv.weight.T + block.attn.qkv.bias
        q, k, v = qkv.reshape(B, N, 3, heads, hd).permute(2, 0, 3, 1, 4)
        attn = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(hd), dim=-1)
        y = (attn @ v).transpose(1, 2).reshape(B, N, C)
        x = x + y @ block.attn.proj.weight.T + block.attn.proj.bias
        y = F.layer_norm(x, (C,), block.norm2.weight, block.norm2.bias, eps=1e-5)
        y = F.gelu(y @ block.mlp.fc1.weight.T + block.mlp.fc1.bias)
        return x + y @ block.mlp.fc2.weight.T + block.mlp.fc2.bias

    with torch.no_grad():
        assert torch.allclose(block(x), naive(x), atol=1e-5)


def test_image_batch_errors():
    model = create_segmenter(tiny_net_kwargs("linear")).eval()
    for bad in (torch.randn(3, 64, 64), torch.randn(1, 1, 64, 64), torch.randn(1, 4, 32, 32)):
        with pytest.raises(ValueError, match=r"expected an image batch of shape B x 3 x H x W"):
            model(bad)
    with pytest.raises(ValueError, match="floating-point"):
        model(torch.zeros(1, 3, 32, 32, dtype=torch.uint8))


def test_unknown_backbone_and_decoder_list_known_names():
    with pytest.raises(ValueError, match=r"unknown backbone 'vit_huge'.*vit_small_patch16_384"):
        net_kwargs_for("vit_huge", "linear", 5, 64)
    with pytest.raises(ValueError, match=r"unknown decoder 'deeplab_dec'.*linear, mask_transformer"):
        net_kwargs_for("vit_tiny_patch16_384", "deeplab_dec", 5, 64)
    net = tiny_net_kwargs()
    net["decoder"]["name"] = "unet"
    with pytest.raises(ValueError, match=r"unknown decoder 'unet'"):
        create_segmenter(net)
    net["decoder"]["name"] = "segformer"  # a MiT head is no decoder of a ViT
    with pytest.raises(ValueError, match=r"^unknown decoder 'segformer' for a ViT encoder; known decoders: "
                                         r"linear, mask_transformer$"):
        create_segmenter(net)
