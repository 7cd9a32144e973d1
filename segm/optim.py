"""Optimizer and learning-rate schedule of Segmenter: timm's optimizers (``sgd`` is SGD with Nesterov
momentum 0.9) and a polynomial decay stepped once per iteration."""

from __future__ import annotations

import torch
import torch.nn as nn
from timm.optim import create_optimizer_v2
from torch.optim.lr_scheduler import LRScheduler


def create_optimizer(model: nn.Module, opt: str, lr: float, weight_decay: float, momentum: float = 0.9) -> torch.optim.Optimizer:
    """timm's optimizer ``opt`` over the trainable parameters.

    With ``weight_decay > 0`` biases, 1-D parameters and ``model.no_weight_decay()`` get no decay (timm's
    split); with 0 there is a single group, as in the reference.
    """
    return create_optimizer_v2(model, opt=opt, lr=lr, weight_decay=weight_decay, momentum=momentum)


class PolynomialLR(LRScheduler):
    """``lr_t = (base - min_lr) * (1 - t / iter_max) ** power + min_lr``, stepped after every iteration.

    ``t`` counts the steps taken: iteration 1 uses the value for ``t = 0`` (the base lr), iteration k the
    value for ``t = k - 1``; the lr is left unchanged when ``t`` is not a multiple of ``step_size``, past
    ``iter_max`` and in a run of no iterations. With ``iter_warmup > 0`` the lr first ramps up linearly from 0
    (off by default).
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
            raise ValueError(f"the warm-up ({int(iter_warmup)} iterations) must be shorter than the run ({int(iter_max)} iterations)")
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
