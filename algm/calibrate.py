"""ALGM threshold calibration (the paper's rule, for which no tool was published).

A trained pure model runs on training images and, in every block after attention, the similarities a
merge step would test are collected: each CLAP window's mean pairwise cosine similarity and each
token's best GBM partner similarity. Per layer: mean mu, std sigma (unbiased, over all values) and the
suggested threshold tau = mu + sigma. The command is ``python -m segm.calibrate``.
"""

from __future__ import annotations

import math
from typing import Iterable

import torch
import torch.nn as nn

from algm.local_merge import window_similarity
from tokred.bipartite import best_partners


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
            for x in batches:
                x = x.to(device)
                grid[:] = [(x.shape[2] // encoder.patch_size, x.shape[3] // encoder.patch_size)]
                encoder.forward_tokens(x)
    finally:
        for h in hooks:
            h.remove()
    return stats
