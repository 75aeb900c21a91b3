"""Dynamic int8 quantization of the exported towers, and residual passes for chosen text layers.

`quantize_int8`: onnxruntime's quantize_dynamic, int8 per-channel weights, activations quantized
per call (one scale per matrix). `add_residual_passes`: a chosen layer also multiplies the
rounding residual r = x - x̂ of its input, quantized the same way, so it sees x at ~16-bit
precision for a second int8 GEMM (standard ONNX ops, the same stored int8 weight). onnxruntime's
int8 GEMMs take one activation scale per matrix, so per-row scales or SmoothQuant are not open;
docs/EXPORT.md has the measurements.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path

# Op types quantized per tower: convolutions stay fp32 (onnxruntime's ConvInteger is slower than
# fp32 on CPU) and so does the word-embedding table (quantizing it costs structure accuracy).
INT8_OP_TYPES = {"image": ["MatMul"], "text": ["MatMul", "Gemm", "Attention"]}

# text layers that can get a residual pass, by the name of their weight in the unpadded graph
# (pertvl.export.unpadded over a transformers BertModel)
RESIDUAL_LAYERS = {
    "qkv": re.compile(r"(^|\.)qkv\.\d+\.weight"),
    "attn-out": re.compile(r"\.attention\.output\.dense\.weight"),
    "ffn-in": re.compile(r"\.intermediate\.dense\.weight"),
    "ffn-out": re.compile(r"\.layer\.\d+\.output\.dense\.weight"),
}
DEFAULT_RESIDUAL = ("ffn-in",)


@contextlib.contextmanager
def quiet_onnxruntime_tools() -> Iterator[None]:
    """Keep onnxruntime's quantizer and optimizer quiet: root logger at ERROR, prints to stderr."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(sys.stderr):
            warnings.simplefilter("ignore")
            yield
    finally:
        root.setLevel(level)


def parse_residual_layers(spec: str | None) -> tuple[str, ...]:
    """"ffn-in,qkv" -> ("ffn-in", "qkv"); "none" or "" -> (). Raises ValueError on unknown names."""
    names = tuple(s.strip() for s in (spec or "").split(",") if s.strip() and s.strip() != "none")
    unknown = [n for n in names if n not in RESIDUAL_LAYERS]
    if unknown:
        raise ValueError(f"int8 residual layers: unknown {unknown}; expected a comma list of "
                         f"{sorted(RESIDUAL_LAYERS)} or 'none'")
    return names


def quantize_int8(src: Path, dst: Path, tower: str) -> None:
    """Dynamic int8 quantization (weights int8, activations quantized at run time)."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with quiet_onnxruntime_tools():
        quantize_dynamic(
            os.fspath(src), os.fspath(dst), op_types_to_quantize=INT8_OP_TYPES[tower],
            # per-channel weight scales: closer to fp32 at the same speed
            weight_type=QuantType.QInt8, per_channel=True,
            # fused contrib ops (Attention, SkipLayerNormalization) have no shape-inference types
            extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT},
        )


def _only(nodes: list):
    """The single node of a list, else None."""
    return nodes[0] if len(nodes) == 1 else None


def add_residual_passes(path: Path, layers: tuple[str, ...]) -> dict[str, int]:
    """Give the quantized layers named in `layers` (keys of RESIDUAL_LAYERS) a residual pass, in
    place, in a graph written by `quantize_int8`. Returns the number of MatMuls changed per layer
    kind. Raises ValueError when a kind matches none (the graph is not what this expects)."""
    import onnx
    from onnx import TensorProto, helper

    model = onnx.load(os.fspath(path))
    graph = model.graph
    producer = {out: node for node in graph.node for out in node.output}
    consumers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)

    after: dict[int, list] = {}  # id(node) -> nodes to insert after it (keeps topological order)
    counts = dict.fromkeys(layers, 0)
    for node in graph.node:
        if node.op_type != "MatMulInteger":
            continue
        kind = next((k for k in layers if RESIDUAL_LAYERS[k].search(node.input[1])), None)
        if kind is None:
            continue
        # quantize_dynamic's pattern: DynamicQuantizeLinear(x) -> MatMulInteger -> Cast -> Mul(x_scale * w_scale)
        xq, wq, xzp, wzp = node.input
        dql = producer.get(xq)
        cast = _only(consumers.get(node.output[0], []))
        rescale = _only(consumers.get(cast.output[0], [])) if cast is not None else None
        scales = producer.get(next((i for i in rescale.input if i != cast.output[0]), "")) if rescale else None
        if (getattr(dql, "op_type", None), getattr(cast, "op_type", None), getattr(rescale, "op_type", None),
                getattr(scales, "op_type", None)) != ("DynamicQuantizeLinear", "Cast", "Mul", "Mul"):
            raise ValueError(f"{path}: {node.name} is not in quantize_dynamic's pattern "
                             "(DynamicQuantizeLinear -> MatMulInteger -> Cast -> Mul by x_scale * w_scale)")
        x, x_scale = dql.input[0], dql.output[1]
        w_scale = next(i for i in scales.input if i != x_scale)
        p = f"{node.name}/residual"
        out = rescale.output[0]
        rescale.output[0] = f"{out}/coarse"
        after[id(rescale)] = [
            helper.make_node("DequantizeLinear", [xq, x_scale, xzp], [f"{p}/x_hat"], name=f"{p}/dequantize"),
            helper.make_node("Sub", [x, f"{p}/x_hat"], [f"{p}/r"], name=f"{p}/sub"),
            helper.make_node("DynamicQuantizeLinear", [f"{p}/r"], [f"{p}/rq", f"{p}/r_scale", f"{p}/r_zero_point"],
                             name=f"{p}/quantize"),
            helper.make_node("MatMulInteger", [f"{p}/rq", wq, f"{p}/r_zero_point", wzp], [f"{p}/y_int"],
                             name=f"{p}/matmul"),
            helper.make_node("Cast", [f"{p}/y_int"], [f"{p}/y_float"], name=f"{p}/cast", to=TensorProto.FLOAT),
            helper.make_node("Mul", [f"{p}/r_scale", w_scale], [f"{p}/scales"], name=f"{p}/scales"),
            helper.make_node("Mul", [f"{p}/y_float", f"{p}/scales"], [f"{p}/y"], name=f"{p}/rescale"),
            helper.make_node("Add", [f"{out}/coarse", f"{p}/y"], [out], name=f"{p}/add"),
        ]
        counts[kind] += 1
    missing = [k for k, n in counts.items() if not n]
    if missing:
        raise ValueError(f"{path}: no quantized MatMul for int8 residual layers {missing}")
    nodes = []
    for node in graph.node:
        nodes.append(node)
        nodes.extend(after.get(id(node), ()))
    del graph.node[:]
    graph.node.extend(nodes)
    onnx.save(model, os.fspath(path))
    return counts
