"""The compiled path: ``compile_model`` equals eager in fp32 and compiles nothing per image after warm-up.

Merge counts that depend on the image break the graph where they are read; the graphs after a break
see a new token count on the first image that changes it and are recompiled once, with that dimension
symbolic. A counting backend (no code generation) checks that after one pass over a few images with
different merge counts, a second pass and new images compile nothing; inductor itself runs on an ALGM
model against eager; eval, speedtest and inference pass ``--compile`` and ``--dtype`` through.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch._dynamo
import yaml
from click.testing import CliRunner
from PIL import Image
from torch._dynamo.testing import CompileCounter

import segm.eval.miou as miou_cli
import segm.inference as inference_cli
import segm.speedtest as speedtest_cli
from segm.model.factory import create_segmenter
from segm.model.token_reduction import apply_token_reduction
from segm.runtime import compile_model
from tests.conftest import perturb_, tiny_net_kwargs, tiny_vit_with_parts, write_checkpoint

# Settings whose token counts depend on the image where the method allows it.
VARYING = {
    "pure": {},
    "algm": {"selected_layers": [1, 3], "threshold": 0.88},
    "tome": {"r": 3},
    "tome_sublayer": {"ratio": 0.3},
    "evit": {"keep_rate": 0.7, "drop_layers": [2, 3]},
    "act": {"q_hashes": 2, "seed": 0},
    "expedite": {"after_layer": 2, "num_clusters": (2, 2), "reconstruct": True},
    "cts": {"num_shared": 1},
}


CROP = 128  # an 8 x 8 patch grid


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def tiny(patch_type: str) -> torch.nn.Module:
    model = tiny_vit_with_parts(4, n_cls=16, crop=CROP)
    apply_token_reduction(model, patch_type, **VARYING[patch_type])
    return model


def scene(flat_rows: int, seed: int) -> torch.Tensor:
    """Noise with its top ``flat_rows`` patch rows constant: the more flat rows, the more windows merge."""
    im = torch.randn(1, 3, CROP, CROP, generator=torch.Generator().manual_seed(seed))
    im[:, :, : 16 * flat_rows] = 0.5
    return im.repeat(2, 1, 1, 1)


def merged_length(model: torch.nn.Module, im: torch.Tensor) -> int:
    with torch.no_grad():
        tokens, _ = model.encoder.forward_tokens(im)
    return tokens.shape[1]


@pytest.mark.parametrize("patch_type", sorted(VARYING))
def test_no_compilation_per_image_after_warm_up(patch_type):
    model = tiny(patch_type)
    counter = CompileCounter()
    compiled = compile_model(model, backend=counter)
    dataset = [scene(rows, seed) for seed, rows in enumerate((0, 8, 2, 5, 4, 6))]
    later = dataset[::-1] + [scene(rows, 20 + seed) for seed, rows in enumerate((1, 3, 7, 2, 5, 0))]
    with torch.no_grad():
        for im in dataset:
            compiled(im)
        after_warm_up = counter.frame_count
        for im in later:
            assert torch.allclose(compiled(im), model(im), atol=1e-5)
    assert after_warm_up > 0 and counter.frame_count == after_warm_up
    if patch_type == "algm":
        assert len({merged_length(model, im) for im in later}) >= 8


def test_inductor_output_equals_eager():
    model = tiny("algm")  # graph breaks, dynamic token counts, and unpatched blocks after them
    compiled = compile_model(model)
    with torch.no_grad():
        for rows in (0, 4, 2):
            im = scene(rows, rows)
            assert (compiled(im) - model(im)).abs().max() <= 1e-5


@pytest.fixture
def counted_compile(monkeypatch):
    """Replace the CLIs' ``compile_model`` by one with a counting backend; returns the counter."""
    counter = CompileCounter()
    for module in (miou_cli, inference_cli, speedtest_cli):
        monkeypatch.setattr(module, "compile_model", lambda model: compile_model(model, backend=counter))
    return counter


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    net = tiny_net_kwargs("mask_transformer", n_cls=16, crop=64)
    return write_checkpoint(tmp_path_factory.mktemp("model"), perturb_(create_segmenter(net)), net)


def test_eval_compiled_under_autocast_scores_as_eager(checkpoint, counted_compile):
    args = [str(checkpoint), "synthetic", "--frac-dataset", "0.0625", "--num-workers", "0", "--dtype", "bf16", "--device", "cpu"]
    eager = CliRunner().invoke(miou_cli.main, args, catch_exceptions=False)
    eager_scores = yaml.safe_load((checkpoint.parent / "scores_ss.yml").read_text())
    compiled = CliRunner().invoke(miou_cli.main, [*args, "--compile"], catch_exceptions=False)
    assert eager.exit_code == 0 and compiled.exit_code == 0, eager.output + compiled.output
    assert counted_compile.frame_count > 0
    scores = [yaml.safe_load(p.read_text()) for p in sorted(checkpoint.parent.glob("scores_ss-*.yml"))]
    assert [s["settings"]["compiled"] for s in scores] == [True] and eager_scores["settings"]["dtype"] == "bf16"
    assert scores[0]["mean_iou"] == eager_scores["mean_iou"] and scores[0]["settings"]["dtype"] == "bf16"


def test_speedtest_and_inference_run_compiled(checkpoint, counted_compile, tmp_path):
    timed = CliRunner().invoke(speedtest_cli.main, ["--model-dir", str(checkpoint.parent), "--iters", "2", "--warmup", "2",
                                                    "--repeat", "1", "--compile", "--dtype", "bf16", "--device", "cpu"])
    assert timed.exit_code == 0, timed.output
    summary = json.loads(timed.stdout.strip().splitlines()[-1])
    assert summary["compiled"] is True and summary["dtype"] == "bf16"
    after_speedtest = counted_compile.frame_count
    assert after_speedtest > 0
    images = tmp_path / "images"
    images.mkdir()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (70, 90, 3), dtype=np.uint8)).save(images / "a.png")
    out = tmp_path / "out"
    predicted = CliRunner().invoke(inference_cli.main, ["--model-path", str(checkpoint), "-i", str(images), "-o", str(out),
                                                        "--dataset", "synthetic", "--compile", "--device", "cpu"])
    assert predicted.exit_code == 0, predicted.output
    assert Image.open(out / "a.png").size == (90, 70) and counted_compile.frame_count > after_speedtest
