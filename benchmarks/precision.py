"""Does token reduction keep its speed-up in lower precision? Every patch type against pure, per autocast dtype.

One random-weight model (default ViT-S/16 + mask transformer at 512), synthetic scenes squashed to the
crop, each image repeated ``--batch`` times per forward (the speedtest protocol). Per dtype, all points
are timed interleaved on the same images, so each speed-up over pure is a ratio within one run; ``kept``
is a point's speed-up in that dtype divided by its fp32 speed-up (1.0: the reduction is worth as much in
that precision). The shares of one profiled eager forward split its time into reduction bookkeeping
(``tokred::`` ranges), the final upsampling of the class masks (``segm::upsample``) and the rest.

With ``--compile`` every point also runs through ``segm.runtime.compile_model``: an untimed pass over
``--compile-warmup`` other images compiles every graph (merge counts vary between them), then the
compiled forwards are timed interleaved with the eager ones; the table adds compiled im/s, the compiled
speed-up over eager, the bound on it (1 / the eager share of library kernels, which compiling leaves as
they are), the graphs compiled while timing (0: no image after the warm-up compiled anything) and the
graph breaks.

    python benchmarks/precision.py [--point algm --point tome:r=8 ...] [--dtypes fp32,bf16] [--compile]
                                   [--out FILE.md]

Points are written as in ``patch_types.py``; without ``--point`` every ViT patch type runs at its defaults.
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Callable

import click
import torch
import torch._dynamo
from torch._dynamo.utils import counters

from segm.cli import resolve_device
from segm.measure import measurement_loader, time_shares
from segm.model.token_reduction import apply_token_reduction
from segm.runtime import DTYPES, compile_model, dtype_autocast
from segm.speedtest import batches, measure

from patch_types import benchmark_model, decoder_name, machine_card
from report import emit


@click.command()
@click.option("--backbone", default="vit_small_patch16_384", show_default=True)
@click.option("--crop", default=512, show_default=True)
@click.option("--point", "points", multiple=True, help="A patch type and its options, e.g. tome:r=8 (repeatable).")
@click.option("--device", default="cpu", show_default=True)
@click.option("--dtypes", default=None, help="Comma-separated autocast dtypes (default: fp32,bf16 on CPU, "
              "fp32,bf16,fp16 on GPU); fp32 always runs, as the reference of 'kept'.")
@click.option("--batch", type=int, default=None, help="Copies per forward (default: 32 on GPU, 4 on CPU).")
@click.option("--warmup", type=int, default=None, help="Untimed forwards (default: 20 on GPU, 1 on CPU).")
@click.option("--iters", type=int, default=None, help="Timed forwards per point and dtype (default: 100 on GPU, "
              "3 on CPU).")
@click.option("--compile", "compiled", is_flag=True, default=False, help="Also time every point compiled.")
@click.option("--compile-warmup", type=int, default=8, show_default=True,
              help="Images of the untimed compiled pass (not the timed ones).")
@click.option("--out", type=click.Path(path_type=Path), default=None, help="Also write the table here.")
def main(backbone: str, crop: int, points: tuple[str, ...], device: str, dtypes: str | None, batch: int | None,
         warmup: int | None, iters: int | None, compiled: bool, compile_warmup: int, out: Path | None) -> None:
    """Speed-up over pure of every patch type in fp32 and in lower-precision autocast, with time shares."""
    dev = resolve_device(device)
    gpu = dev.type == "cuda"
    names = [d.strip() for d in (dtypes or ("fp32,bf16,fp16" if gpu else "fp32,bf16")).split(",")]
    unknown = [d for d in names if d not in DTYPES]
    if unknown:
        raise click.BadParameter(f"unknown dtype {unknown[0]!r}; choose from {', '.join(DTYPES)}", param_hint="--dtypes")
    names = ["fp32"] + [d for d in dict.fromkeys(names) if d != "fp32"]
    batch = batch or (32 if gpu else 4)
    warmup = warmup if warmup is not None else (20 if gpu else 1)
    iters = iters or (100 if gpu else 3)
    model, info, chosen = benchmark_model(backbone, crop, points)
    model.to(dev)
    extra = compile_warmup if compiled else 0
    loader, _ = measurement_loader("synthetic", None, "val", crop, info["normalization"], limit=warmup + iters + extra)
    images = list(batches(loader, warmup + iters + extra))
    timed, compile_images = images[: warmup + iters], images[warmup + iters :]
    probe = timed[0].to(dev).repeat(batch, 1, 1, 1)
    setups, settings = {}, {}
    for label, name, options in chosen:
        settings[label] = apply_token_reduction(model, name, **options)
        setups[label] = lambda name=name, options=options: apply_token_reduction(model, name, **options)
    fps: dict[str, dict[str, float]] = {}
    fps_compiled: dict[str, dict[str, float]] = {}
    late_graphs: dict[str, int] = {}
    shares: dict[str, dict[str, dict[str, float]]] = {}
    forward = compile_model(model) if compiled else None
    compiled_setups = {f"{label} compiled": running(setup, forward) for label, setup in setups.items()} if compiled else {}
    for dtype in names:
        autocast = dtype_autocast(dev, dtype)
        if forward is not None:
            measure(model, compile_images, dev, batch, len(compile_images), 0, autocast, False, compiled_setups,
                    show_progress=False)
        before = counters["stats"]["unique_graphs"]
        times = measure(model, timed, dev, batch, warmup, iters, autocast, False, {**setups, **compiled_setups},
                        show_progress=False)
        late_graphs[dtype] = counters["stats"]["unique_graphs"] - before
        rates = {label: batch / statistics.mean(t) for label, t in times.items()}
        fps[dtype] = {label: rates[label] for label in setups}
        if forward is not None:
            fps_compiled[dtype] = {label: rates[f"{label} compiled"] for label in setups}
        shares[dtype] = {}
        for label, setup in setups.items():
            setup()
            shares[dtype][label] = time_shares(model, probe, autocast, runs=1)
    breaks = {label: graph_breaks(model, setup, probe) for label, setup in setups.items()} if compiled else {}
    base = next(label for label, name, _ in chosen if name == "pure")
    emit("\n".join(report_lines(backbone, decoder_name(model), crop, dev, batch, warmup, iters, names, chosen,
                                settings, fps, shares, base, fps_compiled, late_graphs, breaks)), out)


def running(setup: Callable[[], object], forward: torch.nn.Module) -> Callable[[], torch.nn.Module]:
    """A ``measure`` variant that applies ``setup`` to the model, then times ``forward`` (the compiled model)."""
    def variant() -> torch.nn.Module:
        setup()
        return forward
    return variant


def graph_breaks(model: torch.nn.Module, setup: Callable[[], None], x: torch.Tensor) -> str:
    """Where compiling one point's forward breaks the graph: ``count x file:line`` per place, or none."""
    setup()
    with torch.no_grad():
        explained = torch._dynamo.explain(model)(x)
    places: dict[str, int] = {}
    for reason in explained.break_reasons:
        frame = reason.user_stack[-1] if reason.user_stack else None
        place = f"{Path(frame.filename).parent.name}/{Path(frame.filename).name}:{frame.lineno}" if frame else "?"
        places[place] = places.get(place, 0) + 1
    return ", ".join(f"{n} x {place}" for place, n in places.items()) or "none"


def report_lines(backbone: str, decoder: str, crop: int, device: torch.device, batch: int, warmup: int, iters: int,
                 dtypes: list[str], chosen: list[tuple[str, str, dict]], settings: dict[str, dict],
                 fps: dict[str, dict[str, float]], shares: dict[str, dict[str, dict[str, float]]], base: str,
                 fps_compiled: dict[str, dict[str, float]], late_graphs: dict[str, int], breaks: dict[str, str]
                 ) -> list[str]:
    """The Markdown report: a speed table over dtypes, the compiled table (if timed), then the time shares."""
    head = "| patch type | settings | " + " | ".join(f"im/s {d} | speed-up {d}" + (f" | kept {d}" if d != "fp32" else "")
                                                  for d in dtypes) + " |"
    lines = [
        f"{backbone} + {decoder} at {crop}x{crop}, random weights, synthetic scenes squashed to the crop, 150 classes; "
        f"device {device.type} ({machine_card(device)}); batch = 1 image x {batch} copies, {warmup} warm-up and "
        f"{iters} timed forwards per point and dtype, points interleaved within each dtype.",
        "",
        head,
        "|" + "---|" * (head.count("|") - 1),
    ]
    for label, name, _ in chosen:
        shown = ", ".join(f"{k}={v}" for k, v in settings[label].items())
        cells = []
        for d in dtypes:
            speedup = fps[d][label] / fps[d][base]
            cells.append(f"{fps[d][label]:.2f} | {speedup:.3f}")
            if d != "fp32":
                cells[-1] += f" | {speedup / (fps['fp32'][label] / fps['fp32'][base]):.3f}"
        lines.append(f"| {name} | {shown} | " + " | ".join(cells) + " |")
    if fps_compiled:
        head = "| patch type | " + " | ".join(f"im/s {d} | speed-up {d} | vs eager {d} | bound {d}"
                                               for d in dtypes) + " | graph breaks |"
        compiled_late = ", ".join(f"{d}: {late_graphs[d]}" for d in dtypes)
        lines += ["", "Compiled, after an untimed pass over other images, timed interleaved with eager ('vs eager': "
                  "compiled / eager im/s of the same point and dtype; 'bound': 1 / the share of the eager forward "
                  "spent in the library kernels a compiled forward calls as they are (matrix products, attention, "
                  "convolution, upsampling), the most compiling can win if the kernels keep their speed; graphs "
                  f"compiled while timing, all points: {compiled_late}):", "", head,
                  "|" + "---|" * (head.count("|") - 1)]
        for label, name, _ in chosen:
            cells = [f"{fps_compiled[d][label]:.2f} | {fps_compiled[d][label] / fps_compiled[d][base]:.3f} | "
                     f"{fps_compiled[d][label] / fps[d][label]:.3f} | {1 / shares[d][label]['kernels']:.3f}"
                     for d in dtypes]
            lines.append(f"| {name} | " + " | ".join(cells) + f" | {breaks[label]} |")
    lines += ["", "Shares of one profiled eager forward (bookkeeping / upsampling / rest):", "",
              "| patch type | " + " | ".join(dtypes) + " |", "|---|" + "---|" * len(dtypes)]
    for label, name, _ in chosen:
        cells = []
        for d in dtypes:
            s = shares[d][label]
            rest = 1.0 - s["bookkeeping"] - s["upsampling"]
            cells.append(f"{100 * s['bookkeeping']:.1f} % / {100 * s['upsampling']:.1f} % / {100 * rest:.1f} %")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


if __name__ == "__main__":
    main()
