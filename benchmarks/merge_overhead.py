"""Where the time of an ALGM forward goes: ViT-S/16 + mask transformer at 512x512, batch 1.

Times >= 20 forwards after warm-up (random weights, synthetic scenes), splits them into stages by timing
the merge functions, the unmerge and the decoder in place, and prints a Markdown table. The last line is
``merge share: X%``: CLAP + GBM + unmerge (bookkeeping and host syncs included) over the whole forward.

    python benchmarks/merge_overhead.py [--device cuda] [--iters 20] [--out benchmarks/results/merge_overhead_cpu.md]
"""

from __future__ import annotations

import platform
import statistics
import time
from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path

import click
import torch

import algm.patch
from segm.cli import Command, resolve_device
from segm.data import create_dataset
from segm.measure import synchronize
from segm.model.factory import create_segmenter, net_kwargs_for
from segm.model.token_reduction import apply_token_reduction
from tokred.state import MergeState

from report import emit


class StageTimer:
    """Accumulates wall time per stage; synchronises the device around every timed call."""

    def __init__(self, device: torch.device):
        self.device = device
        self.times: dict[str, list[float]] = defaultdict(list)
        self.current: dict[str, float] = defaultdict(float)

    def sync(self) -> None:
        synchronize(self.device)

    @contextmanager
    def stage(self, name: str):
        self.sync()
        start = time.perf_counter()
        yield
        self.sync()
        self.current[name] += time.perf_counter() - start

    def wrap(self, name: str, func):
        def timed(*args, **kwargs):
            with self.stage(name):
                return func(*args, **kwargs)

        return timed

    def end_iteration(self) -> None:
        for name, value in self.current.items():
            self.times[name].append(value)
        self.current = defaultdict(float)


def synthetic_batch(im_size: int, normalization: str, device: torch.device) -> torch.Tensor:
    """One synthetic scene resized to ``im_size`` and normalised."""
    dataset = create_dataset("synthetic", "val", im_size=im_size, crop_size=im_size, normalization=normalization)
    return dataset[0]["im"][0][None, :, :im_size, :im_size].to(device)


@click.command(cls=Command)
@click.option("--device", default="cpu", show_default=True)
@click.option("--iters", default=20, show_default=True, help="Timed forwards (after warm-up).")
@click.option("--warmup", default=3, show_default=True)
@click.option("--threshold", default=0.88, show_default=True, help="CLAP threshold.")
@click.option("--out", type=click.Path(path_type=Path), default=None, help="Also write the table here.")
def main(device: str, iters: int, warmup: int, threshold: float, out: Path | None) -> None:
    """Time the stages of an ALGM forward (ViT-S/16, 512x512, batch 1)."""
    torch.manual_seed(0)
    dev = resolve_device(device)
    model = create_segmenter(net_kwargs_for("vit_small_patch16_384", "mask_transformer", 150, 512)).eval().to(dev)
    x = synthetic_batch(512, "vit", dev)
    timer = StageTimer(dev)

    pure_times = []
    with torch.no_grad():
        for i in range(warmup + iters):
            timer.sync()
            start = time.perf_counter()
            model(x)
            timer.sync()
            if i >= warmup:
                pure_times.append(time.perf_counter() - start)

    apply_token_reduction(model, "algm", selected_layers=[1, 5], threshold=threshold, trace_source=True)
    with torch.no_grad():
        _, state = model.encoder.forward_tokens(x)
    counts = [int(h.max()) + 1 for h in state.history]
    apply_token_reduction(model, "algm", selected_layers=[1, 5], threshold=threshold)

    originals = (algm.patch.conditional_pooling, algm.patch.global_merge, MergeState.unmerge)
    algm.patch.conditional_pooling = timer.wrap("CLAP", originals[0])
    algm.patch.global_merge = timer.wrap("GBM", originals[1])
    MergeState.unmerge = timer.wrap("unmerge", originals[2])
    model.decoder.token_logits = timer.wrap("decoder", model.decoder.token_logits)
    model.encoder.embed = timer.wrap("patch embed", model.encoder.embed)
    try:
        with torch.no_grad():
            for i in range(warmup + iters):
                with timer.stage("total"):
                    model(x)
                if i < warmup:
                    timer.current.clear()
                else:
                    timer.end_iteration()
    finally:
        algm.patch.conditional_pooling, algm.patch.global_merge, MergeState.unmerge = originals

    mean = {name: statistics.mean(values) for name, values in timer.times.items()}
    named = ("patch embed", "CLAP", "GBM", "unmerge", "decoder")
    blocks = mean["total"] - sum(mean[n] for n in named)
    rows = [("patch embed", mean["patch embed"]), ("attention + MLP (blocks, norm, upsampling)", blocks),
            ("CLAP", mean["CLAP"]), ("GBM", mean["GBM"]), ("unmerge", mean["unmerge"]),
            ("decoder", mean["decoder"]), ("total ALGM forward", mean["total"])]
    share = 100 * (mean["CLAP"] + mean["GBM"] + mean["unmerge"]) / mean["total"]
    lines = [
        f"ViT-S/16 + mask transformer, 512x512, batch 1, ALGM layers 1 5, window 2x2, threshold {threshold}; "
        f"device {device} ({platform.processor() or platform.machine()}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads); mean of {iters} forwards after {warmup} warm-up.",
        f"Tokens: 1025 -> {counts[0]} after CLAP (layer 1) -> {counts[1]} after GBM (layer 5).",
        "",
        "| stage | ms | share |",
        "|---|---|---|",
        *[f"| {name} | {1000 * t:.2f} | {100 * t / mean['total']:.1f}% |" for name, t in rows],
        f"| pure forward (unpatched, same weights) | {1000 * statistics.mean(pure_times):.2f} | |",
        "",
        f"ALGM / pure time: {mean['total'] / statistics.mean(pure_times):.3f}",
        "",
        f"merge share: {share:.2f}%",
    ]
    emit("\n".join(lines), out)


if __name__ == "__main__":
    main()
