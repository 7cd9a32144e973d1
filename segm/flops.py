"""GFLOPs with the published protocol: ``python -m segm.flops --model-dir D --dataset ade20k``.

fvcore's ``FlopCountAnalysis`` (1 multiply-add = 1 flop; matmul, linear, convolution, norms and bilinear
upsampling counted; softmax, GELU, additions, gathers and sorts not) on every validation image squashed
to the crop, averaged over the images, per image even with ``--batch-size`` > 1 (the reference reported
per batch). Fused attention is counted as its two matrix products, at the lengths each patch type
actually uses. Prints ``GFlops: <value>``.
"""

from __future__ import annotations

import json
import statistics
from collections import defaultdict
from typing import Any

import click
import torch
import torch.nn as nn

from segm.cli import (
    Command,
    apply_requested_reduction,
    fail_cleanly,
    reduction_request,
    resolve_device,
    token_reduction_options,
)
from segm.utils.progress import progress
from segm.measure import default_n_cls, flop_analysis, measured_model, measurement_loader, measurement_options


def breakdown(analysis, model: nn.Module) -> dict[str, float]:
    """FLOPs per stage. Attention runs fused, so the ``matmul`` ops inside encoder blocks are the products a
    patch type adds (similarities, scores, hashes): they are reported as token reduction. Parts of the
    model beside encoder and decoder (CTS's policy network) have their own line. The remainder is
    upsampling (and pos-embed resizing)."""
    modules = analysis.by_module()
    operators = analysis.by_module_and_operator()
    rows = {name.replace("_", " "): modules.get(name, 0) for name, _ in model.named_children()
            if name not in ("encoder", "decoder")}
    rows["patch embed"] = modules.get("encoder.patch_embed", 0)
    n_blocks = len(model.encoder.blocks)
    reduction = 0
    for i in range(n_blocks):
        name = f"encoder.blocks.{i}"
        extra = operators.get(name, {}).get("matmul", 0)
        reduction += extra
        rows[f"encoder block {i + 1}"] = modules.get(name, 0) - extra
    rows["encoder norm"] = modules.get("encoder.norm", 0)
    rows["decoder"] = modules.get("decoder", 0)
    rows["token reduction (similarities, scores)"] = reduction
    rows["upsampling and the rest"] = analysis.total() - sum(rows.values())
    return rows


def block_tokens(model: nn.Module, x: torch.Tensor) -> list[tuple[int, int, int]]:
    """Tokens entering each encoder block, its attention projections and its MLP, for input ``x``."""
    counts: dict[tuple[int, str], int] = {}

    def count(i: int, part: str):
        return lambda module, args: counts.__setitem__((i, part), args[0].shape[1])

    hooks = []
    for i, block in enumerate(model.encoder.blocks):
        hooks += [block.register_forward_pre_hook(count(i, "block")),
                  block.attn.qkv.register_forward_pre_hook(count(i, "attn")),
                  block.mlp.register_forward_pre_hook(count(i, "mlp"))]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in hooks:
            h.remove()
    return [(counts[(i, "block")], counts[(i, "attn")], counts[(i, "mlp")]) for i in range(len(model.encoder.blocks))]


@click.command(cls=Command)
@measurement_options
@click.option("--max-images", type=int, default=None, help="Average over the first N images only.")
@click.option("--breakdown", "show_breakdown", is_flag=True, default=False,
              help="Print a table per stage (patch embed, blocks with token counts, decoder, merging + upsampling).")
@token_reduction_options
@fail_cleanly
def main(**opts: Any) -> None:
    """Count GFLOPs per image of a Segmenter (with any patch type), averaged over the validation images.

    With --batch-size > 1 the count is still per image (the published script reported per batch).
    """
    request = reduction_request(opts)
    device = resolve_device(opts["device"])
    model, info = measured_model(opts["model_dir"], opts["backbone"], opts["decoder"], opts["crop_size"],
                                 default_n_cls(opts["dataset"], opts["root"]))
    patch_type, settings = apply_requested_reduction(model, request, info["variant"], measuring=True)
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
                for stage, flops in breakdown(analysis, model).items():
                    stages[stage].append(flops / 1e9 / x.shape[0])
                tokens.append(block_tokens(model, x))
    gflops = statistics.mean(per_image)
    if opts["show_breakdown"]:
        mean_tokens = [[statistics.mean(v) for v in zip(*per_block)] for per_block in zip(*tokens)]
        click.echo("| stage | tokens (block / attention / MLP) | GFLOPs |")
        click.echo("|---|---|---|")
        for stage, values in stages.items():
            n = ""
            if stage.startswith("encoder block"):
                n = " / ".join(f"{c:.1f}" for c in mean_tokens[int(stage.split()[-1]) - 1])
            click.echo(f"| {stage} | {n} | {statistics.mean(values):.4f} |")
    click.echo(json.dumps({"model": info["source"], "data": data_name, "images": len(per_image) * opts["batch_size"],
                           "patch_type": patch_type, "settings": settings, "gflops": round(gflops, 4)}))
    click.echo(f"GFlops: {gflops:.4f}")


if __name__ == "__main__":
    main()
