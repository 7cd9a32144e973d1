"""The reports of ``segm.compare``: one Markdown table with ratios to pure, a two-panel Pareto plot and the
protocol card that every number needs beside it."""

from __future__ import annotations

import json
import platform
from pathlib import Path
from typing import Any

import click
import timm
import torch

from segm.model.token_reduction import PATCH_TYPES


def options_of(record: dict[str, Any]) -> dict[str, Any]:
    """The options a point asked for (its sweep entry on top of the checkpoint's settings)."""
    return json.loads(record["key"])["options"]


def ordered(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Records by method (registry order) then by GFLOPs."""
    rank = {name: i for i, name in enumerate(PATCH_TYPES)}
    return sorted(records, key=lambda r: (rank.get(r["method"], len(rank)), r["gflops"]))


def results_table(records: list[dict[str, Any]]) -> str:
    """The Markdown table: absolute figures, and ratios to the pure point when there is one."""
    pure = next((r for r in records if r["method"] == "pure"), None)
    lines = ["| method | options | mIoU | ΔmIoU | GFLOPs | GFLOPs ratio | im/s | speed-up | efficiency | bookkeeping | "
             "tokens (first / last block) |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in ordered(records):
        options = ", ".join(f"{k}={v}" for k, v in options_of(r).items()) or "-"
        blocks = list(r["tokens"].values())
        tokens = f"{blocks[0][0]} / {blocks[-1][0]}" if blocks else "-"
        if pure is not None:
            ratio, speedup = r["gflops"] / pure["gflops"], r["speedup"]
            relative = f"{r['mean_iou'] - pure['mean_iou']:+.2f} | {r['gflops']:.4g} | {ratio:.3f} | {r['fps']:.4g} | " \
                       f"{speedup:.3f} | {speedup * ratio:.3f}"
        else:
            relative = f"- | {r['gflops']:.4g} | - | {r['fps']:.4g} | - | -"
        lines.append(f"| {r['method']} | {options} | {r['mean_iou']:.2f} | {relative} | "
                     f"{100 * r['time_shares']['bookkeeping']:.1f} % | {tokens} |")
    return "\n".join(lines)


def pareto_plot(records: list[dict[str, Any]], path: Path) -> bool:
    """mIoU against GFLOPs and against the paired speed-up over pure, a line per method and pure as a star.

    The speed-up, not im/s, because it is the ratio that background load cancels out of. False without
    matplotlib.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    by_method: dict[str, list[dict[str, Any]]] = {}
    for r in ordered(records):
        by_method.setdefault(r["method"], []).append(r)
    for method, points in by_method.items():
        for ax, key in zip(axes, ("gflops", "speedup")):
            pairs = sorted((p[key], p["mean_iou"]) for p in points)  # a line from left to right
            xs, ys = [x for x, _ in pairs], [y for _, y in pairs]
            if method == "pure":
                ax.scatter(xs, ys, marker="*", s=180, color="black", zorder=3, label="pure")
            else:
                ax.plot(xs, ys, marker="o", label=method)
    for ax, label in zip(axes, ("GFLOPs per image", "speed-up over pure (paired timing)")):
        ax.set_xlabel(label)
        ax.set_ylabel("mIoU")
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def protocol_card(protocol: dict[str, Any]) -> str:
    """The measurement protocol as a Markdown table, with the software it ran on."""
    rows = {**protocol, "torch": torch.__version__, "timm": timm.__version__, "python": platform.python_version(),
            "machine": platform.machine()}
    return "\n".join(["| | |", "|---|---|", *(f"| {k} | {v} |" for k, v in rows.items())])


def write_reports(out: Path, records: list[dict[str, Any]], protocol: dict[str, Any]) -> list[Path]:
    """Write ``results.md``, ``protocol.md`` and (with matplotlib) ``pareto.png``; returns the written paths."""
    written = [out / "results.md", out / "protocol.md"]
    written[0].write_text(results_table(records) + "\n")
    written[1].write_text(protocol_card(protocol) + "\n")
    if pareto_plot(records, out / "pareto.png"):
        written.append(out / "pareto.png")
    else:
        click.echo('note: matplotlib is not installed, so there is no pareto.png; pip install -e ".[plot]"', err=True)
    return written
