"""One training epoch and one evaluation pass, shared by ``segm.train`` and ``segm.eval.miou``."""

from __future__ import annotations

import contextlib
import math
import signal
from typing import Any, Callable, Iterable

import torch
import torch.nn as nn

from segm.metrics import confusion_matrix, scores_from_confusion
from segm.model.inference import inference
from segm.utils.distributed import all_reduce_sum, is_distributed
from segm.utils.progress import progress

IGNORE_INDEX = 255
LOG_EVERY = 100  # iterations between log lines when no progress bar is shown (batch jobs)


class NonFiniteLossError(RuntimeError):
    """Training stopped because a loss was NaN or infinite (the last checkpoint is left intact)."""


class StopRequest:
    """Set by SIGTERM (what SLURM sends before it kills a job) or SIGINT: the current iteration finishes,
    then training stops with a checkpoint. Under torchrun/SLURM every process stops at the same
    iteration (the flag is all-reduced), so no collective is left waiting."""

    def __init__(self) -> None:
        self.signal_name: str | None = None

    def install(self) -> "StopRequest":
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        self.signal_name = signal.Signals(signum).name

    def agreed(self, device: torch.device) -> bool:
        """Whether any process was asked to stop (one small all-reduce when distributed; in a single process
        the flag itself, with no device copy or synchronisation in the training loop)."""
        if not is_distributed():
            return self.signal_name is not None
        flag = torch.tensor(float(self.signal_name is not None), device=device)
        return bool(all_reduce_sum(flag).item() > 0)


def train_one_epoch(
    model: nn.Module,
    loader: Iterable[dict[str, torch.Tensor]],
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    epoch: int,
    device: torch.device,
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    scaler: torch.amp.GradScaler | None = None,
    clip_grad: float | None = None,
    show_progress: bool = False,
    start_iteration: int = 0,
    totals: torch.Tensor | None = None,
    stop: StopRequest | None = None,
) -> dict[str, Any]:
    """Train for one epoch; returns the mean loss and learning rate over all iterations of all processes.

    The scheduler steps after every iteration. A non-finite loss raises ``NonFiniteLossError`` before
    any parameter is updated. ``start_iteration`` and ``totals`` (this process's sums of loss, lr and
    iterations so far) continue an epoch that was stopped; when ``stop`` is set after an iteration, the
    epoch ends early with ``stopped`` and the local ``totals`` to continue from.
    """
    criterion = nn.CrossEntropyLoss(ignore_index=IGNORE_INDEX)
    model.train()
    totals = torch.zeros(3, dtype=torch.float64) if totals is None else totals.clone()
    iteration = start_iteration
    bar = progress(loader, show_progress, desc=f"epoch {epoch}", leave=False)
    for batch in bar:
        im = batch["im"].to(device, non_blocking=True)
        target = batch["segmentation"].to(device, non_blocking=True).long()
        with autocast():
            loss = criterion(model(im), target)
        loss_value = loss.item()
        if not math.isfinite(loss_value):
            raise NonFiniteLossError(
                f"loss is {loss_value} at epoch {epoch}, iteration {iteration}; stopping "
                "(checkpoint.pth still holds the previous epoch)"
            )
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            if clip_grad:
                scaler.unscale_(optimizer)
                nn.utils.clip_grad_norm_(model.parameters(), clip_grad)
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            if clip_grad:
                nn.utils.clip_grad_norm_(model.parameters(), clip_grad)
            optimizer.step()
        scheduler.step()
        lr = optimizer.param_groups[0]["lr"]
        totals += torch.tensor([loss_value, lr, 1.0], dtype=torch.float64)
        iteration += 1
        if hasattr(bar, "set_postfix"):
            bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{lr:.2e}")
        elif show_progress and iteration % LOG_EVERY == 0:
            print(f"epoch {epoch} [{iteration}/{start_iteration + len(loader)}] loss {loss_value:.4f} lr {lr:.3e}",
                  flush=True)
        if stop is not None and stop.agreed(device):
            return {"stopped": True, "iteration": iteration, "totals": totals}
    world = all_reduce_sum(totals.to(device)).cpu()
    count = max(world[2].item(), 1.0)
    return {"stopped": False, "iteration": iteration, "totals": totals,
            "loss": world[0].item() / count, "learning_rate": world[1].item() / count}


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: Iterable[dict[str, Any]],
    n_cls: int,
    window_size: int,
    window_stride: int,
    device: torch.device,
    window_batch_size: int = 1,
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    show_progress: bool = False,
    max_images: int | None = None,
    on_prediction: Callable[[dict[str, Any], torch.Tensor], None] | None = None,
) -> dict[str, Any]:
    """Sliding-window evaluation at the original label resolution; scores summed over all processes.

    ``loader`` yields validation items (batch size 1): views, flips, ``ori_shape`` and the mapped label
    ``gt``. ``on_prediction(item, pred)`` sees every predicted label map (e.g. to save images).
    """
    model.eval()
    confusion = torch.zeros(n_cls, n_cls, dtype=torch.int64, device=device)
    seen = 0
    for item in progress(loader, show_progress, desc="eval", leave=False):
        if max_images is not None and seen >= max_images:
            break
        metas = [{"flip": flip} for flip in item["flip"]]
        with autocast():
            probs = inference(model, item["im"], metas, item["ori_shape"], window_size, window_stride, window_batch_size)
        pred = probs.argmax(0)
        confusion += confusion_matrix(pred, item["gt"], n_cls, IGNORE_INDEX)
        if on_prediction is not None:
            on_prediction(item, pred)
        seen += 1
    confusion = all_reduce_sum(confusion)
    scores = scores_from_confusion(confusion)
    scores["images"] = int(all_reduce_sum(torch.tensor(seen, device=device)).item())
    return scores
