"""An export-only BERT forward that runs the dense layers on real tokens only ("remove padding").

The same hidden states as `BertModel(input_ids, attention_mask).last_hidden_state` (zeroed on
padding), from the same weights, with the embeddings, QKV, attention output, FFN and layer norms
on a [T, H] matrix of the batch's T real tokens; only the attention core uses the [B, L] layout,
as onnxruntime's `com.microsoft.MultiHeadAttention` contrib op (onnxruntime's own BERT fusion
keeps every padded row). Supported: transformers' BertModel with absolute position embeddings, as an
encoder.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def unpadded_unsupported(backbone: nn.Module) -> str | None:
    """None when `backbone` can be exported unpadded, else the reason why not."""
    from transformers import BertModel

    if not isinstance(backbone, BertModel):
        return f"{type(backbone).__name__} is not a transformers BertModel"
    cfg = backbone.config
    if getattr(cfg, "position_embedding_type", "absolute") != "absolute":
        return f"position_embedding_type={cfg.position_embedding_type!r} (needs 'absolute')"
    if getattr(cfg, "is_decoder", False) or getattr(cfg, "add_cross_attention", False):
        return "the BertModel is configured as a decoder"
    if cfg.hidden_size % cfg.num_attention_heads:
        return f"hidden_size {cfg.hidden_size} is not a multiple of {cfg.num_attention_heads} heads"
    return None


class _MultiHeadAttention(torch.autograd.Function):
    """Scaled dot-product attention over [B, L, H] q/k/v with a [B, L] key padding mask: the
    math in torch, `com.microsoft.MultiHeadAttention` in the ONNX graph (same definition:
    scale 1/sqrt(head size), masked keys get `MASK_FILTER` added before the softmax)."""

    MASK_FILTER = -10000.0  # the contrib op's default mask_filter_value; exp() of it is 0 in fp32

    @staticmethod
    def forward(ctx, q, k, v, key_mask, num_heads: int):  # noqa: ARG004 (autograd.Function signature)
        b, length, h = q.shape
        d = h // num_heads
        q, k, v = (t.view(b, length, num_heads, d).transpose(1, 2) for t in (q, k, v))
        bias = (1.0 - key_mask[:, None, None, :].to(q.dtype)) * _MultiHeadAttention.MASK_FILTER
        scores = torch.matmul(q, k.transpose(-1, -2)) * (d**-0.5) + bias
        return torch.matmul(scores.softmax(-1), v).transpose(1, 2).reshape(b, length, h)

    @staticmethod
    def symbolic(g, q, k, v, key_mask, num_heads):
        mask = g.op("Cast", key_mask, to_i=6)  # int32, as the contrib op requires
        no_bias = g.op("prim::Constant")  # an omitted optional input ("" in the ONNX node)
        no_bias.setType(torch._C.OptionalType.ofTensor())
        out = g.op("com.microsoft::MultiHeadAttention", q, k, v, no_bias, mask, num_heads_i=int(num_heads),
                   mask_filter_value_f=_MultiHeadAttention.MASK_FILTER)
        out.setType(q.type())  # [B, L, H] like the query (v has the same width); spares a shape-inference warning
        return out


def _cat(parts: list[torch.Tensor]) -> torch.Tensor:
    """Rows of the groups in order (no copy, and no Concat node, for a single group)."""
    return parts[0] if len(parts) == 1 else torch.cat(parts)


class _SpecialRows(nn.Module):
    """Applies a linear layer to the special-token rows: a node of its own (named
    .../special_rows/...) that reads the same weight as the word rows' node."""

    def forward(self, linear: nn.Linear, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, linear.weight, linear.bias)


class UnpaddedBert(nn.Module):
    """[B, L] input_ids/attention_mask -> [B, L, H] last hidden states (zeros on padding), equal to
    the wrapped BertModel's up to rounding; its modules are used as they are, except query/key/value
    fused into one [3H, H] linear per layer.

    special_ids: the rows of these tokens ([CLS]/[SEP]) go through every dense layer as a matrix
    of their own (same numbers in fp32): their activations are several times larger than any word
    row's, and dynamic int8 scales a whole matrix by its largest value.
    """

    def __init__(self, bert: nn.Module, special_ids: tuple[int, ...] = ()):
        super().__init__()
        reason = unpadded_unsupported(bert)
        if reason:
            raise ValueError(f"UnpaddedBert: {reason}")
        self.bert = bert
        self.num_heads = int(bert.config.num_attention_heads)
        self.special_ids = tuple(int(i) for i in special_ids)
        self.special_rows = _SpecialRows()
        self.qkv = nn.ModuleList()
        for layer in bert.encoder.layer:
            att = layer.attention.self
            fused = nn.Linear(att.query.in_features, 3 * att.query.out_features,
                              dtype=att.query.weight.dtype, device=att.query.weight.device)
            with torch.no_grad():
                fused.weight.copy_(torch.cat([att.query.weight, att.key.weight, att.value.weight]))
                fused.bias.copy_(torch.cat([att.query.bias, att.key.bias, att.value.bias]))
            self.qkv.append(fused)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        b, length = input_ids.shape
        flat_ids = input_ids.reshape(-1)
        real = attention_mask.reshape(-1) > 0  # [B*L]
        special = torch.zeros_like(real)
        for sid in self.special_ids:  # a fixed tuple: unrolled at export
            special = special | (flat_ids == sid)
        # Special-token rows, then word rows (one group without special_ids).
        groups = [real & special, real & ~special] if self.special_ids else [real]
        slots = [torch.nonzero(g).squeeze(1) for g in groups]  # flat slot of each row
        order = _cat(slots)
        # the row (in group order) of each slot; padding slots point at row 0 (masked as keys,
        # dropped as queries)
        slot_row = torch.zeros_like(flat_ids).index_put((order,), torch.arange(order.shape[0], device=order.device))
        positions = torch.arange(length, device=input_ids.device).repeat(b)
        emb = self.bert.embeddings
        xs = [emb.LayerNorm(emb.word_embeddings(flat_ids[r]) + emb.position_embeddings(positions[r])
                            + emb.token_type_embeddings.weight[0]) for r in slots]
        h = emb.word_embeddings.embedding_dim
        # q/k/v of slot s: rows 3*slot_row[s] + 0/1/2 of the [3T, H] view of the fused QKV output
        qkv_rows = [3 * slot_row + j for j in range(3)]
        for layer, qkv in zip(self.bert.encoder.layer, self.qkv, strict=True):
            rows = _cat(self._dense(qkv, xs)).reshape(-1, h)
            q, k, v = (rows[r].view(b, length, h) for r in qkv_rows)
            context = _MultiHeadAttention.apply(q, k, v, attention_mask, self.num_heads).reshape(b * length, h)
            att_out, ffn = layer.attention.output, layer.output
            xs = [att_out.LayerNorm(y + x) for y, x in zip(self._dense(att_out.dense, [context[r] for r in slots]), xs, strict=True)]
            inner = self._dense(layer.intermediate.dense, xs)
            inner = [layer.intermediate.intermediate_act_fn(y) for y in inner]
            xs = [ffn.LayerNorm(y + x) for y, x in zip(self._dense(ffn.dense, inner), xs, strict=True)]
        x = _cat(xs)
        return (x[slot_row] * real.unsqueeze(1).to(x.dtype)).view(b, length, h)

    def _dense(self, linear: nn.Linear, xs: list[torch.Tensor]) -> list[torch.Tensor]:
        """The linear layer on each row group: special rows via special_rows, word rows directly."""
        if len(xs) == 1:
            return [linear(xs[0])]
        return [self.special_rows(linear, xs[0]), linear(xs[1])]
