"""The exported modules: each tower of a DualEncoder wrapped as the graph's inputs -> outputs."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from pertvl.export.unpadded import UnpaddedBert

log = logging.getLogger(__name__)


class ImageTower(nn.Module):
    """images [B, 1, S, S] in [0, 1] -> (image_emb [B, D] L2-normalized, regions [B, M, Dl])."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.model.encode_image(images)
        return F.normalize(out.global_emb, dim=-1), out.regions


class TextTower(nn.Module):
    """input_ids, attention_mask, word_ids [B, L] -> (text_emb [B, D] L2-normalized,
    words [B, W, Dl], word_mask [B, W] bool) with W = L (the model's static word slots).

    unpadded: compute the transformer's hidden states with pertvl.export.unpadded.UnpaddedBert
    (same numbers, dense layers on real tokens only) instead of the backbone's own forward;
    split_special: in it, run the [CLS]/[SEP] rows through the dense layers separately (the
    source graph of int8 quantization, which gives those rows their own scale)."""

    def __init__(self, model: nn.Module, unpadded: bool = False, split_special: bool = False):
        super().__init__()
        self.model = model
        special = model.text.special_ids if split_special else ()
        self.unpadded = UnpaddedBert(model.text.backbone, special) if unpadded else None

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                word_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if self.unpadded is None:
            out = self.model.encode_text(input_ids, attention_mask, word_ids)
        else:
            hidden = self.unpadded(input_ids, attention_mask)
            out = self.model.text.outputs(hidden, input_ids, attention_mask, word_ids)
        return F.normalize(out.global_emb, dim=-1), out.words, out.word_mask


@contextlib.contextmanager
def eager_attention(model: nn.Module) -> Iterator[list[str]]:
    """Switch every transformers model inside `model` to eager attention for the duration (the
    pattern onnxruntime's attention fusion recognizes); yields the names of the switched modules."""
    switched: list[tuple[nn.Module, str]] = []
    try:
        for name, module in model.named_modules():
            cfg = getattr(module, "config", None)
            current = getattr(cfg, "_attn_implementation", None)
            if current in (None, "eager") or not hasattr(module, "set_attn_implementation"):
                continue
            try:
                module.set_attn_implementation("eager")
            except (ValueError, NotImplementedError) as e:  # remote-code models may refuse
                log.warning("%s: cannot switch to eager attention (%s); exporting with %s", name, e, current)
                continue
            switched.append((module, current))
        yield [type(m).__name__ for m, _ in switched]
    finally:
        for module, previous in switched:
            module.set_attn_implementation(previous)
