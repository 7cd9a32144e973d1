"""GFLOPs with the published protocol: ``python -m segm.flops --model-dir D --dataset ade20k``.

fvcore's ``FlopCountAnalysis`` (1 multiply-add = 1 flop; matmul, linear, convolution, norms and bilinear
upsampling counted; softmax, GELU, additions, gathers and sorts not) on every validation image squashed
to the crop, averaged over the images, per image even with ``--batch-size`` > 1 (the reference reported
per batch). Fused attention is counted as its two matrix products. Prints ``GFlops: <value>``.
"""

from __future__ import annotations

import json
import statistics
from collections import defaultdict
from typing import Any

import click
import torch
import torch.nn as nn

from segm.cli import Command, apply_token_reduction_options, fail_cleanly, resolve_device, token_reduction_options
from segm.utils.progress import progress
from segm.measure import default_n_cls, flop_analysis, measured_model, measurement_loader, measurement_options


def breakdown(analysis, n_blocks: int) -> dict[str, float]:
    """FLOPs per stage. Inside encoder blocks attention is fused, so their ``matmul`` ops are ALGM's
    similarity products: they are reported as merging. The remainder is upsampling (and pos-embed resizing)."""
    modules = analysis.by_module()
    operators = analysis.by_module_and_operator()
    rows = {"patch embed": modules.get("encoder.patch_embed", 0)}
    merging = 0
    for i in range(n_blocks):
        name = f"encoder.blocks.{i}"
        merge = operators.get(name, {}).get("matmul", 0)
        merging += merge
        rows[f"encoder block {i + 1}"] = modules.get(name, 0) - merge
    rows["encoder norm"] = modules.get("encoder.norm", 0)
    rows["decoder"] = modules.get("decoder", 0)
    rows["merging (similarities)"] = merging
    rows["upsampling and the rest"] = analysis.total() - sum(rows.values())
    return rows


def block_tokens(model: nn.Module, x: torch.Tensor) -> list[int]:
    """Number of tokens entering each encoder block for input ``x``."""
    counts: list[int] = []
    hooks = [b.register_forward_pre_hook(lambda m, args: counts.append(args[0].shape[1])) for b in model.encoder.blocks]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in hooks:
            h.remove()
    return counts


@click.command(cls=Command)
@measurement_options
@click.option("--max-images", type=int, default=None, help="Average over the first N images only.")
@click.option("--breakdown", "show_breakdown", is_flag=True, default=False,
              help="Print a table per stage (patch embed, blocks with token counts, decoder, merging + upsampling).")
@token_reduction_options
@fail_cleanly
def main(**opts: Any) -> None:
    """Count GFLOPs per image of a Segmenter (optionally with ALGM), averaged over the validation images.

    With --batch-size > 1 the count is still per image (the published script reported per batch).
    """
    device = resolve_device(opts["device"])
    model, info = measured_model(opts["model_dir"], opts["backbone"], opts["decoder"], opts["crop_size"],
                                 default_n_cls(opts["dataset"], opts["root"]))
    apply_token_reduction_options(model, opts)
    model.to(device)
    loader, data_name = measurement_loader(opts["dataset"], opts["root"], "val", info["crop_size"], info["normalization"],
                                           opts["batch_size"], opts["keep_aspect"], opts["max_images"])
    per_image: list[float] = []
    stages: dict[str, list[float]] = defaultdict(list)
    tokens: list[list[int]] = []
    with torch.no_grad():
        for batch in progress(loader, leave=False):
            x = batch.to(device)
            analysis = flop_analysis(model, x)
            per_image.append(analysis.total() / 1e9 / x.shape[0])
            if opts["show_breakdown"]:
                for stage, flops in breakdown(analysis, len(model.encoder.blocks)).items():
                    stages[stage].append(flops / 1e9 / x.shape[0])
                tokens.append(block_tokens(model, x))
    gflops = statistics.mean(per_image)
    if opts["show_breakdown"]:
        mean_tokens = [statistics.mean(col) for col in zip(*tokens)]
        click.echo("| stage | tokens | GFLOPs |")
        click.echo("|---|---|---|")
        for stage, values in stages.items():
            n = mean_tokens[int(stage.split()[-1]) - 1] if stage.startswith("encoder block") else ""
            n = f"{n:.1f}" if n != "" else ""
            click.echo(f"| {stage} | {n} | {statistics.mean(values):.4f} |")
    click.echo(json.dumps({"model": info["source"], "data": data_name, "images": len(per_image) * opts["batch_size"],
                           "patch_type": opts["patch_type"], "gflops": round(gflops, 4)}))
    click.echo(f"GFlops: {gflops:.4f}")


if __name__ == "__main__":
    main()
