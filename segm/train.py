"""Train Segmenter or SegFormer, with any patch type: ``python -m segm.train --log-dir D --dataset ade20k ...``.

Runs on one device, under torchrun or under SLURM (one task per GPU). The run owns its folder (a file
lock); everything is checked before the first iteration (options, disk space, the first validation
image). The run's patch type and its settings go to ``variant.yml``; a resumed run without
``--patch-type`` keeps them, and a resumed run with other settings is refused but for a few safe ones.
Every epoch writes ``checkpoint.pth`` atomically, evaluates every ``eval_freq`` epochs, appends a JSON
line to ``log.txt`` and keeps a single ``best_checkpoint.pth``; SIGTERM or SIGINT finish the iteration,
write a mid-epoch checkpoint and exit with status 75; the same command restarted resumes exactly.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click
import torch
import yaml
from torch.nn.parallel import DistributedDataParallel

from segm.cli import (
    POSITIVE,
    PROBABILITY,
    Command,
    ReductionRequest,
    apply_requested_reduction,
    device_option,
    fail_cleanly,
    reduction_request,
    resolve_device,
    root_option,
    token_reduction_options,
    window_options,
)
from segm.config import training_defaults
from segm.data import STATS, create_dataset, create_loader, per_process_batch_size
from segm.engine import NonFiniteLossError, StopRequest, evaluate, train_one_epoch
from segm.model.factory import POLICY_METHODS, create_segmenter, load_policy_weights, load_variant, net_kwargs_for
from segm.model.token_reduction import variant_entry
from segm.model.weights import check_state_dict, read_checkpoint, to_float32
from segm.optim import PolynomialLR, create_optimizer
from segm.run_dir import RunLock, check_free_space, earlier_run_files, move_aside, remove_stale_temporaries
from segm.runtime import DTYPES, autocast_context
from segm.utils import distributed
from segm.utils.checkpoint import (
    gather_objects,
    gather_rng_states,
    prepare_log_dir,
    save_atomic,
    set_rng_states,
    tensor_bytes,
)
from tokred.errors import UsageError

AMP_DTYPES = {name: dtype for name, dtype in DTYPES.items() if dtype is not None}
EXIT_STOPPED = 75  # EX_TEMPFAIL: stopped on request, run the same command again to continue
# Settings a resumed run may change; anything else in variant.yml must be as the run started.
SAFE_CHANGES = ("algorithm_kwargs.num_epochs", "optimizer_kwargs.epochs", "optimizer_kwargs.iter_max",
                "algorithm_kwargs.eval_freq", "inference_kwargs.")
NOT_SETTINGS = ("resume", "log_dir", "version", "dataset_kwargs.num_workers", "algorithm_kwargs.start_epoch",
                "net_kwargs.policynet_ckpt")


def build_variant(opts: dict[str, Any], world_size: int) -> dict[str, Any]:
    """The run's configuration in the reference's ``variant.yml`` layout (plus seed and AMP dtype)."""
    ds = training_defaults(opts["backbone"], opts["dataset"])

    def pick(key: str, default: Any) -> Any:
        return default if opts[key] is None else opts[key]

    im_size = pick("im_size", ds["im_size"])
    crop_size = pick("crop_size", ds.get("crop_size", im_size))
    world_batch = pick("batch_size", ds["batch_size"])
    batch = per_process_batch_size(world_batch, world_size)
    epochs = pick("epochs", ds["epochs"])
    net = net_kwargs_for(
        opts["backbone"], opts["decoder"], n_cls=0, crop_size=crop_size, dropout=opts["dropout"],
        drop_path_rate=opts["drop_path"], normalization=opts["normalization"],
    )
    if opts["policy_method"] or opts["policynet_ckpt"]:
        net["policy_method"] = opts["policy_method"] or "policy_net"
        net["policynet_ckpt"] = str(opts["policynet_ckpt"]) if opts["policynet_ckpt"] else None
    return {
        "world_batch_size": world_batch,
        "version": "normal",
        "resume": opts["resume"],
        "dataset_kwargs": {
            "dataset": opts["dataset"],
            "image_size": im_size,
            "crop_size": crop_size,
            "batch_size": batch,
            "normalization": net["normalization"],
            "split": "train",
            "num_workers": opts["num_workers"],
        },
        "algorithm_kwargs": {
            "batch_size": batch,
            "start_epoch": 0,
            "num_epochs": epochs,
            "eval_freq": pick("eval_freq", ds.get("eval_freq", 1)),
            "seed": opts["seed"],
        },
        "optimizer_kwargs": {
            "opt": pick("optimizer", ds["opt"]),
            "lr": pick("learning_rate", ds["learning_rate"]),
            "weight_decay": pick("weight_decay", ds["weight_decay"]),
            "momentum": 0.9,
            "clip_grad": opts["clip_grad"],
            "sched": opts["scheduler"],
            "epochs": epochs,
            "min_lr": pick("minlearning_rate", ds["min_lr"]),
            "poly_power": ds["poly_power"],
            "poly_step_size": 1,
            "iter_warmup": float(pick("warmup_iters", ds["warmup_iters"])),
            "head_lr_mult": ds["head_lr_mult"],
        },
        "net_kwargs": net,
        "amp": opts["amp"],
        "amp_dtype": opts["amp_dtype"],
        "log_dir": str(opts["log_dir"]),
        "inference_kwargs": {
            "im_size": im_size,
            "window_size": pick("window_size", ds.get("window_size", im_size)),
            "window_stride": pick("window_stride", ds.get("window_stride", im_size)),
        },
    }


def reconcile_log(log_path: Path, start_epoch: int, last_record: dict[str, Any] | None) -> None:
    """Keep ``log.txt`` lines of epochs before ``start_epoch`` (re-adding the checkpoint's own epoch if lost)."""
    lines = [json.loads(line) for line in log_path.read_text().splitlines() if line.strip()] if log_path.exists() else []
    kept = [rec for rec in lines if rec.get("epoch", -1) < start_epoch]
    if last_record is not None and not any(rec.get("epoch") == last_record["epoch"] for rec in kept):
        kept.append(last_record)
    tmp = log_path.with_name(".log.txt.tmp")
    tmp.write_text("".join(json.dumps(rec) + "\n" for rec in kept))
    tmp.replace(log_path)




def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested settings as ``{"a.b": value}`` with tuples as lists, for comparison."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = list(value) if isinstance(value, tuple) else value
    return flat


def resume_differences(saved: dict[str, Any], current: dict[str, Any]) -> tuple[list[str], list[str]]:
    """``(refused, allowed)`` descriptions of the settings that differ between ``variant.yml`` and the command.

    Keys the saved variant does not record (older files) are not compared.
    """
    old, new = flatten(saved), flatten(current)
    refused, allowed = [], []
    for key in sorted(set(old) & set(new)):
        if key.startswith(NOT_SETTINGS) or old[key] == new[key]:
            continue
        text = f"{key}: {old[key]!r} -> {new[key]!r}"
        (allowed if key.startswith(SAFE_CHANGES) else refused).append(text)
    return refused, allowed


@dataclass
class RunFolder:
    """The run's files, whether it continues an earlier run, and that run's ``variant.yml`` (read once)."""

    log_dir: Path
    resuming: bool
    lock: RunLock | None = None
    saved_variant: dict[str, Any] | None = None

    @property
    def checkpoint(self) -> Path:
        return self.log_dir / "checkpoint.pth"

    @property
    def variant(self) -> Path:
        return self.log_dir / "variant.yml"

    @property
    def best(self) -> Path:
        return self.log_dir / "best_checkpoint.pth"


def open_folder(opts: dict[str, Any], env: distributed.DistEnv) -> RunFolder:
    """Create and lock ``--log-dir`` (rank 0), clean up partial files, and decide between resume and start.

    ``--no-resume`` on a folder that holds a run refuses unless ``--overwrite``, which moves the old
    files aside; nothing is ever deleted.
    """
    log_dir: Path = opts["log_dir"]
    folder = RunFolder(log_dir, False)
    lock = None
    if env.is_main:
        prepare_log_dir(log_dir)
        lock = RunLock(log_dir).acquire()
        remove_stale_temporaries(log_dir)
        if not opts["resume"] and folder.checkpoint.exists():
            if not opts["overwrite"]:
                lock.release()
                raise UsageError(f"--no-resume: {log_dir} holds a run ({', '.join(p.name for p in earlier_run_files(log_dir))}); "
                                 "add --overwrite to move it to old-<time>/ inside the folder and start over, or "
                                 "choose another --log-dir")
            moved = move_aside(log_dir)
            click.echo(f"Moved the earlier run to {moved}")
    distributed.barrier()
    folder.lock = lock
    folder.resuming = opts["resume"] and folder.checkpoint.exists()
    if folder.resuming and folder.variant.is_file():
        folder.saved_variant = load_variant(folder.variant)
    return folder


@dataclass
class Data:
    """Datasets and loaders of a run."""

    train_set: Any
    val_set: Any
    train_loader: Any
    val_loader: Any

    @property
    def n_cls(self) -> int:
        return self.train_set.n_cls


def build_data(opts: dict[str, Any], variant: dict[str, Any], env: distributed.DistEnv, device: torch.device) -> Data:
    """The training and validation sets and loaders; the first validation image is decoded now, so that a
    broken dataset fails before any training."""
    ds_kwargs, inf, seed = variant["dataset_kwargs"], variant["inference_kwargs"], variant["algorithm_kwargs"]["seed"]
    train_set = create_dataset(opts["dataset"], "train", im_size=ds_kwargs["image_size"], crop_size=ds_kwargs["crop_size"],
                               normalization=ds_kwargs["normalization"], root=opts["root"], seed=seed,
                               max_images=opts["max_images"])
    val_set = create_dataset(opts["dataset"], "val", im_size=inf["im_size"], normalization=ds_kwargs["normalization"],
                             root=opts["root"], seed=seed, max_images=opts["max_images"])
    val_set[0]
    pin = device.type == "cuda"
    train_loader = create_loader(train_set, ds_kwargs["batch_size"], num_workers=opts["num_workers"],
                                 distributed=env.distributed, seed=seed, pin_memory=pin)
    val_loader = create_loader(val_set, 1, num_workers=min(opts["num_workers"], 2), distributed=env.distributed,
                               seed=seed, pin_memory=pin)
    return Data(train_set, val_set, train_loader, val_loader)


@dataclass
class Trainer:
    """The model and everything that updates it."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: PolynomialLR
    scaler: torch.amp.GradScaler | None
    autocast: Any


def build_trainer(opts: dict[str, Any], request: ReductionRequest, variant: dict[str, Any], folder: RunFolder,
                  env: distributed.DistEnv, device: torch.device) -> Trainer:
    """The model (pretrained encoder, frozen heads, CTS policy network, token reduction), optimizer, schedule,
    loss scaler and autocast of the run; the patch type and the schedule are recorded in ``variant``."""
    optim_kwargs = variant["optimizer_kwargs"]
    from_checkpoint = folder.resuming or bool(opts["finetune"])
    pretrained = False if opts["no_pretrained"] or from_checkpoint else (opts["pretrained"] or True)
    torch.manual_seed(variant["algorithm_kwargs"]["seed"])
    model = create_segmenter(variant["net_kwargs"], pretrained=pretrained)
    for name in ("head", "head_dist"):  # a ViT encoder's ImageNet classifiers are never trained
        if hasattr(getattr(model, "encoder", None), name):
            getattr(model.encoder, name).requires_grad_(False)
    if getattr(model, "policy_net", None) is not None:
        prepare_policy_net(model.policy_net, opts["policynet_ckpt"], from_checkpoint=from_checkpoint)
    patch_type, settings = apply_requested_reduction(model, request, folder.saved_variant, announce=env.is_main)
    variant["token_reduction"] = variant_entry(patch_type, settings)
    if getattr(model, "policy_schedule", None) is not None:
        variant["net_kwargs"]["policy_schedule"] = list(model.policy_schedule)
    model.to(device)
    optimizer = create_optimizer(model, optim_kwargs["opt"], optim_kwargs["lr"], optim_kwargs["weight_decay"],
                                 optim_kwargs["momentum"], optim_kwargs["head_lr_mult"])
    scheduler = PolynomialLR(optimizer, optim_kwargs["poly_step_size"], optim_kwargs["iter_warmup"], optim_kwargs["iter_max"],
                             optim_kwargs["poly_power"], optim_kwargs["min_lr"])
    amp_dtype = AMP_DTYPES[variant["amp_dtype"]]
    scaler = torch.amp.GradScaler(device.type) if opts["amp"] and amp_dtype == torch.float16 else None
    return Trainer(model, optimizer, scheduler, scaler, autocast_context(device, opts["amp"], amp_dtype))


@dataclass
class Progress:
    """Where the run stands: the next epoch, the iteration within it and this process's running sums."""

    epoch: int = 0
    iteration: int = 0
    totals: torch.Tensor | None = None
    best: dict[str, Any] = field(default_factory=lambda: {"mean_iou": float("-inf"), "epoch": None})


def checkpoint_bytes(trainer: Trainer) -> int:
    """About how large one checkpoint is: the model's tensors and the optimizer's state (two per parameter
    for Adam-like optimizers, one for SGD with momentum)."""
    model_bytes = tensor_bytes(trainer.model.state_dict())
    per_param = 2 if any("exp_avg" in s for s in trainer.optimizer.state.values()) or isinstance(
        trainer.optimizer, (torch.optim.Adam, torch.optim.AdamW)) else 1
    trained = sum(p.numel() * 4 for p in trainer.model.parameters() if p.requires_grad)
    return model_bytes + per_param * trained


def snapshot(trainer: Trainer, progress: Progress, env: distributed.DistEnv, n_cls: int, seed: int,
             record: dict[str, Any] | None, partial: dict[str, Any] | None = None) -> dict[str, Any]:
    """The checkpoint of the run at the end of an epoch (or, with ``partial``, inside one)."""
    state = {
        "model": trainer.model.state_dict(), "optimizer": trainer.optimizer.state_dict(), "n_cls": n_cls,
        "lr_scheduler": trainer.scheduler.state_dict(), "epoch": progress.epoch - 1 if partial else progress.epoch,
        "rng_states": gather_rng_states(env), "sampler": {"seed": seed, "epoch": progress.epoch, "world_size": env.world_size},
        "log_record": record, "best_mean_iou": progress.best["mean_iou"], "best_epoch": progress.best["epoch"],
    }
    if partial is not None:
        state["partial"] = partial
    if trainer.scaler is not None:
        state["loss_scaler"] = trainer.scaler.state_dict()
    return state


def fit(trainer: Trainer, data: Data, variant: dict[str, Any], folder: RunFolder, progress: Progress,
        env: distributed.DistEnv, device: torch.device) -> None:
    """The epoch loop: train, checkpoint, evaluate, log; stops cleanly on SIGTERM / SIGINT."""
    model, algo, inf = trainer.model, variant["algorithm_kwargs"], variant["inference_kwargs"]
    clip_grad, seed, n_cls = variant["optimizer_kwargs"]["clip_grad"], algo["seed"], data.n_cls
    net = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None) if env.distributed else model
    num_epochs, eval_freq = algo["num_epochs"], algo["eval_freq"]
    per_process_batch = variant["dataset_kwargs"]["batch_size"]
    stop = StopRequest().install()
    if progress.epoch >= num_epochs and env.is_main:
        click.echo(f"Nothing to do: {folder.checkpoint} already holds epoch {progress.epoch - 1} of {num_epochs}.")
    while progress.epoch < num_epochs:
        epoch, started = progress.epoch, time.perf_counter()
        data.train_loader.set_position(epoch, progress.iteration * per_process_batch)
        stats = train_one_epoch(net, data.train_loader, trainer.optimizer, trainer.scheduler, epoch, device,
                                trainer.autocast, trainer.scaler, clip_grad, show_progress=env.is_main,
                                start_iteration=progress.iteration, totals=progress.totals, stop=stop)
        if stats["stopped"]:
            partial = {"epoch": epoch, "iteration": stats["iteration"], "totals": gather_objects(env, stats["totals"])}
            state = snapshot(trainer, progress, env, n_cls, seed, None, partial)
            if env.is_main:
                save_atomic(state, folder.checkpoint)
            raise TrainingStopped(f"stopped by {stop.signal_name or 'a signal'} at epoch {epoch}, iteration "
                                  f"{stats['iteration']}; run the same command to resume")
        record = {"train_loss": stats["loss"], "train_learning_rate": stats["learning_rate"], "epoch": epoch,
                  "num_updates": (epoch + 1) * steps_per_epoch(data.train_loader)}
        state = snapshot(trainer, progress, env, n_cls, seed, record)
        if env.is_main:
            save_atomic(state, folder.checkpoint)
        if epoch % eval_freq == 0 or epoch == num_epochs - 1:
            scores = evaluate(model, data.val_loader, n_cls, inf["window_size"], inf["window_stride"], device,
                              window_batch_size=1, autocast=trainer.autocast, show_progress=env.is_main)
            record.update({f"val_{k}": scores[k] for k in ("pixel_accuracy", "mean_accuracy", "mean_iou")})
            if env.is_main:
                click.echo(f"Stats [{epoch}]: pixel_accuracy: {scores['pixel_accuracy']}  mean_accuracy: "
                           f"{scores['mean_accuracy']}  mean_iou: {scores['mean_iou']}  ({scores['images']} images)")
            if scores["mean_iou"] > progress.best["mean_iou"]:
                progress.best = {"mean_iou": scores["mean_iou"], "epoch": epoch}
                if env.is_main:
                    save_atomic({**state, "best_mean_iou": scores["mean_iou"], "best_epoch": epoch}, folder.best)
                    click.echo(f"New best mean_iou {scores['mean_iou']} at epoch {epoch}: {folder.best}")
        if env.is_main:
            with open(folder.log_dir / "log.txt", "a") as f:
                f.write(json.dumps(record) + "\n")
            click.echo(f"Epoch {epoch}: train_loss {record['train_loss']:.4f} ({time.perf_counter() - started:.1f} s)")
        progress.epoch, progress.iteration, progress.totals = epoch + 1, 0, None
    if env.distributed:
        if not distributed.replicas_identical(model):
            raise RuntimeError("the processes ended with different weights: the data-parallel run is broken")
        if env.is_main:
            click.echo(f"Weights identical on all {env.world_size} processes")
    distributed.barrier()


class TrainingStopped(Exception):
    """Training stopped on request (SIGTERM / SIGINT) after writing a checkpoint to continue from."""


def train(opts: dict[str, Any], request: ReductionRequest, env: distributed.DistEnv, device: torch.device) -> None:
    """One run: folder, data, model, restore, checks, then the epoch loop."""
    folder = open_folder(opts, env)
    try:
        variant = build_variant(opts, env.world_size)
        data = build_data(opts, variant, env, device)
        variant["net_kwargs"]["n_cls"] = variant["net_kwargs"]["decoder"]["n_cls"] = data.n_cls
        variant["optimizer_kwargs"]["iter_max"] = steps_per_epoch(data.train_loader) * variant["optimizer_kwargs"]["epochs"]
        trainer = build_trainer(opts, request, variant, folder, env, device)
        progress = Progress()
        if opts["finetune"] and not folder.resuming:
            load_weights(trainer.model, opts["finetune"])
            if env.is_main:
                click.echo(f"Fine-tuning from the weights of {opts['finetune']}")
        torch.manual_seed(variant["algorithm_kwargs"]["seed"] + env.rank)
        if folder.resuming:
            progress = resume(folder, trainer, variant, env)
        variant["algorithm_kwargs"]["start_epoch"] = progress.epoch
        if env.is_main:
            check_free_space(folder.log_dir, 2 * checkpoint_bytes(trainer))
            text = yaml.safe_dump(variant, sort_keys=True)
            click.echo(f"Configuration:\n{text}")
            folder.variant.write_text(text)
            counts = {name: sum(p.numel() for p in part.parameters() if p.requires_grad)
                      for name, part in trainer.model.named_children()}
            click.echo(f"Train images: {len(data.train_set)}, val images: {len(data.val_set)}, processes: "
                       f"{env.world_size} ({env.launcher})")
            click.echo("Trained parameters: " + ", ".join(f"{name} {n}" for name, n in counts.items()))
        fit(trainer, data, variant, folder, progress, env, device)
    finally:
        if folder.lock is not None:
            folder.lock.release()


def steps_per_epoch(loader: Any) -> int:
    """Iterations of a whole training epoch of this process."""
    return -(-loader.sampler.num_samples // loader.batch_size)


@click.command(cls=Command)
@click.option("--log-dir", type=click.Path(path_type=Path), required=True, help="Output folder (created).")
@click.option("--dataset", type=str, required=True, help="Dataset key of config.yml (e.g. ade20k, synthetic).")
@root_option
@click.option("--im-size", type=POSITIVE, default=None, help="Train resize base / val short side (default: dataset's).")
@click.option("--crop-size", type=POSITIVE, default=None, help="Training crop, also the model's size (default: dataset's).")
@window_options
@click.option("--backbone", type=str, required=True, help="Backbone key of config.yml, e.g. vit_small_patch16_384.")
@click.option("--decoder", type=str, required=True, help="linear or mask_transformer.")
@click.option("--optimizer", type=str, default=None,
              help="timm optimizer name (sgd = Nesterov SGD; default: sgd for ViT backbones, adamw for MiT).")
@click.option("--scheduler", type=click.Choice(["polynomial"]), default="polynomial", show_default=True)
@click.option("--weight-decay", type=float, default=None, help="Default: 0 for ViT backbones, 0.01 for MiT.")
@click.option("--dropout", type=PROBABILITY, default=0.0, show_default=True, help="Encoder dropout.")
@click.option("--drop-path", type=PROBABILITY, default=0.1, show_default=True, help="Encoder stochastic depth (last block).")
@click.option("--batch-size", type=POSITIVE, default=None, help="World batch size (default: dataset's).")
@click.option("--epochs", type=click.IntRange(0), default=None, help="Epochs (default: dataset's; 0 is honoured).")
@click.option("-lr", "--learning-rate", type=click.FloatRange(0, min_open=True), default=None,
              help="Base learning rate (default: dataset's).")
@click.option("-min-lr", "--minlearning-rate", type=click.FloatRange(0), default=None,
              help="Final learning rate (default: 1e-5 for ViT backbones, 0 for MiT).")
@click.option("--warmup-iters", type=click.IntRange(0), default=None,
              help="Iterations of linear learning-rate warm-up before the polynomial decay (default: 0; 1500 for MiT).")
@click.option("--normalization", type=click.Choice(sorted(STATS)), default=None, help="Default: the backbone's.")
@click.option("--eval-freq", type=POSITIVE, default=None, help="Evaluate every N epochs and at the last (default: dataset's).")
@click.option("--amp/--no-amp", default=False, show_default=True, help="Mixed precision.")
@click.option("--amp-dtype", type=click.Choice(sorted(AMP_DTYPES)), default="fp16", show_default=True)
@click.option("--clip-grad", type=click.FloatRange(0, min_open=True), default=None, help="Clip the gradient norm to this value.")
@click.option("--resume/--no-resume", default=True, show_default=True,
              help="Resume from LOG_DIR/checkpoint.pth (the same run: changed settings are refused).")
@click.option("--overwrite", is_flag=True, default=False,
              help="With --no-resume, start over in a LOG_DIR that holds a run: its files move to LOG_DIR/old-<time>/.")
@click.option("--pretrained", type=click.Path(path_type=str), default=None,
              help="Local ImageNet weights (.pth/.safetensors/.npz) for the encoder (default: timm hub weights).")
@click.option("--no-pretrained", is_flag=True, default=False, help="Random encoder initialisation.")
@click.option("--finetune", type=click.Path(path_type=Path), default=None,
              help="Start from the weights of this checkpoint (e.g. a trained pure model), at epoch 0.")
@click.option("--policy-method", type=click.Choice(POLICY_METHODS), default=None,
              help="CTS: build the model with a policy network (policy_net; implied by --policynet-ckpt).")
@click.option("--policynet-ckpt", type=click.Path(path_type=Path), default=None,
              help="CTS: trained policy network (python -m segm.policy.train) loaded into the model; it gets no gradient.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--num-workers", type=click.IntRange(0), default=4, show_default=True, help="Data-loading processes per GPU.")
@click.option("--max-images", type=POSITIVE, default=None, help="Use only the first N images of each split (quick checks).")
@device_option
@token_reduction_options
@fail_cleanly
def main(**opts: Any) -> None:
    """Train a Segmenter or SegFormer (optionally with token reduction) and evaluate it every eval_freq epochs."""
    request = reduction_request(opts)
    requested = resolve_device(opts.pop("device"))
    env = distributed.init_distributed(requested)
    device = distributed.process_device(requested, env)
    torch.backends.cudnn.benchmark = device.type == "cuda"  # fixed crop sizes: let cuDNN pick its fastest kernels
    try:
        train(opts, request, env, device)
    except NonFiniteLossError as err:
        click.echo(f"error: {err}", err=True)
        sys.exit(3)
    except TrainingStopped as stopped:
        if env.is_main:
            click.echo(str(stopped), err=True)
        sys.exit(EXIT_STOPPED)
    finally:
        distributed.destroy()


def prepare_policy_net(policy_net: torch.nn.Module, path: Path | None, from_checkpoint: bool) -> None:
    """CTS's policy network trains with the Segmenter but gets no gradient: frozen, loaded from ``path``.

    Its weights come from ``--policynet-ckpt`` unless a checkpoint (resume, fine-tuning) provides them.
    """
    policy_net.requires_grad_(False)
    if from_checkpoint:
        return
    if path is None:
        raise UsageError("--policy-method policy_net needs the trained policy network: --policynet-ckpt PATH "
                         "(train one with python -m segm.policy.train)")
    load_policy_weights(policy_net, path)


def load_weights(model: torch.nn.Module, path: Path) -> None:
    """Copy a checkpoint's model weights (strictly matched) into ``model``."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"--finetune checkpoint not found: {path}")
    data = read_checkpoint(Path(path))
    state = data["model"] if "model" in data else data
    check_state_dict(model, state, str(path))
    model.load_state_dict(to_float32(state))


def resume(folder: RunFolder, trainer: Trainer, variant: dict[str, Any], env: distributed.DistEnv) -> Progress:
    """Restore a run from ``checkpoint.pth`` (mid-epoch ones included) after checking it is the same run.

    Settings that differ from ``variant.yml`` are refused (all listed), except the safe ones, which are
    applied: more epochs rebuild the schedule for the new length. A weights-only checkpoint (no optimizer
    state) starts a fine-tuning run at epoch 0, as in ALGM.
    """
    data = read_checkpoint(folder.checkpoint)
    if "optimizer" in data and folder.saved_variant is not None:
        refused, allowed = resume_differences(folder.saved_variant, variant)
        if refused:
            raise UsageError(f"{folder.log_dir} holds a run with other settings ({'; '.join(refused)}); rerun it as it "
                             "started, choose another --log-dir, or start over with --no-resume --overwrite (the old "
                             "files move to old-<time>/)")
        if allowed and env.is_main:
            click.echo(f"note: changed on resume: {'; '.join(allowed)} (the schedule follows the new length)", err=True)
    try:
        check_state_dict(trainer.model, data["model"], str(folder.checkpoint))
    except UsageError as err:
        raise UsageError(f"{err}; it was written for another model: choose another --log-dir, or start over with "
                         "--no-resume --overwrite (the old files move to old-<time>/)") from None
    trainer.model.load_state_dict(data["model"])
    if "optimizer" not in data:
        if env.is_main:
            click.echo(f"Fine-tuning from the weights in {folder.checkpoint}")
        return Progress()
    trainer.optimizer.load_state_dict(data["optimizer"])
    trainer.scheduler.load_state_dict(data["lr_scheduler"])
    trainer.scheduler.iter_max = variant["optimizer_kwargs"]["iter_max"]
    if trainer.scaler is not None and "loss_scaler" in data:
        trainer.scaler.load_state_dict(data["loss_scaler"])
    states = data.get("rng_states")
    if states and len(states) == env.world_size:
        set_rng_states(states[env.rank])
    best = {"mean_iou": data.get("best_mean_iou", float("-inf")), "epoch": data.get("best_epoch")}
    if folder.best.exists():
        stored = read_checkpoint(folder.best)
        best = {"mean_iou": stored.get("best_mean_iou", best["mean_iou"]), "epoch": stored.get("best_epoch", best["epoch"])}
    progress = Progress(epoch=data["epoch"] + 1, best=best)
    partial = data.get("partial")
    if partial is not None and len(partial["totals"]) == env.world_size:
        progress.epoch, progress.iteration = partial["epoch"], partial["iteration"]
        progress.totals = partial["totals"][env.rank]
    if env.is_main:
        reconcile_log(folder.log_dir / "log.txt", progress.epoch, data.get("log_record"))
        where = f"epoch {progress.epoch}" + (f", iteration {progress.iteration}" if progress.iteration else "")
        click.echo(f"Resuming from {folder.checkpoint} at {where} (best mean_iou so far {best['mean_iou']})")
    return progress


if __name__ == "__main__":
    main()
