"""ONNX export of both towers of a trained DualEncoder, with metadata, a parity check and int8.

`export_model(model, out)` writes the export folder described in pertvl.export: each tower is
traced (torch.onnx.export, dynamo=False, opset 17) with a dynamic batch; the text graph is
"unpadded" for a BERT backbone (dense layers on the real tokens only, pertvl.export.unpadded),
else "fused" by onnxruntime's transformer optimizer; every file gets the export's facts as
metadata_props; torch and onnxruntime must agree within 1e-4 in fp32 on random and real inputs;
`quantize="int8"` adds quantized towers. Everything is written in a temporary folder renamed to
the export only when all passed: a failed export leaves no folder.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import tempfile
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pertvl import __version__
from pertvl.data.image import pixel_rule
from pertvl.data.text import cleaning_rule
from pertvl.data.tokenize import tokenization_rule
from pertvl.export import FORMAT, MANIFEST_NAME, ONNX_FILES, ParityError, tower_metadata
from pertvl.export.card import CARD_NAME, write_model_card
from pertvl.export.graphs import (
    export_image_tower,
    export_text_tower,
    graph_io,
    optimize_text_graph,
    set_metadata,
)
from pertvl.export.int8 import (
    DEFAULT_RESIDUAL,
    INT8_OP_TYPES,
    add_residual_passes,
    parse_residual_layers,
    quantize_int8,
)
from pertvl.export.parity import PARITY_TOLERANCE, check_parity, measure_speed, parity_inputs
from pertvl.export.samples import phantom_like_images
from pertvl.export.source import load_for_export
from pertvl.export.unpadded import unpadded_unsupported
from pertvl.files import sha256_file
from pertvl.train.rundir import trained_image_size

log = logging.getLogger(__name__)

DEFAULT_OPSET = 17
DEFAULT_IMAGE_SIZE = 224
EXPORTER = "torch.onnx.export(dynamo=False)"


# text graph: "auto" = "unpadded" when the backbone supports it (BertModel), else "fused"
TEXT_GRAPHS = ("auto", "unpadded", "fused", "traced")


@dataclass
class ExportResult:
    """out_dir: the export folder; manifest: its pertvl_export.json content."""

    out_dir: Path
    manifest: dict[str, Any]


def export_model(model: nn.Module, out_dir: str | os.PathLike, *, image_size: int = DEFAULT_IMAGE_SIZE,
                 max_length: int | None = None, opset: int = DEFAULT_OPSET, quantize: str | None = None,
                 int8_residual: str | Sequence[str] = DEFAULT_RESIDUAL, parity: bool = True,
                 text_graph: str = "auto", tolerance: float = PARITY_TOLERANCE, force: bool = False,
                 source: dict[str, Any] | None = None, command: str | None = None,
                 run_config: dict[str, Any] | None = None) -> ExportResult:
    """Export a DualEncoder (moved to CPU float32) to `out_dir` (see the module docstring).

    `max_length` defaults to the model config's; `int8_residual`: text layers whose int8
    input gets a residual pass (pertvl.export.int8; unpadded graph only); `text_graph`: "auto",
    "unpadded", "fused" or "traced" (as traced); `source`, `command`, `run_config` are recorded
    in the manifest and the model card.
    Raises FileExistsError (`out_dir` exists, no `force`), ParityError (nothing written) and
    ValueError (an unknown option, or "unpadded" for a backbone without support).
    """
    import onnx
    import onnxruntime as ort

    out_dir = Path(out_dir)
    if out_dir.exists() and not force:
        raise FileExistsError(f"{out_dir}: already exists (use --force to replace it)")
    if quantize not in (None, "int8"):
        raise ValueError(f"quantize: expected None or 'int8', got {quantize!r}")
    if text_graph not in TEXT_GRAPHS:
        raise ValueError(f"text_graph: expected one of {TEXT_GRAPHS}, got {text_graph!r}")
    int8_residual = parse_residual_layers(int8_residual if isinstance(int8_residual, str) else ",".join(int8_residual))
    max_length = int(max_length or model.config.max_length)
    model = model.to("cpu", torch.float32).eval()
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.partial-", dir=out_dir.parent))
    try:
        t0 = time.perf_counter()
        with torch.inference_mode():
            probe = model.encode_image(torch.from_numpy(phantom_like_images(2, image_size, seed=7)))
        grid = [int(g) for g in probe.grid]
        embedding_dim, local_dim = int(probe.global_emb.shape[1]), int(probe.regions.shape[2])
        paths = {t: tmp / ONNX_FILES[(t, "fp32")] for t in ("image", "text")}
        export_image_tower(model, paths["image"], image_size, opset, (grid[0] * grid[1], local_dim))
        text_info = _export_text_graph(model, paths["text"], max_length, opset, text_graph)
        log.info("traced both towers in %.1f s (text graph: %s)", time.perf_counter() - t0, text_info["mode"])
        tok_files = sorted(Path(p).name for p in model.tokenizer.save_pretrained(tmp) if Path(p).is_file())

        image_io, text_io = graph_io(paths["image"]), graph_io(paths["text"])
        manifest: dict[str, Any] = {
            "format": FORMAT,
            "pertvl_version": __version__,
            "export_id": uuid.uuid4().hex,
            "created": datetime.now(UTC).isoformat(timespec="seconds"),
            "command": command,
            "source": source or {},
            # the model's config less its max_length: the export's own is text.max_length
            "model_config": {k: v for k, v in model.config.to_dict().items() if k != "max_length"},
            "opset": opset,
            "embedding_dim": embedding_dim,
            "local_dim": local_dim,
            "exporter": {"method": EXPORTER, "torch": torch.__version__, "onnx": onnx.__version__,
                         "onnxruntime": ort.__version__, "text_graph": text_info},
            "image": {
                "inputs": image_io[0], "outputs": image_io[1], "grid": grid,
                "preprocessing": pixel_rule(image_size),
                "output_norm": {"image_emb": "L2 (unit length: cosine = dot product)", "regions": "none"},
            },
            "text": {
                "inputs": text_io[0], "outputs": text_io[1],
                "cleaning": cleaning_rule(),
                "max_length": max_length,
                "tokenization": tokenization_rule(model.tokenizer),
                "output_norm": {"text_emb": "L2 (unit length: cosine = dot product)", "words": "none",
                                "word_mask": "True for real words"},
                "tokenizer_files": {},
            },
            "files": {},
            "parity": None,
            "speed": None,
        }
        for name in tok_files:
            entry = {"kind": "tokenizer", "sha256": sha256_file(tmp / name), "bytes": (tmp / name).stat().st_size}
            manifest["files"][name] = entry
            manifest["text"]["tokenizer_files"][name] = entry["sha256"]

        variants = ["fp32"] + (["int8"] if quantize == "int8" else [])
        if "int8" in variants:
            quantize_int8(paths["image"], tmp / ONNX_FILES[("image", "int8")], "image")
            text_info["int8"] = _quantize_text(model, paths["text"], tmp / ONNX_FILES[("text", "int8")],
                                               text_info["mode"], max_length, opset, int8_residual)
        for variant in variants:
            for tower in ("image", "text"):
                path = tmp / ONNX_FILES[(tower, variant)]
                doc = f"pertvl {tower} encoder ({variant}); facts in metadata_props 'pertvl.*' and {MANIFEST_NAME}"
                for name in set_metadata(path, tower_metadata(manifest, tower, variant), doc):
                    manifest["files"][name] = {"kind": "onnx" if name.endswith(".onnx") else "onnx-data",
                                               "tower": tower, "variant": variant,
                                               "sha256": sha256_file(tmp / name), "bytes": (tmp / name).stat().st_size}

        cases = parity_inputs(model, image_size, max_length) if parity or "int8" in variants else []
        int8_paths = {t: tmp / ONNX_FILES[(t, "int8")] for t in ("image", "text")}
        if "int8" in variants:
            manifest["speed"] = measure_speed(
                {t: {"fp32": paths[t], "int8": int8_paths[t]} for t in ("image", "text")}, cases)
        if parity:
            t1 = time.perf_counter()
            report = {"tolerance": tolerance,
                      "rule": "fp32: max abs diff <= tolerance for image_emb/text_emb, <= tolerance x max(1, "
                              "max |torch output|) for regions/words; word_mask identical; int8: reported only",
                      "fp32": check_parity(model, paths, cases, tolerance)}
            if "int8" in variants:
                report["int8"] = check_parity(model, int8_paths, cases, None)
            manifest["parity"] = report
            log.info("parity checked in %.1f s: fp32 max abs %s", time.perf_counter() - t1,
                     {t: max(v.values()) for t, v in report["fp32"]["max_abs"].items()})

        manifest["model_card"] = CARD_NAME
        write_model_card(tmp, run_config, manifest=manifest)
        (tmp / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
        _publish(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return ExportResult(out_dir, manifest)


def _export_text_graph(model: nn.Module, path: Path, max_length: int, opset: int, text_graph: str) -> dict[str, Any]:
    """Write the text tower's graph in the `text_graph` form; returns its manifest entry."""
    import onnx

    backbone = model.text.backbone
    reason = unpadded_unsupported(backbone)
    if reason is None and model.text.needs_word_states:
        reason = (f"word_features {model.text.word_features!r} needs intermediate hidden states, which the "
                  "unpadded graph does not return")
    if text_graph == "unpadded" and reason:
        raise ValueError(f"text_graph 'unpadded': {reason}; use 'fused'")
    mode = ("fused" if reason else "unpadded") if text_graph == "auto" else text_graph
    info: dict[str, Any] = {"mode": mode}
    if text_graph == "auto" and reason:
        info["unpadded_unsupported"] = reason
    switched = export_text_tower(model, path, max_length, opset, "unpadded" if mode == "unpadded" else "eager")
    if mode == "unpadded":
        ops = [n.op_type for n in onnx.load(os.fspath(path), load_external_data=False).graph.node]
        info["contrib_ops"] = {"MultiHeadAttention": ops.count("MultiHeadAttention")}
    else:
        info["eager_attention_for"] = switched
    cfg = backbone.config
    if mode == "fused" and getattr(cfg, "num_attention_heads", None) and getattr(cfg, "hidden_size", None):
        info["tool"] = "onnxruntime.transformers.optimizer (model_type=bert, opt_level=0)"
        info["fused"] = optimize_text_graph(path, cfg.num_attention_heads, cfg.hidden_size)
        if not info["fused"].get("Attention"):
            log.warning("text graph: onnxruntime fused no Attention node (fused: %s); it will run unfused",
                        info["fused"])
    return info


def _quantize_text(model: nn.Module, fp32: Path, dst: Path, mode: str, max_length: int, opset: int,
                   residual: tuple[str, ...]) -> dict[str, Any]:
    """Write the int8 text tower; returns its manifest entry. The residual passes need the
    unpadded graph (they find the layers by their weight names there); other graphs get none."""
    if mode != "unpadded":
        quantize_int8(fp32, dst, "text")
        if residual:  # a warning when asked for, not for the default
            (log.info if residual == DEFAULT_RESIDUAL else log.warning)(
                "int8: residual passes %s need the unpadded text graph; the %s graph gets none", list(residual), mode)
        return {"source": "the fp32 graph", "op_types": INT8_OP_TYPES["text"], "residual": {}}
    source = dst.with_name(".text_int8_source.onnx")
    try:
        export_text_tower(model, source, max_length, opset, "unpadded-split")
        quantize_int8(source, dst, "text")
    finally:
        source.unlink(missing_ok=True)
    counts = add_residual_passes(dst, residual) if residual else {}
    return {"source": "unpadded-split trace ([CLS]/[SEP] rows quantized apart from word rows)",
            "op_types": INT8_OP_TYPES["text"], "fp32": ["word/position embeddings", "attention core", "layer norms"],
            "residual": counts}


def _publish(tmp: Path, out_dir: Path) -> None:
    """Rename the finished temporary folder to `out_dir` (replacing an old export only now)."""
    old = None
    if out_dir.exists():
        old = out_dir.with_name(f".{out_dir.name}.old-{uuid.uuid4().hex[:8]}")
        out_dir.rename(old)
    tmp.chmod(0o755)
    tmp.rename(out_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def cli_main(args) -> int:
    """`pertvl export`."""
    model, source, cfg = load_for_export(run=args.run, checkpoint=args.checkpoint, config=args.config)
    image_size = args.image_size or trained_image_size(cfg) or DEFAULT_IMAGE_SIZE
    max_length = args.max_length or ((cfg or {}).get("data") or {}).get("max_length") or model.config.max_length
    try:
        result = export_model(
            model, args.out, image_size=image_size, max_length=max_length, opset=args.opset,
            quantize=args.quantize, int8_residual=args.int8_residual,
            parity=not args.no_parity, text_graph=args.text_graph,
            tolerance=args.tolerance, force=args.force, source=source,
            command=" ".join(["pertvl", *sys.argv[1:]]), run_config=cfg,
        )
    except ParityError as e:
        print(f"pertvl export: parity check FAILED, nothing written to {args.out}: {e}", file=sys.stderr)
        return 1
    m = result.manifest
    print(f"exported to {result.out_dir} (export_id {m['export_id']}, opset {m['opset']}, image {image_size} px, "
          f"D={m['embedding_dim']}, Dl={m['local_dim']}, grid {m['image']['grid']})")
    graph = m["exporter"]["text_graph"]
    print(f"  text graph: {graph['mode']}" + (f", fused {graph['fused']}" if graph.get("fused") else "")
          + (f" (unpadded unsupported: {graph['unpadded_unsupported']})" if graph.get("unpadded_unsupported") else ""))
    if "int8" in graph:
        residual = graph["int8"].get("residual") or {}
        print("  int8 text residual passes: " + (", ".join(f"{k} ({n} matmuls)" for k, n in residual.items()) or "none"))
    if m["parity"]:
        for variant in ("fp32", "int8"):
            if variant in m["parity"]:
                p = m["parity"][variant]
                for tower in ("image", "text"):
                    diffs = ", ".join(f"{k} {v:.2e}" + (f" (|x| <= {p['scale'][tower][k]:.3g})"
                                                            if k in ("regions", "words") else "")
                                      for k, v in p["max_abs"][tower].items() if k != "word_mask")
                    print(f"  parity {variant} {tower}: max abs diff {diffs}; min cosine {p['min_cosine'][tower]:.6f}")
    if m["speed"]:
        for tower, s in m["speed"].items():
            print(f"  speed {tower} ({s['input']}): fp32 {s['seconds']['fp32'] * 1e3:.1f} ms, "
                  f"int8 {s['seconds']['int8'] * 1e3:.1f} ms ({s['int8_speedup']:.2f}x)")
    return 0
