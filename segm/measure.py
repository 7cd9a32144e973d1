"""What ``segm.speedtest``, ``segm.flops``, ``segm.calibrate`` and ``segm.compare`` share: the model (from a
checkpoint folder or from a backbone with random weights), the measurement images, the FLOP counter and
the profiler-based time shares.

Images follow the published protocol: validation images squashed to ``crop x crop`` (PIL bilinear, as
torchvision's ``Resize`` on PIL images), scaled to [0, 1] and normalised; ``keep_aspect`` resizes the
short side instead. Without ``$DATASET`` (or with ``synthetic``) the synthetic scenes are used.
"""

from __future__ import annotations

import contextlib
import os
import time
import warnings
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable, Iterable

import click
import numpy as np
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, Dataset

from segm.cli import POSITIVE, compose, device_option, root_option
from segm.config import backbone_family
from segm.data import create_dataset, dataset_info
from segm.images import model_input, resize_rgb, short_side_size
from segm.model.factory import (
    DECODERS,
    DECODERS_BY_FAMILY,
    MODEL_PARTS,
    create_segmenter,
    load_model,
    net_kwargs_for,
    variant_crop_size,
    variant_normalization,
)
from segm.model.token_reduction import PATCH_TYPES
from segm.utils.progress import progress
from tokred.errors import UsageError
from tokred.profiling import PREFIX


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (a no-op off CUDA), so a wall-clock interval covers it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_call(run: Callable[[], Any], device: torch.device) -> float:
    """Seconds ``run()`` takes, between device synchronisations."""
    synchronize(device)
    start = time.perf_counter()
    run()
    synchronize(device)
    return time.perf_counter() - start


def measured_model(
    model_dir: Path | None, backbone: str | None, decoder: str | None, crop_size: int | None, n_cls: int,
    patch_types: Iterable[str | None] = (),
) -> tuple[nn.Module, dict[str, Any]]:
    """The model to measure, in eval mode, and its ``crop_size`` / ``normalization`` / ``variant``.

    From ``model_dir/checkpoint.pth`` when a folder is given, else a randomly initialised ``backbone``
    (whose ``variant`` is ``None``) holding the random parts that ``patch_types`` need (CTS's policy
    network; the other patch types never run it), so that every method can be measured without training.
    """
    if model_dir is not None:
        path = Path(model_dir) / "checkpoint.pth"
        if not path.is_file():
            raise FileNotFoundError(f"no checkpoint.pth in --model-dir {model_dir} (looked for {path})")
        model, variant = load_model(path)
        return model, {"crop_size": variant_crop_size(variant), "normalization": variant_normalization(variant),
                       "source": str(path), "variant": variant}
    if backbone is None:
        raise UsageError("give --model-dir (a trained model) or --backbone (random weights)")
    crop = crop_size or 512
    decoder = decoder or DECODERS_BY_FAMILY[backbone_family(backbone)][-1]
    net = net_kwargs_for(backbone, decoder, n_cls=n_cls, crop_size=crop)
    for part in {part for name in patch_types if name for part in PATCH_TYPES[name].model_parts}:
        net.update(MODEL_PARTS[part])
    torch.manual_seed(0)
    model = create_segmenter(net).eval()
    return model, {"crop_size": crop, "normalization": net["normalization"], "source": f"{backbone} (random weights)",
                   "variant": None}


def use_synthetic(dataset: str | None, root: str | None) -> bool:
    """Measure on synthetic scenes when asked to, or when no dataset root is known."""
    return dataset in (None, "synthetic") or (root is None and not os.environ.get("DATASET"))


class MeasurementImages(Dataset):
    """Decoded images of a dataset split, resized for measurement and normalised: ``[3, h, w]`` float."""

    def __init__(self, source: Any, size: int, normalization: str, keep_aspect: bool = False, limit: int | None = None):
        self.source = source
        self.size = size
        self.keep_aspect = keep_aspect
        self.normalization = normalization
        self.length = len(source) if limit is None else min(limit, len(source))

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> torch.Tensor:
        rgb = self.source.image(index)
        target = short_side_size(*rgb.shape[:2], self.size) if self.keep_aspect else (self.size, self.size)
        return model_input(resize_rgb(rgb, target), self.normalization)


def measurement_loader(
    dataset: str | None, root: str | None, split: str, size: int, normalization: str,
    batch_size: int = 1, keep_aspect: bool = False, limit: int | None = None,
) -> tuple[DataLoader, str]:
    """Batches of measurement images and the name of the data they come from."""
    name = "synthetic" if use_synthetic(dataset, root) else dataset
    if dataset not in (None, "synthetic") and name == "synthetic":
        click.echo(f"note: neither $DATASET nor --root is set, so the images are synthetic scenes, not {dataset}'s "
                   f"(the model keeps {dataset}'s class count)", err=True)
    if keep_aspect and batch_size > 1:
        raise UsageError("--keep-aspect gives images of different shapes: use --batch-size 1")
    source = create_dataset(name, split, root=root)
    images = MeasurementImages(source, size, normalization, keep_aspect, limit)
    if len(images) == 0:
        raise UsageError(f"the {split} split of {name} holds no images")
    return DataLoader(images, batch_size=batch_size, shuffle=False, num_workers=0), name


def default_n_cls(dataset: str | None, root: str | None) -> int:
    """Class count of the named dataset (150, ADE20K's, without one or for ``synthetic``)."""
    return 150 if dataset in (None, "synthetic") else dataset_info(dataset).n_cls


def sdpa_flop_handle(inputs: list[Any], outputs: list[Any]) -> int:
    """fvcore handle for ``aten::scaled_dot_product_attention``: the two attention matrix products.

    ``Q K^T`` and ``A V`` count ``B h Lq Lk d`` and ``B h Lq Lk dv`` multiply-adds, exactly what fvcore
    counts for the explicit ``q @ k.transpose`` and ``attn @ v`` of the reference's attention.
    """
    q, k, v = (inputs[i].type().sizes() for i in range(3))
    batch = int(np.prod(q[:-2]))
    return batch * q[-2] * k[-2] * q[-1] + batch * q[-2] * k[-2] * v[-1]


def flop_analysis(model: nn.Module, x: torch.Tensor):
    """An fvcore ``FlopCountAnalysis`` (1 multiply-add = 1 flop) with the attention handle registered."""
    with warnings.catch_warnings():  # fvcore scripts its focal losses at import: torch deprecates jit.script
        warnings.simplefilter("ignore", FutureWarning)
        from fvcore.nn import FlopCountAnalysis

    analysis = FlopCountAnalysis(model, x)
    analysis.set_op_handle("aten::scaled_dot_product_attention", sdpa_flop_handle)
    return analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False)


measurement_options: Callable = compose(
    click.option("--model-dir", type=click.Path(path_type=Path), default=None,
                 help="Folder with checkpoint.pth and variant.yml (else --backbone with random weights)."),
    click.option("--dataset", type=str, default=None,
                 help="Dataset whose validation images are used (synthetic scenes without $DATASET)."),
    root_option,
    click.option("--backbone", type=str, default=None,
                 help="Backbone for random weights (without --model-dir; with a random policy network for CTS)."),
    click.option("--decoder", type=click.Choice(DECODERS), default=None,
                 help="Decoder for random weights (default: mask_transformer for ViT backbones, segformer for MiT)."),
    click.option("--crop-size", type=POSITIVE, default=None, help="Input size for random weights (default 512)."),
    click.option("--batch-size", type=POSITIVE, default=1, show_default=True),
    click.option("--keep-aspect", is_flag=True, default=False,
                 help="Resize the short side to the crop instead of squashing to a square."),
    device_option,
)


def gflops_per_image(model: nn.Module, loader: DataLoader, device: torch.device, show_progress: bool = True
                     ) -> list[float]:
    """fvcore GFLOPs per image of every batch of ``loader`` (a batch's count divided by its size)."""
    counts = []
    with torch.no_grad():
        for batch in progress(loader, show_progress, leave=False, desc="GFLOPs"):
            x = batch.to(device)
            counts.append(flop_analysis(model, x).total() / 1e9 / x.shape[0])
    return counts


# Library kernels a compiled forward calls as they are (matrix products, attention, convolution, upsampling).
LIBRARY_KERNELS = ("aten::addmm", "aten::mm", "aten::bmm", "aten::baddbmm", "aten::_scaled_dot_product",
                   "aten::mkldnn_convolution", "aten::cudnn_convolution", "aten::upsample_bilinear2d")


def time_shares(model: nn.Module, x: torch.Tensor, autocast: Callable = contextlib.nullcontext, runs: int = 2
                ) -> dict[str, float]:
    """Shares of a forward's time spent in token-reduction bookkeeping (``tokred::`` profiler ranges), in the
    final upsampling (``segm::upsample``) and in ``LIBRARY_KERNELS`` (their own time), measured with the
    autograd profiler over ``runs`` forwards. A compiler that leaves those kernels as they are can at most
    make the forward ``1 / kernels`` times faster."""
    os.environ.setdefault("KINETO_LOG_LEVEL", "99")  # keep the profiler's start/stop lines off the terminal
    with torch.no_grad():
        with autocast():
            model(x)
        with torch.autograd.profiler.profile(use_kineto=False) as prof:
            for _ in range(runs):
                with torch.profiler.record_function("segm::forward"), autocast():
                    model(x)
    totals: dict[str, float] = defaultdict(float)
    for event in prof.function_events:
        for label, prefix in (("forward", "segm::forward"), ("bookkeeping", PREFIX), ("upsampling", "segm::upsample")):
            if event.name.startswith(prefix):
                totals[label] += event.cpu_time_total
        if event.name.startswith(LIBRARY_KERNELS):
            totals["kernels"] += event.self_cpu_time_total
    forward = totals["forward"] or 1.0
    return {label: totals[label] / forward for label in ("bookkeeping", "upsampling", "kernels")}
