"""segm.compare end to end on a tiny checkpoint and the synthetic dataset: the table against the JSON lines,
figures equal to the separate commands', resume, the plot, and one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from segm.compare import main as compare_cli
from segm.eval.miou import main as miou_cli
from segm.flops import main as flops_cli
from segm.model.factory import create_segmenter
from tests.conftest import perturb_, tiny_net_kwargs, write_checkpoint

FAST = ["--max-images", "2", "--repeat", "2", "--warmup", "1", "--iters", "2", "--device", "cpu", "--num-workers", "0"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    net = tiny_net_kwargs("mask_transformer", n_cls=16, crop=64)
    return write_checkpoint(tmp_path_factory.mktemp("model"), perturb_(create_segmenter(net)), net)


@pytest.fixture(scope="module")
def compared(checkpoint, tmp_path_factory) -> tuple[Path, list[dict]]:
    out = tmp_path_factory.mktemp("compare") / "out"
    sweep = out.parent / "sweep.yml"
    sweep.write_text("tome: [{r: 2}, {r: 4}]\n")
    result = CliRunner().invoke(compare_cli, [str(checkpoint), "synthetic", "--out", str(out), "--methods", "pure,tome,cts",
                                              "--sweep", str(sweep), *FAST])
    assert result.exit_code == 0, result.output
    assert "note: skipping cts: patch type 'cts' needs a model with a policy network" in result.stderr
    return out, [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]


def test_one_line_per_point_and_a_table_row_each(compared):
    out, records = compared
    assert [(r["method"], r["settings"]) for r in records] == [
        ("pure", {}), ("tome", {"r": 2, "prop_attn": True}), ("tome", {"r": 4, "prop_attn": True})]
    pure = records[0]
    assert pure["speedup"] == 1.0 and all(r["speedup"] > 0 for r in records)
    rows = [line for line in (out / "results.md").read_text().splitlines()[2:]]
    assert len(rows) == 3
    by_gflops = [records[0], *sorted(records[1:], key=lambda r: r["gflops"])]
    for row, record in zip(rows, by_gflops):
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert cells[0] == record["method"]
        assert float(cells[2]) == pytest.approx(record["mean_iou"], abs=0.005)
        assert float(cells[4]) == pytest.approx(record["gflops"], rel=1e-3)
        assert float(cells[5]) == pytest.approx(record["gflops"] / pure["gflops"], abs=5e-4)
        assert float(cells[6]) == pytest.approx(record["fps"], rel=1e-3)
        assert float(cells[7]) == pytest.approx(record["speedup"], abs=5e-4)
        assert cells[10] == f"{record['tokens']['encoder block 1'][0]} / {record['tokens']['encoder block 12'][0]}"
    assert records[2]["tokens"]["encoder block 2"][0] == 17 - 4  # 16 patches + cls, 4 merged in block 1


def test_figures_equal_the_separate_commands(compared, checkpoint):
    _, records = compared
    tome = records[2]
    flops = CliRunner().invoke(flops_cli, ["--model-dir", str(checkpoint.parent), "--dataset", "synthetic", "--max-images", "2",
                                           "--device", "cpu", "--patch-type", "tome", "--tome-r", "4"])
    assert flops.exit_code == 0, flops.output
    assert float(flops.stdout.split("GFlops: ")[1]) == pytest.approx(tome["gflops"], abs=1e-4)
    miou = CliRunner().invoke(miou_cli, [str(checkpoint), "synthetic", "--device", "cpu", "--frac-dataset", str(2 / 64),
                                         "--patch-type", "tome", "--tome-r", "4", "--num-workers", "0"])
    assert miou.exit_code == 0, miou.output
    assert float(miou.stdout.split("mean_iou: ")[1].split()[0]) == pytest.approx(tome["mean_iou"], abs=1e-6)


def test_protocol_card_and_plot(compared):
    out, _ = compared
    card = (out / "protocol.md").read_text()
    for entry in ("| dataset | synthetic |", "| dtype | fp32 |", "| batch | 1 image x 2 copies |", "| torch | ",
                  "| counter | fvcore"):
        assert entry in card
    assert (out / "pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_rerun_adds_nothing(compared, checkpoint):
    out, records = compared
    sweep = out.parent / "sweep.yml"
    result = CliRunner().invoke(compare_cli, [str(checkpoint), "synthetic", "--out", str(out), "--methods", "pure,tome",
                                              "--sweep", str(sweep), *FAST])
    assert result.exit_code == 0, result.output
    assert "3 of 3 points already in" in result.stderr
    assert len((out / "results.jsonl").read_text().splitlines()) == len(records)


def test_results_of_another_checkpoint_are_kept_unless_overwrite(compared, tmp_path):
    out, records = compared
    torch.manual_seed(1)
    net = tiny_net_kwargs("linear", n_cls=16, crop=64)
    other = write_checkpoint(tmp_path / "other", create_segmenter(net), net)
    result = CliRunner().invoke(compare_cli, [str(other), "synthetic", "--out", str(out), "--methods", "pure", *FAST])
    assert result.exit_code == 2
    assert result.stderr.startswith(f"error: {out} holds results of another checkpoint (")
    assert len((out / "results.jsonl").read_text().splitlines()) == len(records)


@pytest.mark.parametrize("args,sweep,message", [
    (["--methods", "pure,nope"], None, "--methods: unknown method 'nope'; known: pure, algm, tome"),
    (["--methods", "tome"], "tome: [{rr: 3}]", "patch type 'tome' has no option rr; its options: r, prop_attn"),
    (["--methods", "tome"], "nope: [{}]", "unknown method 'nope'"),
    (["--methods", "tome"], "tome: {r: 3}", "a sweep file maps method names to lists of option dicts"),
    (["--methods", "tome"], "tome: [{r: -1}]", "r must be an int >= 0"),
])
def test_bad_input_is_one_line(checkpoint, tmp_path, args, sweep, message):
    extra = []
    if sweep is not None:
        (tmp_path / "sweep.yml").write_text(sweep)
        extra = ["--sweep", str(tmp_path / "sweep.yml")]
    result = CliRunner().invoke(compare_cli, [str(checkpoint), "synthetic", "--out", str(tmp_path / "out"), *args, *extra, *FAST])
    assert result.exit_code == 2, result.output
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1
