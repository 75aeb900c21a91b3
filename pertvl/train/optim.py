"""The paper's optimiser and learning-rate schedule.

SGD (lr 0.0015, momentum 0.9, weight decay 5e-4; paper §IV) with a linear warm-up followed by a
cosine decay. The schedule is a `LambdaLR` that DeepSpeed steps once per OPTIMIZER step (at each
gradient-accumulation boundary; skipped fp16 overflow steps do not advance it), so warm-up and
total lengths are counted in optimizer steps, not micro-batches. Both objects are passed to
`deepspeed.initialize(optimizer=..., lr_scheduler=...)`; the ds_configs hold no optimizer block.
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
    """The paper's SGD.

    Args:
        params: parameters, or param groups (e.g. from `decay_param_groups`; a group's own
            "weight_decay" wins over the argument).
        lr, momentum, weight_decay: the paper's values by default.

    Returns:
        torch.optim.SGD (DeepSpeed needs "zero_allow_untested_optimizer": true for it under ZeRO >= 1).

    Raises:
        ValueError: a negative lr/weight decay or momentum outside [0, 1).
    """
    if lr <= 0 or weight_decay < 0 or not 0 <= momentum < 1:
        raise ValueError(
            f"expected lr > 0, weight_decay >= 0, 0 <= momentum < 1; got lr={lr}, "
            f"weight_decay={weight_decay}, momentum={momentum}"
        )
    return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)


def tower_param_groups(model: nn.Module, lr: float, image_lr_mult: float = 1.0) -> list[dict[str, Any]]:
    """The trainable parameters as SGD param groups: one group at `lr`, or, when image_lr_mult
    is not 1, the image tower (`model.image`: backbone and heads) at lr × image_lr_mult after the
    rest (text tower, temperature) at lr. The scheduler scales each group's lr alike.

    Raises:
        ValueError: image_lr_mult <= 0, or a model without an `image` tower asked for a multiplier.
    """
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


def decay_param_groups(model: nn.Module, weight_decay: float = PAPER_WEIGHT_DECAY) -> list[dict[str, Any]]:
    """Two param groups: weight decay on matrices/kernels, none on biases, norm weights and scalars
    such as a learnable logit scale (decaying a temperature pulls it towards 0 for no reason).

    The paper applies one weight decay to everything; this is the common refinement, opt-in.

    Returns:
        [{"params": decayed, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}]
        with only trainable parameters; empty groups are dropped.
    """
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            (decay if param.ndim >= 2 else no_decay).append(param)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


@dataclass
class WarmupCosine:
    """LR multiplier for optimizer step s (0-based): linear warm-up, then cosine to min_lr_ratio.

    s < W:      (s + 1) / W                      (the first step already trains, at lr / W)
    s >= W:     r + (1 - r) * (1 + cos(pi * p)) / 2,   p = min(1, (s - W) / max(1, T - W))

    A plain dataclass (not a lambda) so LambdaLR.state_dict stores its fields and a checkpoint
    stays loadable with torch.load(weights_only=True).
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
    """Warm-up + cosine schedule over `total_steps` optimizer steps.

    Args:
        optimizer: the optimizer whose lr is the peak.
        warmup_steps: linear warm-up length (0 = none).
        total_steps: optimizer steps of the whole run (the cosine ends there at min_lr_ratio).
        min_lr_ratio: final lr as a fraction of the peak.

    Returns:
        LambdaLR driven by `WarmupCosine`; pass it to deepspeed.initialize(lr_scheduler=...).

    Raises:
        ValueError: negative warm-up, total < 1 or < warm-up, min_lr_ratio outside [0, 1].
    """
    if warmup_steps < 0 or total_steps < 1 or warmup_steps > total_steps:
        raise ValueError(
            f"expected 0 <= warmup_steps <= total_steps and total_steps >= 1; got {warmup_steps}, {total_steps}"
        )
    if not 0.0 <= min_lr_ratio <= 1.0:
        raise ValueError(f"min_lr_ratio must lie in [0, 1], got {min_lr_ratio}")
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, WarmupCosine(int(warmup_steps), int(total_steps), float(min_lr_ratio))
    )
