"""What keeping freed CPU memory is worth: forwards under glibc's default malloc against ``keep_freed_memory``.

Each round starts two fresh interpreters, one per setting (the one going first alternates); each builds the
same random-weight model (default ViT-S/16 + mask transformer at 512), times the same forwards on synthetic
scenes (each image repeated ``--batch`` times, the points interleaved) and counts the minor page faults of
every timed forward. The table gives, per point, the median over rounds of each setting's im/s, their ratio
(kept / default, within each round), the speed-up over pure in each setting and the faults per forward.

    python benchmarks/cpu_memory.py [--point algm --point tome:r=8 ...] [--rounds 3] [--out FILE.md]

Points are written as in ``patch_types.py``; pure always runs.
"""

from __future__ import annotations

import json
import resource
import statistics
import subprocess
import sys
from pathlib import Path

import click
import torch

from segm.measure import measurement_loader, timed_call
from segm.model.token_reduction import apply_token_reduction
from segm.runtime import keep_freed_memory
from segm.speedtest import batches

from patch_types import benchmark_model, decoder_name, machine_card
from report import emit

SETTINGS = ("default", "kept")


@click.command()
@click.option("--backbone", default="vit_small_patch16_384", show_default=True)
@click.option("--crop", default=512, show_default=True)
@click.option("--point", "points", multiple=True, help="A patch type and its options, e.g. tome:r=8 (repeatable).")
@click.option("--batch", type=int, default=2, show_default=True, help="Copies of each image per forward.")
@click.option("--warmup", type=int, default=1, show_default=True, help="Untimed forwards per point and interpreter.")
@click.option("--iters", type=int, default=4, show_default=True, help="Timed forwards per point and interpreter.")
@click.option("--rounds", type=int, default=3, show_default=True, help="Pairs of interpreters.")
@click.option("--child", type=click.Choice(SETTINGS), default=None, hidden=True)
@click.option("--out", type=click.Path(path_type=Path), default=None, help="Also write the table here.")
def main(backbone: str, crop: int, points: tuple[str, ...], batch: int, warmup: int, iters: int, rounds: int,
         child: str | None, out: Path | None) -> None:
    """im/s and page faults per forward on CPU, glibc's default malloc against freed memory kept for reuse."""
    if child is not None:
        click.echo(json.dumps(child_run(backbone, crop, points, batch, warmup, iters, child == "kept")))
        return
    runs: dict[str, list[dict]] = {setting: [] for setting in SETTINGS}
    for r in range(rounds):
        for setting in SETTINGS if r % 2 == 0 else SETTINGS[::-1]:
            done = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--child", setting],
                                  capture_output=True, text=True, check=True)
            runs[setting].append(json.loads(done.stdout.strip().splitlines()[-1]))
    first = runs["default"][0]
    lines = [
        f"{backbone} + {first['decoder']} at {crop}x{crop}, random weights, synthetic scenes squashed to the crop, "
        f"150 classes; {first['machine']}; batch = 1 image x {batch} copies, {warmup} warm-up and {iters} timed "
        f"forwards per point, points interleaved; {rounds} rounds of one fresh interpreter per setting, medians "
        "over rounds.",
        "",
        "| patch type | im/s default | im/s kept | kept / default | speed-up over pure default / kept "
        "| faults per forward default / kept |",
        "|---|---|---|---|---|---|",
    ]
    for label in first["fps"]:
        fps = {s: [run["fps"][label] for run in runs[s]] for s in SETTINGS}
        speedup = {s: statistics.median(run["fps"][label] / run["fps"]["pure"] for run in runs[s]) for s in SETTINGS}
        faults = {s: statistics.median(run["faults"][label] for run in runs[s]) for s in SETTINGS}
        ratio = statistics.median(k / d for d, k in zip(fps["default"], fps["kept"]))
        lines.append(f"| {label} | {statistics.median(fps['default']):.2f} | {statistics.median(fps['kept']):.2f} | "
                     f"{ratio:.3f} | {speedup['default']:.3f} / {speedup['kept']:.3f} | "
                     f"{faults['default']:.0f} / {faults['kept']:.0f} |")
    emit("\n".join(lines), out)


def child_run(backbone: str, crop: int, points: tuple[str, ...], batch: int, warmup: int, iters: int,
              kept: bool) -> dict:
    """One interpreter's im/s and median minor faults per timed forward, per point."""
    if kept and not keep_freed_memory():
        raise click.UsageError("freed memory cannot be kept here (not glibc, or MALLOC_* tunables are set)")
    device = torch.device("cpu")
    model, info, chosen = benchmark_model(backbone, crop, points)
    loader, _ = measurement_loader("synthetic", None, "val", crop, info["normalization"], limit=warmup + iters)
    times: dict[str, list[float]] = {label: [] for label, _, _ in chosen}
    faults: dict[str, list[int]] = {label: [] for label, _, _ in chosen}
    with torch.no_grad():
        for i, image in enumerate(batches(loader, warmup + iters)):
            x = image.repeat(batch, 1, 1, 1)
            for label, name, options in chosen if i % 2 == 0 else chosen[::-1]:
                apply_token_reduction(model, name, **options)
                before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
                seconds = timed_call(lambda: model(x), device)
                if i >= warmup:
                    times[label].append(seconds)
                    faults[label].append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    return {"fps": {label: batch / statistics.mean(t) for label, t in times.items()},
            "faults": {label: statistics.median(f) for label, f in faults.items()},
            "decoder": decoder_name(model), "machine": f"cpu ({machine_card(device)})"}


if __name__ == "__main__":
    main()
