"""segm.inference and segm.vis on a small random-weight checkpoint."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from segm.inference import main as infer
from segm.vis import main as vis
from segm.visualize import draw_merge_groups
from segm.model.factory import create_segmenter
from tests.conftest import perturb_, tiny_net_kwargs, write_checkpoint


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    torch.manual_seed(0)
    net = tiny_net_kwargs("mask_transformer", n_cls=16, crop=64)
    return write_checkpoint(tmp_path_factory.mktemp("model"), perturb_(create_segmenter(net)), net)


@pytest.fixture
def image_dir(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (70, 90, 3), dtype=np.uint8)).save(folder / "a.png")
    Image.fromarray(rng.integers(0, 255, (64, 64), dtype=np.uint8)).convert("L").save(folder / "b.jpg")
    (folder / "notes.txt").write_text("not an image")
    return folder


def test_inference_writes_one_blended_prediction_per_image(model_path, image_dir, tmp_path):
    out = tmp_path / "out"
    result = CliRunner().invoke(infer, ["--model-path", str(model_path), "-i", str(image_dir), "-o", str(out),
                                        "--cpu", "--dataset", "synthetic"])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir()) == ["a.png", "b.jpg"]
    assert Image.open(out / "a.png").size == (90, 70)
    assert Image.open(out / "b.jpg").mode == "RGB"


def test_inference_show_merges_adds_panels(model_path, image_dir, tmp_path):
    out = tmp_path / "out"
    result = CliRunner().invoke(infer, ["--model-path", str(model_path), "-i", str(image_dir), "-o", str(out), "--cpu",
                                        "--dataset", "synthetic", "--patch-type", "algm", "--selected-layers", "1", "5",
                                        "--threshold", "0.5", "--show-merges", "--resize"])
    assert result.exit_code == 0, result.output
    width, height = Image.open(out / "a.png").size
    assert (width, height) == (3 * 82, 64 + 16)


@pytest.mark.parametrize("setup,args,message", [
    ("missing", [], "input folder not found"),
    ("empty", [], "no images"),
    ("images", ["--show-merges", "--dataset", "synthetic"], "patch type 'pure' recorded no patch-to-token maps on this image: nothing to draw"),
    ("images", [], "the model predicts 16 classes but ade20k has 150; pass --dataset"),
])
def test_inference_errors(model_path, image_dir, tmp_path, setup, args, message):
    folder = {"missing": tmp_path / "nope", "empty": tmp_path, "images": image_dir}[setup]
    result = CliRunner().invoke(infer, ["--model-path", str(model_path), "-i", str(folder), "-o", str(tmp_path / "o"),
                                        "--cpu", *args])
    assert result.exit_code == 2 and message in result.stderr


def test_vis_draws_a_panel_per_selected_layer(model_path, image_dir, tmp_path):
    out = tmp_path / "merges.png"
    result = CliRunner().invoke(vis, [str(model_path), str(image_dir / "a.png"), "-o", str(out), "--patch-type", "algm",
                                      "--selected-layers", "1", "5", "8", "--threshold", "0.5"])
    assert result.exit_code == 0, result.output
    assert Image.open(out).size == (4 * 82, 64 + 16)
    assert "step 1:" in result.output and "step 3:" in result.output


def test_draw_merge_groups_colours_tokens_and_draws_boundaries():
    image = np.full((4, 6, 3), 100, dtype=np.uint8)
    index = np.array([[0, 0, 1], [2, 2, 1]]).reshape(-1)
    out = draw_merge_groups(image, index, (2, 3), 2, alpha=1.0)
    assert np.all(out[0, 0] == out[0, 1]) and np.all(out[0, 4] == 0)
    assert np.all(out[2, 0] == 0) and np.all(out[3, 5] == out[0, 5]) and out[3, 5].any()
    assert not np.all(out[0, 0] == out[3, 1])
