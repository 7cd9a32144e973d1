"""Optimizer and learning-rate schedule of Segmenter: timm's optimizers (``sgd`` is SGD with Nesterov
momentum 0.9) and a polynomial decay stepped once per iteration."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
from timm.optim import create_optimizer_v2
from torch.optim.lr_scheduler import LRScheduler

from tokred.errors import UsageError


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Every parameter of ``model``, frozen ones included, grouped as the reference's optimizer holds them.

    With ``weight_decay > 0``: ``[no decay, decay]``, where biases, 1-D parameters and the names in
    ``model.no_weight_decay()`` get no decay; with 0 a single group. Keeping the frozen classification
    heads makes optimizer states interchangeable with the reference's checkpoints (they get no gradient,
    so the optimizer never changes them).
    """
    if not weight_decay:
        return [{"params": list(model.parameters())}]
    skip = model.no_weight_decay() if hasattr(model, "no_weight_decay") else set()
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        (no_decay if param.ndim <= 1 or name.endswith(".bias") or name in skip else decay).append(param)
    return [{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": weight_decay}]


def create_optimizer(model: nn.Module, opt: str, lr: float, weight_decay: float, momentum: float = 0.9,
                     head_lr_mult: float = 1.0) -> torch.optim.Optimizer:
    """timm's optimizer ``opt`` (``sgd``: Nesterov momentum) over the model's parameter groups.

    A model with its own ``parameter_groups(weight_decay, head_lr_mult)`` (SegFormer: mmseg's rules) gives
    them, with an ``lr_mult`` per group; others use :func:`parameter_groups`.
    """
    if hasattr(model, "parameter_groups"):
        groups = model.parameter_groups(weight_decay, head_lr_mult)
    else:
        groups = parameter_groups(model, weight_decay)
    for group in groups:
        group["lr"] = lr * group.pop("lr_mult", 1.0)
    return create_optimizer_v2(groups, opt=opt, lr=lr, weight_decay=weight_decay, momentum=momentum)


class PolynomialLR(LRScheduler):
    """``lr_t = (base - min_lr) * (1 - t / iter_max) ** power + min_lr``, stepped after every iteration.

    ``t`` counts the steps taken: iteration k uses the value for ``t = k - 1`` (iteration 1: the base lr);
    the lr is left unchanged when ``t`` is not a multiple of ``step_size``, past ``iter_max`` and in a run of
    no iterations. With ``iter_warmup > 0`` the lr first ramps up linearly from ``min_lr`` (off by default).
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        step_size: int,
        iter_warmup: int,
        iter_max: int,
        power: float,
        min_lr: float = 0.0,
        last_epoch: int = -1,
    ):
        if 0 < iter_max <= iter_warmup:
            raise UsageError(f"the warm-up ({int(iter_warmup)} iterations) must be shorter than the run ({int(iter_max)} iterations)")
        self.step_size = step_size
        self.iter_warmup = int(iter_warmup)
        self.iter_max = int(iter_max)
        self.power = power
        self.min_lr = min_lr
        super().__init__(optimizer, last_epoch)

    def _decayed(self, base_lr: float) -> float:
        t = float(self.last_epoch)
        if t < self.iter_warmup:
            coef = t / self.iter_warmup * (1 - self.iter_warmup / self.iter_max) ** self.power
        else:
            coef = (1 - t / self.iter_max) ** self.power
        return (base_lr - self.min_lr) * coef + self.min_lr

    def get_lr(self) -> list[float]:
        t = self.last_epoch
        if self.iter_max == 0 or t % self.step_size != 0 or t > self.iter_max:
            return [group["lr"] for group in self.optimizer.param_groups]
        return [self._decayed(base) for base in self.base_lrs]
