"""Image tower: a ResNet (transformers' ResNetModel) giving a global and a region-level output.

One backbone serves both branches (the authors' code ran two separate ResNet-50s): the global
embedding comes from the last stage (average-pooled, projected to d_e) and the region features
from the stage before it (GLoRIA's layer3: 14×14 at 224 px), projected by a 1×1 convolution to the
local width Dl shared with the word features (paper §III-A).

The tower takes raw pixels in [0, 1], [B, 1|3, H, W]: grayscale is repeated to 3 channels and
mean/std normalization happens inside the module, so an exported ONNX graph sees raw pixels.
torchvision cannot be imported on the project's machines, hence transformers' ResNet.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn
from transformers import ResNetConfig, ResNetModel

log = logging.getLogger(__name__)

# Named backbone configurations (ResNetConfig keyword arguments).
IMAGE_ARCHS: dict[str, dict] = {
    # The paper's encoder (BioViL / GLoRIA): bottleneck blocks; microsoft/resnet-50 has these shapes.
    "resnet50": dict(embedding_size=64, hidden_sizes=[256, 512, 1024, 2048], depths=[3, 4, 6, 3],
                     layer_type="bottleneck"),
    "resnet18": dict(embedding_size=64, hidden_sizes=[64, 128, 256, 512], depths=[2, 2, 2, 2], layer_type="basic"),
    # CPU demo: basic blocks, one per stage; ~0.5 GFLOP per 224 px image, 14×14 regions at 224 px.
    "resnet-tiny": dict(embedding_size=32, hidden_sizes=[32, 64, 128, 256], depths=[1, 1, 1, 1], layer_type="basic"),
}

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def projection_head(kind: str, in_dim: int, out_dim: int) -> nn.Module:
    """The projection into the joint space: "linear" or "mlp" (Linear → ReLU → Linear, as in
    ConVIRT/SimCLR heads)."""
    if kind == "linear":
        return nn.Linear(in_dim, out_dim)
    if kind == "mlp":
        return nn.Sequential(nn.Linear(in_dim, in_dim), nn.ReLU(inplace=True), nn.Linear(in_dim, out_dim))
    raise ValueError(f"projection: expected 'linear' or 'mlp', got {kind!r}")


@dataclass
class ImageOutput:
    """global_emb [B, D] (projected, not normalized); regions [B, M, Dl] (projected local features,
    M = h·w, row-major over the grid); grid (h, w) of the regions. When the local branch was
    skipped (need_local=False) regions is None and grid (0, 0)."""

    global_emb: torch.Tensor
    regions: torch.Tensor | None
    grid: tuple[int, int]


def build_resnet(arch: str, pretrained: str | None = None) -> ResNetModel:
    """A ResNetModel: weights from `pretrained` (local folder or hub id, e.g. microsoft/resnet-50)
    when given, else the named configuration with random initialization."""
    if pretrained:
        model = ResNetModel.from_pretrained(pretrained)
        if arch in IMAGE_ARCHS and list(model.config.hidden_sizes) != IMAGE_ARCHS[arch]["hidden_sizes"]:
            log.warning("image_pretrained %s has hidden sizes %s, not those of %r; using the checkpoint's",
                        pretrained, model.config.hidden_sizes, arch)
        return model
    if arch not in IMAGE_ARCHS:
        raise ValueError(f"image_arch: expected one of {sorted(IMAGE_ARCHS)}, got {arch!r}")
    return ResNetModel(ResNetConfig(**IMAGE_ARCHS[arch]))


class ImageEncoder(nn.Module):
    """ResNet backbone + global projection head + 1×1-conv region projection.

    Args:
        backbone: a transformers ResNetModel (≥ 2 stages).
        embed_dim: d_e, width of the global embedding.
        local_dim: Dl, width of the region features (= the word-feature width).
        projection: "linear" or "mlp" global head.
        mean, std: per-channel normalization applied to the [0, 1] input (3 values each).
    """

    def __init__(
        self,
        backbone: ResNetModel,
        embed_dim: int,
        local_dim: int,
        projection: str = "linear",
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
    ) -> None:
        super().__init__()
        sizes = list(backbone.config.hidden_sizes)
        if len(sizes) < 2:
            raise ValueError(f"image backbone: expected at least 2 stages, got hidden_sizes {sizes}")
        if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
            raise ValueError(f"image_mean/image_std: expected 3 values each (std > 0), got {list(mean)} / {list(std)}")
        self.backbone = backbone
        self.global_proj = projection_head(projection, sizes[-1], embed_dim)
        self.local_proj = nn.Conv2d(sizes[-2], local_dim, kernel_size=1)
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """[B, 1|3, H, W] in [0, 1] → 3 normalized channels (grayscale repeated)."""
        if images.dim() != 4 or images.shape[1] not in (1, 3):
            raise ValueError(f"images: expected [B, 1|3, H, W], got shape {tuple(images.shape)}")
        if images.shape[1] == 1:  # static in an exported graph (the channel axis is fixed)
            images = images.expand(-1, 3, -1, -1)
        return (images - self.mean.to(images.dtype)) / self.std.to(images.dtype)

    def forward(self, images: torch.Tensor, need_local: bool = True) -> ImageOutput:
        """Args: images [B, 1|3, H, W] float in [0, 1]; need_local: compute the region features.
        Returns: ImageOutput (regions None when need_local is False)."""
        out = self.backbone(self.normalize(images), output_hidden_states=need_local, return_dict=True)
        global_emb = self.global_proj(out.pooler_output.flatten(1))
        if not need_local:
            return ImageOutput(global_emb=global_emb, regions=None, grid=(0, 0))
        # hidden_states = (stem, stage1, …, stageN): the stage before the last gives the regions.
        local = self.local_proj(out.hidden_states[-2])  # [B, Dl, h, w]
        h, w = local.shape[-2:]
        return ImageOutput(global_emb=global_emb, regions=local.flatten(2).transpose(1, 2), grid=(int(h), int(w)))
