"""Nothing a user does loses work: run folders owned by one run, no flag that deletes, resume means the same
run, preemption-safe training, checks before the first iteration, inputs never overwritten, faithful
image decoding, self-describing scores."""

from __future__ import annotations

import errno
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from click.testing import CliRunner
from PIL import Image

from segm.data import DatasetError, load_rgb
from segm.data.check import main as check_cli
from segm.data.synthetic.write import write_layout
from segm.eval.miou import scores_path
from segm.inference import main as infer_cli
from segm.run_dir import RunLock, check_free_space, move_aside, remove_stale_temporaries
from segm.speedtest import main as speedtest_cli
from segm.train import main as train_cli
from segm.vis import main as vis_cli
from segm.utils.checkpoint import save_atomic
from tokred.errors import UsageError
from tests.conftest import SUBPROCESS_ENV, module_cmd, read_log, run_module

BASE = ["--dataset", "synthetic", "--backbone", "vit_tiny_patch16_384", "--decoder", "linear", "--no-pretrained",
        "--im-size", "64", "--crop-size", "64", "--window-size", "64", "--window-stride", "64", "--batch-size", "2",
        "--eval-freq", "1", "--seed", "0", "--num-workers", "0", "--device", "cpu", "--max-images", "12"]


def train(log_dir: Path, *extra: str, check: bool = True) -> subprocess.CompletedProcess:
    return run_module("segm.train", "--log-dir", str(log_dir), *BASE, *extra, check=check)


def losses(log_dir: Path) -> list[float]:
    return [record["train_loss"] for record in read_log(log_dir)]


def test_a_second_run_on_a_locked_folder_stops_at_once_naming_the_holder(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    lock = RunLock(run).acquire()
    try:
        result = train(run, "--epochs", "1", check=False)
    finally:
        lock.release()
    assert result.returncode == 2
    assert result.stderr.strip() == (f"error: {run} is in use by another training run (PID {os.getpid()} on "
                                     f"{socket.gethostname()}); wait for it to finish or choose another --log-dir")
    assert not (run / "checkpoint.pth").exists()
    RunLock(run).acquire().release()  # free again once released (and after the holder dies)


def test_no_resume_refuses_then_overwrite_moves_the_old_run_aside(tmp_path):
    run = tmp_path / "run"
    train(run, "--epochs", "1")
    before = (run / "checkpoint.pth").read_bytes()
    refused = train(run, "--epochs", "1", "--no-resume", check=False)
    assert refused.returncode == 2
    assert "--no-resume: " in refused.stderr and "add --overwrite to move it to old-<time>/" in refused.stderr
    assert (run / "checkpoint.pth").read_bytes() == before
    train(run, "--epochs", "1", "--no-resume", "--overwrite")
    old = [p for p in run.iterdir() if p.name.startswith("old-")]
    assert len(old) == 1 and (old[0] / "checkpoint.pth").read_bytes() == before
    assert sorted(p.name for p in old[0].iterdir()) == ["best_checkpoint.pth", "checkpoint.pth", "log.txt", "variant.yml"]


def test_resume_refuses_changed_settings_and_applies_more_epochs(tmp_path):
    run = tmp_path / "run"
    train(run, "--epochs", "1")
    changed = train(run, "--epochs", "1", "-lr", "0.5", "--seed", "3", check=False)
    assert changed.returncode == 2
    assert ("optimizer_kwargs.lr: 0.01 -> 0.5" in changed.stderr and "algorithm_kwargs.seed: 0 -> 3" in changed.stderr)
    more = train(run, "--epochs", "2")
    assert "note: changed on resume: algorithm_kwargs.num_epochs: 1 -> 2" in more.stderr
    variant = yaml.safe_load((run / "variant.yml").read_text())
    assert variant["algorithm_kwargs"]["num_epochs"] == 2 and variant["optimizer_kwargs"]["iter_max"] == 12
    assert torch.load(run / "checkpoint.pth", weights_only=True)["lr_scheduler"]["iter_max"] == 12
    assert [record["epoch"] for record in read_log(run)] == [0, 1]


def test_sigterm_mid_epoch_then_the_same_command_gives_the_same_losses(tmp_path):
    straight = tmp_path / "straight"
    train(straight, "--epochs", "2")
    stopped = tmp_path / "stopped"
    stopped.mkdir()
    (stopped / ".checkpoint.pth.tmp-999999").write_bytes(b"partial")  # left by a dead process
    proc = subprocess.Popen(module_cmd("segm.train", "--log-dir", str(stopped), *BASE, "--epochs", "2"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=SUBPROCESS_ENV)
    for line in proc.stdout:
        if line.startswith("Trained parameters:"):
            break
    time.sleep(1.0)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 75, err[-2000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith("stopped by SIGTERM at epoch ") and last.endswith("; run the same command to resume")
    state = torch.load(stopped / "checkpoint.pth", weights_only=True)
    assert state["partial"]["epoch"] in (0, 1) and 0 < state["partial"]["iteration"] <= 6
    assert not (stopped / ".checkpoint.pth.tmp-999999").exists()
    resumed = train(stopped, "--epochs", "2")
    assert "Resuming from" in resumed.stdout and f"iteration {state['partial']['iteration']}" in resumed.stdout
    assert losses(stopped) == pytest.approx(losses(straight), rel=1e-6)


@pytest.mark.parametrize("args,message", [
    (["--eval-freq", "0"], "Invalid value for '--eval-freq': 0 is not in the range x>=1"),
    (["--window-stride", "0"], "Invalid value for '--window-stride'"),
    (["--device", "tpu"], "error: --device tpu is not a device; use cpu, cuda or cuda:N"),
])
def test_bad_numbers_and_devices_are_one_line_before_any_work(tmp_path, args, message):
    result = CliRunner().invoke(train_cli, ["--log-dir", str(tmp_path / "run"), *BASE, "--epochs", "1", *args])
    assert result.exit_code == 2 and message in result.stderr
    assert not (tmp_path / "run" / "checkpoint.pth").exists()


def test_free_space_is_checked_and_a_full_disk_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    with pytest.raises(UsageError, match=r"has \d+ MB free but a run needs about 3000000 MB for two checkpoints"):
        check_free_space(tmp_path, 3_000_000 * 2**20)
    path = tmp_path / "checkpoint.pth"
    save_atomic({"w": torch.ones(3)}, path)

    def full_disk(obj, f):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(UsageError) as err:
        save_atomic({"w": torch.zeros(1024, 256)}, path)
    assert str(err.value).startswith("could not write checkpoint.pth: no space left on device (free ")
    assert str(err.value).endswith("needed 1 MB); the previous checkpoint.pth is intact")
    assert torch.equal(torch.load(path, weights_only=True)["w"], torch.ones(3))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pth"]


def test_stale_temporaries_of_dead_processes_go_and_live_ones_stay(tmp_path):
    dead, alive = tmp_path / ".checkpoint.pth.tmp-999999", tmp_path / f".checkpoint.pth.tmp-{os.getpid()}"
    dead.write_bytes(b"x")
    alive.write_bytes(b"x")
    assert remove_stale_temporaries(tmp_path) == [dead]
    assert alive.exists() and not dead.exists()
    (tmp_path / "log.txt").write_text("{}\n")
    moved = move_aside(tmp_path)
    assert moved.name.startswith("old-") and (moved / "log.txt").read_text() == "{}\n"


def test_inference_refuses_to_write_over_its_inputs(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(images / "a.png")
    checkpoint = tmp_path / "model" / "checkpoint.pth"
    result = CliRunner().invoke(infer_cli, ["--model-path", str(checkpoint), "-i", str(images), "-o", str(images), "--cpu"])
    assert result.exit_code == 2
    assert result.stderr.strip() == (f"error: --output-dir {images} would overwrite the input file {images / 'a.png'}; "
                                     "choose another output")
    both = CliRunner().invoke(infer_cli, ["--model-path", str(checkpoint), "-i", str(images), "-o", str(tmp_path / "o"),
                                          "--cpu", "--device", "cpu"])
    assert both.exit_code == 2 and "give --device or --gpu/--cpu, not both" in both.stderr
    picture = CliRunner().invoke(vis_cli, [str(checkpoint), str(images / "a.png"), "-o", str(images / "a.png")])
    assert picture.exit_code == 2
    assert picture.stderr.strip() == (f"error: --output {images / 'a.png'} would overwrite the input file "
                                      f"{images / 'a.png'}; choose another output")


def test_16_bit_images_are_scaled_not_saturated(tmp_path):
    values = np.array([[0, 255, 256, 65535], [1000, 30000, 40000, 65280]], dtype=np.uint16)
    Image.fromarray(values).save(tmp_path / "deep.png")
    assert Image.open(tmp_path / "deep.png").mode.startswith("I;16")
    rgb = load_rgb(tmp_path / "deep.png")
    assert rgb.shape == (2, 4, 3) and rgb.dtype == np.uint8
    assert rgb[..., 0].tolist() == (values >> 8).tolist() and np.array_equal(rgb[..., 0], rgb[..., 2])
    Image.fromarray(np.array([[7, 200]], dtype=np.int32)).save(tmp_path / "small.tif")
    assert load_rgb(tmp_path / "small.tif")[..., 1].tolist() == [[7, 200]]


def test_the_dataset_check_decodes_every_image_unless_quick(tmp_path):
    write_layout(tmp_path, "ade20k", {"train": 1, "val": 2}, 32, 32)
    victim = next((tmp_path / "ade20k" / "ADEChallengeData2016" / "images" / "validation").glob("*.jpg"))
    victim.write_bytes(victim.read_bytes()[: len(victim.read_bytes()) // 2])
    full = CliRunner().invoke(check_cli, ["ade20k", "--split", "val", "--root", str(tmp_path), "--workers", "1"])
    assert full.exit_code == 1 and f"cannot decode image file {victim}" in full.stderr
    quick = CliRunner().invoke(check_cli, ["ade20k", "--split", "val", "--root", str(tmp_path), "--workers", "1", "--quick"])
    assert quick.exit_code == 0, quick.output


def test_scores_of_other_settings_get_their_own_file(tmp_path):
    settings = {"patch_type": "pure", "images": 64}
    first = scores_path(tmp_path, "ss", settings)
    assert first == tmp_path / "scores_ss.yml"
    first.write_text(yaml.safe_dump({"mean_iou": 1.0, "settings": settings}))
    assert scores_path(tmp_path, "ss", settings) == first
    other = scores_path(tmp_path, "ss", {**settings, "patch_type": "tome"})
    assert other.parent == tmp_path and other.name.startswith("scores_ss-") and other.name.endswith(".yml")


def test_speedtest_zero_iterations_is_a_range_error():
    result = CliRunner().invoke(speedtest_cli, ["--backbone", "vit_tiny_patch16_384", "--repeat", "0"])
    assert result.exit_code == 2 and "Invalid value for '--repeat': 0 is not in the range x>=1" in result.output


def test_a_truncated_image_is_a_dataset_error_naming_it(tmp_path):
    path = tmp_path / "cut.jpg"
    Image.fromarray(np.full((64, 64, 3), 90, dtype=np.uint8)).save(path, quality=95)
    path.write_bytes(path.read_bytes()[:300])
    with pytest.raises(DatasetError, match=f"cannot decode image file {path}"):
        load_rgb(path)
