"""The paper's optimiser and learning-rate schedule: SGD (lr 0.0015, momentum 0.9, weight decay
5e-4; paper §IV) with a linear warm-up and a cosine decay, stepped by DeepSpeed once per OPTIMIZER
step (skipped fp16 overflow steps do not advance it). The ds_configs hold no optimizer block.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

PAPER_LR = 0.0015
PAPER_MOMENTUM = 0.9
PAPER_WEIGHT_DECAY = 5e-4


def build_optimizer(
    params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
    lr: float = PAPER_LR,
    momentum: float = PAPER_MOMENTUM,
    weight_decay: float = PAPER_WEIGHT_DECAY,
) -> torch.optim.SGD:
    """The paper's SGD over parameters or param groups (ValueError on lr <= 0, weight_decay < 0 or
    momentum outside [0, 1)); DeepSpeed needs "zero_allow_untested_optimizer" for it under ZeRO."""
    if lr <= 0 or weight_decay < 0 or not 0 <= momentum < 1:
        raise ValueError(f"expected lr > 0, weight_decay >= 0, 0 <= momentum < 1; got lr={lr}, "
                         f"weight_decay={weight_decay}, momentum={momentum}")
    return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)


def tower_param_groups(model: nn.Module, lr: float, image_lr_mult: float = 1.0) -> list[dict[str, Any]]:
    """The trainable parameters as SGD param groups: one at `lr`, or, when image_lr_mult is not 1,
    the rest at lr then the image tower (`model.image`) at lr × image_lr_mult."""
    if image_lr_mult <= 0:
        raise ValueError(f"train.image_lr_mult: expected > 0, got {image_lr_mult}")
    trainable = [p for p in model.parameters() if p.requires_grad]
    if image_lr_mult == 1.0:
        return [{"params": trainable, "lr": lr}]
    tower = getattr(model, "image", None)
    if not isinstance(tower, nn.Module):
        raise ValueError(f"train.image_lr_mult: {type(model).__name__} has no image tower (model.image)")
    image_ids = {id(p) for p in tower.parameters()}
    groups = [{"params": [p for p in trainable if id(p) not in image_ids], "lr": lr},
              {"params": [p for p in trainable if id(p) in image_ids], "lr": lr * image_lr_mult}]
    return [g for g in groups if g["params"]]


@dataclass
class WarmupCosine:
    """LR multiplier for optimizer step s (0-based): linear warm-up, then cosine to min_lr_ratio.

    s < W:      (s + 1) / W                      (the first step already trains, at lr / W)
    s >= W:     r + (1 - r) * (1 + cos(pi * p)) / 2,   p = min(1, (s - W) / max(1, T - W))

    A dataclass, not a lambda: LambdaLR.state_dict stores its fields (weights_only loading).
    """

    warmup_steps: int
    total_steps: int
    min_lr_ratio: float = 0.0

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        progress = min(1.0, (step - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps))
        return self.min_lr_ratio + (1.0 - self.min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(
    optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int, min_lr_ratio: float = 0.0
) -> torch.optim.lr_scheduler.LambdaLR:
    """`WarmupCosine` as a LambdaLR over `total_steps` optimizer steps (ValueError on a negative
    warm-up, total < 1 or < warm-up, min_lr_ratio outside [0, 1])."""
    if warmup_steps < 0 or total_steps < 1 or warmup_steps > total_steps:
        raise ValueError(
            f"expected 0 <= warmup_steps <= total_steps and total_steps >= 1; got {warmup_steps}, {total_steps}"
        )
    if not 0.0 <= min_lr_ratio <= 1.0:
        raise ValueError(f"min_lr_ratio must lie in [0, 1], got {min_lr_ratio}")
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, WarmupCosine(int(warmup_steps), int(total_steps), float(min_lr_ratio))
    )
