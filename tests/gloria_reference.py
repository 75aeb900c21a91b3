"""GLoRIA's local loss as its gloria/loss/gloria_loss.py writes it
(a Python loop over captions; images [B, D, ih, iw], words [B, D, W]), the reference the tests
hold pertvl.losses.local_attentive_loss to and bench/bench_local_loss.py times it against.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def gloria_cosine_similarity(x1, x2, dim=1, eps=1e-8):
    w12 = torch.sum(x1 * x2, dim)
    w1 = torch.norm(x1, 2, dim)
    w2 = torch.norm(x2, 2, dim)
    return (w12 / (w1 * w2).clamp(min=eps)).squeeze()


def gloria_attention_fn(query, context, temp1):
    """query [b, D, W]; context [b, D, ih, iw] -> weighted context [b, D, W], attn [b, W, ih, iw]."""
    batch_size, query_len = query.size(0), query.size(2)
    ih, iw = context.size(2), context.size(3)
    source_len = ih * iw
    context = context.view(batch_size, -1, source_len)
    context_t = torch.transpose(context, 1, 2).contiguous()
    attn = torch.bmm(context_t, query)  # [b, M, W]
    attn = attn.view(batch_size * source_len, query_len)
    attn = nn.Softmax(dim=-1)(attn)  # over words
    attn = attn.view(batch_size, source_len, query_len)
    attn = torch.transpose(attn, 1, 2).contiguous()
    attn = attn.view(batch_size * query_len, source_len)
    attn = attn * temp1
    attn = nn.Softmax(dim=-1)(attn)  # over regions
    attn = attn.view(batch_size, query_len, source_len)
    attn_t = torch.transpose(attn, 1, 2).contiguous()
    weighted = torch.bmm(context, attn_t)
    return weighted, attn.view(batch_size, -1, ih, iw)


def gloria_local_loss(img_features, words_emb, cap_lens, temp1=4.0, temp2=5.0, temp3=10.0, agg="sum"):
    """img_features [B, D, ih, iw]; words_emb [B, D, W]; cap_lens: words of each caption."""
    batch_size = img_features.shape[0]
    att_maps, similarities = [], []
    for i in range(words_emb.shape[0]):
        words_num = cap_lens[i]
        word = words_emb[i, :, :words_num].unsqueeze(0).contiguous()
        word = word.repeat(batch_size, 1, 1)
        weighted, attn = gloria_attention_fn(word, img_features, temp1)
        att_maps.append(attn[i].unsqueeze(0).contiguous())
        word = word.transpose(1, 2).contiguous().view(batch_size * words_num, -1)
        weighted = weighted.transpose(1, 2).contiguous().view(batch_size * words_num, -1)
        row_sim = gloria_cosine_similarity(word, weighted).view(batch_size, words_num)
        row_sim = row_sim.mul(temp2).exp()
        row_sim = row_sim.sum(dim=1, keepdim=True) if agg == "sum" else row_sim.mean(dim=1, keepdim=True)
        similarities.append(torch.log(row_sim))
    similarities = torch.cat(similarities, 1) * temp3  # [images, captions]
    labels = torch.arange(batch_size)
    loss0 = F.cross_entropy(similarities, labels)
    loss1 = F.cross_entropy(similarities.transpose(0, 1), labels)
    return loss0, loss1, att_maps
