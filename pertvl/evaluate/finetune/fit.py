"""What both fine-tunes share: the fit loop (settings and their CLI defaults, precision, optimizer groups,
warm-up + linear decay, seeding, heads and loaders), the problem-list limit and the number formats."""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

MAX_LISTED_PROBLEMS = 1000  # problems named in the JSON; all are counted

# CLI defaults that depend on the mode: (epochs, head_lr) for end-to-end fine-tuning and for a frozen
# encoder. A linear probe on precomputed features costs little per epoch and needs more, larger steps.
FINETUNE_DEFAULTS = {"nli": (3, 1e-3), "chexpert": (5, 1e-3)}
PROBE_DEFAULTS = (30, 1e-2)


@dataclass
class FitSettings:
    """AdamW (weight decay on weight matrices only), linear warm-up over `warmup` of the steps then linear
    decay to 0, gradients clipped at max_grad_norm; precision fp32 or bf16 / fp16 autocast."""

    epochs: int = 3
    lr: float = 2e-5
    head_lr: float = 1e-3
    batch_size: int = 32
    weight_decay: float = 0.01
    warmup: float = 0.1
    dropout: float = 0.1
    max_grad_norm: float = 1.0
    seed: int = 0
    device: str = "auto"
    precision: str = "fp32"
    workers: int = 0
    freeze_encoder: bool = False

    def __post_init__(self) -> None:  # the other fields are checked where the CLI parses them
        if self.lr <= 0 or self.head_lr <= 0:
            raise ValueError(f"learning rates: expected > 0, got lr {self.lr}, head_lr {self.head_lr}")


def fit_settings(args, task: str) -> FitSettings:
    frozen = bool(args.freeze_encoder or args.export)
    epochs, head_lr = PROBE_DEFAULTS if frozen else FINETUNE_DEFAULTS[task]
    return FitSettings(epochs=args.epochs or epochs, lr=args.lr, head_lr=args.head_lr or head_lr,
                       batch_size=args.batch_size, weight_decay=args.weight_decay, warmup=args.warmup,
                       dropout=args.dropout, seed=args.seed, device=args.device, precision=args.precision,
                       workers=getattr(args, "workers", 0), freeze_encoder=frozen)


def format_skips(skipped: dict[str, int]) -> str:
    return ", ".join(f"{k} ×{v}" for k, v in skipped.items()) or "none"


def format_number(x: float | None) -> str:
    return "—" if x is None else f"{x:.3f}"


def autocast(device, precision: str):
    """bf16 / fp16 autocast on `device`; a no-op in fp32."""
    import torch

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    return contextlib.nullcontext() if dtype is None else torch.autocast(device.type, dtype=dtype)


def param_groups(encoder_params: Iterable, head_params: Iterable, settings: FitSettings) -> list[dict]:
    """AdamW groups: encoder at lr, head at head_lr; weight decay on matrices only (BERT practice)."""
    groups = []
    for params, lr in ((encoder_params, settings.lr), (head_params, settings.head_lr)):
        params = [p for p in params if p.requires_grad]
        decay = [p for p in params if p.dim() >= 2]
        rest = [p for p in params if p.dim() < 2]
        groups += [{"params": decay, "lr": lr, "weight_decay": settings.weight_decay},
                   {"params": rest, "lr": lr, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


@dataclass
class EpochLog:
    epoch: int
    train_loss: float
    steps: int
    metrics: dict[str, float | None] = field(default_factory=dict)


def fit(module, groups: list[dict], loader, step_loss: Callable[[Any], Any], settings: FitSettings, device,
        on_epoch: Callable[[int], dict[str, float | None]] | None = None,
        select: Callable[[dict[str, float | None]], float] | None = None) -> tuple[list[EpochLog], int]:
    """The training loop of both fine-tunes: step_loss(batch) -> loss or None (nothing to learn);
    on_epoch() -> metrics; `select(metrics)` picks the state restored at the end (first best), else
    the last epoch. Returns (history, best epoch)."""
    import torch

    scaler = torch.amp.GradScaler(device.type, enabled=settings.precision == "fp16")
    optimizer = torch.optim.AdamW(groups)
    total = settings.epochs * max(1, len(loader))
    warm = int(round(settings.warmup * total))

    def schedule(step: int) -> float:  # linear warm-up, then linear decay to 0 (BERT's schedule)
        if step < warm:
            return (step + 1) / warm
        return max(0.0, (total - step) / max(1, total - warm))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    params = [p for g in groups for p in g["params"]]
    history: list[EpochLog] = []
    best_epoch, best_score, best_state = settings.epochs, -math.inf, None
    for epoch in range(1, settings.epochs + 1):
        module.train()
        losses = []
        for batch in loader:
            with autocast(device, settings.precision):
                loss = step_loss(batch)
            if loss is None:
                continue
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(params, settings.max_grad_norm)
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            losses.append(float(loss.detach()))
        module.eval()
        metrics = on_epoch(epoch) if on_epoch else {}
        history.append(EpochLog(epoch, float(np.mean(losses)) if losses else math.nan, len(losses), metrics))
        shown = ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if v is not None)
        print(f"  epoch {epoch}/{settings.epochs}: train loss {history[-1].train_loss:.4f}"
              + (f", {shown}" if shown else ""), flush=True)
        if select is not None:
            score = select(metrics)
            if score > best_score:
                best_epoch, best_score = epoch, score
                best_state = {k: v.detach().to("cpu", copy=True) for k, v in module.state_dict().items()}
    if best_state is not None and best_epoch != settings.epochs:
        module.load_state_dict(best_state)
    module.eval()
    return history, best_epoch


def seeded_generator(seed: int):
    """Seed python, numpy and torch (CPU and CUDA) as training does, and return a seeded generator for
    DataLoader shuffling."""
    import torch

    from pertvl.train.engine import seed_everything

    seed_everything(seed)
    return torch.Generator().manual_seed(seed)


def linear_head(in_dim: int, num_labels: int, dropout: float):
    from torch import nn

    return nn.Sequential(nn.Dropout(dropout), nn.Linear(in_dim, num_labels))


def standardize(features: dict[str, Any], fit_on: str, eps: float = 1e-6) -> dict[str, Any]:
    """Z-score every split's [N, D] features with the mean/std of split `fit_on`, so one head learning
    rate serves encoders whose features differ in scale."""
    ref = features[fit_on]
    mean = ref.mean(0, keepdim=True)
    std = ref.std(0, keepdim=True) if len(ref) > 1 else ref.new_ones(1, ref.shape[1])
    return {k: (x - mean) / (std + eps) for k, x in features.items()}


def feature_loader(features, *tensors, batch_size: int, shuffle: bool, generator=None):
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    return DataLoader(TensorDataset(torch.as_tensor(features), *[torch.as_tensor(t) for t in tensors]),
                      batch_size=batch_size, shuffle=shuffle, generator=generator)


def item_loader(items: Sequence, collate, batch_size: int, shuffle: bool = False, generator=None):
    from torch.utils.data import DataLoader

    return DataLoader(items, batch_size=batch_size, shuffle=shuffle, generator=generator, collate_fn=collate)


def encode_all(encode, loader, device, settings: FitSettings):
    """Features of every batch of a loader with a frozen encoder, as one float32 CPU tensor."""
    import torch

    out = []
    with torch.inference_mode(), autocast(device, settings.precision):
        for batch in loader:
            out.append(encode(batch).float().cpu())
    return torch.cat(out)
