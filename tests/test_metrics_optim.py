"""Metrics against a brute-force mmseg-style computation, the polynomial schedule, distributed env parsing."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from segm.metrics import confusion_matrix, scores_from_confusion
from segm.model.factory import create_segmenter
from segm.optim import PolynomialLR, create_optimizer
from segm.utils.checkpoint import save_atomic
from segm.utils.distributed import detect_env, first_host, slurm_port
from tests.conftest import tiny_net_kwargs


def brute_scores(preds, gts, n_cls, ignore=255):
    """mmseg 0.14 mean_iou, written with loops over images and classes."""
    inter = np.zeros(n_cls)
    union = np.zeros(n_cls)
    pred_area = np.zeros(n_cls)
    label_area = np.zeros(n_cls)
    for pred, gt in zip(preds, gts):
        mask = gt != ignore
        p, g = pred[mask], gt[mask]
        for c in range(n_cls):
            i = np.sum((p == c) & (g == c))
            inter[c] += i
            pred_area[c] += np.sum(p == c)
            label_area[c] += np.sum(g == c)
            union[c] += np.sum(p == c) + np.sum(g == c) - i
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = inter / union
        acc = inter / label_area
    return round(inter.sum() / label_area.sum() * 100, 2), round(np.nanmean(acc) * 100, 2), round(np.nanmean(iou) * 100, 2), iou


def test_scores_match_bruteforce_with_ignore_absent_and_false_positive_classes():
    rng = np.random.default_rng(0)
    n_cls = 6
    preds, gts = [], []
    for shape in ((17, 23), (31, 8), (5, 40)):
        gt = rng.integers(0, 4, size=shape)
        gt[rng.random(shape) < 0.2] = 255
        pred = rng.integers(0, 5, size=shape)
        preds.append(pred)
        gts.append(gt)
    conf = sum(confusion_matrix(torch.from_numpy(p), torch.from_numpy(g), n_cls) for p, g in zip(preds, gts))
    scores = scores_from_confusion(conf)
    aacc, macc, miou, iou = brute_scores(preds, gts, n_cls)
    assert scores["pixel_accuracy"] == aacc
    assert scores["mean_accuracy"] == macc
    assert scores["mean_iou"] == miou
    assert np.allclose(scores["cat_iou"], iou, equal_nan=True)
    assert scores["cat_iou"][4] == 0.0
    assert math.isnan(scores["cat_iou"][5])


def test_confusion_counts_exactly():
    pred = torch.tensor([[0, 1], [1, 2]])
    gt = torch.tensor([[0, 1], [255, 1]])
    conf = confusion_matrix(pred, gt, 3)
    assert conf.tolist() == [[1, 0, 0], [0, 1, 1], [0, 0, 0]]


def test_polynomial_lr_matches_reference_formula():
    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([param], lr=0.01)
    sched = PolynomialLR(opt, step_size=1, iter_warmup=0, iter_max=10, power=0.9, min_lr=1e-5)
    seen = []
    for _ in range(12):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    want = [0.01] + [(0.01 - 1e-5) * (1 - t / 10) ** 0.9 + 1e-5 for t in range(1, 11)]
    assert seen[:11] == pytest.approx(want)
    assert seen[11] == pytest.approx(1e-5)
    state = sched.state_dict()
    fresh = PolynomialLR(torch.optim.SGD([param], lr=0.01), 1, 0, 10, 0.9, 1e-5)
    fresh.load_state_dict(state)
    assert fresh.last_epoch == 12


def test_sgd_is_nesterov_and_weight_decay_groups():
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4))
    opt = create_optimizer(model, "sgd", lr=0.1, weight_decay=0.0)
    assert len(opt.param_groups) == 1 and opt.param_groups[0]["nesterov"] and opt.param_groups[0]["momentum"] == 0.9
    opt = create_optimizer(model, "sgd", lr=0.1, weight_decay=1e-4)
    decays = sorted((g["weight_decay"], len(g["params"])) for g in opt.param_groups)
    assert decays == [(0.0, 3), (1e-4, 1)]


def test_optimizer_holds_the_frozen_heads_in_the_reference_groups():
    model = create_segmenter(tiny_net_kwargs("linear", n_cls=5, crop=32))
    model.encoder.head.requires_grad_(False)
    opt = create_optimizer(model, "sgd", lr=0.1, weight_decay=1e-4)
    names = {id(p): n for n, p in model.named_parameters()}
    no_decay, decay = ([names[id(p)] for p in g["params"]] for g in opt.param_groups)
    assert [g["weight_decay"] for g in opt.param_groups] == [0.0, 1e-4]
    assert "encoder.head.weight" in decay and "encoder.head.bias" in no_decay
    expected_no_decay = [n for n, p in model.named_parameters()
                         if p.ndim <= 1 or n.endswith(".bias") or n in {"encoder.pos_embed", "encoder.cls_token"}]
    assert no_decay == expected_no_decay
    assert decay == [n for n, _ in model.named_parameters() if n not in expected_no_decay]
    assert len(create_optimizer(model, "adamw", lr=0.1, weight_decay=0.0).param_groups[0]["params"]) == len(names)


def test_detect_env_torchrun_slurm_and_single():
    env = detect_env({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "MASTER_ADDR": "h", "MASTER_PORT": "1234"})
    assert (env.rank, env.world_size, env.local_rank, env.master_addr, env.master_port, env.launcher) == (3, 4, 1, "h", 1234, "torchrun")
    slurm = {"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1",
             "SLURM_JOB_NODELIST": "gpu[007-009,012],cpu1", "SLURM_JOB_ID": "4242"}
    env = detect_env(slurm)
    assert (env.rank, env.world_size, env.local_rank, env.master_addr, env.launcher) == (5, 8, 1, "gpu007", "slurm")
    assert env.master_port == slurm_port("4242") == 24242
    assert detect_env({**slurm, "SLURM_JOB_ID": "4243"}).master_port != env.master_port
    assert detect_env({"SLURM_PROCID": "0", "SLURM_NTASKS": "1"}).launcher == "single"
    assert not detect_env({}).distributed
    assert first_host("node12") == "node12"


def test_save_atomic_never_leaves_a_truncated_file(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pth"
    save_atomic({"epoch": 1}, path)

    def broken_save(obj, f):
        f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_atomic({"epoch": 2}, path)
    monkeypatch.undo()
    assert torch.load(path) == {"epoch": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pth"]


def test_polynomial_lr_warmup_ramps_from_zero():
    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([param], lr=0.01)
    sched = PolynomialLR(opt, step_size=1, iter_warmup=4, iter_max=10, power=0.9, min_lr=0.0)
    seen = []
    for _ in range(6):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    peak = 0.01 * (1 - 4 / 10) ** 0.9
    assert seen == pytest.approx([0.0, peak / 4, peak / 2, 3 * peak / 4, peak, 0.01 * (1 - 5 / 10) ** 0.9])


def test_polynomial_lr_of_a_run_without_iterations_keeps_the_base_lr():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.01)
    PolynomialLR(opt, step_size=1, iter_warmup=0, iter_max=0, power=0.9, min_lr=1e-5)
    assert opt.param_groups[0]["lr"] == 0.01


def test_polynomial_lr_refuses_a_warmup_as_long_as_the_run():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.01)
    with pytest.raises(ValueError, match=r"warm-up \(10 iterations\) must be shorter than the run \(10 iterations\)"):
        PolynomialLR(opt, step_size=1, iter_warmup=10, iter_max=10, power=0.9)
