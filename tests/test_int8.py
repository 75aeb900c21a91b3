"""pertvl.export.int8: dynamic int8 quantization and the residual pass.

A one-layer ONNX graph (x @ W + b, W named like a BERT FFN input layer) is quantized with
quantize_int8. The residual pass must leave only the weights' int8 rounding: its output has to
match x @ dequantized(W) + b far more closely than the plain int8 graph does, from the same
stored int8 weight.
"""

from __future__ import annotations

import numpy as np
import pytest

from pertvl.export.int8 import RESIDUAL_LAYERS, add_residual_passes, parse_residual_layers, quantize_int8

WEIGHT = "model.text.backbone.encoder.layer.0.intermediate.dense.weight"
K, N = 64, 96


def _linear_graph(path, rng) -> tuple[np.ndarray, np.ndarray]:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w = rng.standard_normal((K, N)).astype(np.float32) * 0.1
    b = rng.standard_normal(N).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", WEIGHT], ["xw"]), helper.make_node("Add", ["xw", "bias"], ["y"])],
        "linear",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["rows", K])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["rows", N])],
        [numpy_helper.from_array(w, WEIGHT), numpy_helper.from_array(b, "bias")],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return w, b


def _dequantized_weight(path) -> np.ndarray:
    """W as the int8 graph stores it: int8 values, per-column scale and zero point."""
    import onnx
    from onnx import numpy_helper

    inits = {i.name: numpy_helper.to_array(i) for i in onnx.load(str(path)).graph.initializer}
    q = inits[f"{WEIGHT}_quantized"].astype(np.float32)
    return (q - inits[f"{WEIGHT}_zero_point"].astype(np.float32)) * inits[f"{WEIGHT}_scale"]


def _run(path, x) -> np.ndarray:
    import onnxruntime as ort

    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


def test_residual_pass_leaves_only_weight_rounding(tmp_path):
    import onnx

    rng = np.random.default_rng(0)
    w, b = _linear_graph(tmp_path / "fp32.onnx", rng)
    quantize_int8(tmp_path / "fp32.onnx", tmp_path / "int8.onnx", "text")
    (tmp_path / "residual.onnx").write_bytes((tmp_path / "int8.onnx").read_bytes())
    assert add_residual_passes(tmp_path / "residual.onnx", ("ffn-in",)) == {"ffn-in": 1}

    x = rng.standard_normal((50, K)).astype(np.float32)
    x[3, 7] = 25.0  # an outlier sets the dynamic scale of the whole matrix, as [CLS] rows do in BERT
    target = x.astype(np.float64) @ _dequantized_weight(tmp_path / "int8.onnx") + b
    coarse = np.abs(_run(tmp_path / "int8.onnx", x) - target).max()
    fine = np.abs(_run(tmp_path / "residual.onnx", x) - target).max()
    assert coarse > 0.05  # int8 activations: a step of 28/255 on x
    assert fine < coarse / 50  # the residual's own step is 255x finer
    assert np.abs(_run(tmp_path / "residual.onnx", x) - (x @ w + b)).max() < 0.05  # and the weights' rounding

    # one stored int8 weight, read by both integer matmuls; no new initializers
    graph = onnx.load(str(tmp_path / "residual.onnx")).graph
    readers = [n for n in graph.node if f"{WEIGHT}_quantized" in n.input]
    assert [n.op_type for n in readers] == ["MatMulInteger", "MatMulInteger"]
    assert {i.name for i in graph.initializer} == {i.name for i in onnx.load(str(tmp_path / "int8.onnx")).graph.initializer}


def test_residual_pass_refuses_layers_it_cannot_find(tmp_path):
    _linear_graph(tmp_path / "fp32.onnx", np.random.default_rng(1))
    quantize_int8(tmp_path / "fp32.onnx", tmp_path / "int8.onnx", "text")
    before = (tmp_path / "int8.onnx").read_bytes()
    with pytest.raises(ValueError, match=r"no quantized MatMul for int8 residual layers \['qkv'\]"):
        add_residual_passes(tmp_path / "int8.onnx", ("ffn-in", "qkv"))
    assert (tmp_path / "int8.onnx").read_bytes() == before  # nothing written


def test_residual_layer_names():
    assert parse_residual_layers("ffn-in, qkv") == ("ffn-in", "qkv")
    assert parse_residual_layers("none") == parse_residual_layers("") == parse_residual_layers(None) == ()
    with pytest.raises(ValueError, match=r"unknown \['ffn'\]"):
        parse_residual_layers("ffn")
    # each kind matches its BERT weight and no other
    names = {"qkv": "unpadded.qkv.3.weight_Transposed_quantized",
             "attn-out": "model.text.backbone.encoder.layer.3.attention.output.dense.weight_Transposed_quantized",
             "ffn-in": "model.text.backbone.encoder.layer.3.intermediate.dense.weight_Transposed_quantized",
             "ffn-out": "model.text.backbone.encoder.layer.3.output.dense.weight_Transposed_quantized"}
    for kind, pattern in RESIDUAL_LAYERS.items():
        assert [k for k, n in names.items() if pattern.search(n)] == [kind]


def test_residual_pass_refuses_a_graph_of_another_shape(tmp_path):
    """A MatMulInteger whose output is not Cast -> Mul(scales) (not quantize_dynamic's pattern)."""
    import onnx
    from onnx import helper

    _linear_graph(tmp_path / "fp32.onnx", np.random.default_rng(2))
    quantize_int8(tmp_path / "fp32.onnx", tmp_path / "int8.onnx", "text")
    model = onnx.load(str(tmp_path / "int8.onnx"))
    matmul = next(n for n in model.graph.node if n.op_type == "MatMulInteger")
    model.graph.node.append(helper.make_node("Identity", [matmul.output[0]], ["extra"]))  # a second reader
    onnx.save(model, str(tmp_path / "other.onnx"))
    with pytest.raises(ValueError, match="is not in quantize_dynamic's pattern"):
        add_residual_passes(tmp_path / "other.onnx", ("ffn-in",))
