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
    POSITIVE,
    Command,
    apply_requested_reduction,
    fail_cleanly,
    reduction_request,
    resolve_device,
    token_reduction_options,
)
from segm.utils.progress import progress
from segm.measure import default_n_cls, flop_analysis, measured_model, measurement_loader, measurement_options


MAIN_PARTS = ("encoder", "decoder", "backbone", "decode_head")


def encoder_parts(model: nn.Module) -> list[tuple[str, str, bool]]:
    """``(label, module path, is a block)`` of the encoder in order: a ViT's patch embedding, blocks and norm,
    or, per stage of a MiT, its patch embedding, blocks and norm."""
    if hasattr(model, "encoder"):
        blocks = [(f"encoder block {i + 1}", f"encoder.blocks.{i}", True) for i in range(len(model.encoder.blocks))]
        return [("patch embed", "encoder.patch_embed", False), *blocks, ("encoder norm", "encoder.norm", False)]
    parts = []
    for s, stage in enumerate(model.backbone.layers):
        parts.append((f"stage {s + 1} patch embed", f"backbone.layers.{s}.0", False))
        parts += [(f"stage {s + 1} block {j + 1}", f"backbone.layers.{s}.1.{j}", True) for j in range(len(stage[1]))]
        parts.append((f"stage {s + 1} norm", f"backbone.layers.{s}.2", False))
    return parts


def breakdown(analysis, model: nn.Module) -> dict[str, float]:
    """FLOPs per stage. Attention runs fused, so the ``matmul`` ops inside encoder blocks are the products a
    patch type adds (similarities, scores, hashes): they are reported as token reduction. Parts of the
    model beside encoder and decoder (CTS's policy network) have their own line. The remainder is
    upsampling (and pos-embed resizing)."""
    modules = analysis.by_module()
    operators = analysis.by_module_and_operator()
    rows = {name.replace("_", " "): modules.get(name, 0) for name, _ in model.named_children() if name not in MAIN_PARTS}
    reduction = 0
    for label, path, is_block in encoder_parts(model):
        extra = operators.get(path, {}).get("matmul", 0) if is_block else 0
        reduction += extra
        rows[label] = modules.get(path, 0) - extra
    rows["decoder"] = modules.get("decoder", modules.get("decode_head", 0))
    rows["token reduction (similarities, scores)"] = reduction
    rows["upsampling and the rest"] = analysis.total() - sum(rows.values())
    return rows


def block_tokens(model: nn.Module, x: torch.Tensor) -> dict[str, tuple[int, ...]]:
    """Per block label, the tokens entering it, its attention's queries and keys (ViT: its attention
    projections) and its MLP, for input ``x``."""
    counts: dict[str, list[int]] = {}

    def count(label: str, slot: int, arg: int = 0):
        return lambda module, args: counts.setdefault(label, [0, 0, 0]).__setitem__(slot, args[arg].shape[1])

    hooks = []
    for label, path, is_block in encoder_parts(model):
        if not is_block:
            continue
        block = model.get_submodule(path)
        hooks.append(block.register_forward_pre_hook(count(label, 0)))
        if hasattr(model, "encoder"):
            hooks += [block.attn.qkv.register_forward_pre_hook(count(label, 1)),
                      block.mlp.register_forward_pre_hook(count(label, 2))]
        else:
            hooks += [block.attn.attn.register_forward_pre_hook(count(label, 1, 0)),
                      block.attn.attn.register_forward_pre_hook(count(label, 2, 1))]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in hooks:
            h.remove()
    return {label: tuple(c) for label, c in counts.items()}


@click.command(cls=Command)
@measurement_options
@click.option("--max-images", type=POSITIVE, default=None, help="Average over the first N images only.")
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
                                 default_n_cls(opts["dataset"], opts["root"]),
                                 patch_types=[request.patch_type])
    patch_type, settings = apply_requested_reduction(model, request, info["variant"], measuring=True)
    model.to(device)
    loader, data_name = measurement_loader(opts["dataset"], opts["root"], "val", info["crop_size"], info["normalization"],
                                           opts["batch_size"], opts["keep_aspect"], opts["max_images"])
    per_image: list[float] = []
    stages: dict[str, list[float]] = defaultdict(list)
    tokens: dict[str, list[tuple[int, ...]]] = defaultdict(list)
    with torch.no_grad():
        for batch in progress(loader, leave=False):
            x = batch.to(device)
            analysis = flop_analysis(model, x)
            per_image.append(analysis.total() / 1e9 / x.shape[0])
            if opts["show_breakdown"]:
                for stage, flops in breakdown(analysis, model).items():
                    stages[stage].append(flops / 1e9 / x.shape[0])
                for label, counts in block_tokens(model, x).items():
                    tokens[label].append(counts)
    gflops = statistics.mean(per_image)
    if opts["show_breakdown"]:
        columns = "block / attention / MLP" if hasattr(model, "encoder") else "block / queries / keys"
        click.echo(f"| stage | tokens ({columns}) | GFLOPs |")
        click.echo("|---|---|---|")
        for stage, values in stages.items():
            n = " / ".join(f"{statistics.mean(c):.1f}" for c in zip(*tokens[stage])) if stage in tokens else ""
            click.echo(f"| {stage} | {n} | {statistics.mean(values):.4f} |")
    click.echo(json.dumps({"model": info["source"], "data": data_name, "images": len(per_image) * opts["batch_size"],
                           "patch_type": patch_type, "settings": settings, "gflops": round(gflops, 4)}))
    click.echo(f"GFlops: {gflops:.4f}")


if __name__ == "__main__":
    main()
