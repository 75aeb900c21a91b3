"""Torch encoders for the evaluations: `TorchEncoder` over a trained DualEncoder (`--run`; checks the
ONNX export) and `HFTextEncoder` over a plain HF text model (`--text-model`, text only). Texts are
tokenized as in training (encode_texts) and embedded in order of length; outputs come back in input
order, float32, L2-normalized.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from pertvl.data.tokenize import encode_texts
from pertvl.evaluate.encoder import stack_padded


def pick_device(device: Any):
    """A torch.device: `device` as given, or CUDA when available else CPU for None, "" or "auto"."""
    import torch

    if device in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _length_order(texts: list[str]) -> np.ndarray:
    """Indices sorting texts by word count (stable), so batches hold texts of similar length."""
    return np.argsort([len(t.split()) for t in texts], kind="stable")


class _TorchBase:
    def __init__(self, device: Any, batch_size: int, max_length: int):
        self.device = pick_device(device)
        self.batch_size = batch_size
        self.max_length = max_length

    def _tokens(self, tokenizer, texts: list[str]):
        """(encode_texts' encoding, its input_ids / attention_mask / word_ids as tensors on the device)."""
        import torch

        enc = encode_texts(tokenizer, texts, max_length=self.max_length)
        return enc, {k: torch.from_numpy(getattr(enc, k)).to(self.device) for k in ("input_ids", "attention_mask", "word_ids")}

    def _embed_texts(self, texts: list[str], tokenizer, forward) -> np.ndarray:
        import torch
        import torch.nn.functional as F

        texts = list(texts)
        if not texts:
            return np.zeros((0, 0), dtype=np.float32)
        order = _length_order(texts)
        out: list[np.ndarray] = []
        with torch.inference_mode():
            for start in range(0, len(texts), self.batch_size):
                _, tensors = self._tokens(tokenizer, [texts[i] for i in order[start : start + self.batch_size]])
                out.append(F.normalize(forward(**tensors).float(), dim=-1).cpu().numpy())
        emb = np.concatenate(out)
        result = np.empty_like(emb)
        result[order] = emb
        return result


class TorchEncoder(_TorchBase):
    """Global image / text embeddings (and the local branch's features) of a DualEncoder."""

    def __init__(self, model, device: Any = None, batch_size: int = 32, max_length: int = 128):
        super().__init__(device, batch_size, max_length)
        self.model = model.to(self.device).eval()

    @classmethod
    def from_run(cls, run_dir: str | os.PathLike, **kwargs) -> TorchEncoder:
        """Load RUN_DIR/final (DualEncoder.save_pretrained layout), or RUN_DIR itself if it is one
        (pertvl.train.rundir.RunDir.model_dir)."""
        from pertvl.train.rundir import RunDir

        model, _ = RunDir(run_dir).load_model()
        return cls(model, **kwargs)

    def _image_batches(self, images: np.ndarray) -> list:
        """images [N, 1, H, W] float in [0, 1] as float32 CPU tensors of `batch_size` images."""
        import torch

        images = np.asarray(images)
        if images.ndim != 4 or images.shape[1] not in (1, 3):
            raise ValueError(f"expected images [N, 1, H, W] float in [0, 1], got shape {tuple(images.shape)}")
        return [torch.from_numpy(np.ascontiguousarray(images[start : start + self.batch_size], dtype=np.float32))
                for start in range(0, len(images), self.batch_size)]

    def embed_images(self, images: np.ndarray) -> np.ndarray:
        import torch
        import torch.nn.functional as F

        batches = self._image_batches(images)
        if not batches:
            return np.zeros((0, 0), dtype=np.float32)
        with torch.inference_mode():
            out = [F.normalize(self.model.encode_image(x.to(self.device)).global_emb.float(), dim=-1).cpu().numpy() for x in batches]
        return np.concatenate(out)

    def embed_texts(self, texts: list[str]) -> np.ndarray:
        def forward(input_ids, attention_mask, word_ids):
            return self.model.encode_text(input_ids, attention_mask, word_ids).global_emb

        return self._embed_texts(texts, self.model.tokenizer, forward)

    def image_features(self, images: np.ndarray):
        """pertvl.infer.ImageFeatures (L2-normalized global embeddings, region features, grid) of
        images [N, 1, H, W] float in [0, 1]."""
        import torch
        import torch.nn.functional as F

        from pertvl.infer import ImageFeatures

        embs, regions, grid = [], [], (0, 0)
        with torch.inference_mode():
            for x in self._image_batches(images):
                out = self.model.encode_image(x.to(self.device), need_local=True)
                embs.append(F.normalize(out.global_emb.float(), dim=-1).cpu().numpy())
                regions.append(out.regions.float().cpu().numpy())
                grid = tuple(out.grid)
        return ImageFeatures(np.concatenate(embs), np.concatenate(regions), grid)

    def text_features(self, texts: list[str]):
        """pertvl.infer.TextFeatures (global embeddings, word features, word masks, the words seen)
        of cleaned texts, tokenized as in training (one batch per `batch_size` texts)."""
        import torch
        import torch.nn.functional as F

        from pertvl.infer import TextFeatures

        texts = list(texts)
        n = len(texts)
        parts = []
        with torch.inference_mode():
            for start in range(0, n, self.batch_size):
                enc, tensors = self._tokens(self.model.tokenizer, texts[start : start + self.batch_size])
                out = self.model.encode_text(**tensors)
                parts.append((F.normalize(out.global_emb.float(), dim=-1).cpu().numpy(),
                              out.words.float().cpu().numpy(), out.word_mask.bool().cpu().numpy(), enc.num_words))
        emb = np.concatenate([p[0] for p in parts]) if parts else np.zeros((0, 0), np.float32)
        words, mask = stack_padded([p[1] for p in parts], [p[2] for p in parts])
        nums = np.concatenate([np.asarray(p[3]) for p in parts]) if parts else np.zeros(0, int)
        word_lists = [t.split()[: int(k)] for t, k in zip(texts, nums, strict=True)]
        return TextFeatures(emb, words, mask, texts, word_lists)


class HFTextEncoder(_TorchBase):
    """A plain HF text model (e.g. the offline MiniLM) as a text encoder, the untrained baseline; pooling
    "mean" (token states under the attention mask) or "cls"."""

    def __init__(self, path: str | os.PathLike, pooling: str = "mean", device: Any = None, batch_size: int = 32,
                 max_length: int = 128):
        from transformers import AutoModel, AutoTokenizer

        super().__init__(device, batch_size, max_length)
        if not os.path.isdir(path):
            raise FileNotFoundError(f"{path}: not a model folder")
        self.pooling = pooling
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = AutoModel.from_pretrained(path).to(self.device).eval()

    def embed_texts(self, texts: list[str]) -> np.ndarray:
        def forward(input_ids, attention_mask, word_ids):
            hidden = self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
            if self.pooling == "cls":
                return hidden[:, 0]
            mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
            return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)

        return self._embed_texts(texts, self.tokenizer, forward)
