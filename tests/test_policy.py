"""CTS's policy network: the label rule, the training items, the labels CLI and the training CLI (exact resume)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from click.testing import CliRunner
from PIL import Image
from torch.utils.data import Dataset

from segm.data import DatasetError, EpochSampler, create_dataset
from segm.data.synthetic.write import write_layout
from segm.model.factory import load_policy_weights
from segm.model.policy_net import PolicyNet
from segm.policy import labels as labels_cli
from segm.policy import train as train_cli
from segm.policy.data import PolicyDataset, batch_stream, policy_loader
from segm.policy.labels import POLICY_RULES, PolicyRule, policy_labels, policy_rule
from tests.conftest import SUBPROCESS_ENV, kill_when, module_cmd, read_log, run_module

TRAIN = ["--dataset", "synthetic", "--no-pretrained", "--iters", "8", "--batch-size", "4", "--max-images", "10",
         "--log-every", "1", "--eval-every", "4", "--checkpoint-every", "3", "--seed", "0", "--device", "cpu",
         "--num-workers", "0"]


def brute_force(label: np.ndarray, cell: int, zero_is_ignore: bool, border_ignore: bool) -> np.ndarray:
    """The rule written out cell by cell on the set of values of each cell."""
    rows, cols = label.shape[0] // cell, label.shape[1] // cell
    out = np.zeros((rows, cols), dtype=np.uint8)
    for r in range(rows):
        for c in range(cols):
            values = set(label[r * cell:(r + 1) * cell, c * cell:(c + 1) * cell].ravel().tolist())
            if zero_is_ignore:
                values = {255 if v == 0 else v for v in values}
            on_ring = r in (0, rows - 1) or c in (0, cols - 1)
            if len(values) == 1:
                out[r, c] = 1
            elif border_ignore and on_ring and 255 in values and len(values) == 2:
                out[r, c] = 255
    return out


def hand_made() -> np.ndarray:
    """A 3 x 3 grid of 4 x 4 cells, one case per cell."""
    label = np.zeros((12, 12), dtype=np.uint8)
    cells = {
        (0, 0): np.full((4, 4), 3),                          # uniform
        (0, 1): np.full((4, 4), 255),                        # all ignore
        (0, 2): np.where(np.eye(4, dtype=bool), 255, 7),     # one class + ignore, on the border
        (1, 0): np.array([[1, 2] * 2] * 4),                  # two classes, on the border
        (1, 1): np.where(np.eye(4, dtype=bool), 255, 5),     # one class + ignore, inside
        (1, 2): np.where(np.eye(4, dtype=bool), 0, 9),       # 0 + one class: one class + ignore with zero -> ignore
        (2, 0): np.zeros((4, 4)),                            # all 0: uniform either way
        (2, 1): np.where(np.eye(4, dtype=bool), 255, 0),     # 0 + ignore: all ignore with zero -> ignore
        (2, 2): np.array([[4, 4, 6, 255]] * 4),              # two classes + ignore
    }
    for (r, c), block in cells.items():
        label[r * 4:(r + 1) * 4, c * 4:(c + 1) * 4] = block
    return label


def test_rule_on_hand_made_cells():
    label = hand_made()
    assert policy_labels(label, cell=4).tolist() == [[1, 1, 0], [0, 0, 0], [1, 0, 0]]
    assert policy_labels(label, cell=4, border_ignore=True).tolist() == [[1, 1, 255], [0, 0, 0], [1, 255, 0]]
    assert policy_labels(label, cell=4, zero_is_ignore=True).tolist() == [[1, 1, 0], [0, 0, 0], [1, 1, 0]]
    assert policy_labels(label, cell=4, zero_is_ignore=True, border_ignore=True).tolist() == [
        [1, 1, 255], [0, 0, 255], [1, 1, 0]]
    assert policy_labels(torch.from_numpy(label).long(), cell=4).tolist() == [[1, 1, 0], [0, 0, 0], [1, 0, 0]]


@pytest.mark.parametrize("zero_is_ignore", [False, True])
@pytest.mark.parametrize("border_ignore", [False, True])
def test_rule_matches_a_brute_force_count(zero_is_ignore, border_ignore):
    rng = np.random.default_rng(0)
    for trial in range(20):
        cell = int(rng.choice([4, 8, 32]))
        shape = (int(rng.integers(1, 5)) * cell + int(rng.integers(0, cell)), int(rng.integers(1, 5)) * cell)
        # few distinct values per cell so that uniform and one-class-plus-ignore cells are common
        coarse = rng.choice([0, 3, 255], size=(shape[0] // 2 + 1, shape[1] // 2 + 1), p=[0.2, 0.5, 0.3])
        label = np.kron(coarse, np.ones((2, 2), dtype=np.int64))[: shape[0], : shape[1]].astype(np.uint8)
        label[rng.random(shape) < 0.01 * trial] = rng.integers(0, 256)
        got = policy_labels(label, cell, zero_is_ignore, border_ignore)
        assert got.dtype == np.uint8 and got.shape == (shape[0] // cell, shape[1] // cell)
        np.testing.assert_array_equal(got, brute_force(label, cell, zero_is_ignore, border_ignore))


def test_rule_refuses_maps_it_cannot_read():
    with pytest.raises(ValueError, match="holds no whole 32x32 cell"):
        policy_labels(np.zeros((16, 64), dtype=np.uint8))
    with pytest.raises(ValueError, match="2-D"):
        policy_labels(np.zeros((1, 64, 64), dtype=np.uint8))


def test_dataset_table():
    assert policy_rule("ade20k") == policy_rule("ade20k_large") == PolicyRule(True, True, size=(512, 512))
    assert policy_rule("pascal_context") == policy_rule("pascal_context_59") == PolicyRule(True, False, short_side=512, crop=480)
    assert policy_rule("cityscapes") == PolicyRule(crop=768)
    assert policy_rule("synthetic") == PolicyRule(size=(128, 128))
    assert policy_rule("coco_stuff") == PolicyRule(size=(512, 512))
    assert "coco_stuff" not in POLICY_RULES
    with pytest.raises(ValueError, match="unknown dataset 'nope'"):
        policy_rule("nope")


def test_geometry_of_each_kind():
    gen = torch.Generator().manual_seed(0)
    image, label = torch.rand(3, 300, 400) * 255, torch.randint(0, 5, (300, 400), dtype=torch.uint8)
    out_image, out_label = policy_rule("ade20k").apply(image, label, gen)
    assert out_image.shape == (3, 512, 512) and out_label.shape == (512, 512) and out_label.dtype == torch.uint8
    assert set(out_label.unique().tolist()) <= set(label.unique().tolist())  # nearest: no new values
    rule = policy_rule("pascal_context")
    assert rule.apply(None, label)[1].shape == (512, 682)  # deterministic: the whole resized image
    out_image, out_label = rule.apply(image, label, gen)
    assert out_image.shape == (3, 480, 480) and out_label.shape == (480, 480)
    big = torch.randint(0, 19, (1024, 2048), dtype=torch.uint8)
    crops = [policy_rule("cityscapes").apply(None, big, torch.Generator().manual_seed(s))[1] for s in (1, 1, 2)]
    assert crops[0].shape == (768, 768) and torch.equal(crops[0], crops[1]) and not torch.equal(crops[0], crops[2])
    with pytest.raises(DatasetError, match="smaller than the 768x768 policy crop"):
        policy_rule("cityscapes").apply(None, label, gen)


def test_items_are_normalised_and_flip_reproducibly_from_the_seed():
    data = create_dataset("synthetic", "train", max_images=4)
    policy = PolicyDataset(data)
    raw_image = (torch.from_numpy(data.image(1)).permute(2, 0, 1).float() - 127.5) / 127.5
    raw_target = torch.from_numpy(policy_labels(data.raw_label(1))).long()
    flipped = set()
    for seed in range(16):
        image, target = policy[(1, seed)]
        assert image.dtype == torch.float32 and image.shape == (3, 128, 128)
        assert target.dtype == torch.int64 and target.shape == (4, 4)
        again = policy[(1, seed)]
        assert torch.equal(image, again[0]) and torch.equal(target, again[1])
        if torch.equal(image, raw_image):
            assert torch.equal(target, raw_target)
            flipped.add(False)
        else:
            assert torch.equal(image, raw_image.flip(-1))
            assert torch.equal(target, torch.from_numpy(policy_labels(data.raw_label(1)[:, ::-1].copy())).long())
            flipped.add(True)
    assert flipped == {False, True}
    assert image.min() >= -1 and image.max() <= 1
    val = PolicyDataset(create_dataset("synthetic", "val", max_images=2))
    assert not val.flip and torch.equal(val[0][0], val[(0, 123)][0])


class Keys(Dataset):
    def __len__(self) -> int:
        return 10

    def __getitem__(self, key):
        return torch.tensor(key)


def test_a_stream_started_part_way_yields_the_same_batches():
    def take(start: int, count: int) -> list[list]:
        loader = policy_loader(Keys(), 4, EpochSampler(Keys(), seed=3))
        stream = batch_stream(loader, start)
        return [next(stream).tolist() for _ in range(count)]

    full = take(0, 7)
    assert take(3, 4) == full[3:]
    assert take(4, 3) == full[4:]
    assert len({tuple(map(tuple, batch)) for batch in full}) == 7  # every epoch has its own order and seeds


def test_labels_cli_prints_one_table_and_writes_pngs(tmp_path):
    out = tmp_path / "out"
    result = CliRunner().invoke(labels_cli.main, ["synthetic", "--max-images", "4", "--out", str(out)])
    assert result.exit_code == 0, result.output
    data = create_dataset("synthetic", "train", max_images=4)
    expected = [policy_labels(data.raw_label(i)) for i in range(4)]
    counts = np.bincount(np.concatenate([e.ravel() for e in expected]), minlength=256)
    lines = result.output.splitlines()
    table = [line for line in lines if line.startswith("|")]
    assert table[0] == "| cells | count | share |" and len(table) == 6
    assert table[2] == f"| shareable (1) | {counts[1]} | {100 * counts[1] / 64:.2f} % |"
    assert table[3] == f"| not shareable (0) | {counts[0]} | {100 * counts[0] / 64:.2f} % |"
    assert table[4] == "| ignored (255) | 0 | 0.00 % |" and table[5] == "| total | 64 | 100.00 % |"
    written = sorted(p.name for p in out.iterdir())
    assert written == [f"train_{i:06d}.png" for i in range(4)]
    for i, want in enumerate(expected):
        np.testing.assert_array_equal(np.array(Image.open(out / f"train_{i:06d}.png")), want)


def test_labels_cli_on_files_refuses_to_write_into_the_dataset(tmp_path):
    root = tmp_path / "data"
    write_layout(root, "ade20k", {"train": 2, "val": 2})
    inside = root / "ade20k/ADEChallengeData2016/annotations/training"
    refused = CliRunner().invoke(labels_cli.main, ["ade20k", "--root", str(root), "--out", str(inside)])
    assert refused.exit_code == 2
    assert refused.output.strip().splitlines()[-1].startswith("error: --out ") and "choose a folder outside" in refused.output
    ok = CliRunner().invoke(labels_cli.main, ["ade20k", "--root", str(root), "--split", "val", "--out", str(tmp_path / "p")])
    assert ok.exit_code == 0, ok.output
    assert "| total | 512 | 100.00 % |" in ok.output  # 2 images resized to 512 x 512: 16 x 16 cells each
    assert np.array(Image.open(tmp_path / "p/val_000000.png")).shape == (16, 16)


@pytest.mark.parametrize("args,message", [
    (["--dataset", "nope"], "unknown dataset 'nope'; known datasets: ade20k"),
    (["--iters", "0"], "Invalid value for '--iters': 0 is not in the range x>=1"),
    (["--lr", "0"], "Invalid value for '--lr': 0.0 is not in the range x>0"),
    (["--batch-size", "16"], "--batch-size 16 is more than the 10 training images of synthetic"),
    (["--pretrained", "missing.pth", "--no-pretrained"], "exclude each other"),
])
def test_training_errors_are_one_line(tmp_path, args, message):
    result = CliRunner().invoke(train_cli.main, ["--log-dir", str(tmp_path / "run"), *TRAIN, *args])
    assert result.exit_code == 2, result.output
    assert result.output.strip().splitlines()[-1].lower().startswith("error: ") and message in result.output


def test_pretrained_weights_from_a_file_and_from_the_hub_offline(tmp_path, monkeypatch):
    source = timm.create_model("efficientnet_lite0")
    torch.save(source.state_dict(), tmp_path / "lite0.pth")
    net = PolicyNet()
    train_cli.read_backbone_weights(net.backbone, tmp_path / "lite0.pth")
    assert torch.equal(net.backbone.conv_stem.weight, source.conv_stem.weight)

    def offline(*args, **kwargs):
        if kwargs.get("pretrained"):
            raise OSError("no network")
        return create(*args, **kwargs)

    create = timm.create_model
    monkeypatch.setattr(timm, "create_model", offline)
    args = [a for a in TRAIN if a != "--no-pretrained"]
    result = CliRunner().invoke(train_cli.main, ["--log-dir", str(tmp_path / "run"), *args])
    assert result.exit_code == 2 and result.output.strip().splitlines()[-1].startswith("error: could not fetch")


def train_cmd(log_dir: Path, *extra: str) -> list[str]:
    return module_cmd("segm.policy.train", "--log-dir", str(log_dir), *TRAIN, *extra)


def run_train(log_dir: Path, *extra: str) -> subprocess.CompletedProcess:
    return run_module("segm.policy.train", "--log-dir", str(log_dir), *TRAIN, *extra, timeout=300)


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("policy") / "straight"
    run_train(run, "--num-workers", "0")
    return run


def test_training_writes_checkpoint_log_and_a_loadable_policynet(straight_run):
    assert sorted(p.name for p in straight_run.iterdir()) == ["checkpoint.pth", "log.txt", "policynet.pth"]
    log = read_log(straight_run)
    assert [rec["iteration"] for rec in log] == list(range(1, 9))
    assert [i + 1 for i, rec in enumerate(log) if "val_accuracy" in rec] == [4, 8]
    assert all(0 <= rec["val_accuracy"] <= 100 for rec in log if "val_accuracy" in rec)
    assert all(rec["learning_rate"] == 5e-5 and np.isfinite(rec["train_loss"]) for rec in log)
    ckpt = torch.load(straight_run / "checkpoint.pth", weights_only=True)
    assert {"model", "optimizer", "iteration", "rng_states", "sampler", "running"} <= set(ckpt)
    assert ckpt["iteration"] == 8 and ckpt["optimizer"]["param_groups"][0]["weight_decay"] == 1e-3
    net = PolicyNet()
    load_policy_weights(net, straight_run / "policynet.pth")
    assert all(torch.equal(v, ckpt["model"][k]) for k, v in net.state_dict().items())
    assert net(torch.zeros(1, 3, 64, 96))["logits"].shape == (1, 2, 2, 3)


def test_resume_after_sigkill_gives_the_same_losses(straight_run, tmp_path):
    crashed = tmp_path / "crashed"
    proc = subprocess.Popen(train_cmd(crashed, "--num-workers", "1"), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env=SUBPROCESS_ENV)
    kill_when(proc, (crashed / "checkpoint.pth").exists, timeout=200)
    assert not (crashed / "policynet.pth").exists()
    resumed = run_train(crashed, "--num-workers", "1")
    assert "Resuming from" in resumed.stdout
    want, got = read_log(straight_run), read_log(crashed)
    assert [rec["iteration"] for rec in got] == list(range(1, 9))
    assert [rec["train_loss"] for rec in got] == pytest.approx([rec["train_loss"] for rec in want], rel=1e-5)
    assert [rec.get("val_accuracy") for rec in got] == [rec.get("val_accuracy") for rec in want]
    final_want = torch.load(straight_run / "policynet.pth", weights_only=True)
    final_got = torch.load(crashed / "policynet.pth", weights_only=True)
    assert all(torch.allclose(final_got[k].float(), v.float(), atol=1e-6) for k, v in final_want.items())
    again = CliRunner().invoke(train_cli.main, ["--log-dir", str(crashed), *TRAIN, "--num-workers", "0"])
    assert again.exit_code == 0 and "Nothing to do" in again.output and len(read_log(crashed)) == 8


def test_a_non_finite_loss_ends_the_run_with_one_line(tmp_path):
    result = CliRunner().invoke(train_cli.main, ["--log-dir", str(tmp_path / "run"), *TRAIN, "--lr", "1e30"])
    assert result.exit_code == 3
    assert result.output.strip().splitlines()[-1].startswith("error: loss is ")
