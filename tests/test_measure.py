"""FLOP counts (published baselines, a hand count, the attention handle), speedtest / flops / calibrate CLIs."""

from __future__ import annotations

import contextlib
import json

import pytest
import torch
import yaml
from click.testing import CliRunner

from algm.local_merge import window_similarity
from segm.calibrate import main as calibrate
from segm.flops import main as flops_cli
from segm.measure import flop_analysis, time_shares
from segm.model.factory import create_segmenter, net_kwargs_for
from segm.model.inference import upsample_logits
from segm.speedtest import main as speedtest_cli, measure
from tokred.bipartite import best_partners
from tokred.profiling import section
from tests.conftest import perturb_, tiny_net_kwargs, write_checkpoint


def test_vit_tiny_mask_transformer_512_counts_the_published_12_83_gflops():
    model = create_segmenter(net_kwargs_for("vit_tiny_patch16_384", "mask_transformer", 150, 512)).eval()
    with torch.no_grad():
        total = flop_analysis(model, torch.randn(1, 3, 512, 512)).total() / 1e9
    assert total == pytest.approx(12.83, abs=0.005)


def test_linear_decoder_count_equals_a_hand_count():
    D, K, N, P, L = 192, 150, 1024, 16, 12
    T = N + 1
    layer_norm = T * D * 5
    block = 2 * layer_norm + T * D * 3 * D + 2 * T * T * D + T * D * D + 2 * T * D * 4 * D
    want = N * D * 3 * P * P + L * block + layer_norm + N * D * K + K * 512 * 512 * 4
    model = create_segmenter(net_kwargs_for("vit_tiny_patch16_384", "linear", K, 512)).eval()
    with torch.no_grad():
        assert flop_analysis(model, torch.randn(1, 3, 512, 512)).total() == want


def test_fused_attention_handle_equals_explicit_attention_count():
    model = create_segmenter(tiny_net_kwargs("mask_transformer", crop=64)).eval()
    x = torch.randn(2, 3, 64, 80)
    with torch.no_grad():
        fused = flop_analysis(model, x).by_operator()
        for module in model.modules():
            if hasattr(module, "fused_attn"):
                module.fused_attn = False
        explicit = flop_analysis(model, x).by_operator()
    assert fused["scaled_dot_product_attention"] == explicit["matmul"] - fused.get("matmul", 0)
    assert sum(fused.values()) == sum(explicit.values())


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    torch.manual_seed(0)
    net = tiny_net_kwargs("mask_transformer", n_cls=16, crop=64)
    path = write_checkpoint(tmp_path_factory.mktemp("model"), perturb_(create_segmenter(net)), net)
    return path.parent


def test_speedtest_cli_prints_fps_and_json(model_dir):
    result = CliRunner().invoke(speedtest_cli, ["--model-dir", str(model_dir), "--dataset", "synthetic", "--iters", "2",
                                                "--warmup", "1", "--repeat", "2", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    fps_line = [line for line in result.stdout.splitlines() if line.startswith("FPS: ")]
    assert len(fps_line) == 1 and float(fps_line[0].split()[1]) > 0
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["batch"] == 2 and summary["timed_forwards"] == 2 and summary["data"] == "synthetic"


def test_speedtest_compare_times_both(model_dir):
    result = CliRunner().invoke(speedtest_cli, ["--model-dir", str(model_dir), "--iters", "2", "--warmup", "1",
                                                "--repeat", "2", "--device", "cpu", "--compare", "--threshold", "0.5",
                                                "--keep-aspect", "--dtype", "bf16"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert set(summary["fps"]) == {"pure", "algm"}
    assert summary["speedup"] == pytest.approx(summary["fps"]["algm"] / summary["fps"]["pure"], rel=1e-2)
    assert "speed-up: " in result.stdout


def test_flops_cli_prints_gflops_and_algm_counts_fewer(model_dir):
    args = ["--model-dir", str(model_dir), "--dataset", "synthetic", "--max-images", "2", "--device", "cpu"]
    pure = CliRunner().invoke(flops_cli, args)
    algm = CliRunner().invoke(flops_cli, [*args, "--patch-type", "algm", "--threshold", "0.5", "--breakdown"])
    assert pure.exit_code == 0 and algm.exit_code == 0, pure.output + algm.output
    value = lambda r: float([l for l in r.stdout.splitlines() if l.startswith("GFlops: ")][0].split()[1])
    assert 0 < value(algm) < value(pure)
    assert "| encoder block 5 |" in algm.stdout and "| token reduction (similarities, scores) |" in algm.stdout


def test_flops_without_a_dataset_root_says_it_measures_synthetic_images(monkeypatch):
    monkeypatch.delenv("DATASET", raising=False)
    args = ["--dataset", "pascal_context", "--backbone", "vit_tiny_patch16_384", "--crop-size", "32",
            "--max-images", "1", "--device", "cpu"]
    result = CliRunner().invoke(flops_cli, args)
    assert result.exit_code == 0, result.output
    assert ("note: neither $DATASET nor --root is set, so the images are synthetic scenes, not pascal_context's "
            "(the model keeps pascal_context's class count)") in result.stderr
    summary = json.loads(result.stdout.splitlines()[-2])
    model = create_segmenter(net_kwargs_for("vit_tiny_patch16_384", "mask_transformer", 60, 32)).eval()
    with torch.no_grad():
        expected = flop_analysis(model, torch.zeros(1, 3, 32, 32)).total() / 1e9
    assert summary["data"] == "synthetic" and summary["gflops"] == round(expected, 4)


@pytest.mark.parametrize("args,message", [
    (["--model-dir", "{tmp}"], "no checkpoint.pth in --model-dir"),
    (["--dataset", "nope", "--root", "{tmp}"], "unknown dataset 'nope'"),
    (["--backbone", "vit_tiny_patch16_384", "--device", "cuda"], None),
])
def test_measurement_errors(tmp_path, args, message):
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    result = CliRunner().invoke(flops_cli, [*args, "--max-images", "1"])
    if message is None:
        if torch.cuda.is_available():
            pytest.skip("CUDA is available here")
        message = "CUDA is not available"
    assert result.exit_code == 2 and message in result.stderr


def test_calibrate_matches_bruteforce_mean_plus_std(model_dir, tmp_path):
    out = tmp_path / "tau.yml"
    result = CliRunner().invoke(calibrate, [str(model_dir / "checkpoint.pth"), "synthetic", "--max-images", "3",
                                            "--out", str(out), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    stats = yaml.safe_load(out.read_text())

    from segm.measure import measurement_loader
    from segm.model.factory import load_model

    model, _ = load_model(model_dir / "checkpoint.pth")
    loader, _ = measurement_loader("synthetic", None, "train", 64, "vit", limit=3)
    values = {i: {"clap": [], "gbm": []} for i in range(12)}
    with torch.no_grad():
        for x in loader:
            h = model.encoder.embed(x)
            for i, block in enumerate(model.encoder.blocks):
                after_attention = h + block.attn(block.norm1(h))
                values[i]["clap"].append(window_similarity(after_attention[:, 1:], (4, 4), (2, 2)).flatten())
                values[i]["gbm"].append(best_partners(after_attention, 1)[0][:, 1:].flatten())
                h = block(h)
    for i in range(12):
        for kind in ("clap", "gbm"):
            v = torch.cat(values[i][kind]).double()
            got = stats["layers"][i + 1][kind]
            assert got["count"] == v.numel()
            assert got["threshold"] == pytest.approx((v.mean() + v.std()).item(), abs=1e-9)
    assert stats["suggested"]["threshold"] == pytest.approx(stats["layers"][1]["clap"]["threshold"], abs=1e-4)
    assert "suggested: --selected-layers 1 5 --threshold" in result.stdout


class Probe(torch.nn.Module):
    """A forward of one kind of work: pointwise, a matrix product, bookkeeping, or the mask upsampling."""

    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "pointwise":
            return x.sin().cos().exp()
        if self.kind == "matmul":
            return x @ x
        if self.kind == "bookkeeping":
            with section("probe"):
                return x.sin().cos().exp()
        return upsample_logits(x[None, None], (1024, 1024))


@pytest.mark.parametrize("kind, least", [("pointwise", {}), ("matmul", {"kernels": 0.6}),
                                         ("bookkeeping", {"bookkeeping": 0.6}),
                                         ("upsample", {"upsampling": 0.6, "kernels": 0.4})])
def test_time_shares_attribute_each_kind_of_work(kind, least):
    shares = time_shares(Probe(kind), torch.rand(512, 512), runs=2)
    assert set(shares) == {"bookkeeping", "upsampling", "kernels"}
    for label, value in shares.items():
        assert (value > least[label]) if label in least else (value == 0.0), (label, shares)


class Calls(torch.nn.Module):
    """Records the batch size of every forward."""

    def __init__(self):
        super().__init__()
        self.seen: list[int] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append(x.shape[0])
        return x


def test_measure_times_the_module_a_variant_returns():
    model, other = Calls(), Calls()
    loader = [torch.zeros(1, 3, 4, 4)] * 3
    variants = {"eager": lambda: {"settings": "not a module"}, "other": lambda: other}
    times = measure(model, loader, torch.device("cpu"), 2, 1, 2, contextlib.nullcontext, False, variants,
                    show_progress=False)
    assert {name: len(t) for name, t in times.items()} == {"eager": 2, "other": 2}
    assert model.seen == [2, 2, 2] and other.seen == [2, 2, 2]
