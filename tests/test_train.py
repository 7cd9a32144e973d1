"""segm.train end to end on the synthetic dataset: files written, exact resume after SIGKILL, errors, 2 processes."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner

from segm.engine import NonFiniteLossError, train_one_epoch
from segm.model.factory import load_model
from segm.optim import PolynomialLR
from segm.train import main as train_cli
from tests.conftest import SUBPROCESS_ENV, has_log_line, kill_when, module_cmd, read_log, run_module

BASE = ["--dataset", "synthetic", "--backbone", "vit_tiny_patch16_384", "--decoder", "linear", "--no-pretrained",
        "--im-size", "64", "--crop-size", "64", "--window-size", "64", "--window-stride", "64", "--batch-size", "4",
        "--eval-freq", "1", "--seed", "0", "--num-workers", "0", "--device", "cpu", "--max-images", "16"]


def train_cmd(log_dir: Path, *extra: str) -> list[str]:
    return module_cmd("segm.train", "--log-dir", str(log_dir), *BASE, *extra)


def run_train(log_dir: Path, *extra: str, check: bool = True) -> subprocess.CompletedProcess:
    return run_module("segm.train", "--log-dir", str(log_dir), *BASE, *extra, check=check)


def test_training_writes_checkpoint_log_variant_and_one_best_checkpoint(tmp_path):
    run = tmp_path / "run"
    result = run_train(run, "--epochs", "2")
    log = read_log(run)
    assert [rec["epoch"] for rec in log] == [0, 1]
    assert set(log[0]) == {"train_loss", "train_learning_rate", "val_pixel_accuracy", "val_mean_accuracy",
                           "val_mean_iou", "epoch", "num_updates"}
    assert [rec["num_updates"] for rec in log] == [4, 8]
    variant = yaml.safe_load((run / "variant.yml").read_text())
    assert variant["net_kwargs"]["image_size"] == [64, 64]
    assert variant["optimizer_kwargs"]["iter_max"] == 8
    assert variant["dataset_kwargs"]["batch_size"] == 4 and variant["world_batch_size"] == 4
    assert variant["algorithm_kwargs"]["num_epochs"] == 2
    ckpt = torch.load(run / "checkpoint.pth", weights_only=True)
    assert {"model", "optimizer", "n_cls", "lr_scheduler", "epoch", "rng_states", "sampler"} <= set(ckpt)
    assert ckpt["epoch"] == 1 and ckpt["n_cls"] == 16
    best = torch.load(run / "best_checkpoint.pth", weights_only=True)
    assert best["best_mean_iou"] == max(rec["val_mean_iou"] for rec in log)
    assert log[best["best_epoch"]]["val_mean_iou"] == best["best_mean_iou"]
    assert sorted(p.name for p in run.iterdir()) == [".lock", "best_checkpoint.pth", "checkpoint.pth", "log.txt", "variant.yml"]
    model, _ = load_model(run / "checkpoint.pth")
    assert model.n_cls == 16
    assert "Stats [1]:" in result.stdout and "(16 images)" in result.stdout


def test_resume_after_sigkill_gives_the_same_losses(tmp_path):
    straight = tmp_path / "straight"
    run_train(straight, "--epochs", "3")
    crashed = tmp_path / "crashed"
    proc = subprocess.Popen(train_cmd(crashed, "--epochs", "3"), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=SUBPROCESS_ENV)
    kill_when(proc, has_log_line(crashed))
    assert len(read_log(crashed)) < 3
    resumed = run_train(crashed, "--epochs", "3")
    assert "Resuming from" in resumed.stdout
    want = [rec["train_loss"] for rec in read_log(straight)]
    got = [rec["train_loss"] for rec in read_log(crashed)]
    assert [rec["epoch"] for rec in read_log(crashed)] == [0, 1, 2]
    assert got == pytest.approx(want, rel=1e-4)
    assert [r["val_mean_iou"] for r in read_log(crashed)][1:] == [r["val_mean_iou"] for r in read_log(straight)][1:]


def test_zero_epochs_are_honoured_and_a_finished_run_restarts_as_a_no_op(tmp_path):
    run = tmp_path / "run"
    run_train(run, "--epochs", "0")
    assert not (run / "log.txt").exists() and not (run / "checkpoint.pth").exists()
    run_train(run, "--epochs", "1")
    again = run_train(run, "--epochs", "1")
    assert "Nothing to do" in again.stdout
    assert len(read_log(run)) == 1


@pytest.mark.parametrize("args,message", [
    (["--dataset", "nope"], "unknown dataset 'nope'; known datasets: ade20k"),
    (["--backbone", "vit_giant"], "unknown backbone 'vit_giant'; known backbones: deit_base_distilled_patch16_224"),
    (["--decoder", "deeplab_dec"], "unknown decoder 'deeplab_dec'; known decoders: linear, mask_transformer"),
    (["--patch-type", "algm", "--selected-layers", "1", "13"], "selected_layers [1, 13] out of range: blocks are numbered 1..12"),
    (["--batch-size", "3", "--device", "cpu"], None),
])
def test_bad_options_give_one_clear_error(tmp_path, args, message):
    if message is None:
        assert run_train(tmp_path / "run", *args, "--epochs", "1", check=False).returncode == 0
        return
    result = CliRunner().invoke(train_cli, ["--log-dir", str(tmp_path / "run"), *BASE, *args, "--epochs", "1"])
    assert result.exit_code == 2
    assert result.stderr.strip().splitlines()[-1].startswith("error: ")
    assert message in result.stderr
    assert not (tmp_path / "run" / "checkpoint.pth").exists()


def test_unwritable_log_dir(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    result = run_train(blocker / "run", "--epochs", "1", check=False)
    assert result.returncode == 2
    assert f"--log-dir {blocker / 'run'} is not writable" in result.stderr


def test_checkpoint_of_another_model_in_log_dir(tmp_path):
    run = tmp_path / "run"
    run_train(run, "--epochs", "1")
    result = run_train(run, "--epochs", "2", "--decoder", "mask_transformer", check=False)
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1
    assert f"error: {run} holds a run with other settings (" in result.stderr
    assert "net_kwargs.decoder.name: 'linear' -> 'mask_transformer'" in result.stderr
    assert "start over with --no-resume --overwrite (the old files move to old-<time>/)" in result.stderr


def test_non_finite_loss_stops_before_any_update():
    model = torch.nn.Conv2d(3, 2, 1)
    params = [p.detach().clone() for p in model.parameters()]
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = PolynomialLR(opt, 1, 0, 10, 0.9)
    batches = [{"im": torch.randn(2, 3, 4, 4), "segmentation": torch.zeros(2, 4, 4, dtype=torch.long)},
               {"im": torch.full((2, 3, 4, 4), float("nan")), "segmentation": torch.zeros(2, 4, 4, dtype=torch.long)}]
    with pytest.raises(NonFiniteLossError, match=r"loss is nan at epoch 3, iteration 1"):
        train_one_epoch(model, batches, opt, sched, 3, torch.device("cpu"))
    assert not all(torch.equal(a, b) for a, b in zip(params, model.parameters()))
    after_first = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(NonFiniteLossError):
        train_one_epoch(model, batches[1:], opt, sched, 3, torch.device("cpu"))
    assert all(torch.equal(a, b) for a, b in zip(after_first, model.parameters()))


def test_two_processes_with_gloo_hold_identical_weights_and_evaluate_the_whole_val_set(tmp_path):
    run = tmp_path / "ddp"
    result = run_module("torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29531",
                        "-m", "segm.train", "--log-dir", str(run), *BASE, "--epochs", "1", "--max-images", "14")
    assert "processes: 2 (torchrun)" in result.stdout
    assert "Weights identical on all 2 processes" in result.stdout
    assert "(14 images)" in result.stdout
    log = read_log(run)
    assert len(log) == 1 and log[0]["num_updates"] == 4  # 7 images per process, batches of 2


def test_non_finite_loss_ends_the_run_with_one_line_naming_epoch_and_iteration(tmp_path):
    run = tmp_path / "run"
    result = run_train(run, "--epochs", "2", "-lr", "1e30", check=False)
    assert result.returncode == 3
    last = result.stderr.strip().splitlines()[-1]
    assert re.fullmatch(r"error: loss is (nan|inf) at epoch \d+, iteration \d+; stopping \(checkpoint\.pth still holds the previous epoch\)", last)
    if (run / "checkpoint.pth").exists():
        kept = torch.load(run / "checkpoint.pth", weights_only=True)
        assert all(torch.isfinite(v).all() for v in kept["model"].values())
