"""Suggest ALGM's CLAP threshold with the paper's rule (tau = mean + std of the tested similarities).

    python -m segm.calibrate MODEL_PATH DATASET [--max-images N] [--selected-layers 1 5] [--out tau.yml]

A trained pure model runs on training images; for every block the statistics of the similarities that
CLAP and GBM would test after its attention are printed, then the suggested ``--threshold``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click
import yaml

from algm.calibrate import RunningMoments, collect_similarities
from algm.patch import ALGM
from segm.cli import Command, device_option, fail_cleanly, method_options, resolve_device, root_option
from segm.measure import measurement_loader
from segm.model.factory import load_model, variant_crop_size, variant_normalization
from segm.model.token_reduction import remove_token_reduction
from segm.utils.progress import progress


def format_table(stats: list[dict[str, RunningMoments]], selected: list[int]) -> str:
    """A Markdown table of the per-block statistics, marking the roles of the selected layers."""
    lines = ["| layer | role | CLAP mu | CLAP sigma | CLAP tau | GBM mu | GBM sigma | GBM tau |", "|---|---|---|---|---|---|---|---|"]
    for number, layer in enumerate(stats, start=1):
        role = "" if number not in selected else ("CLAP" if number == selected[0] else "GBM")
        c, g = layer["clap"].summary(), layer["gbm"].summary()
        lines.append(f"| {number} | {role} | {c['mean']:.4f} | {c['std']:.4f} | {c['threshold']:.4f} | "
                     f"{g['mean']:.4f} | {g['std']:.4f} | {g['threshold']:.4f} |")
    return "\n".join(lines)


@click.command(cls=Command)
@click.argument("model_path", type=click.Path(path_type=Path))
@click.argument("dataset", type=str)
@root_option
@click.option("--split", type=click.Choice(["train", "val"]), default="train", show_default=True)
@click.option("--max-images", type=click.IntRange(0), default=200, show_default=True, help="Images to run (0: all).")
@method_options("algm", ["selected_layers", "window_size"])
@click.option("--out", type=click.Path(path_type=Path), default=None, help="Write the statistics to this YAML file.")
@device_option
@fail_cleanly
def main(model_path: Path, dataset: str, **opts: Any) -> None:
    """Suggest ALGM thresholds (tau = mean + std of the tested similarities) for a trained pure MODEL_PATH."""
    device = resolve_device(opts["device"])
    model, variant = load_model(model_path)
    remove_token_reduction(model)
    model.to(device)
    loader, data_name = measurement_loader(dataset, opts["root"], opts["split"], variant_crop_size(variant),
                                           variant_normalization(variant), limit=opts["max_images"] or None)
    asked = {"selected_layers": list(opts["selected_layers"]) or None}
    if opts["merging_window_size"] is not None:
        asked["window_size"] = tuple(opts["merging_window_size"])
    algm = ALGM(**asked)
    algm.prepare(ALGM.target(model))
    selected, window = algm.config["selected_layers"], algm.config["window_size"]
    stats = collect_similarities(model, progress(loader, desc="calibrate"), window, device)
    click.echo(f"{len(loader.dataset)} {opts['split']} images of {data_name}, window {window[0]}x{window[1]}")
    click.echo(format_table(stats, selected))
    tau = stats[selected[0] - 1]["clap"].summary()["threshold"]
    click.echo(f"suggested: --selected-layers {' '.join(map(str, selected))} --threshold {tau:.3f}")
    if opts["out"]:
        out = {
            "images": len(loader.dataset), "data": data_name, "window_size": list(window),
            "layers": {n: {k: v.summary() for k, v in layer.items()} for n, layer in enumerate(stats, start=1)},
            "suggested": {"selected_layers": selected, "threshold": round(tau, 4)},
        }
        opts["out"].write_text(yaml.safe_dump(out, sort_keys=False))
        click.echo(f"wrote {opts['out']}")


if __name__ == "__main__":
    main()
