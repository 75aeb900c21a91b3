"""Image augmentation for chest X-ray training, deterministic per sample.

No horizontal (or vertical) flip: reports say "left" and "right". Brightness/contrast jitter, then a
small affine (rotation, isotropic scale, translation) with a black border. Each sample's parameters
come from an RNG seeded by (seed, epoch, sample key), so a stream resumed mid-epoch reproduces the
uninterrupted stream's pixels; the transforms are kornia's batched ops (CPU or GPU).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class AugmentConfig:
    """Ranges of the augmentation; every parameter is drawn uniformly from its range.

    max_rotation_deg: rotation in [-max, +max] degrees.
    scale:            isotropic zoom factor range.
    max_translate:    shift in [-max, +max] of the image side, independently in x and y.
    brightness:       additive intensity shift in [-b, +b] (images are in [0, 1]).
    contrast:         contrast factor in [1 - c, 1 + c] around the image mean.
    """

    max_rotation_deg: float = 5.0
    scale: tuple[float, float] = (0.9, 1.1)
    max_translate: float = 0.04
    brightness: float = 0.1
    contrast: float = 0.1

    def __post_init__(self) -> None:
        lo, hi = self.scale
        if not (0 < lo <= hi):
            raise ValueError(f"scale must be a range 0 < lo <= hi, got {self.scale}")
        if min(self.max_rotation_deg, self.max_translate, self.brightness, self.contrast) < 0:
            raise ValueError(f"augmentation magnitudes must be >= 0, got {self}")
        if self.contrast >= 1:
            raise ValueError(f"contrast must be < 1 (factor 1 - c stays positive), got {self.contrast}")


@dataclass
class AugmentParams:
    """Per-sample parameters, each a float32 tensor with B rows."""

    angle_deg: torch.Tensor  # [B]
    scale: torch.Tensor  # [B]
    translate: torch.Tensor  # [B, 2] (x, y) as fractions of the width / height
    brightness: torch.Tensor  # [B] additive
    contrast: torch.Tensor  # [B] factor


def sample_params(keys: Sequence[str], *, seed: int, epoch: int, config: AugmentConfig) -> AugmentParams:
    """Draw the augmentation of each sample from its own (seed, epoch, key) RNG."""
    rows = []
    for key in keys:
        # a 64-bit seed from (seed, epoch, key), stable across processes (unlike hash())
        digest = hashlib.blake2b(f"{seed}\x00{epoch}\x00{key}".encode(), digest_size=8).digest()
        rng = np.random.default_rng(int.from_bytes(digest, "little"))
        u = rng.uniform(-1.0, 1.0, size=6)  # fixed draw order: angle, scale, tx, ty, brightness, contrast
        lo, hi = config.scale
        rows.append((u[0] * config.max_rotation_deg, lo + (u[1] + 1.0) / 2.0 * (hi - lo),
                     u[2] * config.max_translate, u[3] * config.max_translate, u[4] * config.brightness,
                     1.0 + u[5] * config.contrast))
    t = torch.tensor(np.asarray(rows, dtype=np.float32).reshape(len(keys), 6))
    return AugmentParams(angle_deg=t[:, 0], scale=t[:, 1], translate=t[:, 2:4], brightness=t[:, 4],
                         contrast=t[:, 5])


def apply_augmentation(images: torch.Tensor, params: AugmentParams) -> torch.Tensor:
    """Augment images [B, C, H, W] in [0, 1] with `sample_params`' B rows: contrast and brightness
    first (so the border the affine uncovers stays black), then rotation/scale/translation about the
    image centre; the result is clamped to [0, 1]."""
    from kornia.enhance import adjust_brightness, adjust_contrast_with_mean_subtraction
    from kornia.geometry.transform import get_affine_matrix2d, warp_affine

    b, _, h, w = images.shape
    dev, dt = images.device, images.dtype
    x = adjust_contrast_with_mean_subtraction(images, params.contrast.to(dev, dt))
    x = adjust_brightness(x, params.brightness.to(dev, dt), clip_output=True)
    center = torch.tensor([(w - 1) / 2.0, (h - 1) / 2.0], device=dev, dtype=dt).expand(b, 2)
    shift = params.translate.to(dev, dt) * torch.tensor([w, h], device=dev, dtype=dt)
    scale = params.scale.to(dev, dt)[:, None].expand(b, 2)
    matrix = get_affine_matrix2d(shift, center, scale, params.angle_deg.to(dev, dt))
    x = warp_affine(x, matrix[:, :2, :], dsize=(h, w), mode="bilinear", padding_mode="zeros",
                    align_corners=True)
    return x.clamp_(0.0, 1.0)
