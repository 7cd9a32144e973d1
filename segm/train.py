"""Train Segmenter, with any patch type: ``python -m segm.train --log-dir D --dataset ade20k --backbone ... --decoder ...``.

Runs on one device, under torchrun or under SLURM (one task per GPU). The run's patch type and its
settings go to ``variant.yml``; a resumed run without ``--patch-type`` keeps them. Every epoch writes
``checkpoint.pth`` atomically, evaluates every ``eval_freq`` epochs, appends a JSON line to ``log.txt``
and keeps a single ``best_checkpoint.pth``; the same command restarted resumes exactly.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import click
import torch
import yaml
from torch.nn.parallel import DistributedDataParallel

from segm.cli import (
    Command,
    ReductionRequest,
    apply_requested_reduction,
    device_option,
    fail_cleanly,
    reduction_request,
    resolve_device,
    root_option,
    token_reduction_options,
)
from segm.config import training_defaults
from segm.data import STATS, create_dataset, create_loader, per_process_batch_size
from segm.engine import NonFiniteLossError, autocast_context, evaluate, train_one_epoch
from segm.model.factory import POLICY_METHODS, create_segmenter, load_policy_weights, load_variant, net_kwargs_for
from segm.model.token_reduction import variant_entry
from segm.model.weights import check_state_dict, read_checkpoint, to_float32
from segm.optim import PolynomialLR, create_optimizer
from segm.utils import distributed
from segm.utils.checkpoint import gather_rng_states, prepare_log_dir, save_atomic, set_rng_states
from tokred.errors import UsageError

AMP_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


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


@click.command(cls=Command)
@click.option("--log-dir", type=click.Path(path_type=Path), required=True, help="Output folder (created).")
@click.option("--dataset", type=str, required=True, help="Dataset key of config.yml (e.g. ade20k, synthetic).")
@root_option
@click.option("--im-size", type=int, default=None, help="Train resize base / val short side (default: dataset's).")
@click.option("--crop-size", type=int, default=None, help="Training crop, also the model's size (default: dataset's).")
@click.option("--window-size", type=int, default=None, help="Sliding window of the evaluation (default: dataset's).")
@click.option("--window-stride", type=int, default=None, help="Sliding-window stride (default: dataset's).")
@click.option("--backbone", type=str, required=True, help="Backbone key of config.yml, e.g. vit_small_patch16_384.")
@click.option("--decoder", type=str, required=True, help="linear or mask_transformer.")
@click.option("--optimizer", type=str, default=None,
              help="timm optimizer name (sgd = Nesterov SGD; default: sgd for ViT backbones, adamw for MiT).")
@click.option("--scheduler", type=click.Choice(["polynomial"]), default="polynomial", show_default=True)
@click.option("--weight-decay", type=float, default=None, help="Default: 0 for ViT backbones, 0.01 for MiT.")
@click.option("--dropout", type=float, default=0.0, show_default=True, help="Encoder dropout.")
@click.option("--drop-path", type=float, default=0.1, show_default=True, help="Encoder stochastic depth (last block).")
@click.option("--batch-size", type=int, default=None, help="World batch size (default: dataset's).")
@click.option("--epochs", type=int, default=None, help="Epochs (default: dataset's; 0 is honoured).")
@click.option("-lr", "--learning-rate", type=float, default=None, help="Base learning rate (default: dataset's).")
@click.option("-min-lr", "--minlearning-rate", type=float, default=None,
              help="Final learning rate (default: 1e-5 for ViT backbones, 0 for MiT).")
@click.option("--warmup-iters", type=int, default=None,
              help="Iterations of linear learning-rate warm-up before the polynomial decay (default: 0; 1500 for MiT).")
@click.option("--normalization", type=click.Choice(sorted(STATS)), default=None, help="Default: the backbone's.")
@click.option("--eval-freq", type=int, default=None, help="Evaluate every N epochs and at the last (default: dataset's).")
@click.option("--amp/--no-amp", default=False, show_default=True, help="Mixed precision.")
@click.option("--amp-dtype", type=click.Choice(sorted(AMP_DTYPES)), default="fp16", show_default=True)
@click.option("--clip-grad", type=float, default=None, help="Clip the gradient norm to this value.")
@click.option("--resume/--no-resume", default=True, show_default=True, help="Resume from LOG_DIR/checkpoint.pth.")
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
@click.option("--num-workers", type=int, default=4, show_default=True, help="Data-loading processes per GPU.")
@click.option("--max-images", type=int, default=None, help="Use only the first N images of each split (quick checks).")
@device_option
@token_reduction_options
@fail_cleanly
def main(**opts: Any) -> None:
    """Train a Segmenter (optionally with token reduction) and evaluate it every eval_freq epochs."""
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
    finally:
        distributed.destroy()


def train(opts: dict[str, Any], request: ReductionRequest, env: distributed.DistEnv, device: torch.device) -> None:
    log_dir: Path = opts["log_dir"]
    main_process = env.is_main
    if main_process:
        prepare_log_dir(log_dir)
    distributed.barrier()
    variant = build_variant(opts, env.world_size)
    ds_kwargs, algo, optim_kwargs, inf = (variant[k] for k in ("dataset_kwargs", "algorithm_kwargs", "optimizer_kwargs", "inference_kwargs"))
    seed = algo["seed"]

    train_set = create_dataset(opts["dataset"], "train", im_size=ds_kwargs["image_size"], crop_size=ds_kwargs["crop_size"],
                               normalization=ds_kwargs["normalization"], root=opts["root"], seed=seed,
                               max_images=opts["max_images"])
    val_set = create_dataset(opts["dataset"], "val", im_size=inf["im_size"], normalization=ds_kwargs["normalization"],
                             root=opts["root"], seed=seed, max_images=opts["max_images"])
    train_loader = create_loader(train_set, ds_kwargs["batch_size"], num_workers=opts["num_workers"],
                                 distributed=env.distributed, seed=seed, pin_memory=device.type == "cuda")
    val_loader = create_loader(val_set, 1, num_workers=min(opts["num_workers"], 2), distributed=env.distributed,
                               seed=seed, pin_memory=device.type == "cuda")
    n_cls = train_set.n_cls
    variant["net_kwargs"]["n_cls"] = n_cls
    variant["net_kwargs"]["decoder"]["n_cls"] = n_cls
    optim_kwargs["iter_max"] = len(train_loader) * optim_kwargs["epochs"]

    checkpoint_path = log_dir / "checkpoint.pth"
    best_path = log_dir / "best_checkpoint.pth"
    resuming = opts["resume"] and checkpoint_path.exists()
    pretrained = False if opts["no_pretrained"] or resuming or opts["finetune"] else (opts["pretrained"] or True)
    torch.manual_seed(seed)
    model = create_segmenter(variant["net_kwargs"], pretrained=pretrained)
    for name in ("head", "head_dist"):  # a ViT encoder's ImageNet classifiers are never trained
        if hasattr(getattr(model, "encoder", None), name):
            getattr(model.encoder, name).requires_grad_(False)
    if getattr(model, "policy_net", None) is not None:
        prepare_policy_net(model.policy_net, opts["policynet_ckpt"], from_checkpoint=resuming or bool(opts["finetune"]))
    saved = load_variant(log_dir / "variant.yml") if resuming and (log_dir / "variant.yml").is_file() else None
    patch_type, settings = apply_requested_reduction(model, request, saved, announce=main_process)
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
    autocast = autocast_context(device, opts["amp"], amp_dtype)

    start_epoch, best = 0, {"mean_iou": float("-inf"), "epoch": None}
    if opts["finetune"] and not resuming:
        load_weights(model, opts["finetune"])
        if main_process:
            click.echo(f"Fine-tuning from the weights of {opts['finetune']}")
    torch.manual_seed(seed + env.rank)
    if resuming:
        start_epoch, best = resume(checkpoint_path, best_path, model, optimizer, scheduler, scaler, env, log_dir)
    algo["start_epoch"] = start_epoch

    if main_process:
        text = yaml.safe_dump(variant, sort_keys=True)
        click.echo(f"Configuration:\n{text}")
        (log_dir / "variant.yml").write_text(text)
        counts = {name: sum(p.numel() for p in part.parameters() if p.requires_grad) for name, part in model.named_children()}
        click.echo(f"Train images: {len(train_set)}, val images: {len(val_set)}, processes: {env.world_size} ({env.launcher})")
        click.echo("Trained parameters: " + ", ".join(f"{name} {n}" for name, n in counts.items()))

    net = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None) if env.distributed else model
    num_epochs, eval_freq = algo["num_epochs"], algo["eval_freq"]
    if start_epoch >= num_epochs and main_process:
        click.echo(f"Nothing to do: {checkpoint_path} already holds epoch {start_epoch - 1} of {num_epochs}.")
    for epoch in range(start_epoch, num_epochs):
        started = time.perf_counter()
        train_loader.set_epoch(epoch)
        stats = train_one_epoch(net, train_loader, optimizer, scheduler, epoch, device, autocast, scaler,
                                optim_kwargs["clip_grad"], show_progress=main_process)
        record = {"train_loss": stats["loss"], "train_learning_rate": stats["learning_rate"], "epoch": epoch,
                  "num_updates": (epoch + 1) * len(train_loader)}
        states = gather_rng_states(env)
        snapshot = {
            "model": model.state_dict(), "optimizer": optimizer.state_dict(), "n_cls": n_cls,
            "lr_scheduler": scheduler.state_dict(), "epoch": epoch, "rng_states": states,
            "sampler": {"seed": seed, "epoch": epoch, "world_size": env.world_size},
            "log_record": record, "best_mean_iou": best["mean_iou"], "best_epoch": best["epoch"],
        }
        if scaler is not None:
            snapshot["loss_scaler"] = scaler.state_dict()
        if main_process:
            save_atomic(snapshot, checkpoint_path)
        if epoch % eval_freq == 0 or epoch == num_epochs - 1:
            scores = evaluate(model, val_loader, n_cls, inf["window_size"], inf["window_stride"], device,
                              window_batch_size=1, autocast=autocast, show_progress=main_process)
            record.update({f"val_{k}": scores[k] for k in ("pixel_accuracy", "mean_accuracy", "mean_iou")})
            if main_process:
                click.echo(f"Stats [{epoch}]: pixel_accuracy: {scores['pixel_accuracy']}  mean_accuracy: "
                           f"{scores['mean_accuracy']}  mean_iou: {scores['mean_iou']}  ({scores['images']} images)")
            if scores["mean_iou"] > best["mean_iou"]:
                best = {"mean_iou": scores["mean_iou"], "epoch": epoch}
                if main_process:
                    save_atomic({**snapshot, "best_mean_iou": best["mean_iou"], "best_epoch": epoch}, best_path)
                    click.echo(f"New best mean_iou {best['mean_iou']} at epoch {epoch}: {best_path}")
        if main_process:
            with open(log_dir / "log.txt", "a") as f:
                f.write(json.dumps(record) + "\n")
            click.echo(f"Epoch {epoch}: train_loss {record['train_loss']:.4f} ({time.perf_counter() - started:.1f} s)")
    if env.distributed:
        if not distributed.replicas_identical(model):
            raise RuntimeError("the processes ended with different weights: the data-parallel run is broken")
        if main_process:
            click.echo(f"Weights identical on all {env.world_size} processes")
    distributed.barrier()


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


def resume(checkpoint_path: Path, best_path: Path, model, optimizer, scheduler, scaler, env, log_dir: Path):
    """Restore a run from ``checkpoint.pth``; returns the first epoch to run and the best score so far.

    A weights-only checkpoint (no optimizer state) starts a fine-tuning run at epoch 0, as in ALGM.
    """
    data = read_checkpoint(checkpoint_path)
    try:
        check_state_dict(model, data["model"], str(checkpoint_path))
    except UsageError as err:
        raise UsageError(f"{err}; it was written for another model: start a new --log-dir or pass --no-resume") from None
    model.load_state_dict(data["model"])
    if "optimizer" not in data:
        if env.is_main:
            click.echo(f"Fine-tuning from the weights in {checkpoint_path}")
        return 0, {"mean_iou": float("-inf"), "epoch": None}
    optimizer.load_state_dict(data["optimizer"])
    scheduler.load_state_dict(data["lr_scheduler"])
    if scaler is not None and "loss_scaler" in data:
        scaler.load_state_dict(data["loss_scaler"])
    states = data.get("rng_states")
    if states and len(states) == env.world_size:
        set_rng_states(states[env.rank])
    best = {"mean_iou": data.get("best_mean_iou", float("-inf")), "epoch": data.get("best_epoch")}
    if best_path.exists():
        stored = read_checkpoint(best_path)
        best = {"mean_iou": stored.get("best_mean_iou", best["mean_iou"]), "epoch": stored.get("best_epoch", best["epoch"])}
    start_epoch = data["epoch"] + 1
    if env.is_main:
        reconcile_log(log_dir / "log.txt", start_epoch, data.get("log_record"))
        click.echo(f"Resuming from {checkpoint_path} at epoch {start_epoch} (best mean_iou so far {best['mean_iou']})")
    return start_epoch, best


if __name__ == "__main__":
    main()
