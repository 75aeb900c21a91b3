"""The typed batch that the stream produces and the model consumes."""

from __future__ import annotations

from dataclasses import dataclass, field, fields

import torch

from pertvl.data.records import PERTURBATION_TYPES


@dataclass
class Batch:
    """One training/evaluation batch of B samples with K = len(pert_types) perturbation columns: the nine
    of PERTURBATION_TYPES, then any counterfactual types (cf_*) a run asked for with loss.pert_types."""

    images: torch.Tensor  # [B, 1, H, W] float32 in [0, 1]; the image encoder normalizes itself
    input_ids: torch.Tensor  # [B, L] int64, the cleaned reports
    attention_mask: torch.Tensor  # [B, L] int64
    word_ids: torch.Tensor  # [B, L] int64, word index of each token, -1 for [CLS]/[SEP]/pad
    pert_input_ids: torch.Tensor  # [B, K, Lp] int64, perturbation k of sample b
    pert_attention_mask: torch.Tensor  # [B, K, Lp] int64
    pert_valid: torch.Tensor  # [B, K] bool; False where unavailable or token-identical to the original
    ids: list[str] = field(default_factory=list)
    study_ids: list[str] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)
    labels: torch.Tensor | None = None  # [B, C] float, NaN where unknown (phantom/CheXpert labels)
    pert_types: tuple[str, ...] = PERTURBATION_TYPES

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def to(self, device: torch.device | str, image_dtype: torch.dtype | None = None) -> Batch:
        """Move tensors to `device`; images optionally cast (bf16/fp16 engines)."""
        out = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, torch.Tensor):
                v = v.to(device, non_blocking=True)
                if f.name == "images" and image_dtype is not None:
                    v = v.to(image_dtype)
            out[f.name] = v
        return Batch(**out)
