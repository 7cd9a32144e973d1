"""Shared test helpers: small Segmenter variants with random weights, checkpoints written to tmp dirs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import pytest
import torch
import yaml

from segm.model.factory import MODEL_PARTS, create_segmenter, net_kwargs_for


def tiny_net_kwargs(decoder: str = "mask_transformer", backbone: str = "vit_tiny_patch16_384",
                    n_cls: int = 5, crop: int = 64) -> dict:
    """``net_kwargs`` of a small real backbone at a small crop (fast on the CPU)."""
    return net_kwargs_for(backbone, decoder, n_cls=n_cls, crop_size=crop)


def tiny_vit_with_parts(depth: int, n_cls: int = 5, crop: int = 64) -> torch.nn.Module:
    """A tiny ViT Segmenter in eval mode with ``depth`` blocks and every optional model part (seed 0)."""
    net = tiny_net_kwargs(n_cls=n_cls, crop=crop)
    net["n_layers"] = depth
    for extra in MODEL_PARTS.values():
        net.update(extra)
    torch.manual_seed(0)
    return create_segmenter(net).eval()


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


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run fastest on one thread (and do not slow down on a shared CPU); modules opt in with
    ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def tiny_model():
    torch.manual_seed(0)
    net = tiny_net_kwargs()
    return perturb_(create_segmenter(net)).eval(), net


SUBPROCESS_ENV = dict(os.environ, OMP_NUM_THREADS="1")  # one thread per test subprocess: 2 cores are shared


def module_cmd(module: str, *args: str) -> list[str]:
    """The command line of ``python -m <module> <args>`` with this interpreter."""
    return [sys.executable, "-m", module, *args]


def run_module(module: str, *args: str, check: bool = True, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run ``python -m <module> <args>`` in a one-thread subprocess; with ``check``, assert it succeeded
    (showing the tail of its stderr)."""
    done = subprocess.run(module_cmd(module, *args), capture_output=True, text=True, env=SUBPROCESS_ENV,
                          timeout=timeout)
    if check:
        assert done.returncode == 0, done.stderr[-3000:]
    return done


def read_log(log_dir: Path) -> list[dict]:
    """The per-epoch records of a run's ``log.txt``."""
    return [json.loads(line) for line in (log_dir / "log.txt").read_text().splitlines()]


def kill_when(proc: subprocess.Popen, ready: Callable[[], bool], timeout: float = 300) -> None:
    """SIGKILL ``proc`` as soon as ``ready()`` holds (polled every 20 ms); asserts it died by that signal,
    i.e. that it had not finished first."""
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if ready():
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.02)
    assert proc.wait() == -signal.SIGKILL, "the run finished before it could be killed"


def has_log_line(run: Path) -> Callable[[], bool]:
    """Whether the run in ``run`` has logged its first epoch."""
    return lambda: (run / "log.txt").exists() and bool((run / "log.txt").read_text().strip())
