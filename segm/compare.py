"""Every token-reduction method on one checkpoint, one protocol: ``python -m segm.compare MODEL_PATH DATASET``.

For every method (``--methods``, default: every registered patch type that applies to the model) and
every point of its sweep (``--sweep default`` uses each patch type's own, scaled to the model; a YAML file
maps method names to lists of option dicts), the weights are used off the shelf and measured the same
way: single-scale sliding-window mIoU on the validation split (the first ``--max-images``), fvcore
GFLOPs per image on the validation images squashed to the crop, images/s with the speedtest protocol
(``--repeat`` copies, warm-up, synchronised; each point interleaved with the pure model, and its speed-up
the ratio of the two), the tokens entering each block and the share of the forward
spent on reduction bookkeeping (profiler). When the checkpoint records a patch type, its settings are the
base of that method's points (ALGM at the model's layers). Results go to ``DIR/results.jsonl`` as they
come (a rerun skips the points already there), then ``results.md``, ``pareto.png`` and ``protocol.md``.
"""

from __future__ import annotations

import hashlib
import json
import statistics
import time
from pathlib import Path
from typing import Any, Callable

import click
import torch
import yaml

from segm.cli import Command, device_option, dtype_option, fail_cleanly, resolve_device, root_option, window_batch_option
from segm.compare_report import write_reports
from segm.data import create_dataset, create_loader
from segm.engine import evaluate
from segm.eval.miou import default_window
from segm.flops import block_tokens
from segm.measure import gflops_per_image, measurement_loader, time_shares
from segm.model.factory import load_model, variant_crop_size, variant_normalization
from segm.model.token_reduction import PATCH_TYPES, apply_token_reduction, measurement_options, variant_token_reduction
from segm.runtime import dtype_autocast
from segm.speedtest import measure
from segm.utils.progress import progress
from tokred.errors import UsageError

FINGERPRINT = "compare.json"
RESULTS = "results.jsonl"


def checkpoint_fingerprint(path: Path) -> dict[str, Any]:
    """What identifies a checkpoint: its resolved path, size and SHA-256."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            digest.update(chunk)
    return {"model": str(path.resolve()), "bytes": path.stat().st_size, "sha256": digest.hexdigest()}


def claim_output(out: Path, fingerprint: dict[str, Any], overwrite: bool) -> None:
    """Use ``out`` for this checkpoint's results: refuse one holding another checkpoint's unless ``overwrite``."""
    out.mkdir(parents=True, exist_ok=True)
    marker = out / FINGERPRINT
    if marker.exists():
        recorded = json.loads(marker.read_text())
        if recorded.get("sha256") != fingerprint["sha256"]:
            if not overwrite:
                raise UsageError(f"{out} holds results of another checkpoint ({recorded.get('model')}); choose another "
                                 "--out or pass --overwrite to start it over for this one")
            (out / RESULTS).unlink(missing_ok=True)
    marker.write_text(json.dumps(fingerprint, indent=2) + "\n")


def read_sweep(source: str, methods: list[str]) -> dict[str, list[dict[str, Any]]]:
    """The sweep file's points per method (``default``: none, every method uses its patch type's sweep)."""
    if source == "default":
        return {}
    path = Path(source)
    if not path.is_file():
        raise FileNotFoundError(f"--sweep file not found: {path}")
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict) or not all(isinstance(v, list) and all(isinstance(p, dict) for p in v) for v in data.values()):
        raise UsageError(f"{path}: a sweep file maps method names to lists of option dicts, e.g. 'tome: [{{r: 8}}]'")
    unknown = [name for name in data if name not in PATCH_TYPES]
    if unknown:
        raise UsageError(f"{path}: unknown method {unknown[0]!r}; known: {', '.join(PATCH_TYPES)}")
    for name, points in data.items():
        for point in points:
            PATCH_TYPES.create(name, **point)  # an unknown option or a bad value fails here, before any work
    return {name: points for name, points in data.items() if name in methods}


def chosen_methods(text: str, model: torch.nn.Module) -> list[str]:
    """The methods of ``--methods`` (``all``: every registered one), pure first, those that apply to the model."""
    names = list(PATCH_TYPES) if text == "all" else [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in PATCH_TYPES]
    if unknown:
        raise UsageError(f"--methods: unknown method {unknown[0]!r}; known: {', '.join(PATCH_TYPES)}")
    kept = []
    for name in ["pure", *[n for n in names if n != "pure"]]:
        reason = PATCH_TYPES[name].why_not(model)
        if reason is None:
            kept.append(name)
        else:
            click.echo(f"note: skipping {name}: {reason}", err=True)
    return kept


def sweep_points(model: torch.nn.Module, variant: dict[str, Any], methods: list[str],
                 from_file: dict[str, list[dict[str, Any]]]) -> list[tuple[str, dict[str, Any]]]:
    """``(method, options)`` of every distinct point; the checkpoint's recorded settings are the base of its own
    method (a small model can make a sweep's points coincide: they are measured once)."""
    recorded = variant_token_reduction(variant)
    points: dict[str, tuple[str, dict[str, Any]]] = {}
    for name in methods:
        base = recorded[1] if recorded is not None and recorded[0] == name else {}
        target = PATCH_TYPES[name].target(model)
        for point in from_file.get(name, PATCH_TYPES[name].sweep(target)):
            options = measurement_options(name, {**base, **point})[0]
            points.setdefault(point_key(name, options), (name, options))
    return list(points.values())


def point_key(method: str, options: dict[str, Any]) -> str:
    """A point's identity in ``results.jsonl``: the method and its requested options."""
    return json.dumps({"method": method, "options": options}, sort_keys=True, default=list)


def done_keys(path: Path) -> set[str]:
    if not path.exists():
        return set()
    return {json.loads(line)["key"] for line in path.read_text().splitlines() if line.strip()}


def paired_setups(model: torch.nn.Module, method: str, options: dict[str, Any]) -> dict[str, Callable[[], None]]:
    """What a point is timed with: the point and the pure model, forward for forward on the same images (the
    speed-up is their ratio, so load that drifts during a run cancels); the pure point is timed alone."""
    setups = {method: lambda: apply_token_reduction(model, method, **options)}
    if method != "pure":
        setups["pure"] = lambda: apply_token_reduction(model, "pure")
    return setups


@click.command(cls=Command)
@click.argument("model_path", type=click.Path(path_type=Path))
@click.argument("dataset_name", type=str)
@click.option("--methods", default="all", show_default=True,
              help="Comma-separated patch types, e.g. pure,algm,tome (all: every one that applies to the model).")
@click.option("--sweep", default="default", show_default=True,
              help="default (each method's own sweep, scaled to the model) or a YAML file: method -> list of options.")
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Folder for the results (resumable).")
@click.option("--max-images", type=click.IntRange(1), default=None, help="Use the first N validation images only.")
@window_batch_option(4)
@click.option("--repeat", type=click.IntRange(1), default=32, show_default=True, help="Copies of each image per timed forward.")
@click.option("--warmup", type=click.IntRange(0), default=50, show_default=True, help="Untimed forwards per point.")
@click.option("--iters", type=click.IntRange(1), default=None, help="Timed forwards per point (default: the images).")
@dtype_option("the timing (the mIoU is fp32)")
@click.option("--overwrite", is_flag=True, default=False, help="Reuse an --out folder that holds another checkpoint's results.")
@click.option("--num-workers", type=click.IntRange(0), default=2, show_default=True)
@root_option
@device_option
@fail_cleanly
def main(model_path: Path, dataset_name: str, **opts: Any) -> None:
    """Compare token-reduction methods on MODEL_PATH with DATASET_NAME's validation set; see the module docstring."""
    device = resolve_device(opts["device"])
    model, variant = load_model(model_path)
    checkpoint = model_path / "checkpoint.pth" if model_path.is_dir() else model_path
    methods = chosen_methods(opts["methods"], model)
    points = sweep_points(model, variant, methods, read_sweep(opts["sweep"], methods))
    out: Path = opts["out"]
    claim_output(out, checkpoint_fingerprint(checkpoint), opts["overwrite"])
    model.to(device).eval()

    crop = variant_crop_size(variant)
    normalization = variant_normalization(variant)
    window_size, window_stride = default_window(variant, dataset_name, crop)
    val = create_dataset(dataset_name, "val", normalization=normalization, root=opts["root"], max_images=opts["max_images"])
    if val.n_cls != model.n_cls:
        raise UsageError(f"the model predicts {model.n_cls} classes but {dataset_name} has {val.n_cls}")
    val_loader = create_loader(val, 1, num_workers=opts["num_workers"], pin_memory=device.type == "cuda")
    images, _ = measurement_loader(dataset_name, opts["root"], "val", crop, normalization, limit=opts["max_images"])
    autocast = dtype_autocast(device, opts["dtype"])
    first_image = next(iter(images)).to(device)

    results = out / RESULTS
    finished = done_keys(results)
    todo = [(m, o) for m, o in points if point_key(m, o) not in finished]
    if len(todo) < len(points):
        click.echo(f"{len(points) - len(todo)} of {len(points)} points already in {results}; measuring the other {len(todo)}", err=True)
    for method, options in progress(todo, desc="points"):
        started = time.perf_counter()
        settings = apply_token_reduction(model, method, **options)
        scores = evaluate(model, val_loader, val.n_cls, window_size, window_stride, device,
                          window_batch_size=opts["window_batch_size"])
        gflops = statistics.mean(gflops_per_image(model, images, device, show_progress=False))
        times = measure(model, images, device, opts["repeat"], opts["warmup"], opts["iters"], autocast, False,
                        paired_setups(model, method, options), show_progress=False)
        fps = {name: opts["repeat"] / statistics.mean(t) for name, t in times.items()}
        apply_token_reduction(model, method, **options)  # the timing's last setup may have been the pure one
        record = {
            "key": point_key(method, options), "method": method, "settings": settings,
            "mean_iou": scores["mean_iou"], "pixel_accuracy": scores["pixel_accuracy"], "images": scores["images"],
            "gflops": round(gflops, 4), "fps": round(fps[method], 3), "speedup": round(fps[method] / fps["pure"], 4),
            "tokens": {label: list(c) for label, c in block_tokens(model, first_image).items()},
            "time_shares": {k: round(v, 4) for k, v in time_shares(model, first_image.repeat(opts["repeat"], 1, 1, 1),
                                                                   autocast).items()},
            "seconds": round(time.perf_counter() - started, 1),
        }
        with open(results, "a") as f:
            f.write(json.dumps(record) + "\n")
    apply_token_reduction(model, "pure")
    protocol = {
        "checkpoint": str(checkpoint), "dataset": dataset_name, "images": len(val), "timing images": len(images.dataset),
        "device": str(device), "device name": torch.cuda.get_device_name(device) if device.type == "cuda" else
        f"CPU ({torch.get_num_threads()} threads)", "dtype": opts["dtype"], "batch": f"1 image x {opts['repeat']} copies",
        "warm-up / timed forwards": f"{opts['warmup']} / {opts['iters'] or len(images.dataset)}",
        "window / stride": f"{window_size} / {window_stride}", "window batch": opts["window_batch_size"],
        "counter": "fvcore FlopCountAnalysis (1 multiply-add = 1 flop), per image, crop-squashed validation images",
        "seed": "0 for randomised methods (measurement defaults)",
    }
    written = write_reports(out, [json.loads(line) for line in results.read_text().splitlines() if line.strip()], protocol)
    click.echo(f"wrote {', '.join(str(p) for p in written)}")


if __name__ == "__main__":
    main()
