"""Expedite (patch type ``expedite``) held against brute forces written from methods.md §2.1-2.5, 2.7.

- ``ref_cluster``: float64 clustering from the per-pair formula ``sum_c (x_ic - c_jc)^2``, adaptive bins
  ``[floor(i n / m), ceil((i + 1) n / m))`` averaged by hand, initial cells ``(y h // gh, x w // gw)``
  and the window mask built pair by pair in Python (masked pairs get probability 0);
- ``ref_weights``: dense ``W = exp(-t_r |F_i - S_j|^2)``, entries below each row's k-th largest zeroed
  (ties kept), rows divided by their L2 norm (clamped at 1e-12), then ``W @ Y``;
- ``ref_forward``: a pure copy of the Segmenter run block by block, clustering after block alpha
  (``[prefix, centroids]``), the final norm, optionally the reconstruction, the decoder's
  ``token_logits``, the grid reshape, bilinear upsampling to the padded input and the crop.
"""

from __future__ import annotations

import copy
import functools
import re

import pytest
import torch
import torch.nn.functional as F

from segm.measure import flop_analysis
from segm.model.factory import create_segmenter
from segm.model.token_reduction import apply_token_reduction
from tokred.errors import UsageError
from tokred.expedite import PRESETS, Expedite, cluster_tokens, reconstruction_map
from tokred.state import MergeState
from tests.conftest import perturb_, tiny_net_kwargs

DEIT = "deit_tiny_distilled_patch16_224"


pytestmark = pytest.mark.usefixtures("one_thread")


@functools.lru_cache(maxsize=None)
def base_model(decoder: str, backbone: str, crop: int):
    torch.manual_seed(0)
    return perturb_(create_segmenter(tiny_net_kwargs(decoder, backbone, crop=crop))).eval()


def make_model(decoder: str = "mask_transformer", backbone: str = "vit_tiny_patch16_384", crop: int = 64):
    """A fresh copy of a cached tiny Segmenter with random, perturbed weights (building one takes seconds)."""
    return copy.deepcopy(base_model(decoder, backbone, crop))


def images(batch: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 3, h, w, generator=torch.Generator().manual_seed(seed))


def adaptive_bins(n_in: int, n_out: int) -> list[tuple[int, int]]:
    return [(i * n_in // n_out, -(-(i + 1) * n_in // n_out)) for i in range(n_out)]


def ref_cluster(tokens, grid, clusters, n_iters, temperature, window_size):
    """Brute-force Expedite clustering of (B, gh*gw, C) tokens into (B, h*w, C) centroids, float64."""
    x = tokens.double()
    B, N, C = x.shape
    (gh, gw), (h, w), r = grid, clusters, window_size // 2
    maps = x.reshape(B, gh, gw, C)
    centres = torch.stack([maps[:, y0:y1, x0:x1].mean((1, 2)) for y0, y1 in adaptive_bins(gh, h)
                           for x0, x1 in adaptive_bins(gw, w)], dim=1)
    allowed = torch.tensor([[abs(y * h // gh - j // w) <= r and abs(xx * w // gw - j % w) <= r for j in range(h * w)]
                            for y in range(gh) for xx in range(gw)])
    for _ in range(n_iters):
        dist = ((x[:, :, None, :] - centres[:, None, :, :]) ** 2).sum(-1)
        assign = torch.where(allowed, -temperature * dist, -torch.inf).softmax(dim=2)
        centres = assign.transpose(1, 2) @ x / assign.sum(1)[..., None].clamp(min=1e-16)
    return centres


def ref_weights(before, centres, k, temperature):
    """Dense kNN reconstruction weights (B, N, M), float64."""
    w = torch.exp(-temperature * ((before.double()[:, :, None] - centres.double()[:, None]) ** 2).sum(-1))
    kth = w.sort(dim=2, descending=True).values[..., min(k, w.shape[2]) - 1 : min(k, w.shape[2])]
    w = torch.where(w >= kth, w, torch.zeros_like(w))
    return w / w.norm(dim=2, keepdim=True).clamp(min=1e-12)


def ref_tokens(pure, im, alpha, clusters, n_iters=5, temperature=0.02, window_size=5, reconstruct=False,
               recon_k=20, recon_temperature=0.02):
    """Normed encoder output of the pure model ``pure`` with Expedite done by hand; and the decoded grid."""
    enc, P = pure.encoder, pure.patch_size
    n = enc.num_prefix_tokens
    grid = (im.shape[2] // P, im.shape[3] // P)
    x = enc.embed(im)
    for i, blk in enumerate(enc.blocks):
        x = blk(x)
        if i == alpha - 1:
            before = x[:, n:]
            centres = ref_cluster(before, grid, clusters, n_iters, temperature, window_size)
            x = torch.cat([x[:, :n], centres.float()], dim=1)
    x = enc.norm(x)
    if not reconstruct:
        return x, clusters
    patches = (ref_weights(before, centres, recon_k, recon_temperature) @ x[:, n:].double()).float()
    return torch.cat([x[:, :n], patches], dim=1), grid


def ref_forward(pure, im, alpha, clusters, **kw):
    H0, W0 = im.shape[2:]
    P = pure.patch_size
    im = F.pad(im, (0, -W0 % P, 0, -H0 % P))
    x, (gh, gw) = ref_tokens(pure, im, alpha, clusters, **kw)
    logits = pure.decoder.token_logits(x[:, pure.encoder.num_prefix_tokens :])
    masks = logits.transpose(1, 2).reshape(im.shape[0], -1, gh, gw)
    return F.interpolate(masks, size=im.shape[2:], mode="bilinear", align_corners=False)[:, :, :H0, :W0]


# --- clustering -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("grid,clusters", [((8, 8), (4, 4)), ((16, 16), (12, 12)), ((6, 10), (4, 3))])
@pytest.mark.parametrize("window_size", [1, 3, 5])
@pytest.mark.parametrize("n_iters", [0, 1, 3])
def test_cluster_tokens_matches_brute_force(grid, clusters, window_size, n_iters):
    gen = torch.Generator().manual_seed(grid[0] * 100 + window_size * 10 + n_iters)
    smooth = F.interpolate(torch.randn(2, 5, 3, 3, generator=gen), size=grid, mode="bilinear", align_corners=False)
    tokens = (2 * smooth + 0.5 * torch.randn(2, 5, *grid, generator=gen)).flatten(2).transpose(1, 2)
    got = cluster_tokens(tokens, grid, clusters, n_iters, 0.3, window_size // 2)
    want = ref_cluster(tokens, grid, clusters, n_iters, 0.3, window_size)
    assert got.shape == (2, clusters[0] * clusters[1], 5) and got.dtype == torch.float32
    assert torch.allclose(got.double(), want, atol=1e-4)


def test_window_one_is_the_hard_mean_of_each_initial_cell():
    tokens = torch.randn(1, 6 * 10, 4, generator=torch.Generator().manual_seed(1))
    got = cluster_tokens(tokens, (6, 10), (4, 3), 3, 0.02, 0)
    cells = torch.tensor([(y * 4 // 6) * 3 + x * 3 // 10 for y in range(6) for x in range(10)])
    want = torch.stack([tokens[0, cells == j].mean(0) for j in range(12)])
    assert torch.allclose(got[0], want, atol=1e-6)


def test_full_grid_without_iterations_gives_back_the_tokens():
    tokens = torch.randn(2, 24, 7)
    assert torch.equal(cluster_tokens(tokens, (4, 6), (4, 6), 0, 0.02, 2), tokens)


@pytest.mark.parametrize("decoder", ["linear", "mask_transformer"])
@pytest.mark.parametrize("reconstruct", [False, True])
def test_full_grid_without_iterations_is_exactly_the_pure_model(decoder, reconstruct):
    # recon_k=1 keeps only the largest weight, the token's own centroid (distance 0): one weight v, and
    # F.normalize turns it into v / |v| = 1, so every token is copied exactly.
    model, x = make_model(decoder), images(2, 64, 64)
    with torch.no_grad():
        want = model(x)
        apply_token_reduction(model, "expedite", after_layer=4, num_clusters=16, n_iters=0,
                              reconstruct=reconstruct, recon_k=1, recon_temperature=1.0)
        got = model(x)
    assert torch.equal(got, want)


# --- reconstruction -------------------------------------------------------------------------------------

def sparse_recon(before, centres, y, k, temperature):
    index, weight, n_weak = reconstruction_map(before, centres, k, temperature)
    B, N, _ = before.shape
    state = MergeState.start(torch.zeros(B, 1 + N, 1), n_prefix=1, grid=(1, N))
    state.replace(torch.zeros(B, 1 + centres.shape[1], 1), index=1 + index, weight=weight)
    return state.unmerge(y), index, weight, n_weak


def test_reconstruction_matches_dense_knn_with_ties_at_the_kth_value():
    # Integer vectors: every distance is exact in float32, so equal distances tie exactly.
    s = torch.tensor([[1, 0, 0], [-1, 0, 0], [0, 1, 0], [2, 2, 0], [0, 0, 3]], dtype=torch.float32)
    f = torch.tensor([[0, 0, 0], [2, 2, 1], [0, 0, 2], [1, -1, 1], [3, 0, 0], [0, 1, 1]], dtype=torch.float32)
    gen = torch.Generator().manual_seed(0)
    before = torch.stack([f, torch.randn(6, 3, generator=gen)])
    centres = torch.stack([s, torch.randn(5, 3, generator=gen)])
    y = torch.randn(2, 5, 8, generator=gen)
    got, index, weight, n_weak = sparse_recon(before, centres, y, 2, 0.5)
    dense = ref_weights(before, centres, 2, 0.5)
    # rows of batch 0 keep: 3 tied at distance 1; 1 + 2 tied at 6; 1 + 3 tied at 5; 1 + 3 tied at 6; 1 + 1; 1 + 2 tied at 3
    assert (dense[0] > 0).sum(1).tolist() == [3, 3, 4, 4, 2, 3]
    assert (dense[1] > 0).sum(1).tolist() == [2] * 6
    assert index.shape == weight.shape == (2, 6, 4) and n_weak == 0
    assert (weight > 0).sum(2).tolist() == (dense > 0).sum(2).tolist()
    assert torch.allclose(got.double(), dense @ y.double(), atol=1e-6)
    assert torch.allclose(weight.norm(dim=2), torch.ones(2, 6))


def test_recon_k_at_least_the_cluster_count_keeps_every_centroid():
    gen = torch.Generator().manual_seed(1)
    before, centres, y = torch.randn(2, 9, 4, generator=gen), torch.randn(2, 5, 4, generator=gen), torch.randn(2, 5, 6, generator=gen)
    got, index, weight, _ = sparse_recon(before, centres, y, 50, 0.1)
    dense = torch.exp(-0.1 * ((before[:, :, None].double() - centres[:, None].double()) ** 2).sum(-1))
    assert index.shape == (2, 9, 5) and (weight > 0).all()
    assert torch.equal(index.sort(dim=2).values, torch.arange(5).expand(2, 9, 5))
    assert torch.allclose(got.double(), F.normalize(dense, dim=2) @ y.double(), atol=1e-6)


def test_underflowing_rows_give_zero_tokens_and_are_counted():
    gen = torch.Generator().manual_seed(2)
    before, centres, y = torch.randn(2, 6, 4, generator=gen), torch.randn(2, 3, 4, generator=gen), torch.randn(2, 3, 5, generator=gen)
    before[0, 1] = 100.0
    before[1, 4] = -100.0
    before[1, 5] = 100.0
    got, _, _, n_weak = sparse_recon(before, centres, y, 2, 1.0)
    assert n_weak == 3
    weak = torch.zeros(2, 6, dtype=torch.bool)
    weak[0, 1] = weak[1, 4] = weak[1, 5] = True
    assert torch.equal(got[weak], torch.zeros(3, 5))
    assert (got[~weak].abs().sum(-1) > 0).all()
    assert torch.allclose(got.double(), ref_weights(before, centres, 2, 1.0) @ y.double(), atol=1e-6)


def test_model_warns_about_underflowing_reconstruction():
    model, x = make_model(), images(2, 64, 64)
    apply_token_reduction(model, "expedite", after_layer=3, num_clusters=(2, 2), reconstruct=True,
                          recon_temperature=1e6)
    with torch.no_grad(), pytest.warns(UserWarning, match=r"Expedite reconstruction: 32 of 32 patch tokens have \(near\) zero"):
        tokens, _ = model.encoder.forward_tokens(x)
    assert tokens.shape == (2, 17, 192)
    assert torch.equal(tokens[:, 1:], torch.zeros(2, 16, 192)) and (tokens[:, 0].abs().sum(-1) > 0).all()
    with torch.no_grad(), pytest.warns(UserWarning, match="Expedite reconstruction"):
        assert torch.isfinite(model(x)).all()


# --- whole model ----------------------------------------------------------------------------------------

CASES = {
    "linear-square": dict(decoder="linear", crop=128, size=(128, 128), alpha=5, clusters=(4, 4),
                          kw=dict(n_iters=3, temperature=0.05, window_size=3)),
    "mask-nondividing": dict(decoder="mask_transformer", crop=128, size=(128, 128), alpha=7, clusters=(6, 5),
                             kw=dict(n_iters=2, temperature=0.02, window_size=5)),
    "deit-nondividing": dict(decoder="mask_transformer", backbone=DEIT, crop=128, size=(128, 128), alpha=3,
                             clusters=(5, 3), kw=dict(n_iters=4, temperature=0.03, window_size=3)),
    "linear-nonsquare-padded": dict(decoder="linear", crop=64, size=(60, 90), alpha=8, clusters=(3, 4),
                                    kw=dict(n_iters=3, temperature=0.02, window_size=1)),
}


@pytest.mark.parametrize("reconstruct", [False, True])
@pytest.mark.parametrize("case", list(CASES))
def test_segmenter_forward_matches_brute_force(case, reconstruct):
    c = CASES[case]
    model = make_model(c["decoder"], c.get("backbone", "vit_tiny_patch16_384"), c["crop"])
    pure = copy.deepcopy(model)
    kw = dict(c["kw"], reconstruct=reconstruct, recon_k=4, recon_temperature=0.05)
    settings = apply_token_reduction(model, "expedite", after_layer=c["alpha"], num_clusters=c["clusters"], **kw)
    assert settings["num_clusters"] == list(c["clusters"])
    x = images(2, *c["size"], seed=3)
    with torch.no_grad():
        got = model(x)
        want = ref_forward(pure, x, c["alpha"], c["clusters"], **kw)
        alone = torch.cat([model(x[i : i + 1]) for i in range(2)])
        plain = pure(x)
    assert got.shape == (2, 5, *c["size"])
    assert torch.allclose(got, want, atol=1e-4), (got - want).abs().max()
    assert torch.allclose(got, alone, atol=1e-5)
    assert not torch.allclose(got, plain, atol=1e-3)


def test_clustered_grid_is_decoded_then_upsampled_in_one_resize():
    model = make_model("linear", crop=128)
    apply_token_reduction(model, "expedite", after_layer=6, num_clusters=(3, 5))
    x = images(1, 128, 128, seed=4)
    with torch.no_grad():
        tokens, state = model.encoder.forward_tokens(x)
        assert tokens.shape == (1, 1 + 15, 192) and state.patch_grid == (3, 5) and state.index is None
        grid = model.decoder.token_logits(tokens[:, 1:]).transpose(1, 2).reshape(1, 5, 3, 5)
        want = F.interpolate(grid, size=(128, 128), mode="bilinear", align_corners=False)
        assert torch.equal(model(x), want)


@pytest.mark.parametrize("reconstruct", [False, True])
def test_distillation_token_stays_second(reconstruct):
    model = make_model(backbone=DEIT, crop=64)
    pure = copy.deepcopy(model)
    kw = dict(n_iters=3, temperature=0.05, window_size=3, reconstruct=reconstruct, recon_k=2, recon_temperature=0.05)
    apply_token_reduction(model, "expedite", after_layer=4, num_clusters=(2, 3), **kw)
    x = images(2, 64, 64, seed=5)
    with torch.no_grad():
        tokens, _ = model.encoder.forward_tokens(x)
        want, _ = ref_tokens(pure, x, 4, (2, 3), **kw)
    assert tokens.shape == (2, 2 + (16 if reconstruct else 6), 192)
    assert torch.allclose(tokens, want, atol=1e-4)
    assert not torch.allclose(tokens[:, 0], tokens[:, 1], atol=1e-2)


def test_flops_fall_with_alpha_and_cluster_count():
    model, x = make_model(crop=128), images(1, 128, 128)

    def gflops(alpha, clusters):
        apply_token_reduction(model, "expedite", after_layer=alpha, num_clusters=clusters)
        return flop_analysis(model, x).total()

    a8, a4, a8_six = gflops(8, (4, 4)), gflops(4, (4, 4)), gflops(8, (6, 6))
    apply_token_reduction(model, "pure")
    full = flop_analysis(model, x).total()
    assert a4 < a8 < a8_six < full


# --- presets, options, settings -------------------------------------------------------------------------

README_ROWS = {  # Expedite's README, Segmenter ViT-L/16: dataset -> (alpha, side of h x w)
    "ade20k": [(16, 28), (10, 28), (8, 20)],
    "cityscapes": [(18, 32), (12, 32), (10, 24)],
    "pcontext": [(14, 20), (12, 15), (8, 15)],
}


def test_presets_are_the_readme_rows():
    want = {f"{d}_a{a}_{s}": (a, (s, s)) for d, rows in README_ROWS.items() for a, s in rows}
    assert PRESETS == want
    for name, (alpha, grid) in want.items():
        config = Expedite(preset=name).config
        assert (config["preset"], config["after_layer"], config["num_clusters"]) == (name, alpha, grid)


def test_preset_on_a_model_with_a_28x28_grid():
    model = make_model(crop=448)
    settings = apply_token_reduction(model, "expedite", preset="ade20k_a10_28")
    assert (settings["after_layer"], settings["num_clusters"]) == (10, [28, 28])
    assert [type(b).__name__ for b in model.encoder.blocks].index("ClusteringBlock") == 9
    assert apply_token_reduction(model, "expedite", **settings) == settings


@pytest.mark.parametrize("options", [dict(after_layer=8), dict(num_clusters=(20, 20)), dict(num_clusters=400)])
def test_preset_with_other_values_is_refused(options):
    with pytest.raises(UsageError, match=re.escape("preset 'ade20k_a10_28' is after_layer 10 with num_clusters 28x28; "
                                                   "drop the preset or the other values")):
        apply_token_reduction(make_model(), "expedite", preset="ade20k_a10_28", **options)


def one_line_usage_error(match, model=None, **options):
    with pytest.raises(UsageError, match=match) as info:
        apply_token_reduction(make_model() if model is None else model, "expedite", **options)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("options,match", [
    (dict(num_clusters=(5, 4)), r"num_clusters 5x4 is larger than the 4x4 patch grid$"),
    (dict(num_clusters=(4, 5)), r"num_clusters 4x5 is larger than the 4x4 patch grid$"),
    (dict(num_clusters=25), r"num_clusters 5x5 is larger than the 4x4 patch grid$"),
    (dict(num_clusters=0), r"num_clusters must be a positive square number or an \(h, w\) pair of positive ints, got 0$"),
    (dict(num_clusters=-4), r"num_clusters must be a positive square number .*, got -4$"),
    (dict(num_clusters=(0, 3)), r"num_clusters must be a positive square number .*, got \(0, 3\)$"),
    (dict(num_clusters=(3, -1)), r"num_clusters must be a positive square number .*, got \(3, -1\)$"),
    (dict(num_clusters=(2, 2, 2)), r"num_clusters must be a positive square number .*, got \(2, 2, 2\)$"),
    (dict(num_clusters=30), r"num_clusters 30 is not a square number; give \(h, w\) for other grids$"),
    (dict(window_size=4), r"window_size must be a positive odd integer, got 4$"),
    (dict(window_size=0), r"window_size must be a positive odd integer, got 0$"),
    (dict(after_layer=0), r"after_layer must be an integer >= 1, got 0$"),
    (dict(after_layer=12), r"after_layer 12 out of range: clustering after blocks 1\.\.11 of 12$"),
    (dict(temperature=0), r"temperature must be a number in \(0, inf\), got 0$"),
    (dict(temperature=-0.02), r"temperature must be a number in \(0, inf\), got -0\.02$"),
    (dict(recon_temperature=0.0), r"recon_temperature must be a number in \(0, inf\), got 0\.0$"),
    (dict(recon_temperature=-1), r"recon_temperature must be a number in \(0, inf\), got -1$"),
    (dict(recon_k=0), r"recon_k must be an integer >= 1, got 0$"),
    (dict(preset="ade20k_a10_30"), r"preset must be one of ade20k_a16_28, .*, pcontext_a8_15; got 'ade20k_a10_30'$"),
])
def test_option_errors(options, match):
    base = dict(after_layer=3, num_clusters=(2, 2))
    if "preset" in options:
        base = {}
    one_line_usage_error(match, **{**base, **options})


def test_clusters_larger_than_the_grid_of_an_input_are_refused_at_forward():
    model = make_model(crop=128)
    apply_token_reduction(model, "expedite", after_layer=3, num_clusters=(6, 6))
    with torch.no_grad(), pytest.raises(UsageError, match=r"^num_clusters 6x6 is larger than the 4x6 patch grid of this input$"):
        model(images(1, 64, 96))


def test_settings_round_trip():
    model = make_model(crop=128)
    settings = apply_token_reduction(model, "expedite", after_layer=3, num_clusters=36, n_iters=2, temperature=0.1,
                                     window_size=3, reconstruct=True, recon_k=7, recon_temperature=0.5)
    assert settings == {"preset": None, "after_layer": 3, "num_clusters": [6, 6], "n_iters": 2, "temperature": 0.1,
                        "window_size": 3, "reconstruct": True, "recon_k": 7, "recon_temperature": 0.5}
    assert apply_token_reduction(model, "expedite", **settings) == settings
    defaults = apply_token_reduction(make_model(crop=448), "expedite")
    assert defaults == {"preset": None, "after_layer": 10, "num_clusters": [28, 28], "n_iters": 5, "temperature": 0.02,
                        "window_size": 5, "reconstruct": False, "recon_k": 20, "recon_temperature": 0.02}
