"""Shared test helpers: small Segmenter variants with random weights, checkpoints written to tmp dirs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from segm.model.factory import create_segmenter, net_kwargs_for


def tiny_net_kwargs(decoder: str = "mask_transformer", backbone: str = "vit_tiny_patch16_384",
                    n_cls: int = 5, crop: int = 64) -> dict:
    """``net_kwargs`` of a small real backbone at a small crop (fast on the CPU)."""
    return net_kwargs_for(backbone, decoder, n_cls=n_cls, crop_size=crop)


def perturb_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Give norms and biases non-trivial values so that tests see them (initialised to 1 / 0)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn(p.shape, generator=gen))
    return model


def write_checkpoint(directory: Path, model: torch.nn.Module, net_kwargs: dict,
                     dtype: torch.dtype = torch.float32, tuple_tags: bool = True) -> Path:
    """Write ``checkpoint.pth`` + ``variant.yml`` in the reference's format; returns the checkpoint path."""
    directory.mkdir(parents=True, exist_ok=True)
    net = dict(net_kwargs)
    if tuple_tags:
        net["image_size"] = tuple(net["image_size"])
    with open(directory / "variant.yml", "w") as f:
        yaml.dump({"net_kwargs": net, "dataset_kwargs": {"normalization": net["normalization"]}}, f)
    state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in model.state_dict().items()}
    path = directory / "checkpoint.pth"
    torch.save({"model": state, "n_cls": net["n_cls"], "epoch": 0}, path)
    return path


@pytest.fixture
def tiny_model():
    torch.manual_seed(0)
    net = tiny_net_kwargs()
    return perturb_(create_segmenter(net)).eval(), net
