"""The dual encoder: image tower + text tower + joint-space heads, one config, one factory.

`DualEncoder.forward(batch)` runs the image backbone once and the text transformer ONCE over the
B original reports and the batch's valid perturbations together (gathered, packed or padded,
encoded, their embeddings scattered back into pert_emb [B, K, D], zeros where invalid).

`save_pretrained(dir)` writes config.json ({"format", "pertvl_version", "config"}),
model.safetensors (every weight, authoritative), text_encoder/ (HF model + tokenizer) and
image_encoder/ (HF ResNetModel); `from_pretrained(dir)` reads it back (safetensors only).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pertvl.config import from_mapping
from pertvl.data.batch import Batch
from pertvl.model.image import (
    IMAGE_ARCHS,
    IMAGE_POOLS,
    IMAGENET_MEAN,
    IMAGENET_STD,
    ImageEncoder,
    ImageOutput,
    build_resnet,
)
from pertvl.model.text import (
    POOLINGS,
    WORD_FEATURES,
    TextEncoder,
    TextOutput,
    default_text_model,
    load_text_backbone,
    packing_supported,
)

FORMAT = "pertvl-dual-encoder/1"
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
TEXT_DIR = "text_encoder"
IMAGE_DIR = "image_encoder"


@dataclass
class DualEncoderConfig:
    """The `model:` section of a run config: everything needed to build the model (the paper's
    values: configs/openi_paper.yaml and configs/cxr_bert.yaml)."""

    embed_dim: int = 128  # d_e (paper: 128, CXR-BERT's projection size)
    local_dim: int | None = None  # Dl of regions and words; None: the text hidden size (GLoRIA)
    projection: str = "linear"  # global heads: linear | mlp
    image_arch: str = "resnet-tiny"  # resnet50 (paper) | resnet18 | resnet-tiny (CPU demo)
    image_pretrained: str | None = None  # ResNetModel weights (folder or hub id); None: random init
    image_pool: str = "avg"  # avg (paper) | attention (CLIP's, keeps where a finding is)
    image_pool_heads: int = 8
    image_mean: list[float] = field(default_factory=lambda: list(IMAGENET_MEAN))
    image_std: list[float] = field(default_factory=lambda: list(IMAGENET_STD))
    freeze_image: bool = False
    text_name_or_path: str | None = None  # a BERT-family model; None: the offline MiniLM
    text_pooling: str = "cls"  # cls (paper) | mean (over word pieces)
    word_features: str = "paper"  # L_local's words: paper | gloria (pertvl.model.text)
    trust_remote_code: bool = False  # an explicit choice (CXR-BERT needs it)
    max_length: int = 128  # word pieces per report in `DualEncoder.tokenize`
    freeze_text: bool = False
    freeze_text_layers: int = 0  # the text embeddings and first n layers
    # Dropout in the frozen text layers while training (true: as transformers leaves them); false
    # keeps them in eval mode, so their CPU attention takes the fused kernel. Changes training.
    frozen_text_dropout: bool = True
    text_packing: bool | None = None  # several texts per row in training; None: when supported
    learnable_temperature: bool = False  # CLIP's log logit scale for L_global, capped at 100
    temperature_init: float = 0.07

    def __post_init__(self) -> None:
        if self.image_arch not in IMAGE_ARCHS:
            raise ValueError(f"image_arch: expected one of {sorted(IMAGE_ARCHS)}, got {self.image_arch!r}")
        if self.image_pool not in IMAGE_POOLS:
            raise ValueError(f"image_pool: expected one of {IMAGE_POOLS}, got {self.image_pool!r}")
        if self.text_pooling not in POOLINGS:
            raise ValueError(f"text_pooling: expected one of {POOLINGS}, got {self.text_pooling!r}")
        if self.word_features not in WORD_FEATURES:
            raise ValueError(f"word_features: expected one of {WORD_FEATURES}, got {self.word_features!r}")
        if self.projection not in ("linear", "mlp"):
            raise ValueError(f"projection: expected 'linear' or 'mlp', got {self.projection!r}")
        if self.embed_dim < 1 or (self.local_dim is not None and self.local_dim < 1):
            raise ValueError(f"embed_dim/local_dim: expected positive widths, got {self.embed_dim}/{self.local_dim}")
        if not 0 < self.temperature_init:
            raise ValueError(f"temperature_init: expected > 0, got {self.temperature_init}")
        self.image_mean = [float(v) for v in self.image_mean]
        self.image_std = [float(v) for v in self.image_std]

    @classmethod
    def from_dict(cls, d: dict[str, Any] | DualEncoderConfig | None) -> DualEncoderConfig:
        return from_mapping(cls, d)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class DualOutput:
    """image: ImageOutput; text: TextOutput of the B originals; pert_emb [B, K, D] (zeros where
    invalid; None when perturbations were skipped); pert_valid [B, K] bool; logit_scale: 1/τ as a
    (1,) tensor when the temperature is learnable, else None."""

    image: ImageOutput
    text: TextOutput
    pert_emb: torch.Tensor | None
    pert_valid: torch.Tensor | None
    logit_scale: torch.Tensor | None


class DualEncoder(nn.Module):
    """Image tower + text tower + heads (paper §III-A). Build it with `create_model`."""

    def __init__(self, config: DualEncoderConfig, *, _text: tuple | None = None, _image: nn.Module | None = None):
        super().__init__()
        self.config = config
        backbone, tokenizer = _text or load_text_backbone(
            config.text_name_or_path or default_text_model(), config.trust_remote_code
        )
        local_dim = config.local_dim or int(backbone.config.hidden_size)
        self.text = TextEncoder(backbone, tokenizer, config.embed_dim, local_dim, config.projection, config.text_pooling,
                                config.word_features)
        self.text.freeze(whole=config.freeze_text, layers=config.freeze_text_layers,
                         dropout=bool(config.frozen_text_dropout))
        supported = packing_supported(backbone)
        if config.text_packing and not supported:
            raise ValueError(f"text_packing: {type(backbone).__name__} does not support packed texts "
                             "(needs a BertModel with sdpa/eager attention); set it to false or leave it unset")
        self.pack_texts = supported if config.text_packing is None else bool(config.text_packing)
        resnet = _image if _image is not None else build_resnet(config.image_arch, config.image_pretrained)
        self.image = ImageEncoder(resnet, config.embed_dim, local_dim, config.projection,
                                  config.image_mean, config.image_std, config.image_pool, config.image_pool_heads)
        if config.freeze_image:
            self.image.backbone.requires_grad_(False)
        if config.learnable_temperature:
            # Shape (1,), not 0-dim: DeepSpeed crashes on 0-dim parameters.
            self.logit_scale = nn.Parameter(torch.full((1,), math.log(1.0 / config.temperature_init)))
        else:
            self.register_parameter("logit_scale", None)

    # -- towers ---------------------------------------------------------------------------------
    @property
    def tokenizer(self):
        """The HF fast tokenizer of the text tower (its backend feeds encode_texts)."""
        return self.text.tokenizer

    @property
    def local_dim(self) -> int:
        return int(self.image.local_proj.out_channels)

    def encode_image(self, images: torch.Tensor, need_local: bool = True) -> ImageOutput:
        """images [B, 1|3, H, W] float in [0, 1] → ImageOutput."""
        return self.image(images, need_local=need_local)

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, word_ids: torch.Tensor | None = None,
                    num_words: int | None = None, need_local: bool = True) -> TextOutput:
        """[N, L] ids/mask/word_ids (encode_texts) → TextOutput; W = num_words or L (static)."""
        return self.text(input_ids, attention_mask, word_ids, num_words=num_words, need_local=need_local)

    def scale(self) -> torch.Tensor | None:
        """1/τ for L_global when learnable (CLIP's cap of 100), else None."""
        if self.logit_scale is None:
            return None
        return self.logit_scale.clamp(max=math.log(100.0)).exp()

    # -- training forward -----------------------------------------------------------------------
    def forward(self, batch: Batch, need_local: bool = True, need_perturbations: bool = True) -> DualOutput:
        """One image pass and ONE text pass over originals + valid perturbations; `need_local`
        (region and word features) and `need_perturbations` come from `PretrainLoss.model_kwargs()`.
        Heads a preset does not use get no gradient (DDP: find_unused_parameters or freeze them)."""
        ids, mask, word_ids = batch.input_ids, batch.attention_mask, batch.word_ids
        b = ids.shape[0]
        image = self.image(batch.images, need_local=need_local)
        if need_perturbations:
            k, lp = batch.pert_input_ids.shape[1:]
            valid = batch.pert_valid.to(device=ids.device, dtype=torch.bool)
            rows = valid.reshape(-1).nonzero().squeeze(1)  # valid (sample, type) pairs, flattened
            length = max(ids.shape[1], lp)
            p_ids = batch.pert_input_ids.reshape(b * k, lp).index_select(0, rows)
            p_mask = batch.pert_attention_mask.reshape(b * k, lp).index_select(0, rows)
            all_ids = torch.cat([_pad_to(ids, length, self.text.pad_id), _pad_to(p_ids, length, self.text.pad_id)])
            all_mask = torch.cat([_pad_to(mask, length, 0), _pad_to(p_mask, length, 0)])
        else:
            all_ids, all_mask = ids, mask
        # Drop columns that are padding in every row (the batch was padded for all perturbations).
        length = max(1, int(all_mask.sum(1).max()))
        all_ids, all_mask = all_ids[:, :length], all_mask[:, :length]
        # THE text pass (word_hidden: the word features' states when not the last layer, else None)
        hidden, word_hidden = self.text.states(all_ids, all_mask, pack=self.pack_texts, need_words=need_local)
        num_words = None
        w_ids = None
        if need_local:
            w_ids = _pad_to(word_ids, length, -1)
            num_words = max(1, int(w_ids.max()) + 1)  # word slots of this batch (not exported)
        text = self.text.outputs(hidden[:b], all_ids[:b], all_mask[:b], w_ids, num_words, need_local,
                                 None if word_hidden is None else word_hidden[:b])
        pert_emb = pert_valid = None
        if need_perturbations:
            p_emb = self.text.embed(hidden[b:], all_ids[b:], all_mask[b:])  # [V, D]
            pert_emb = p_emb.new_zeros(b * k, p_emb.shape[-1]).index_copy(0, rows, p_emb).view(b, k, -1)
            pert_valid = valid
        return DualOutput(image=image, text=text, pert_emb=pert_emb, pert_valid=pert_valid, logit_scale=self.scale())

    # -- persistence ----------------------------------------------------------------------------
    def save_pretrained(self, directory: str | os.PathLike) -> Path:
        """Write config.json, model.safetensors, text_encoder/ and image_encoder/ (see module doc)."""
        from safetensors.torch import save_model

        from pertvl import __version__

        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        _save_hf(self.text.backbone, out / TEXT_DIR)
        self.text.tokenizer.save_pretrained(out / TEXT_DIR)
        self.image.backbone.save_pretrained(out / IMAGE_DIR)
        save_model(self, str(out / WEIGHTS_NAME))
        meta = {"format": FORMAT, "pertvl_version": __version__, "config": self.config.to_dict()}
        (out / CONFIG_NAME).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
        return out

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, map_location: str | torch.device = "cpu") -> DualEncoder:
        """Load a model written by save_pretrained (weights from safetensors only)."""
        from safetensors import safe_open
        from safetensors.torch import load_model

        src = Path(directory)
        cfg_path = src / CONFIG_NAME
        if not cfg_path.is_file():
            raise FileNotFoundError(f"{cfg_path}: no pertvl model config (write one with save_pretrained)")
        meta = json.loads(cfg_path.read_text(encoding="utf-8"))
        if meta.get("format") != FORMAT:
            raise ValueError(f"{cfg_path}: expected format {FORMAT!r}, got {meta.get('format')!r}")
        config = DualEncoderConfig.from_dict(meta["config"])
        config.text_name_or_path = str(src / TEXT_DIR)
        config.image_pretrained = str(src / IMAGE_DIR)
        model = cls(config)
        weights = src / WEIGHTS_NAME
        with safe_open(str(weights), framework="pt") as f:
            saved = set(f.keys())
        # An encoder taken out of a wrapper checkpoint (CXR-BERT) had no pooler when saved, but
        # AutoModel builds the bare class with one: drop it again (pertvl never uses it).
        if getattr(model.text.backbone, "pooler", None) is not None and not any(
            k.startswith("text.backbone.pooler.") for k in saved
        ):
            model.text.backbone.pooler = None
        load_model(model, str(weights), strict=True, device=str(map_location))
        return model.to(map_location)


def create_model(config: dict[str, Any] | DualEncoderConfig | None = None) -> DualEncoder:
    """Build a DualEncoder from the `model:` section of a run config (dict) or a DualEncoderConfig."""
    return DualEncoder(DualEncoderConfig.from_dict(config))


# ----------------------------------------------------------------------------------------------
def _pad_to(x: torch.Tensor, length: int, value: int) -> torch.Tensor:
    """Right-pad (or cut) the last axis of an [N, L] tensor to `length`."""
    if x.shape[1] >= length:
        return x[:, :length]
    return torch.nn.functional.pad(x, (0, length - x.shape[1]), value=value)


def _save_hf(model: nn.Module, directory: Path) -> None:
    """save_pretrained with a config of the model's own class: an encoder taken out of a wrapper
    (CXR-BERT's remote code) then loads with AutoModel without remote code."""
    cfg = model.config
    own = getattr(type(model), "config_class", None)
    if own is not None and type(cfg) is not own:
        plain = cfg.to_dict()
        plain.pop("auto_map", None)
        plain.pop("model_type", None)
        plain["architectures"] = [type(model).__name__]
        model.config = own.from_dict(plain)
        try:
            model.save_pretrained(directory)
        finally:
            model.config = cfg
    else:
        model.save_pretrained(directory)
