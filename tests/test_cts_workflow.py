"""The whole CTS workflow on the synthetic dataset: train the policy network, train Segmenter with token
sharing from it (killed and resumed exactly), then evaluate and measure the checkpoint with sharing."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner

from segm.eval.miou import main as miou_cli
from segm.flops import main as flops_cli
from segm.model.factory import load_model
from tests.conftest import SUBPROCESS_ENV, has_log_line, kill_when, module_cmd, read_log, run_module

POLICY = ["--dataset", "synthetic", "--no-pretrained", "--iters", "4", "--batch-size", "4", "--max-images", "8",
          "--eval-every", "4", "--checkpoint-every", "2", "--device", "cpu", "--num-workers", "0"]
SEGMENTER = ["--dataset", "synthetic", "--backbone", "vit_tiny_patch16_384", "--decoder", "linear", "--no-pretrained",
             "--im-size", "64", "--crop-size", "64", "--window-size", "64", "--window-stride", "64", "--batch-size", "4",
             "--eval-freq", "1", "--num-workers", "0", "--device", "cpu", "--max-images", "8", "--epochs", "3",
             "--patch-type", "cts", "--num-tokens-shared", "2", "--num-tokens-notshared", "8"]


def losses(log_dir: Path) -> list[float]:
    return [record["train_loss"] for record in read_log(log_dir)]


@pytest.fixture(scope="module")
def policy(tmp_path_factory) -> Path:
    log_dir = tmp_path_factory.mktemp("policy")
    run_module("segm.policy.train", "--log-dir", str(log_dir), *POLICY)
    return log_dir / "policynet.pth"


def test_segmenter_with_token_sharing_trains_resumes_and_evaluates(policy, tmp_path):
    flags = [*SEGMENTER, "--policynet-ckpt", str(policy)]
    straight = tmp_path / "straight"
    run_module("segm.train", "--log-dir", str(straight), *flags)

    crashed = tmp_path / "crashed"
    proc = subprocess.Popen(module_cmd("segm.train", "--log-dir", str(crashed), *flags),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=SUBPROCESS_ENV)
    kill_when(proc, has_log_line(crashed))
    resumed = run_module("segm.train", "--log-dir", str(crashed), *flags)
    assert "Resuming from" in resumed.stdout
    assert losses(crashed) == pytest.approx(losses(straight), rel=1e-4) and len(losses(straight)) == 3

    variant = yaml.safe_load((crashed / "variant.yml").read_text())
    assert variant["net_kwargs"]["policy_method"] == "policy_net"
    assert variant["net_kwargs"]["policy_schedule"] == [8, 2]
    assert variant["token_reduction"] == {"patch_type": "cts", "settings": {"num_shared": 2, "num_not_shared": 8}}

    model, _ = load_model(crashed / "checkpoint.pth")
    trained_policy = torch.load(policy, weights_only=True)
    assert all(torch.equal(model.policy_net.state_dict()[k], v) for k, v in trained_policy.items()
               if not k.endswith(("running_mean", "running_var", "num_batches_tracked")))

    result = CliRunner().invoke(miou_cli, [str(crashed / "checkpoint.pth"), "synthetic", "--im-size", "64",
                                           "--device", "cpu", "--window-batch-size", "1"])
    assert result.exit_code == 0, result.output
    assert "note: using the patch type recorded in variant.yml: cts (num_shared=2, num_not_shared=8)" in result.stderr
    assert "mean_iou: " in result.stdout

    breakdown = CliRunner().invoke(flops_cli, ["--model-dir", str(crashed), "--dataset", "synthetic", "--max-images", "1",
                                               "--device", "cpu", "--breakdown"])
    assert breakdown.exit_code == 0, breakdown.output
    assert "| policy net |  |" in breakdown.stdout
    assert "| encoder block 1 | 11.0 / 11.0 / 11.0 |" in breakdown.stdout  # 1 + 16 - 3 x 2 tokens
