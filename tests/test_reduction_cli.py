"""Token-reduction options on the command line: flags generated from the registry, their parsing, the
patch type recorded in variant.yml and used by later commands, and the measurement commands on every type."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from click.testing import CliRunner

from segm.cli import expand_multi_value_options, reduction_flags, reduction_request, resolve_reduction
from segm.eval.miou import main as miou_cli
from segm.flops import main as flops_cli
from segm.model.factory import create_segmenter
from segm.model.token_reduction import PATCH_TYPES, variant_entry, variant_token_reduction
from segm.speedtest import main as speedtest_cli
from tests.conftest import perturb_, run_module, tiny_net_kwargs, write_checkpoint
from tokred.errors import UsageError


def parsed(*args: str) -> dict:
    """What ``segm.flops`` parses from ``args``, as a ReductionRequest's ``given`` and patch type."""
    with flops_cli.make_context("segm.flops", expand_multi_value_options(list(args))) as ctx:
        request = reduction_request(dict(ctx.params))
    return {"patch_type": request.patch_type, **request.given}


def test_multi_value_flags_take_negative_numbers():
    assert expand_multi_value_options(["--tome-r", "16", "-1.0", "--device", "cpu"]) == [
        "--tome-r=16", "--tome-r=-1.0", "--device", "cpu"]
    assert expand_multi_value_options(["--selected-layers", "1", "5", "7", "x"]) == [
        "--selected-layers=1", "--selected-layers=5", "--selected-layers=7", "x"]
    assert expand_multi_value_options(["--threshold", "0.9", "1"]) == ["--threshold", "0.9", "1"]


def test_every_option_of_every_patch_type_has_one_flag():
    flags = [f.flag for f in reduction_flags()]
    assert len(flags) == len(set(flags))
    assert {"--selected-layers", "--merging-window-size", "--threshold", "--algm-prop-attn", "--tome-r",
            "--tome-prop-attn", "--tome-sublayer-ratio"} <= set(flags)
    assert len(flags) == sum(len(cls.options) for cls in PATCH_TYPES.values())


@pytest.mark.parametrize("args,want", [
    (["--patch-type", "tome", "--tome-r", "8"], {"patch_type": "tome", "tome": {"r": 8}}),
    (["--patch-type", "tome", "--tome-r", "16", "-1.0", "--no-tome-prop-attn"],
     {"patch_type": "tome", "tome": {"r": (16, -1.0), "prop_attn": False}}),
    (["--tome-r", "16", "14", "12", "--tome-prop-attn"], {"patch_type": None, "tome": {"r": [16, 14, 12], "prop_attn": True}}),
    (["--patch-type", "tome_sublayer", "--tome-sublayer-ratio", "0.3"], {"patch_type": "tome_sublayer", "tome_sublayer": {"ratio": 0.3}}),
    (["--patch-type", "algm", "--selected-layers", "1", "5", "--merging-window-size", "2", "1", "--threshold", "0.9",
      "--algm-prop-attn"], {"patch_type": "algm", "algm": {"selected_layers": [1, 5], "window_size": (2, 1),
                                                           "threshold": 0.9, "prop_attn": True}}),
    ([], {"patch_type": None}),
])
def test_generated_options_parse(args, want):
    assert parsed(*args) == want


def test_a_fractional_r_on_the_command_line_is_refused():
    with pytest.raises(UsageError, match="--tome-r: 8.5 is not a whole number of tokens"):
        parsed("--tome-r", "8.5")


def resolve(args: list[str], variant: dict | None = None) -> tuple:
    with flops_cli.make_context("segm.flops", expand_multi_value_options(args)) as ctx:
        return resolve_reduction(reduction_request(dict(ctx.params)), variant)


TOME_VARIANT = {"token_reduction": {"patch_type": "tome", "settings": {"r": 4, "prop_attn": False}}}
PUBLISHED_ALGM_VARIANT = {"dataset_kwargs": {"patch_type": "algm", "selected_layers": (1, 5), "merging_window_size": [2, 2],
                                             "threshold": 0.9, "crop_size": 512}}


@pytest.mark.parametrize("args,variant,want", [
    ([], None, ("pure", {}, False)),
    ([], TOME_VARIANT, ("tome", {"r": 4, "prop_attn": False}, True)),
    (["--tome-r", "8"], TOME_VARIANT, ("tome", {"r": 8, "prop_attn": False}, True)),
    (["--patch-type", "tome"], TOME_VARIANT, ("tome", {}, False)),
    (["--patch-type", "pure"], TOME_VARIANT, ("pure", {}, False)),
    ([], PUBLISHED_ALGM_VARIANT, ("algm", {"selected_layers": (1, 5), "window_size": [2, 2], "threshold": 0.9}, True)),
    ([], {"dataset_kwargs": {"patch_type": "pure", "threshold": None}}, ("pure", {}, True)),
])
def test_the_patch_type_comes_from_the_flag_then_the_variant(args, variant, want):
    assert resolve(args, variant) == want


@pytest.mark.parametrize("args,variant,message", [
    (["--patch-type", "algm", "--tome-r", "8"], None,
     "--tome-r (an option of --patch-type tome) given, but the patch type is algm"),
    (["--threshold", "0.9"], TOME_VARIANT,
     "--threshold (an option of --patch-type algm) given, but the patch type is tome (recorded in variant.yml; "
     "--patch-type chooses another)"),
    (["--tome-sublayer-ratio", "0.2"], None,
     "--tome-sublayer-ratio (an option of --patch-type tome_sublayer) given, but the patch type is pure"),
])
def test_an_option_of_another_method_is_an_error(args, variant, message):
    with pytest.raises(UsageError) as err:
        resolve(args, variant)
    assert str(err.value) == message


def test_variant_entries_round_trip_through_yaml():
    for settings in ({"r": [16, 14, 13, 0], "prop_attn": True}, {"ratio": 0.3}, {}):
        entry = {"token_reduction": variant_entry("tome", settings)}
        assert variant_token_reduction(yaml.safe_load(yaml.safe_dump(entry))) == ("tome", settings)
    assert variant_token_reduction({"net_kwargs": {}}) is None


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    torch.manual_seed(0)
    net = tiny_net_kwargs("mask_transformer", n_cls=16, crop=64)
    return write_checkpoint(tmp_path_factory.mktemp("model"), perturb_(create_segmenter(net)), net).parent


def gflops(result) -> float:
    assert result.exit_code == 0, result.output
    return float([line for line in result.stdout.splitlines() if line.startswith("GFlops: ")][0].split()[1])


def test_flops_counts_every_patch_type_with_the_same_counter(model_dir):
    args = ["--model-dir", str(model_dir), "--dataset", "synthetic", "--max-images", "1", "--device", "cpu"]
    pure = gflops(CliRunner().invoke(flops_cli, args))
    tome = CliRunner().invoke(flops_cli, [*args, "--patch-type", "tome", "--tome-r", "4", "--breakdown"])
    sublayer = CliRunner().invoke(flops_cli, [*args, "--patch-type", "tome_sublayer", "--tome-sublayer-ratio", "0.3",
                                              "--breakdown"])
    assert 0 < gflops(tome) < pure and 0 < gflops(sublayer) < pure
    # 17 tokens enter block 1 (16 patches + class token); ToMe keeps 17 - 4 after each block, the residual
    # stream of tome_sublayer never shrinks while its attention and MLP see int(17 * 0.3) = 5 fewer tokens.
    assert "| encoder block 1 | 17.0 / 17.0 / 13.0 |" in tome.stdout
    assert "| encoder block 2 | 13.0 / 13.0 / 9.0 |" in tome.stdout
    assert "| encoder block 1 | 17.0 / 12.0 / 12.0 |" in sublayer.stdout
    summary = json.loads(tome.stdout.splitlines()[-2])
    assert summary["patch_type"] == "tome" and summary["settings"] == {"r": 4, "prop_attn": True}


def test_speedtest_compares_any_two_patch_types(model_dir):
    args = ["--model-dir", str(model_dir), "--iters", "2", "--warmup", "1", "--repeat", "2", "--device", "cpu"]
    result = CliRunner().invoke(speedtest_cli, [*args, "--compare", "pure,tome", "--tome-r", "4"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert set(summary["fps"]) == {"pure", "tome"}
    assert "FPS pure: " in result.stdout and "FPS tome: " in result.stdout


def test_speedtest_compare_on_random_weights_takes_spaced_names():
    result = CliRunner().invoke(speedtest_cli, ["--backbone", "vit_tiny_patch16_384", "--crop-size", "32", "--iters", "1",
                                                "--warmup", "0", "--repeat", "1", "--device", "cpu",
                                                "--compare", "pure, tome"])
    assert result.exit_code == 0, result.output
    assert set(json.loads(result.stdout.strip().splitlines()[-1])["fps"]) == {"pure", "tome"}


@pytest.mark.parametrize("extra,message", [
    (["--compare", "pure,nope"], "--compare: unknown patch type 'nope'; known patch types: pure, algm, tome"),
    (["--compare", "pure"], "--compare takes two different patch types, e.g. pure,tome; got 'pure'"),
    (["--compare", "pure,tome", "--patch-type", "tome"], "--compare names the patch types to time; drop --patch-type"),
    (["--compare", "pure,tome", "--threshold", "0.9"],
     "--threshold (an option of --patch-type algm) given, but --compare times pure and tome"),
    (["--patch-type", "tome", "--tome-r", "-1"], "r must be an int >= 0"),
])
def test_speedtest_reduction_errors_are_one_line(model_dir, extra, message):
    result = CliRunner().invoke(speedtest_cli, ["--model-dir", str(model_dir), "--iters", "1", "--warmup", "0",
                                                "--repeat", "1", "--device", "cpu", *extra])
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith("error: ") and message in result.stderr and len(result.stderr.splitlines()) == 1


def test_a_trained_patch_type_is_recorded_and_used_by_later_commands(tmp_path):
    run = tmp_path / "run"
    base = ["--dataset", "synthetic", "--backbone", "vit_tiny_patch16_384", "--decoder", "linear", "--no-pretrained",
            "--im-size", "64", "--crop-size", "64", "--window-size", "64", "--window-stride", "64", "--batch-size", "4",
            "--epochs", "1", "--num-workers", "0", "--device", "cpu", "--max-images", "8"]
    run_module("segm.train", "--log-dir", str(run), *base, "--patch-type", "tome", "--tome-r", "4", "--no-tome-prop-attn")
    variant = yaml.safe_load((run / "variant.yml").read_text())
    assert variant["token_reduction"] == {"patch_type": "tome", "settings": {"r": 4, "prop_attn": False}}
    result = CliRunner().invoke(miou_cli, [str(run / "checkpoint.pth"), "synthetic", "--im-size", "64", "--device", "cpu",
                                           "--window-batch-size", "1"])
    assert result.exit_code == 0, result.output
    assert ("note: using the patch type recorded in variant.yml: tome (r=4, prop_attn=False); "
            "--patch-type chooses another") in result.stderr
