"""ALGM threshold calibration (the paper's rule, for which no tool was published).

Runs a trained pure model on training images and, in every block after attention, collects the
similarities a merge step would test: each CLAP window's mean pairwise cosine similarity and each
token's best GBM partner similarity. Per layer it reports mean mu, std sigma (unbiased, over all values)
and the suggested threshold tau = mu + sigma.

    python -m algm.calibrate MODEL_PATH DATASET [--max-images N] [--selected-layers 1 5] [--out tau.yml]
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Iterable

import click
import torch
import torch.nn as nn
import yaml

from algm.global_merge import best_partners
from algm.local_merge import window_similarity
from segm.cli import Command, fail_cleanly, resolve_device, root_option
from segm.measure import measurement_loader
from segm.model.factory import load_model, variant_crop_size, variant_normalization
from segm.model.token_reduction import default_selected_layers
from segm.utils.progress import progress


class RunningMoments:
    """Count, mean and unbiased standard deviation of a stream of values (float64 sums)."""

    def __init__(self) -> None:
        self.n = 0
        self.total = 0.0
        self.squares = 0.0

    def add(self, values: torch.Tensor) -> None:
        values = values.detach().double().flatten()
        values = values[torch.isfinite(values)]
        self.n += values.numel()
        self.total += values.sum().item()
        self.squares += values.square().sum().item()

    @property
    def mean(self) -> float:
        return self.total / self.n if self.n else math.nan

    @property
    def std(self) -> float:
        if self.n < 2:
            return math.nan
        return math.sqrt(max(self.squares - self.total**2 / self.n, 0.0) / (self.n - 1))

    def summary(self) -> dict[str, float]:
        return {"mean": self.mean, "std": self.std, "threshold": self.mean + self.std, "count": self.n}


def collect_similarities(
    model: nn.Module, batches: Iterable[torch.Tensor], window: tuple[int, int], device: torch.device,
    show_progress: bool = True,
) -> list[dict[str, RunningMoments]]:
    """Per block (in order): moments of CLAP window scores and of GBM best-partner scores after attention."""
    encoder = model.encoder
    n_prefix = encoder.num_prefix_tokens
    stats = [{"clap": RunningMoments(), "gbm": RunningMoments()} for _ in encoder.blocks]
    grid: list[tuple[int, int]] = []
    inputs: dict[int, torch.Tensor] = {}

    def keep_input(i):
        return lambda module, args: inputs.__setitem__(i, args[0])

    def measure(i, block):
        def hook(module, args, output):
            x = inputs.pop(i) + block.drop_path1(block.ls1(output))
            stats[i]["clap"].add(window_similarity(x[:, n_prefix:], grid[0], window))
            stats[i]["gbm"].add(best_partners(x, n_prefix)[0][:, 1:])
        return hook

    hooks = []
    for i, block in enumerate(encoder.blocks):
        hooks.append(block.register_forward_pre_hook(keep_input(i)))
        hooks.append(block.attn.register_forward_hook(measure(i, block)))
    try:
        with torch.no_grad():
            for x in progress(batches, show_progress, desc="calibrate"):
                x = x.to(device)
                grid[:] = [(x.shape[2] // encoder.patch_size, x.shape[3] // encoder.patch_size)]
                encoder.forward_tokens(x)
    finally:
        for h in hooks:
            h.remove()
    return stats


def format_table(stats: list[dict[str, RunningMoments]], selected: list[int]) -> str:
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
@click.option("--max-images", type=int, default=200, show_default=True, help="Images to run (0: all).")
@click.option("--selected-layers", type=int, multiple=True,
              help="ALGM layers whose roles are marked (default: 1 5, or 1 7 for 24 blocks).")
@click.option("--merging-window-size", type=int, nargs=2, default=(2, 2), show_default=True)
@click.option("--out", type=click.Path(path_type=Path), default=None, help="Write the statistics to this YAML file.")
@click.option("--device", type=str, default=None, help="cuda or cpu (default: cuda when available).")
@fail_cleanly
def main(model_path: Path, dataset: str, **opts: Any) -> None:
    """Suggest ALGM thresholds (tau = mean + std of the tested similarities) for a trained pure MODEL_PATH."""
    device = resolve_device(opts["device"])
    model, variant = load_model(model_path)
    model.to(device)
    loader, data_name = measurement_loader(dataset, opts["root"], opts["split"], variant_crop_size(variant),
                                           variant_normalization(variant),
                                           limit=opts["max_images"] or None)
    selected = list(opts["selected_layers"]) or default_selected_layers(len(model.encoder.blocks))
    window = tuple(opts["merging_window_size"])
    stats = collect_similarities(model, loader, window, device)
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
