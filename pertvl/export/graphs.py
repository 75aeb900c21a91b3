"""Writing the ONNX graphs: tracing each tower, fusing the text graph, output shapes, metadata_props."""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from pertvl import __version__
from pertvl.data.text import clean_text
from pertvl.data.tokenize import encode_texts
from pertvl.export import IMAGE_INPUTS, IMAGE_OUTPUTS, TEXT_INPUTS, TEXT_OUTPUTS, ExportError
from pertvl.export.int8 import quiet_onnxruntime_tools
from pertvl.export.samples import REAL_REPORTS, phantom_like_images
from pertvl.export.towers import ImageTower, TextTower, eager_attention

_TWO_GB = 2**31 - 1


def export_image_tower(model: nn.Module, path: Path, image_size: int, opset: int, regions_shape: Sequence[int]) -> None:
    """Trace the image tower to `path` (dynamic batch; example batch 2: size-1 dims get fixed).

    `regions_shape` (M, Dl) is written into the graph's output type, which the tracer leaves
    symbolic after a transpose. The exporter's tracer warnings are silenced: the parity step
    exercises every traced constant at other batch sizes and lengths."""
    example = torch.from_numpy(phantom_like_images(2, image_size, seed=123))
    with torch.no_grad(), warnings.catch_warnings(action="ignore"):
        torch.onnx.export(
            ImageTower(model).eval(), (example,), os.fspath(path),
            input_names=list(IMAGE_INPUTS), output_names=list(IMAGE_OUTPUTS),
            dynamic_axes={"images": {0: "batch"}, "image_emb": {0: "batch"}, "regions": {0: "batch"}},
            opset_version=opset, dynamo=False, do_constant_folding=True,
        )
    set_output_dims(path, {"regions": ["batch", *regions_shape]})


def set_output_dims(path: Path, dims: dict[str, list[int | str]]) -> None:
    """Declare output shapes of an ONNX file: an int is a fixed size, a str a named dynamic axis."""
    import onnx

    model = onnx.load(os.fspath(path))
    for out in model.graph.output:
        if out.name not in dims:
            continue
        shape = out.type.tensor_type.shape
        if len(shape.dim) != len(dims[out.name]):
            raise ExportError(f"{path.name}: output {out.name!r} has {len(shape.dim)} dims, expected {dims[out.name]}")
        for d, value in zip(shape.dim, dims[out.name], strict=True):
            if isinstance(value, str):
                d.dim_param = value
            else:
                d.dim_value = int(value)
    onnx.save_model(model, os.fspath(path))


def export_text_tower(model: nn.Module, path: Path, max_length: int, opset: int, trace: str = "unpadded") -> list[str]:
    """Trace the text tower to `path` (dynamic batch and sequence). trace: "unpadded"
    (pertvl.export.unpadded), "unpadded-split" (the same with [CLS]/[SEP] rows apart: the int8
    source graph), "eager" (the backbone under eager attention: the pattern onnxruntime's fusion
    recognizes) or "sdpa" (the backbone as it is). Returns the modules switched to eager attention."""
    # two reports of different lengths: the trace sees padding
    texts = [clean_text(REAL_REPORTS[0]), clean_text(REAL_REPORTS[2])]
    enc = encode_texts(model.tokenizer, texts, max_length=max_length)
    example = tuple(torch.from_numpy(getattr(enc, k)) for k in TEXT_INPUTS)
    seq = {0: "batch", 1: "sequence"}
    attention = eager_attention(model) if trace == "eager" else contextlib.nullcontext([])
    with torch.no_grad(), warnings.catch_warnings(action="ignore"), attention as switched:
        torch.onnx.export(
            TextTower(model, unpadded=trace.startswith("unpadded"), split_special=trace == "unpadded-split").eval(),
            example, os.fspath(path),
            input_names=list(TEXT_INPUTS), output_names=list(TEXT_OUTPUTS),
            dynamic_axes={**{k: seq for k in TEXT_INPUTS}, "text_emb": {0: "batch"}, "words": seq, "word_mask": seq},
            opset_version=opset, dynamo=False, do_constant_folding=True,
        )
    return switched


def optimize_text_graph(path: Path, num_heads: int, hidden_size: int) -> dict[str, int]:
    """Fuse the BERT graph in place with onnxruntime.transformers.optimizer (opt_level 0: only
    the portable contrib-op fusions; the session adds ORT_ENABLE_ALL at load). Returns the counts
    of fused operators."""
    from onnxruntime.transformers import optimizer

    with quiet_onnxruntime_tools():
        opt = optimizer.optimize_model(os.fspath(path), model_type="bert", num_heads=int(num_heads),
                                       hidden_size=int(hidden_size), opt_level=0)
        stats = {k: int(v) for k, v in opt.get_fused_operator_statistics().items() if v}
        opt.save_model_to_file(os.fspath(path))
    return stats


def set_metadata(path: Path, props: dict[str, str], doc: str) -> list[str]:
    """Replace the pertvl metadata_props of an ONNX file; returns the files it now consists of
    (the .onnx, plus `<name>.data` when the model is over 2 GB and needs external data)."""
    import onnx

    model = onnx.load(os.fspath(path))
    keep = [p for p in model.metadata_props if not p.key.startswith("pertvl.")]
    del model.metadata_props[:]
    for p in keep:
        model.metadata_props.add(key=p.key, value=p.value)
    for k, v in props.items():
        model.metadata_props.add(key=k, value=v)
    model.doc_string = doc
    model.producer_name = "pertvl"
    model.producer_version = __version__
    weights = sum(len(t.raw_data) for t in model.graph.initializer)
    data = path.with_name(path.name + ".data")
    data.unlink(missing_ok=True)
    if weights > _TWO_GB - (64 << 20):  # protobuf's limit: only then split weights into a .data file
        onnx.save_model(model, os.fspath(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=data.name)
        return [path.name, data.name]
    onnx.save_model(model, os.fspath(path))
    return [path.name]


def graph_io(path: Path) -> tuple[list[dict], list[dict]]:
    """Inputs and outputs of an ONNX file as onnxruntime sees them: name, dtype, shape (a dynamic
    axis is its name)."""
    import onnxruntime as ort

    session = ort.InferenceSession(os.fspath(path), providers=["CPUExecutionProvider"])

    def desc(arg) -> dict:
        dtype = arg.type.removeprefix("tensor(").removesuffix(")")
        dtype = {"float": "float32", "double": "float64"}.get(dtype, dtype)
        return {"name": arg.name, "dtype": dtype, "shape": [d if isinstance(d, int) else str(d) for d in arg.shape]}

    return [desc(a) for a in session.get_inputs()], [desc(a) for a in session.get_outputs()]
