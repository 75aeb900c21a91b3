"""Image tower: a ResNet (transformers' ResNetModel) giving a global and a region-level output.

One backbone serves both branches (the authors' code ran two separate ResNet-50s): the global
embedding comes from the last stage (average-pooled, projected to d_e; or, with
`pool="attention"`, CLIP's attention pooling, which keeps where a feature is) and the region features
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
import torch.nn.functional as F
from torch import nn
from transformers import ResNetConfig, ResNetModel

log = logging.getLogger(__name__)

# Named backbone configurations (ResNetConfig keyword arguments).
IMAGE_ARCHS: dict[str, dict] = {
    # The paper's encoder (BioViL / GLoRIA): bottleneck blocks; microsoft/resnet-50 has these shapes.
    "resnet50": dict(embedding_size=64, hidden_sizes=[256, 512, 1024, 2048], depths=[3, 4, 6, 3],
                     layer_type="bottleneck"),
    "resnet18": dict(embedding_size=64, hidden_sizes=[64, 128, 256, 512], depths=[2, 2, 2, 2], layer_type="basic"),
    # CPU demo: basic blocks, one per stage; 14×14 regions at 224 px.
    "resnet-tiny": dict(embedding_size=32, hidden_sizes=[32, 64, 128, 256], depths=[1, 1, 1, 1], layer_type="basic"),
}

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def projection_head(kind: str, in_dim: int, out_dim: int) -> nn.Module:
    """The projection into the joint space: "linear" or "mlp" (Linear → ReLU → Linear, as in
    ConVIRT/SimCLR heads)."""
    if kind == "linear":
        return nn.Linear(in_dim, out_dim)
    return nn.Sequential(nn.Linear(in_dim, in_dim), nn.ReLU(inplace=True), nn.Linear(in_dim, out_dim))


# How the last stage becomes the global embedding: the paper's average pool (then the projection
# head), or CLIP's attention pool (Radford et al. 2021, §2.4: one query, the grid's mean, attends
# over the grid with a learned positional embedding). An average pool keeps *where* a feature is
# only through the convolutions' zero padding, so "left" and "right" of the same finding pool to
# nearly the same vector; the attention pool's positional embedding keeps the side.
IMAGE_POOLS = ("avg", "attention")


class AttentionPool2d(nn.Module):
    """CLIP's attention pooling of a [B, C, h, w] feature map into [B, out_dim].

    The query is the grid's mean plus its positional embedding; keys and values are the mean and
    every grid cell, each plus its positional embedding; `heads` heads of width C/heads, then an
    output projection to out_dim. The positional embedding is learned on a `base_grid`² grid
    (CLIP: 7×7, ResNet at 224 px) and bilinearly resized when the input's grid differs (the demo's
    4×4 at 128 px), so one model runs at any image size; in an exported graph the resize is static.
    """

    def __init__(self, channels: int, out_dim: int, heads: int, base_grid: int = 7) -> None:
        super().__init__()
        if channels % heads:
            raise ValueError(f"attention pool: {channels} channels do not split into {heads} heads")
        self.heads, self.base_grid = heads, base_grid
        self.pos = nn.Parameter(torch.randn(base_grid * base_grid + 1, channels) / channels ** 0.5)
        self.q_proj, self.k_proj, self.v_proj = (nn.Linear(channels, channels) for _ in range(3))
        self.c_proj = nn.Linear(channels, out_dim)

    def positions(self, h: int, w: int) -> torch.Tensor:
        """[1 + h·w, C]: the mean token's embedding, then the grid's (row-major), resized to h × w."""
        if (h, w) == (self.base_grid, self.base_grid):
            return self.pos
        g, c = self.base_grid, self.pos.shape[1]
        grid = self.pos[1:].reshape(1, g, g, c).permute(0, 3, 1, 2)
        grid = F.interpolate(grid, size=(h, w), mode="bilinear", align_corners=False)
        return torch.cat([self.pos[:1], grid.permute(0, 2, 3, 1).reshape(h * w, c)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        tokens = x.flatten(2).transpose(1, 2)  # [B, h·w, C]
        tokens = torch.cat([tokens.mean(1, keepdim=True), tokens], dim=1) + self.positions(h, w).to(x.dtype)
        split = lambda t: t.reshape(b, t.shape[1], self.heads, c // self.heads).transpose(1, 2)  # noqa: E731
        q, k, v = split(self.q_proj(tokens[:, :1])), split(self.k_proj(tokens)), split(self.v_proj(tokens))
        pooled = F.scaled_dot_product_attention(q, k, v)  # [B, heads, 1, C/heads]
        return self.c_proj(pooled.transpose(1, 2).reshape(b, c))


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
    when given, else the named configuration with random initialization. `arch`: a key of IMAGE_ARCHS
    (DualEncoderConfig checks it)."""
    if pretrained:
        model = ResNetModel.from_pretrained(pretrained)
        if list(model.config.hidden_sizes) != IMAGE_ARCHS[arch]["hidden_sizes"]:
            log.warning("image_pretrained %s has hidden sizes %s, not those of %r; using the checkpoint's",
                        pretrained, model.config.hidden_sizes, arch)
        return model
    return ResNetModel(ResNetConfig(**IMAGE_ARCHS[arch]))


class ImageEncoder(nn.Module):
    """ResNet backbone (≥ 2 stages) + global projection head + 1×1-conv region projection; the
    arguments are DualEncoderConfig's. With pool "attention" the pool's output projection is the
    head (`projection` unused)."""

    def __init__(
        self,
        backbone: ResNetModel,
        embed_dim: int,
        local_dim: int,
        projection: str = "linear",
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        pool: str = "avg",
        pool_heads: int = 8,
    ) -> None:
        super().__init__()
        sizes = list(backbone.config.hidden_sizes)
        if len(sizes) < 2:
            raise ValueError(f"image backbone: expected at least 2 stages, got hidden_sizes {sizes}")
        if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
            raise ValueError(f"image_mean/image_std: expected 3 values each (std > 0), got {list(mean)} / {list(std)}")
        self.backbone = backbone
        self.pool = pool
        if pool == "avg":
            self.global_proj = projection_head(projection, sizes[-1], embed_dim)
        else:
            self.global_proj = AttentionPool2d(sizes[-1], embed_dim, pool_heads)
        self.local_proj = nn.Conv2d(sizes[-2], local_dim, kernel_size=1)
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        # NHWC activations for the convolutions (a speed lever, pertvl.train.speed; same numbers).
        self.channels_last = False

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
        x = self.normalize(images)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        out = self.backbone(x, output_hidden_states=need_local, return_dict=True)
        pooled = out.pooler_output.flatten(1) if self.pool == "avg" else out.last_hidden_state
        global_emb = self.global_proj(pooled)
        if not need_local:
            return ImageOutput(global_emb=global_emb, regions=None, grid=(0, 0))
        # hidden_states = (stem, stage1, …, stageN): the stage before the last gives the regions.
        local = self.local_proj(out.hidden_states[-2])  # [B, Dl, h, w]
        h, w = local.shape[-2:]
        return ImageOutput(global_emb=global_emb, regions=local.flatten(2).transpose(1, 2), grid=(int(h), int(w)))
