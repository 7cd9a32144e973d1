"""CTS token sharing (patch type ``cts``) on Segmenters holding a policy network, against a brute force.

The brute force follows methods.md section 5.4-5.6, one image at a time with Python loops:

- scores ``softmax(logits)[1]`` per superpatch cell of ``model.policy_net(im)["logits"]``, ranked by Python's
  stable ``sorted`` on the negated score (ties keep raster order); the top ``S`` cells are shared;
- kept patches: the patch-embedding conv applied to each 16 x 16 patch, plus its own position vector of the
  pos embed resized (bilinear) to the input grid; shared cells: the conv applied to the cell's 16 x 16 patch
  of the 2 x 2 average-pooled image, plus the mean of its 4 position vectors; ``[cls, (dist)]`` in front;
- the encoder blocks and norm, the decoder's ``token_logits``, each shared token's output copied to its
  4 patches, a bilinear upsampling to the (padded) input, cropped back.
"""

from __future__ import annotations

import copy
import functools

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from click.testing import CliRunner

from segm.flops import main as flops_cli
from segm.measure import flop_analysis
from segm.model.factory import create_segmenter, load_model, load_policy_weights
from segm.model.policy_net import PolicyNet
from segm.cli import ReductionRequest, resolve_reduction
from segm.model.token_reduction import apply_token_reduction, variant_token_reduction
from tokred.errors import UsageError
from tests.conftest import perturb_, tiny_net_kwargs, write_checkpoint

VIT, DEIT = "vit_tiny_patch16_384", "deit_tiny_distilled_patch16_224"
LINEAR, MASK = "linear", "mask_transformer"
MISSING = "/does/not/exist/policynet.pth"
DEPTH = 4  # encoder blocks: CTS runs them unchanged, fewer keep the module fast


def cts_net(decoder: str = MASK, backbone: str = VIT, schedule=(8, 2), policy: bool = True) -> dict:
    """Tiny ``net_kwargs``: crop 64 (a 4 x 4 grid, 4 superpatches), DEPTH blocks, CTS's policy settings."""
    net = tiny_net_kwargs(decoder, backbone, crop=64)
    net["n_layers"] = DEPTH
    if policy:
        net.update(policy_method="policy_net", policy_schedule=schedule, policynet_ckpt=MISSING)
    return net


@functools.lru_cache(maxsize=None)
def _base(decoder: str, backbone: str) -> nn.Module:
    torch.manual_seed(0)
    return perturb_(create_segmenter(cts_net(decoder, backbone))).eval()


def make_model(decoder: str = MASK, backbone: str = VIT) -> nn.Module:
    return copy.deepcopy(_base(decoder, backbone))


def images(batch: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 3, h, w, generator=torch.Generator().manual_seed(seed))


def bf_ranking(logits: torch.Tensor) -> list[int]:
    """Cells of one image (logits (2, h2, w2)) from most to least shareable; ties keep raster order."""
    h2, w2 = logits.shape[1:]
    scores = [torch.softmax(logits[:, i, j].float(), 0)[1].item() for i in range(h2) for j in range(w2)]
    return sorted(range(h2 * w2), key=lambda c: -scores[c])


def bf_tokens(model: nn.Module, im: torch.Tensor, S: int):
    """The encoder's input tokens (B, T, D) and per image (kept patches (i, j), shared cells) by brute force."""
    enc = model.encoder
    P, n, D = enc.patch_size, enc.num_prefix_tokens, enc.d_model
    B, _, H, W = im.shape
    gh, gw = H // P, W // P
    logits = model.policy_net(im)["logits"]
    half = (im[:, :, 0::2, 0::2] + im[:, :, 1::2, 0::2] + im[:, :, 0::2, 1::2] + im[:, :, 1::2, 1::2]) / 4
    g0 = enc.patch_embed.grid_size
    pos = F.interpolate(enc.pos_embed[0, n:].T.reshape(1, D, *g0), size=(gh, gw), mode="bilinear",
                        align_corners=False)[0]
    prefix = [enc.cls_token[0, 0]] + ([enc.dist_token[0, 0]] if enc.distilled else [])
    prefix = [t + enc.pos_embed[0, k] for k, t in enumerate(prefix)]
    conv = enc.patch_embed.proj

    def embed(patch):
        return F.conv2d(patch[None], conv.weight, conv.bias)[0, :, 0, 0]

    out, layouts = [], []
    for b in range(B):
        shared = sorted(bf_ranking(logits[b])[:S])
        kept = [(i, j) for i in range(gh) for j in range(gw) if (i // 2) * (gw // 2) + j // 2 not in shared]
        rows = list(prefix)
        rows += [embed(im[b, :, i * P:(i + 1) * P, j * P:(j + 1) * P]) + pos[:, i, j] for i, j in kept]
        for c in shared:
            ci, cj = divmod(c, gw // 2)
            rows.append(embed(half[b, :, ci * P:(ci + 1) * P, cj * P:(cj + 1) * P])
                        + pos[:, 2 * ci:2 * ci + 2, 2 * cj:2 * cj + 2].mean((1, 2)))
        out.append(torch.stack(rows))
        layouts.append((kept, shared))
    return torch.stack(out), layouts


def bf_output(model: nn.Module, im: torch.Tensor, S: int) -> torch.Tensor:
    """The Segmenter's logits on ``im`` (H, W multiples of 32) by brute force."""
    enc = model.encoder
    B, _, H, W = im.shape
    gh, gw = H // enc.patch_size, W // enc.patch_size
    x, layouts = bf_tokens(model, im, S)
    for blk in enc.blocks:
        x = blk(x)
    y = model.decoder.token_logits(enc.norm(x)[:, enc.num_prefix_tokens:])
    grid = torch.full((B, y.shape[-1], gh, gw), float("nan"))
    for b, (kept, shared) in enumerate(layouts):
        for r, (i, j) in enumerate(kept):
            grid[b, :, i, j] = y[b, r]
        for r, c in enumerate(shared, len(kept)):
            ci, cj = divmod(c, gw // 2)
            for di in (0, 1):
                for dj in (0, 1):
                    grid[b, :, 2 * ci + di, 2 * cj + dj] = y[b, r]
    assert not grid.isnan().any()
    return F.interpolate(grid, size=(H, W), mode="bilinear", align_corners=False)


# ------------------------------------------------------------------------------------ identity and tokens


@pytest.mark.parametrize("backbone", [VIT, DEIT])
@pytest.mark.parametrize("decoder", [LINEAR, MASK])
def test_sharing_nothing_is_exactly_the_pure_model(decoder, backbone):
    model = make_model(decoder, backbone)
    x = images(2, 64, 96)
    with torch.no_grad():
        want = model(x)
        assert apply_token_reduction(model, "cts", num_shared=0) == {"num_shared": 0, "num_not_shared": 16}
        got = model(x)
        tokens, state = model.encoder.forward_tokens(x)
    assert torch.equal(got, want)
    assert tokens.shape[1] == model.encoder.num_prefix_tokens + 24
    assert torch.equal(state.size, torch.ones(2, tokens.shape[1], 1))


@pytest.mark.parametrize("backbone, shape, S", [
    (VIT, (2, 128, 128), 3), (VIT, (2, 64, 128), 4), (VIT, (1, 64, 64), 4), (VIT, (2, 96, 64), 1),
    (DEIT, (2, 128, 128), 4), (DEIT, (2, 96, 64), 2),
])
def test_input_tokens_match_the_brute_force(backbone, shape, S):
    model = make_model(LINEAR, backbone)
    apply_token_reduction(model, "cts", num_shared=S)
    x = images(*shape, seed=S)
    with torch.no_grad():
        tokens, _ = model.encoder.reducer.start(model.encoder, x)
        want, layouts = bf_tokens(model, x, S)
    n_patches = shape[1] * shape[2] // 256
    assert tokens.shape == (shape[0], model.encoder.num_prefix_tokens + n_patches - 3 * S, 192)
    torch.testing.assert_close(tokens, want, atol=2e-5, rtol=1e-5)
    if shape[1] * shape[2] > 64 * 64:  # the ranking matters: not simply the first S cells
        assert any(shared != list(range(S)) for _, shared in layouts)


def test_ties_share_the_first_cells_in_raster_order():
    model = make_model(LINEAR, VIT)
    with torch.no_grad():
        model.policy_net.head.weight.zero_()
        model.policy_net.head.bias.zero_()
    apply_token_reduction(model, "cts", num_shared=3)
    x = images(2, 128, 96, seed=3)
    with torch.no_grad():
        assert torch.equal(torch.softmax(model.policy_net(x)["logits"], 1), torch.full((2, 2, 4, 3), 0.5))
        tokens, state = model.encoder.reducer.start(model.encoder, x)
        want, layouts = bf_tokens(model, x, 3)
    assert all(shared == [0, 1, 2] for _, shared in layouts)
    torch.testing.assert_close(tokens, want, atol=2e-5, rtol=1e-5)
    # cells 0, 1, 2 = the top two patch rows (grid 8 x 6): all of them map to the 3 shared tokens
    rows = state.index[0].reshape(8, 6) - 1
    assert torch.equal(rows[:2], torch.tensor([[36, 36, 37, 37, 38, 38]] * 2))
    assert torch.equal(rows[2:].flatten(), torch.arange(36))


# ------------------------------------------------------------------------------------------ full output


@pytest.mark.parametrize("decoder", [LINEAR, MASK])
@pytest.mark.parametrize("shape, S", [((2, 128, 128), 4), ((1, 64, 128), 3)])
def test_segmenter_output_matches_the_brute_force(decoder, shape, S):
    model = make_model(decoder, VIT)
    apply_token_reduction(model, "cts", num_shared=S)
    x = images(*shape, seed=10 + S)
    with torch.no_grad():
        got = model(x)
        alone = [bf_output(model, x[b:b + 1], S) for b in range(shape[0])]
        single = [model(x[b:b + 1]) for b in range(shape[0])]
    assert got.shape == (shape[0], 5, shape[1], shape[2])
    for b in range(shape[0]):
        torch.testing.assert_close(got[b:b + 1], alone[b], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(got[b:b + 1], single[b], atol=1e-5, rtol=1e-5)
    pure = make_model(decoder, VIT)
    with torch.no_grad():
        assert not torch.allclose(pure(x), got, atol=1e-3)


@pytest.mark.parametrize("backbone", [VIT, DEIT])
def test_inputs_are_padded_to_a_multiple_of_32(backbone):
    model = make_model(MASK, backbone)
    apply_token_reduction(model, "cts", num_shared=4)
    assert model.encoder.reducer.input_multiple(model.encoder) == 32
    x = images(2, 80, 112, seed=5)
    with torch.no_grad():
        got = model(x)
        tokens, _ = model.encoder.forward_tokens(F.pad(x, (0, 16, 0, 16)))
        want = bf_output(model, F.pad(x, (0, 16, 0, 16)), 4)[:, :, :80, :112]
    assert got.shape == (2, 5, 80, 112)
    assert tokens.shape[1] == model.encoder.num_prefix_tokens + 48 - 12
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_policy_network_gets_no_gradient():
    model = make_model(LINEAR, VIT)
    apply_token_reduction(model, "cts", num_shared=2)
    model(images(1, 64, 64)).square().sum().backward()
    assert all(p.grad is None for p in model.policy_net.parameters())
    assert model.encoder.patch_embed.proj.weight.grad.abs().sum() > 0
    assert model.encoder.pos_embed.grad.abs().sum() > 0


# ---------------------------------------------------------------------------------------------- state


@pytest.mark.parametrize("backbone", [VIT, DEIT])
def test_merge_state_maps_each_shared_cell_to_one_row(backbone):
    model = make_model(LINEAR, backbone)
    apply_token_reduction(model, "cts", num_shared=4)
    x = images(2, 128, 96, seed=7)
    n, N, S = model.encoder.num_prefix_tokens, 48, 4
    with torch.no_grad():
        tokens, state = model.encoder.reducer.start(model.encoder, x)
        _, layouts = bf_tokens(model, x, S)
        out, out_state = model.encoder.forward_tokens(x)
    assert tokens.shape[1] == out.shape[1] == n + N - 3 * S == state.num_tokens
    assert state.n_prefix == n and state.grid == (8, 6) and state.index.shape == (2, N)
    for b, (kept, shared) in enumerate(layouts):
        want = torch.empty(8, 6, dtype=torch.long)
        for r, (i, j) in enumerate(kept):
            want[i, j] = n + r
        for r, c in enumerate(shared, n + len(kept)):
            ci, cj = divmod(c, 3)
            want[2 * ci:2 * ci + 2, 2 * cj:2 * cj + 2] = r
        assert torch.equal(state.index[b], want.flatten())
        assert torch.equal(out_state.index[b], want.flatten())
    want_size = torch.tensor([1.0] * (n + N - 4 * S) + [4.0] * S).expand(2, -1)[..., None]
    assert torch.equal(state.size, want_size)
    assert state.size.sum().item() == 2 * (n + N)


# ------------------------------------------------------------------------------------ settings, errors


def test_num_shared_defaults_to_the_policy_schedule_and_settings_round_trip():
    model = make_model()
    assert model.policy_schedule == (8, 2)
    assert apply_token_reduction(model, "cts") == {"num_shared": 2, "num_not_shared": 8}
    assert model.policy_schedule == (8, 2)
    settings = apply_token_reduction(model, "cts", num_shared=1)
    assert settings == {"num_shared": 1, "num_not_shared": 12}
    assert model.policy_schedule == (12, 1)
    assert apply_token_reduction(model, "cts", **settings) == settings
    assert apply_token_reduction(model, "cts", num_shared=3, num_not_shared=4) == {"num_shared": 3, "num_not_shared": 4}
    assert model.policy_schedule == (4, 3)
    assert apply_token_reduction(model, "cts", num_shared=4) == {"num_shared": 4, "num_not_shared": 0}
    assert model.encoder.reducer.name == "cts" and model.encoder.reducer.config["num_shared"] == 4


def test_schedule_from_a_variant_sets_the_default():
    torch.manual_seed(0)
    model = create_segmenter(cts_net(LINEAR, schedule=[4, 3])).eval()
    assert model.policy_schedule == (4, 3)
    assert apply_token_reduction(model, "cts") == {"num_shared": 3, "num_not_shared": 4}
    with torch.no_grad():
        tokens, _ = model.encoder.forward_tokens(images(1, 64, 64))
    assert tokens.shape[1] == 1 + 16 - 9


def test_a_recorded_num_not_shared_follows_a_new_num_shared():
    model = make_model()
    variant = {"token_reduction": {"patch_type": "cts", "settings": {"num_shared": 2, "num_not_shared": 8}}}
    recorded = variant_token_reduction(variant)
    assert recorded == ("cts", {"num_shared": 2})
    request = ReductionRequest(None, {"cts": {"num_shared": 1}}, {"cts": ["--num-tokens-shared"]})
    patch_type, options, from_variant = resolve_reduction(request, variant)
    assert (patch_type, options, from_variant) == ("cts", {"num_shared": 1}, True)
    assert apply_token_reduction(model, patch_type, **options) == {"num_shared": 1, "num_not_shared": 12}


@pytest.mark.parametrize("options, message", [
    ({"num_shared": -1}, "num_shared must be an integer >= 0, got -1"),
    ({"num_shared": 5}, "num_shared 5 is more than the 4 superpatches of the 4x4 patch grid"),
    ({"num_shared": 2, "num_not_shared": 9},
     "num_not_shared 9 does not match num_shared 2 on the 4x4 grid: 16 - 4 x 2 = 8"),
    # num_shared from the schedule the previous apply recorded, (12, 1)
    ({"num_not_shared": 8}, "num_not_shared 8 does not match num_shared 1 on the 4x4 grid: 16 - 4 x 1 = 12"),
    ({"num_not_shared": -2}, "num_not_shared must be an integer >= 0, got -2"),
])
def test_option_errors_leave_the_model_unchanged(options, message):
    model = make_model()
    apply_token_reduction(model, "cts", num_shared=1)
    with pytest.raises(UsageError) as caught:
        apply_token_reduction(model, "cts", **options)
    assert str(caught.value) == message
    assert model.encoder.reducer.config == {"num_shared": 1, "num_not_shared": 12}
    assert model.policy_schedule == (12, 1)


def test_model_errors():
    torch.manual_seed(0)
    plain = create_segmenter(cts_net(LINEAR, policy=False)).eval()
    with pytest.raises(UsageError) as caught:
        apply_token_reduction(plain, "cts", num_shared=1)
    assert str(caught.value).startswith("patch type 'cts' needs a model with a policy network")
    assert "\n" not in str(caught.value) and plain.encoder.reducer.name == "pure"

    net = cts_net(LINEAR)
    del net["policy_schedule"]
    unscheduled = create_segmenter(net).eval()
    assert unscheduled.policy_schedule is None
    with pytest.raises(UsageError, match=r"^cts: give num_shared \(--num-tokens-shared\); the model records no policy"):
        apply_token_reduction(unscheduled, "cts")
    assert unscheduled.encoder.reducer.name == "pure" and unscheduled.policy_schedule is None
    assert apply_token_reduction(unscheduled, "cts", num_shared=2) == {"num_shared": 2, "num_not_shared": 8}


def test_input_errors():
    model = make_model(LINEAR, VIT)
    apply_token_reduction(model, "cts", num_shared=4)
    with torch.no_grad(), pytest.raises(UsageError, match="^token sharing needs an input that is a multiple of 32, got 48x64$"):
        model.encoder.reducer.start(model.encoder, images(1, 48, 64))
    with torch.no_grad(), pytest.raises(UsageError, match="^num_shared 4 is more than the superpatches of a 32x64 input$"):
        model(images(1, 32, 64))
    with torch.no_grad():
        assert model(images(1, 32, 128)).shape == (1, 5, 32, 128)  # 4 cells: all shared


# -------------------------------------------------------------------------------------------- checkpoints


def test_checkpoint_round_trip_in_the_published_key_layout(tmp_path):
    model = make_model()
    with torch.no_grad():
        model.policy_net.backbone.bn1.running_var.uniform_(0.5, 2.0)
    net = cts_net()
    path = write_checkpoint(tmp_path / "run", model, net)
    text = (tmp_path / "run" / "variant.yml").read_text()
    assert "policy_schedule: !!python/tuple" in text and MISSING in text
    keys = list(model.state_dict())
    assert any(k.startswith("policy_net.backbone.") for k in keys) and "policy_net.head.weight" in keys
    assert all(k.startswith(("encoder.", "decoder.", "policy_net.backbone.", "policy_net.head.")) for k in keys)

    loaded, variant = load_model(path)
    assert variant["net_kwargs"]["policy_schedule"] == (8, 2)
    assert loaded.policy_schedule == (8, 2) and not loaded.training
    assert list(loaded.state_dict()) == keys
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in loaded.state_dict().items())
    assert apply_token_reduction(loaded, "cts") == apply_token_reduction(model, "cts")
    x = images(2, 64, 128, seed=4)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))

    policy_keys = [k for k in keys if k.startswith("policy_net.")]
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("policy_net.")}
    torch.save({"model": state}, tmp_path / "run" / "checkpoint.pth")
    with pytest.raises(UsageError) as caught:
        load_model(tmp_path / "run")
    message = str(caught.value)
    assert f"does not match the model: missing keys {len(policy_keys)} ({', '.join(policy_keys[:10])}, ...)" in message
    assert "unexpected" not in message and "\n" not in message


def test_load_policy_weights_accepts_the_published_layouts(tmp_path):
    torch.manual_seed(1)
    source = perturb_(PolicyNet()).eval()
    with torch.no_grad():
        source.backbone.bn1.running_mean.normal_()
    state = source.state_dict()
    files = {
        "bare.pth": state,
        "wrapped.pth": {"model": state},
        "prefixed.pth": {"model": {f"policy_net.{k}": v for k, v in state.items()}},
    }
    torch.manual_seed(2)
    fresh = PolicyNet().eval()
    assert not torch.equal(fresh.head.weight, source.head.weight)
    for name, data in files.items():
        torch.save(data, tmp_path / name)
        target = copy.deepcopy(fresh)
        load_policy_weights(target, tmp_path / name)
        assert all(torch.equal(v, state[k]) for k, v in target.state_dict().items()), name

    torch.save({k: v for k, v in state.items() if not k.startswith("head.")}, tmp_path / "headless.pth")
    with pytest.raises(UsageError) as caught:
        load_policy_weights(copy.deepcopy(fresh), tmp_path / "headless.pth")
    assert str(caught.value) == (f"policy network checkpoint {tmp_path / 'headless.pth'} does not match the model: "
                                 "missing keys 2 (head.weight, head.bias)")
    with pytest.raises(FileNotFoundError, match="policy network checkpoint not found"):
        load_policy_weights(copy.deepcopy(fresh), tmp_path / "absent.pth")


# ---------------------------------------------------------------------------------------------- FLOPs


def test_flops_count_the_policy_network_and_fall_with_sharing():
    model = make_model(LINEAR, VIT)
    x = images(1, 64, 64)
    with torch.no_grad():
        pure = flop_analysis(model, x).by_module()
        policy = flop_analysis(model.policy_net, x).total()
        counts = {}
        for S in (0, 2, 4):
            apply_token_reduction(model, "cts", num_shared=S)
            counts[S] = flop_analysis(model, x).by_module()
    assert pure["policy_net"] == 0 and policy > 0
    assert all(c["policy_net"] == policy for c in counts.values())
    assert counts[0]["encoder"] == pure["encoder"]
    assert counts[0]["encoder"] > counts[2]["encoder"] > counts[4]["encoder"]
    assert counts[0]["decoder"] > counts[2]["decoder"] > counts[4]["decoder"]
    # the patch embedding sees 16 - 3 S patches
    for S, c in counts.items():
        assert c["encoder.patch_embed"] == (16 - 3 * S) * 192 * 3 * 16 * 16


def test_random_weights_measure_cts_with_a_random_policy_network():
    args = ["--backbone", "vit_tiny_patch16_384", "--crop-size", "64", "--max-images", "1", "--device", "cpu",
            "--breakdown", "--patch-type", "cts", "--num-tokens-shared", "2", "--num-tokens-notshared", "8"]
    result = CliRunner().invoke(flops_cli, args)
    assert result.exit_code == 0, result.output
    rows = {line.split(" | ")[0].strip("| "): line.split(" | ") for line in result.stdout.splitlines() if line.startswith("| ")}
    assert float(rows["policy net"][-1].strip(" |")) > 0
    assert rows["encoder block 1"][1] == "11.0 / 11.0 / 11.0"  # 16 - 4 x 2 + 2 superpatch tokens + class token
