"""pertvl.export.unpadded: the export-only BERT forward over real tokens only.

A random 2-layer BERT (no files): its hidden states must equal transformers' BertModel on every
real token, whatever the padding (right, left, none) and with the [CLS]/[SEP] rows split off;
the dense layers must see only real rows; the ONNX trace must agree under onnxruntime.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pertvl.export.unpadded import UnpaddedBert, unpadded_unsupported

CLS, SEP = 101, 102


def tiny_bert(**overrides):
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=200, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=64, max_position_embeddings=64, **overrides)
    return BertModel(cfg).eval()


def batch(lengths: list[int], width: int, left: bool = False, seed: int = 0):
    """ids [B, width] = [CLS] words [SEP] then padding (0), or padding first with `left`."""
    rng = np.random.default_rng(seed)
    ids = np.zeros((len(lengths), width), np.int64)
    mask = np.zeros_like(ids)
    for i, n in enumerate(lengths):
        row = [CLS, *rng.integers(SEP + 1, 200, n - 2).tolist(), SEP]
        cols = slice(width - n, width) if left else slice(0, n)
        ids[i, cols], mask[i, cols] = row, 1
    return torch.from_numpy(ids), torch.from_numpy(mask)


def reference(bert, ids, mask) -> torch.Tensor:
    with torch.inference_mode():
        return bert(input_ids=ids, attention_mask=mask).last_hidden_state * mask.unsqueeze(-1)


@pytest.mark.parametrize("special_ids", [(), (CLS, SEP)], ids=["one-group", "special-rows-apart"])
@pytest.mark.parametrize("left", [False, True], ids=["right-padded", "left-padded"])
def test_hidden_states_equal_bert(special_ids, left):
    bert = tiny_bert()
    ids, mask = batch([5, 12, 3, 12, 7], 12, left=left)
    with torch.inference_mode():
        got = UnpaddedBert(bert, special_ids)(ids, mask)
    ref = reference(bert, ids, mask)
    assert got.shape == ref.shape == (5, 12, 32)
    torch.testing.assert_close(got, ref, atol=2e-5, rtol=0)
    assert (got[mask == 0] == 0).all()  # padding rows are exactly zero


def test_dense_layers_see_real_rows_only():
    bert = tiny_bert()
    ids, mask = batch([4, 9, 2], 9)
    real, special = int(mask.sum()), 2 * 3
    rows: dict[str, list[int]] = {"qkv": [], "ffn_out": []}
    for variant, special_ids in (("one", ()), ("split", (CLS, SEP))):
        model = UnpaddedBert(bert, special_ids)
        hooks = [model.qkv[0].register_forward_pre_hook(lambda m, a: rows["qkv"].append(a[0].shape[0])),
                 bert.encoder.layer[1].output.dense.register_forward_pre_hook(
                     lambda m, a: rows["ffn_out"].append(a[0].shape[0]))]
        with torch.inference_mode():
            model(ids, mask)
        for h in hooks:
            h.remove()
        if variant == "one":
            assert rows == {"qkv": [real], "ffn_out": [real]}  # 15 rows, not 3 x 9 = 27
        else:  # the word rows go through the module; the special rows through special_rows
            assert rows == {"qkv": [real, real - special], "ffn_out": [real, real - special]}


def test_unsupported_backbones_are_refused_with_the_reason():
    assert unpadded_unsupported(tiny_bert()) is None
    relative = tiny_bert(position_embedding_type="relative_key")
    assert "relative_key" in unpadded_unsupported(relative)
    with pytest.raises(ValueError, match="position_embedding_type='relative_key'"):
        UnpaddedBert(relative)
    assert "not a transformers BertModel" in unpadded_unsupported(torch.nn.Linear(2, 2))
    assert "decoder" in unpadded_unsupported(tiny_bert(is_decoder=True))


def test_onnx_trace_agrees_under_onnxruntime(tmp_path):
    """Traced once on a right-padded batch; onnxruntime then runs other batch sizes, lengths and
    left padding (the MultiHeadAttention contrib op with its key padding mask)."""
    import onnx
    import onnxruntime as ort

    bert = tiny_bert()
    model = UnpaddedBert(bert, (CLS, SEP)).eval()
    path = tmp_path / "unpadded.onnx"
    ids, mask = batch([4, 6], 6)
    with torch.no_grad():
        torch.onnx.export(model, (ids, mask), str(path), input_names=["input_ids", "attention_mask"],
                          output_names=["hidden"], opset_version=17, dynamo=False,
                          dynamic_axes={k: {0: "batch", 1: "sequence"} for k in ("input_ids", "attention_mask", "hidden")})
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert "MultiHeadAttention" in {n.op_type for n in onnx.load(str(path)).graph.node}
    for lengths, width, left in (([3], 3, False), ([5, 16, 2, 9], 16, False), ([7, 3, 11], 11, True)):
        ids, mask = batch(lengths, width, left=left, seed=len(lengths))
        (got,) = session.run(None, {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})
        np.testing.assert_allclose(got, reference(bert, ids, mask).numpy(), atol=1e-4, rtol=0)
