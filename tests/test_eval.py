"""segm.eval.miou on a small random-weight checkpoint and the synthetic validation set."""

from __future__ import annotations

import zipfile

import pytest
import torch
import yaml
from click.testing import CliRunner

from segm.data import create_dataset
from segm.eval.miou import main as miou
from segm.model.factory import create_segmenter
from segm.model.inference import inference
from tests.conftest import perturb_, tiny_net_kwargs, write_checkpoint
from tests.test_metrics_optim import brute_scores


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    net = tiny_net_kwargs("linear", n_cls=16, crop=64)
    model = perturb_(create_segmenter(net)).eval()
    return write_checkpoint(tmp_path_factory.mktemp("model"), model, net), model


def run_miou(*args: str):
    return CliRunner().invoke(miou, list(args), catch_exceptions=False)


def expected_scores(model, n_images: int, im_size: int, window: int, stride: int, window_batch: int):
    dataset = create_dataset("synthetic", "val", im_size=im_size, normalization="vit")
    preds, gts = [], []
    for i in range(n_images):
        item = dataset[i]
        views = [v[None] for v in item["im"]]
        probs = inference(model, views, [{"flip": f} for f in item["flip"]], item["ori_shape"], window, stride, window_batch)
        preds.append(probs.argmax(0).numpy())
        gts.append(item["gt"].numpy())
    return brute_scores(preds, gts, 16)


def test_miou_prints_reference_lines_and_matches_a_bruteforce_evaluation(checkpoint):
    path, model = checkpoint
    result = run_miou(str(path), "synthetic", "--im-size", "96", "--window-size", "64", "--window-stride", "40",
                      "--window-batch-size", "3", "--frac-dataset", "0.125", "--device", "cpu")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    values = {line.split(": ")[0]: line.split(": ")[1] for line in lines[:4]}
    assert list(values) == ["pixel_accuracy", "mean_accuracy", "mean_iou", "inference"]
    assert values["inference"] == "single_scale"
    aacc, macc, miou_value, _ = expected_scores(model, 8, 96, 64, 40, 3)
    assert float(values["pixel_accuracy"]) == aacc
    assert float(values["mean_accuracy"]) == macc
    assert float(values["mean_iou"]) == miou_value
    assert "images: 8" in result.stdout
    scores = yaml.safe_load((path.parent / "scores_ss.yml").read_text())
    assert set(scores) == {"cat_iou", "inference", "mean_accuracy", "mean_iou", "pixel_accuracy", "settings"}
    assert scores["mean_iou"] == miou_value and len(scores["cat_iou"]) == 16
    assert scores["settings"] == {
        "checkpoint": str(path), "dataset": "synthetic", "split": "val", "images": 8, "frac_dataset": 0.125,
        "patch_type": "pure", "patch_settings": {}, "short_side": 96, "window_size": 64, "window_stride": 40,
        "window_batch_size": 3, "dtype": "fp32", "compiled": False}
    assert "| class" in result.stdout


def test_miou_defaults_stride_crop_minus_32_and_multiscale(checkpoint):
    path, model = checkpoint
    result = run_miou(str(path), "synthetic", "--multiscale", "--frac-dataset", "0.03125", "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert "inference: multi_scale" in result.stdout
    assert "window 64, stride 32, short side 128" in result.stdout
    assert (path.parent / "scores_ms.yml").exists()


def test_miou_with_algm_options_and_save_images(checkpoint):
    path, _ = checkpoint
    result = run_miou(str(path), "synthetic", "--im-size", "64", "--patch-type", "algm", "--selected-layers", "1", "5",
                      "--merging-window-size", "2", "2", "--threshold", "0.88", "--save-images", "--frac-dataset",
                      "0.0625", "--device", "cpu")
    assert result.exit_code == 0, result.output
    images = path.parent / "images"
    for sub in ("input", "pred", "gt"):
        assert len(list((images / sub).glob("*.png"))) == 4
    with zipfile.ZipFile(path.parent / "images.zip") as archive:
        assert len([n for n in archive.namelist() if n.endswith(".png")]) == 12
    assert not list(path.parent.glob(".images-partial*"))
    first = next((images / "pred").iterdir()).read_bytes()
    again = run_miou(str(path), "synthetic", "--im-size", "64", "--save-images", "--frac-dataset", "0.03125",
                     "--device", "cpu")
    assert again.exit_code == 0, again.output
    old = [p for p in path.parent.iterdir() if p.name.startswith("old-")]
    assert len(old) == 1 and f"note: moved the earlier evaluation images to {old[0]}" in again.stderr
    assert sorted(p.name for p in old[0].iterdir()) == ["images", "images.zip"]
    assert len(list((old[0] / "images" / "pred").glob("*.png"))) == 4
    assert first in {p.read_bytes() for p in (old[0] / "images" / "pred").iterdir()}
    assert len(list((images / "pred").glob("*.png"))) == 2


@pytest.mark.parametrize("args,message", [
    (["--patch-type", "algm", "--selected-layers", "1", "13"], "selected_layers [1, 13] out of range"),
    (["--window-size", "64"], None),
])
def test_miou_option_errors(checkpoint, args, message):
    path, _ = checkpoint
    result = run_miou(str(path), "synthetic", "--frac-dataset", "0.01", "--device", "cpu", *args)
    if message is None:
        assert result.exit_code == 0
    else:
        assert result.exit_code == 2 and message in result.stderr


@pytest.mark.parametrize("frac", ["0.0", "1.5"])
def test_miou_frac_dataset_outside_0_1_is_refused(checkpoint, frac):
    path, _ = checkpoint
    before = sorted(p.name for p in path.parent.rglob("*"))
    result = CliRunner().invoke(miou, [str(path), "synthetic", "--frac-dataset", frac, "--save-images"])
    assert result.exit_code == 2
    assert f"Invalid value for '-frac-dataset' / '--frac-dataset': {frac} is not in the range 0<x<=1." in result.output
    assert sorted(p.name for p in path.parent.rglob("*")) == before


def test_miou_without_variant_or_checkpoint(tmp_path):
    torch.save({"model": {}}, tmp_path / "checkpoint.pth")
    result = run_miou(str(tmp_path / "checkpoint.pth"), "synthetic", "--device", "cpu")
    assert result.exit_code == 2
    assert "no variant.yml or variant.yaml beside" in result.stderr
    result = run_miou(str(tmp_path / "missing.pth"), "synthetic", "--device", "cpu")
    assert result.exit_code == 2 and "checkpoint not found" in result.stderr


def test_miou_class_count_mismatch(tmp_path):
    net = tiny_net_kwargs("linear", n_cls=5, crop=64)
    path = write_checkpoint(tmp_path, create_segmenter(net), net)
    result = run_miou(str(path), "synthetic", "--device", "cpu")
    assert result.exit_code == 2 and "the model predicts 5 classes but synthetic has 16" in result.stderr
