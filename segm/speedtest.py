"""Images per second with the published protocol: ``python -m segm.speedtest --model-dir D --dataset ade20k``.

Every loader batch is repeated ``--repeat`` (32) times, the first ``--warmup`` (50) forwards are not timed,
every later forward is timed between device synchronisations, and ``im/s = repeat * batch / mean time``
(no_grad; fp32 unless ``--dtype``, eager unless ``--compile``). ``--compare A,B`` times two patch types in
one process, interleaved on the same images.
Prints ``FPS: <im/s>`` and a one-line JSON summary.
"""

from __future__ import annotations

import functools
import itertools
import json
from typing import Any, Callable, Iterator

import click
import torch
import torch.nn as nn

from segm.cli import (
    POSITIVE,
    Command,
    ReductionRequest,
    apply_requested_reduction,
    compile_option,
    dtype_option,
    fail_cleanly,
    reduction_request,
    resolve_device,
    token_reduction_options,
)
from segm.measure import default_n_cls, measured_model, measurement_loader, measurement_options, timed_call
from segm.model.token_reduction import PATCH_TYPES, apply_token_reduction, variant_token_reduction
from segm.runtime import compile_model, dtype_autocast
from segm.utils.progress import progress
from tokred.errors import UsageError

def timed_forward(model: nn.Module, x: torch.Tensor, device: torch.device, autocast: Callable) -> float:
    """Seconds of one forward, between device synchronisations."""
    def forward() -> None:
        with autocast():
            model(x)
    return timed_call(forward, device)


def batches(loader, n: int) -> Iterator[torch.Tensor]:
    """``n`` batches, going through the loader again when it is shorter."""
    return itertools.islice(itertools.cycle(loader), n) if len(loader) < n else itertools.islice(loader, n)


def measure(
    model: nn.Module, loader, device: torch.device, repeat: int, warmup: int, iters: int | None,
    autocast: Callable, channels_last: bool, variants: dict[str, Callable[[], Any]],
    show_progress: bool = True,
) -> dict[str, list[float]]:
    """Timings per variant, interleaved per batch. A variant is a setup function (patch or unpatch the model)
    run before each of its forwards; one that returns a module (the compiled model) has that module timed."""
    timed = iters if iters is not None else max(len(loader) - warmup, 1)
    times: dict[str, list[float]] = {name: [] for name in variants}
    names = list(variants)
    with torch.no_grad():
        stream = batches(loader, warmup + timed)
        for i, batch in enumerate(progress(stream, show_progress, total=warmup + timed, leave=False)):
            x = batch.to(device).repeat(repeat, 1, 1, 1)
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            order = names if i % 2 == 0 else names[::-1]
            for name in order:
                forward = variants[name]()
                forward = forward if isinstance(forward, nn.Module) else model
                if i < warmup:
                    with autocast():
                        forward(x)
                else:
                    times[name].append(timed_forward(forward, x, device, autocast))
    return times


def compared_patch_types(text: str) -> list[str]:
    """``"pure,algm"`` -> two registered patch-type names, or a ``UsageError``."""
    names = [n.strip() for n in text.split(",")]
    if len(names) != 2 or names[0] == names[1]:
        raise UsageError(f"--compare takes two different patch types, e.g. pure,tome; got '{text}'")
    unknown = [n for n in names if n not in PATCH_TYPES]
    if unknown:
        raise UsageError(f"--compare: unknown patch type '{unknown[0]}'; known patch types: {', '.join(PATCH_TYPES)}")
    return names


def reduction_setups(model: nn.Module, request: ReductionRequest, variant: dict[str, Any] | None,
                     compared: list[str], trace_source: bool) -> dict[str, Callable[[], None]]:
    """One setup function per timed variant, run before each of its forwards; alone (no ``compared`` patch
    types), the reduction is applied once."""
    if not compared:
        patch_type, _ = apply_requested_reduction(model, request, variant, trace_source)
        return {patch_type: lambda: None}
    request.refuse_flags_outside(compared, f"--compare times {' and '.join(compared)}")
    recorded = variant_token_reduction(variant) if variant is not None else None
    setups = {}
    for name in compared:
        base = recorded[1] if recorded is not None and recorded[0] == name else {}
        options = request.settings_for(name, base)
        setups[name] = functools.partial(apply_token_reduction, model, name, trace_source=trace_source, **options)
        setups[name]()  # settings are checked before any image is loaded
    return setups


@click.command(cls=Command)
@measurement_options
@click.option("--repeat", type=POSITIVE, default=32, show_default=True, help="Copies of each batch per forward.")
@click.option("--warmup", type=click.IntRange(0), default=50, show_default=True, help="Untimed forwards first.")
@click.option("--iters", type=POSITIVE, default=None, help="Timed forwards (default: the rest of the validation set).")
@dtype_option("the timed forwards")
@compile_option
@click.option("--channels-last", is_flag=True, default=False, help="Channels-last input (helps the patch embedding).")
@click.option("--compare", is_flag=False, flag_value="pure,algm", default=None, metavar="A,B",
              help="Time two patch types interleaved on the same images (alone: pure,algm); prints both and the speed-up.")
@click.option("--trace-source", is_flag=True, default=False, help="Keep the per-step index maps (visualisation cost).")
@token_reduction_options
@fail_cleanly
def main(**opts: Any) -> None:
    """Measure images/s of a Segmenter (with any patch type) with the published protocol."""
    request = reduction_request(opts)
    device = resolve_device(opts["device"])
    if opts["compare"] and request.patch_type is not None:
        raise UsageError("--compare names the patch types to time; drop --patch-type")
    compared = compared_patch_types(opts["compare"]) if opts["compare"] else []
    model, info = measured_model(opts["model_dir"], opts["backbone"], opts["decoder"], opts["crop_size"],
                                 default_n_cls(opts["dataset"], opts["root"]),
                                 patch_types=[request.patch_type, *compared])
    variants = reduction_setups(model, request, info["variant"], compared, opts["trace_source"])
    model.to(device)
    if opts["channels_last"]:
        model.to(memory_format=torch.channels_last)
    loader, data_name = measurement_loader(opts["dataset"], opts["root"], "val", info["crop_size"], info["normalization"],
                                           opts["batch_size"], opts["keep_aspect"])
    autocast = dtype_autocast(device, opts["dtype"])
    forward = compile_model(model) if opts["compiled"] else model
    times = measure(forward, loader, device, opts["repeat"], opts["warmup"], opts["iters"], autocast,
                    opts["channels_last"], variants)
    images = opts["repeat"] * opts["batch_size"]
    fps = {name: round(images / (sum(t) / len(t)), 2) for name, t in times.items()}
    summary = {
        "model": info["source"], "data": data_name, "device": str(device), "dtype": opts["dtype"], "compiled": opts["compiled"],
        "batch": images, "timed_forwards": len(next(iter(times.values()))), "warmup": opts["warmup"],
        "input": "keep-aspect" if opts["keep_aspect"] else f"{info['crop_size']}x{info['crop_size']}",
        "fps": fps,
    }
    if opts["compare"]:
        first, second = list(variants)
        summary["speedup"] = round(fps[second] / fps[first], 3)
        click.echo(f"FPS {first}: {fps[first]}")
        click.echo(f"FPS {second}: {fps[second]}")
        click.echo(f"speed-up: {summary['speedup']}")
    click.echo(f"FPS: {fps[list(variants)[-1]]}")
    click.echo(json.dumps(summary))


if __name__ == "__main__":
    main()
