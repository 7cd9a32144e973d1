"""load_model round trips and errors; ImageNet initialisation from local .pth / .safetensors / .npz files."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from segm.model.factory import create_segmenter, load_model, load_pretrained_encoder, load_variant
from segm.model.vit import VisionTransformer, resize_pos_embed
from tests.conftest import perturb_, tiny_net_kwargs, write_checkpoint


@pytest.mark.parametrize("decoder", ["linear", "mask_transformer"])
def test_load_model_round_trip_with_tuple_tags(tmp_path, decoder):
    torch.manual_seed(0)
    net = tiny_net_kwargs(decoder)
    model = perturb_(create_segmenter(net)).eval()
    path = write_checkpoint(tmp_path / "run", model, net)
    assert "!!python/tuple" in (tmp_path / "run" / "variant.yml").read_text()
    loaded, variant = load_model(path)
    assert variant["net_kwargs"]["image_size"] == (64, 64)
    assert not loaded.training
    im = torch.randn(2, 3, 64, 80)
    with torch.no_grad():
        assert torch.equal(loaded(im), model(im))
    from_dir, _ = load_model(tmp_path / "run")
    with torch.no_grad():
        assert torch.equal(from_dir(im), model(im))


def test_load_model_fp16_weights_become_fp32(tmp_path):
    torch.manual_seed(0)
    net = tiny_net_kwargs("linear")
    model = perturb_(create_segmenter(net)).eval()
    path = write_checkpoint(tmp_path, model, net, dtype=torch.float16)
    loaded, _ = load_model(path)
    assert all(p.dtype == torch.float32 for p in loaded.parameters())
    half = {k: v.half().float() for k, v in model.state_dict().items()}
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in half.items())


def test_variant_yaml_extension_is_accepted(tmp_path):
    net = tiny_net_kwargs("linear")
    path = write_checkpoint(tmp_path, create_segmenter(net), net)
    (tmp_path / "variant.yml").rename(tmp_path / "variant.yaml")
    model, variant = load_model(path)
    assert variant["net_kwargs"]["backbone"] == "vit_tiny_patch16_384"


def test_missing_checkpoint_and_variant(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"checkpoint not found: .*nope\.pth"):
        load_model(tmp_path / "nope.pth")
    torch.save({"model": {}}, tmp_path / "checkpoint.pth")
    with pytest.raises(FileNotFoundError, match=r"no variant\.yml or variant\.yaml beside .*checkpoint\.pth"):
        load_model(tmp_path / "checkpoint.pth")


def test_missing_and_unexpected_keys_are_listed(tmp_path):
    net = tiny_net_kwargs("linear")
    path = write_checkpoint(tmp_path, create_segmenter(net), net)
    data = torch.load(path)
    state = data["model"]
    del state["decoder.head.bias"]
    state["decoder.extra"] = torch.zeros(1)
    torch.save(data, path)
    with pytest.raises(ValueError) as err:
        load_model(path)
    msg = str(err.value)
    assert "missing keys 1 (decoder.head.bias)" in msg
    assert "unexpected keys 1 (decoder.extra)" in msg
    assert "\n" not in msg


def test_many_missing_keys_are_capped_at_ten(tmp_path):
    net = tiny_net_kwargs("linear")
    path = write_checkpoint(tmp_path, create_segmenter(net), net)
    data = torch.load(path)
    data["model"] = {k: v for k, v in data["model"].items() if not k.startswith("encoder.blocks")}
    torch.save(data, path)
    with pytest.raises(ValueError, match=r"missing keys 144 \((encoder\.blocks\.[^,]+, ){9}encoder\.blocks\.[^,]+, \.\.\.\)"):
        load_model(path)


def test_shape_mismatch_names_key_and_shapes(tmp_path):
    net = tiny_net_kwargs("linear")
    path = write_checkpoint(tmp_path, create_segmenter(net), net)
    data = torch.load(path)
    data["model"]["decoder.head.weight"] = torch.zeros(7, 192)
    torch.save(data, path)
    with pytest.raises(ValueError, match=r"'decoder\.head\.weight' has shape \(7, 192\) in the checkpoint but \(5, 192\) in the model"):
        load_model(path)


def test_variant_with_python_object_is_refused(tmp_path):
    net = tiny_net_kwargs("linear")
    path = write_checkpoint(tmp_path, create_segmenter(net), net)
    (tmp_path / "variant.yml").write_text("net_kwargs: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(ValueError, match=r"refused to build a Python object from tag .*python/object/apply:os\.system"):
        load_model(path)
    (tmp_path / "v.yml").write_text("a: !!python/tuple [1, 2]\nb: [3]\n")
    assert load_variant(tmp_path / "v.yml") == {"a": (1, 2), "b": [3]}


def tiny_encoder(distilled: bool = False, image_size=(64, 64)) -> VisionTransformer:
    return VisionTransformer(image_size=image_size, patch_size=16, n_layers=2, d_model=32, d_ff=128,
                             n_heads=2, distilled=distilled)


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_pretrained_local_file_is_remapped_and_pos_embed_resized(tmp_path, suffix):
    torch.manual_seed(0)
    source = perturb_(tiny_encoder(image_size=(32, 32)))
    weights = {k: v for k, v in source.state_dict().items()}
    path = tmp_path / f"weights{suffix}"
    if suffix == ".pth":
        torch.save({"model": weights}, path)
    else:
        from safetensors.torch import save_file
        save_file(weights, str(path))
    target = tiny_encoder(image_size=(64, 48))
    load_pretrained_encoder(target, "vit_tiny_patch16_384", path)
    got = target.state_dict()
    assert torch.equal(got["blocks.1.mlp.fc2.weight"], weights["blocks.1.mlp.fc2.weight"])
    assert torch.equal(got["pos_embed"], resize_pos_embed(weights["pos_embed"], None, (4, 3), 1))


def test_pretrained_head_of_other_size_is_skipped_and_missing_block_is_an_error(tmp_path):
    source = tiny_encoder()
    weights = source.state_dict()
    weights["head.weight"] = torch.zeros(21843, 32)
    weights["head.bias"] = torch.zeros(21843)
    torch.save(weights, tmp_path / "in21k.pth")
    target = tiny_encoder()
    load_pretrained_encoder(target, "vit_tiny_patch16_384", tmp_path / "in21k.pth")
    assert torch.equal(target.state_dict()["norm.weight"], weights["norm.weight"])
    del weights["norm.bias"]
    torch.save(weights, tmp_path / "broken.pth")
    with pytest.raises(ValueError, match=r"missing keys 1 \(norm\.bias\)"):
        load_pretrained_encoder(target, "vit_tiny_patch16_384", tmp_path / "broken.pth")
    with pytest.raises(FileNotFoundError, match="pretrained weight file not found"):
        load_pretrained_encoder(target, "vit_tiny_patch16_384", tmp_path / "absent.pth")


def write_google_npz(encoder: VisionTransformer, path) -> None:
    """Write an encoder in the original JAX ViT ``.npz`` layout (the inverse of timm's reader)."""
    sd = {k: v.detach().numpy() for k, v in encoder.state_dict().items()}
    D, heads = encoder.d_model, encoder.n_heads
    hd = D // heads
    w = {
        "embedding/kernel": sd["patch_embed.proj.weight"].transpose(2, 3, 1, 0),
        "embedding/bias": sd["patch_embed.proj.bias"],
        "cls": sd["cls_token"],
        "Transformer/posembed_input/pos_embedding": sd["pos_embed"],
        "Transformer/encoder_norm/scale": sd["norm.weight"],
        "Transformer/encoder_norm/bias": sd["norm.bias"],
        "head/kernel": sd["head.weight"].T,
        "head/bias": sd["head.bias"],
    }
    for i in range(encoder.n_layers):
        b, p = f"blocks.{i}.", f"Transformer/encoderblock_{i}/"
        qkv_w, qkv_b = sd[b + "attn.qkv.weight"].reshape(3, D, D), sd[b + "attn.qkv.bias"].reshape(3, D)
        for j, name in enumerate(("query", "key", "value")):
            w[f"{p}MultiHeadDotProductAttention_1/{name}/kernel"] = qkv_w[j].T.reshape(D, heads, hd)
            w[f"{p}MultiHeadDotProductAttention_1/{name}/bias"] = qkv_b[j].reshape(heads, hd)
        w[f"{p}MultiHeadDotProductAttention_1/out/kernel"] = sd[b + "attn.proj.weight"].reshape(D, heads, hd).transpose(1, 2, 0)
        w[f"{p}MultiHeadDotProductAttention_1/out/bias"] = sd[b + "attn.proj.bias"]
        for ln, norm in (("LayerNorm_0", "norm1"), ("LayerNorm_2", "norm2")):
            w[f"{p}{ln}/scale"] = sd[f"{b}{norm}.weight"]
            w[f"{p}{ln}/bias"] = sd[f"{b}{norm}.bias"]
        for r in range(2):
            w[f"{p}MlpBlock_3/Dense_{r}/kernel"] = sd[f"{b}mlp.fc{r + 1}.weight"].T
            w[f"{p}MlpBlock_3/Dense_{r}/bias"] = sd[f"{b}mlp.fc{r + 1}.bias"]
    np.savez(path, **w)


def test_pretrained_npz_file(tmp_path):
    torch.manual_seed(0)
    source = perturb_(tiny_encoder(image_size=(48, 48)))
    write_google_npz(source, tmp_path / "augreg.npz")
    target = tiny_encoder(image_size=(64, 64))
    load_pretrained_encoder(target, "vit_tiny_patch16_384", tmp_path / "augreg.npz")
    want = source.state_dict()
    got = target.state_dict()
    for key in ("blocks.0.attn.qkv.weight", "blocks.1.attn.proj.weight", "blocks.1.mlp.fc1.bias",
                "patch_embed.proj.weight", "norm.bias", "cls_token", "head.weight"):
        assert torch.allclose(got[key], want[key], atol=1e-6), key
    assert torch.allclose(got["pos_embed"], resize_pos_embed(want["pos_embed"], None, (4, 4), 1), atol=1e-6)


def test_pretrained_hub_weights_offline_fail_with_one_clear_message():
    code = (
        "from segm.model.factory import create_segmenter, net_kwargs_for\n"
        "create_segmenter(net_kwargs_for('vit_tiny_patch16_384', 'linear', 5, 64), pretrained=True)\n"
    )
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    last = result.stderr.strip().splitlines()[-1]
    assert "could not fetch the ImageNet weights 'vit_tiny_patch16_384.augreg_in21k_ft_in1k'" in last
    assert "--pretrained PATH" in last and "--no-pretrained" in last


def test_pretrained_true_for_backbone_without_hub_weights():
    with pytest.raises(ValueError, match=r"no timm hub weights match 'vit_base_patch8_384'.*--pretrained PATH"):
        load_pretrained_encoder(tiny_encoder(), "vit_base_patch8_384", True)


def test_load_model_never_downloads(tmp_path, monkeypatch):
    import timm

    def no_download(*args, **kwargs):
        raise AssertionError("load_model tried to fetch pretrained weights")

    monkeypatch.setattr(timm, "create_model", no_download)
    net = tiny_net_kwargs("linear")
    model = create_segmenter(net)
    loaded, _ = load_model(write_checkpoint(tmp_path, model, net))
    assert torch.equal(loaded.encoder.pos_embed, model.encoder.pos_embed)
