"""Train CTS's policy network: ``python -m segm.policy.train --dataset ade20k --log-dir D``.

As CTS's ``policynet/train.py`` with its ``config.py``: AdamW (lr 5e-5, weight decay 1e-3, constant),
world batch 8, 50 000 iterations, horizontal flip, cross-entropy over the two classes with ignore 255,
the dataset's policy geometry and labels (:mod:`segm.policy.labels`). Validation is the per-cell accuracy
on the non-ignored cells of the val split, every ``--eval-every`` iterations and at the end.

Runs like ``segm.train``: one device, torchrun or SLURM (DDP; the world batch is split over the processes).
``D/checkpoint.pth`` is written atomically every ``--checkpoint-every`` iterations and at the end (model,
optimizer, iteration, random states, the running loss of the current log interval); the same command
restarted continues exactly where it stopped (mid-epoch too) and logs the same losses. ``D/log.txt`` gets
one JSON line per logged interval; ``D/policynet.pth`` is the trained ``PolicyNet.state_dict()`` (CTS's
``model.pth`` format), which ``segm.train --policynet-ckpt`` loads.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any, Callable

import click
import torch
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel

from segm.cli import POSITIVE, Command, device_option, fail_cleanly, resolve_device, root_option
from segm.data import EpochSampler, create_dataset, per_process_batch_size
from segm.data.loader import ShardSampler
from segm.data.transforms import IGNORE_INDEX
from segm.engine import NonFiniteLossError
from segm.model.weights import check_state_dict, read_checkpoint, to_float32
from segm.model.policy_net import PolicyNet
from segm.policy.data import PolicyDataset, batch_stream, iterations_per_epoch, policy_loader
from segm.utils import distributed
from segm.utils.checkpoint import gather_rng_states, prepare_log_dir, save_atomic, set_rng_states
from segm.utils.progress import progress
from tokred.errors import UsageError

def check_options(opts: dict[str, Any]) -> None:
    """One clear error for options that exclude each other (the ranges are the click types')."""
    if opts["pretrained"] and opts["no_pretrained"]:
        raise UsageError("--pretrained PATH and --no-pretrained exclude each other; give one")


def read_backbone_weights(backbone: nn.Module, path: Path) -> None:
    """Load ImageNet weights of ``efficientnet_lite0`` (timm names, ``.pth`` or ``.safetensors``) into ``backbone``.

    The classifier (``conv_head``, ``bn2``, ``classifier``) is not part of the feature backbone and is skipped;
    a trained ``policynet.pth`` also works (its ``backbone.*`` part is taken).
    """
    if not path.is_file():
        raise FileNotFoundError(f"pretrained weight file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        weights = load_file(str(path))
    else:
        weights = read_checkpoint(path)
        for key in ("model", "state_dict"):
            if isinstance(weights, dict) and key in weights:
                weights = weights[key]
    own = backbone.state_dict()
    for prefix in ("module.", "backbone."):
        weights = {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in weights.items()}
    weights = {k: v for k, v in weights.items() if k in own}
    check_state_dict(backbone, weights, f"pretrained weights {path} (efficientnet_lite0)")
    backbone.load_state_dict(to_float32(weights), strict=True)


def create_policy_net(pretrained: str | None, random_init: bool) -> PolicyNet:
    """A policy network: random, timm's ImageNet weights (``pretrained`` None) or a local weight file."""
    if random_init:
        return PolicyNet(pretrained=False)
    if pretrained is None:
        return PolicyNet(pretrained=True)
    net = PolicyNet(pretrained=False)
    read_backbone_weights(net.backbone, Path(pretrained))
    return net


@torch.no_grad()
def cell_accuracy(model: nn.Module, loader, device: torch.device, show_progress: bool) -> float:
    """Per-cell accuracy (percent, 2 decimals) on the non-ignored cells, summed over all processes."""
    model.eval()
    counts = torch.zeros(2, dtype=torch.int64, device=device)
    for images, labels in progress(loader, show_progress, desc="eval", leave=False):
        labels = labels.to(device)
        predicted = model(images.to(device))["logits"].argmax(1)
        kept = labels != IGNORE_INDEX
        counts += torch.stack([(predicted[kept] == labels[kept]).sum(), kept.sum()])
    correct, total = distributed.all_reduce_sum(counts).tolist()
    model.train()
    return round(100 * correct / total, 2) if total else float("nan")


def trim_log(log_path: Path, iteration: int) -> None:
    """Keep the ``log.txt`` lines up to ``iteration`` (later ones are redone by the resumed run)."""
    if not log_path.exists():
        return
    records = [json.loads(line) for line in log_path.read_text().splitlines() if line.strip()]
    tmp = log_path.with_name(".log.txt.tmp")
    tmp.write_text("".join(json.dumps(rec) + "\n" for rec in records if rec["iteration"] <= iteration))
    tmp.replace(log_path)


def resume(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, opts: dict[str, Any],
           env: distributed.DistEnv) -> tuple[int, torch.Tensor]:
    """Restore a run from ``checkpoint.pth``: returns the iterations done and the running loss totals."""
    data = read_checkpoint(path)
    if not isinstance(data, dict) or not {"model", "optimizer", "iteration", "sampler"} <= set(data):
        raise UsageError(f"{path} is not a policy training checkpoint; start a new --log-dir or pass --no-resume")
    try:
        check_state_dict(model, data["model"], str(path))
    except UsageError as err:
        raise UsageError(f"{err}; it was written for another model: start a new --log-dir or pass --no-resume") from None
    run = data["sampler"]
    for key, flag in (("dataset", "--dataset"), ("world_batch_size", "--batch-size"), ("seed", "--seed")):
        if run[key] != opts[key if key != "world_batch_size" else "batch_size"]:
            raise UsageError(f"{path} was trained with {flag} {run[key]}; resume with the same value, "
                             "or start a new --log-dir or pass --no-resume")
    model.load_state_dict(data["model"])
    optimizer.load_state_dict(data["optimizer"])
    for group in optimizer.param_groups:
        group.update(lr=opts["lr"], weight_decay=opts["weight_decay"])
    states = data.get("rng_states")
    if states and len(states) == env.world_size:
        set_rng_states(states[env.rank])
    running = data["running"].clone() if env.is_main else torch.zeros(2, dtype=torch.float64)
    iteration = int(data["iteration"])
    if env.is_main:
        trim_log(opts["log_dir"] / "log.txt", iteration)
        click.echo(f"Resuming from {path} at iteration {iteration}")
    return iteration, running


def world_running(running: torch.Tensor, device: torch.device, is_main: bool) -> torch.Tensor:
    """The loss totals of all processes, held by the main process (others restart from zero)."""
    total = distributed.all_reduce_sum(running.to(device, copy=True)).cpu()
    return total if is_main else torch.zeros_like(total)


@click.command(cls=Command)
@click.option("--log-dir", type=click.Path(path_type=Path), required=True, help="Output folder (created).")
@click.option("--dataset", type=str, required=True, help="Dataset key of config.yml (ade20k, cityscapes, synthetic, ...).")
@root_option
@click.option("--iters", type=POSITIVE, default=50_000, show_default=True, help="Training iterations.")
@click.option("--batch-size", type=POSITIVE, default=8, show_default=True, help="World batch size (split over the processes).")
@click.option("--lr", type=click.FloatRange(0, min_open=True), default=5e-5, show_default=True, help="AdamW learning rate (constant).")
@click.option("--weight-decay", type=click.FloatRange(0), default=1e-3, show_default=True, help="AdamW weight decay.")
@click.option("--eval-every", type=POSITIVE, default=10_000, show_default=True, help="Validate every N iterations and at the end.")
@click.option("--log-every", type=POSITIVE, default=100, show_default=True, help="One log.txt line every N iterations.")
@click.option("--checkpoint-every", type=POSITIVE, default=1000, show_default=True, help="Write checkpoint.pth every N iterations and at the end.")
@click.option("--pretrained", type=click.Path(path_type=str), default=None,
              help="Local ImageNet weights of efficientnet_lite0 (.pth/.safetensors; default: timm hub weights).")
@click.option("--no-pretrained", is_flag=True, default=False, help="Random initialisation of the backbone.")
@click.option("--num-workers", type=click.IntRange(0), default=4, show_default=True, help="Data-loading processes per GPU.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--max-images", type=POSITIVE, default=None, help="Use only the first N images of each split (quick checks).")
@click.option("--resume/--no-resume", default=True, show_default=True, help="Resume from LOG_DIR/checkpoint.pth.")
@device_option
@fail_cleanly
def main(**opts: Any) -> None:
    """Train CTS's policy network and write LOG_DIR/policynet.pth."""
    check_options(opts)
    requested = resolve_device(opts.pop("device"))
    env = distributed.init_distributed(requested)
    device = distributed.process_device(requested, env)
    torch.backends.cudnn.benchmark = device.type == "cuda"  # fixed input sizes
    try:
        train(opts, env, device)
    except NonFiniteLossError as err:
        click.echo(f"error: {err}", err=True)
        sys.exit(3)
    finally:
        distributed.destroy()


def train(opts: dict[str, Any], env: distributed.DistEnv, device: torch.device) -> None:
    log_dir: Path = opts["log_dir"]
    main_process = env.is_main
    if main_process:
        prepare_log_dir(log_dir)
    distributed.barrier()
    seed, name = opts["seed"], opts["dataset"]
    batch = per_process_batch_size(opts["batch_size"], env.world_size)
    splits = {split: PolicyDataset(create_dataset(name, split, root=opts["root"], seed=seed, max_images=opts["max_images"]))
              for split in ("train", "val")}
    pin = device.type == "cuda"
    sampler = EpochSampler(splits["train"], env.world_size, env.rank, seed=seed)
    train_loader = policy_loader(splits["train"], batch, sampler, num_workers=opts["num_workers"], seed=seed,
                                 rank=env.rank, pin_memory=pin)
    val_loader = policy_loader(splits["val"], batch, ShardSampler(len(splits["val"]), env.world_size, env.rank),
                               num_workers=min(opts["num_workers"], 2), seed=seed, rank=env.rank, pin_memory=pin)
    if iterations_per_epoch(train_loader) == 0:
        raise UsageError(f"--batch-size {opts['batch_size']} is more than the {len(splits['train'])} training images of "
                         f"{name}; use a smaller batch or more images")

    checkpoint_path = log_dir / "checkpoint.pth"
    resuming = opts["resume"] and checkpoint_path.exists()
    torch.manual_seed(seed)
    model = create_policy_net(opts["pretrained"], random_init=opts["no_pretrained"] or resuming).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=opts["lr"], weight_decay=opts["weight_decay"])
    start, running = 0, torch.zeros(2, dtype=torch.float64)  # (loss sum, iterations) of the current log interval
    if resuming:
        start, running = resume(checkpoint_path, model, optimizer, opts, env)
    total = opts["iters"]
    if main_process:
        click.echo(f"Policy network on {name}: {len(splits['train'])} train / {len(splits['val'])} val images, "
                   f"{splits['train'].rule.describe()}; world batch {opts['batch_size']} on {env.world_size} "
                   f"process(es) ({env.launcher}), {total} iterations, AdamW lr {opts['lr']} wd {opts['weight_decay']}")
        if start >= total:
            click.echo(f"Nothing to do: {checkpoint_path} already holds iteration {start} of {total}.")

    net = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None) if env.distributed else model
    criterion = nn.CrossEntropyLoss(ignore_index=IGNORE_INDEX)
    stream = batch_stream(train_loader, start)
    model.train()
    bar = progress(range(start, total), main_process, initial=start, total=total, desc="policy")
    say: Callable[[str], None] = bar.write if hasattr(bar, "write") else click.echo
    for iteration in bar:
        images, labels = next(stream)
        loss = criterion(net(images.to(device, non_blocking=True))["logits"], labels.to(device, non_blocking=True))
        value = loss.item()
        if not math.isfinite(value):
            raise NonFiniteLossError(f"loss is {value} at iteration {iteration + 1}; stopping "
                                     "(checkpoint.pth still holds the last checkpoint)")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        running += torch.tensor([value, 1.0], dtype=torch.float64)
        done = iteration + 1
        if hasattr(bar, "set_postfix"):
            bar.set_postfix(loss=f"{value:.4f}")
        evaluating = done % opts["eval_every"] == 0 or done == total
        if done % opts["log_every"] == 0 or evaluating:
            totals = distributed.all_reduce_sum(running.to(device, copy=True)).cpu()
            running.zero_()
            record = {"iteration": done, "train_loss": totals[0].item() / totals[1].item(),
                      "learning_rate": optimizer.param_groups[0]["lr"]}
            if evaluating:
                record["val_accuracy"] = cell_accuracy(model, val_loader, device, main_process)
            if main_process:
                with open(log_dir / "log.txt", "a") as f:
                    f.write(json.dumps(record) + "\n")
                say(f"iteration {done}/{total}: train_loss {record['train_loss']:.4f}"
                    + (f", val cell accuracy {record['val_accuracy']} %" if evaluating else ""))
        if done % opts["checkpoint_every"] == 0 or done == total:
            running = world_running(running, device, main_process)
            snapshot = {
                "model": model.state_dict(), "optimizer": optimizer.state_dict(), "iteration": done,
                "rng_states": gather_rng_states(env), "running": running,
                "sampler": {"dataset": name, "seed": seed, "world_batch_size": opts["batch_size"],
                            "world_size": env.world_size},
            }
            if main_process:
                save_atomic(snapshot, checkpoint_path)
    if env.distributed:
        if not distributed.replicas_identical(model):
            raise RuntimeError("the processes ended with different weights: the data-parallel run is broken")
        if main_process:
            click.echo(f"Weights identical on all {env.world_size} processes")
    if main_process:
        save_atomic(model.state_dict(), log_dir / "policynet.pth")
        click.echo(f"Saved the policy network: {log_dir / 'policynet.pth'}")
    distributed.barrier()


if __name__ == "__main__":
    main()
