"""Every patch type against pure on the same weights: GFLOPs, images/s and how much FLOP saving becomes time.

One model (random weights, default ViT-S/16 + mask transformer at 512; a MiT backbone gets the SegFormer
head), synthetic scenes squashed to the crop. GFLOPs are fvcore's per image (the ``segm.flops`` counter) averaged over the timed images; im/s use
the speedtest protocol (each image repeated ``--repeat`` times per forward), with all points timed
interleaved on the same images in one run, so the ratios to pure are what matter. ``efficiency =
speed-up x FLOPs ratio``: 1.0 means every FLOP saved became time saved.

    python benchmarks/patch_types.py [--point tome:r=8 --point tome_sublayer:ratio=0.3 ...] [--out FILE.md]

A point is ``NAME`` or ``NAME:key=value,key=value`` (values in YAML, e.g. ``algm:selected_layers=[1, 5]``);
without ``--point`` every registered patch type that applies runs at its defaults (CTS, whose default is a
trained model's schedule, at the middle of its sweep). With a ``cts`` point the model
holds a random CTS policy network (which the other patch types never run). ACT points add their cluster
counts per block (mean over the timed images, the heads and the hash rows) below the table. Randomised options take their
measurement default (ACT's seed 0), shown in the settings column.
"""

from __future__ import annotations

import platform
import statistics
from contextlib import nullcontext
from pathlib import Path

import click
import torch
import yaml

from segm.cli import resolve_device
from segm.measure import flop_analysis, measured_model, measurement_loader
from segm.model.token_reduction import PATCH_TYPES, apply_token_reduction, measurement_options
from segm.speedtest import batches, measure
from tokred.errors import UsageError

from report import emit


def parse_point(text: str) -> tuple[str, str, dict]:
    """``"tome:r=8"`` -> (label, patch type, options)."""
    name, _, rest = text.partition(":")
    options = yaml.safe_load("{" + rest.replace("=", ": ") + "}") if rest else {}
    return text, name, options


@click.command()
@click.option("--backbone", default="vit_small_patch16_384", show_default=True)
@click.option("--crop", default=512, show_default=True)
@click.option("--point", "points", multiple=True, help="A patch type and its options, e.g. tome:r=8 (repeatable).")
@click.option("--device", default="cpu", show_default=True)
@click.option("--repeat", type=int, default=None, help="Copies per forward (default: 32 on GPU, 2 on CPU).")
@click.option("--warmup", type=int, default=None, help="Untimed forwards (default: 20 on GPU, 2 on CPU).")
@click.option("--iters", type=int, default=None, help="Timed forwards per point (default: 100 on GPU, 6 on CPU).")
@click.option("--out", type=click.Path(path_type=Path), default=None, help="Also write the table here.")
def main(backbone: str, crop: int, points: tuple[str, ...], device: str, repeat: int | None, warmup: int | None,
         iters: int | None, out: Path | None) -> None:
    """Benchmark patch types against the pure model on one backbone with random weights."""
    dev = resolve_device(device)
    gpu = dev.type == "cuda"
    repeat = repeat or (32 if gpu else 2)
    warmup = warmup if warmup is not None else (20 if gpu else 2)
    iters = iters or (100 if gpu else 6)
    model, info, chosen = benchmark_model(backbone, crop, points)
    loader, _ = measurement_loader("synthetic", None, "val", crop, info["normalization"], limit=warmup + iters)
    timed_images = list(batches(loader, warmup + iters))[warmup:]
    setups, gflops, settings, clusters = {}, {}, {}, {}
    with torch.no_grad():
        for label, name, options in chosen:
            settings[label] = apply_token_reduction(model, name, **options)
            gflops[label] = statistics.mean(flop_analysis(model, x).total() / 1e9 for x in timed_images)
            setups[label] = lambda name=name, options=options: apply_token_reduction(model, name, **options)
            if name == "act":
                clusters[label] = act_clusters(model, timed_images)
    model.to(dev)
    times = measure(model, loader, dev, repeat, warmup, iters, nullcontext, False, setups, show_progress=False)
    fps = {label: repeat / statistics.mean(t) for label, t in times.items()}
    base = next(label for label, name, _ in chosen if name == "pure")
    lines = [
        f"{backbone} + {decoder_name(model)} at {crop}x{crop}, random weights, synthetic scenes squashed to the crop, "
        f"150 classes; device {device} ({machine_card(dev)}); batch = 1 image x {repeat} copies, "
        f"{warmup} warm-up and {iters} timed forwards per point, all points interleaved, fp32.",
        "",
        "| patch type | settings | GFLOPs | FLOPs ratio | im/s | speed-up | efficiency |",
        "|---|---|---|---|---|---|---|",
    ]
    for label, name, _ in chosen:
        ratio, speedup = gflops[label] / gflops[base], fps[label] / fps[base]
        shown = ", ".join(f"{k}={v}" for k, v in settings[label].items())
        lines.append(f"| {name} | {shown} | {gflops[label]:.3f} | {ratio:.3f} | {fps[label]:.2f} | {speedup:.3f} | "
                     f"{speedup * ratio:.3f} |")
    for label, per_block in clusters.items():
        lines += ["", f"{label}: query clusters per block (of {per_block[1]} tokens): "
                  + ", ".join(f"{c:.1f}" for c in per_block[0])]
    emit("\n".join(lines), out)


def benchmark_model(backbone: str, crop: int, points: tuple[str, ...]
                    ) -> tuple[torch.nn.Module, dict, list[tuple[str, str, dict]]]:
    """A random-weight model holding the parts the points need, its info, and ``(label, patch type, options)``
    per point with measurement defaults, pure first; without points, every patch type that applies."""
    chosen = [parse_point(p) for p in points] or [(name, name, {}) for name in PATCH_TYPES]
    chosen = [(label, name, measurement_options(name, options)[0]) for label, name, options in chosen]
    if all(name != "pure" for _, name, _ in chosen):
        chosen.insert(0, ("pure", "pure", {}))
    model, info = measured_model(None, backbone, None, crop, 150, patch_types=[name for _, name, _ in chosen])
    if not points:
        chosen = [runnable(model, point) for point in chosen if PATCH_TYPES[point[1]].why_not(model) is None]
    return model, info, chosen


def runnable(model: torch.nn.Module, point: tuple[str, str, dict]) -> tuple[str, str, dict]:
    """``point``, or, when its defaults need what a random model lacks (CTS: a trained policy schedule), the
    middle of the patch type's sweep, with a note saying so."""
    label, name, options = point
    try:
        apply_token_reduction(model, name, **options)
    except UsageError as err:
        points = PATCH_TYPES[name].sweep(PATCH_TYPES[name].target(model))
        middle = measurement_options(name, points[len(points) // 2])[0]
        click.echo(f"note: {name} at its defaults: {err}; measured at the middle of its sweep, {middle}", err=True)
        return label, name, middle
    return point


def machine_card(device: torch.device) -> str:
    """The device and versions a table was measured with."""
    if device.type == "cuda":
        card = torch.cuda.get_device_name(device)
    else:
        card = f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} CPU threads"
    return f"{card}, torch {torch.__version__}"


def act_clusters(model: torch.nn.Module, images: list[torch.Tensor]) -> tuple[list[float], int]:
    """ACT's mean cluster count per block over ``images`` (heads and hash rows averaged), and the token count."""
    per_image = []
    for x in images:
        tokens, state = model.encoder.forward_tokens(x)
        per_image.append([float(mean) for _, mean in state.scratch["act_clusters"]])
    return [statistics.mean(column) for column in zip(*per_image)], tokens.shape[1]


def decoder_name(model: torch.nn.Module) -> str:
    """How the table names the model's head."""
    head = getattr(model, "decoder", None) or model.decode_head
    names = {"MaskTransformer": "mask transformer", "DecoderLinear": "linear decoder", "SegformerHead": "SegFormer head"}
    return names.get(type(head).__name__, type(head).__name__)


if __name__ == "__main__":
    main()
