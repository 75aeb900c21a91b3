"""The export format: what an export folder holds and how its facts are recorded (no torch here).

An export folder (written by `pertvl export`, pertvl.export.onnx) holds::

    image_encoder.onnx        images [B, 1, S, S] float32 in [0, 1] -> image_emb [B, D], regions [B, M, Dl]
    text_encoder.onnx         input_ids, attention_mask, word_ids [B, L] int64
                              -> text_emb [B, D], words [B, W, Dl], word_mask [B, W] bool
    image_encoder.int8.onnx   (with --quantize int8) dynamically quantized variants
    text_encoder.int8.onnx
    tokenizer.json …          the model's tokenizer (save_pretrained)
    pertvl_export.json        the manifest: every fact below plus the sha256 of every file

A tower's facts are also stored in its ONNX file as `metadata_props` (`tower_metadata`), so a
file swapped in from another export is caught by its `pertvl.export_id`. Standard library only:
pertvl.infer reads it without torch.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

from pertvl.files import sha256_file as sha256_file  # the exporter's manifest hashes (one home: pertvl.files)

FORMAT = "pertvl-export/1"
MANIFEST_NAME = "pertvl_export.json"
ONNX_FILES = {
    ("image", "fp32"): "image_encoder.onnx",
    ("text", "fp32"): "text_encoder.onnx",
    ("image", "int8"): "image_encoder.int8.onnx",
    ("text", "int8"): "text_encoder.int8.onnx",
}
# Names of the graph inputs/outputs (the Encoder wrappers of pertvl.export.onnx produce these).
IMAGE_INPUTS = ("images",)
IMAGE_OUTPUTS = ("image_emb", "regions")
TEXT_INPUTS = ("input_ids", "attention_mask", "word_ids")
TEXT_OUTPUTS = ("text_emb", "words", "word_mask")
# Keys of a tower's manifest section that are also stored in its ONNX metadata_props.
_TOWER_KEYS = {
    "image": ("inputs", "outputs", "preprocessing", "grid"),
    "text": ("inputs", "outputs", "cleaning", "max_length", "tokenizer_files"),
}
_COMMON_KEYS = ("format", "pertvl_version", "export_id", "opset", "embedding_dim", "local_dim")
META_PREFIX = "pertvl."


class ExportFormatError(ValueError):
    """An export folder or one of its files does not match the pertvl export format."""


class ExportError(RuntimeError):
    """The export could not be completed (the message says which step and why)."""


class ParityError(ExportError):
    """onnxruntime's outputs differ from torch's by more than the tolerance."""


def tower_metadata(manifest: Mapping[str, Any], tower: str, variant: str = "fp32") -> dict[str, str]:
    """{"pertvl.<key>": json.dumps(value)}: the ONNX metadata_props of one tower file, derived from
    the manifest (ExportFormatError when it lacks a required key)."""
    facts: dict[str, Any] = {"tower": tower, "variant": variant}
    try:
        for key in _COMMON_KEYS:
            facts[key] = manifest[key]
        for key in _TOWER_KEYS[tower]:
            facts[key] = manifest[tower][key]
    except (KeyError, TypeError) as e:
        raise ExportFormatError(f"{MANIFEST_NAME}: missing required key {e} (for the {tower} tower)") from None
    return {META_PREFIX + k: json.dumps(v, sort_keys=True) for k, v in facts.items()}


def decode_metadata(props: Mapping[str, str]) -> dict[str, Any]:
    """Decode pertvl metadata_props ({"pertvl.key": JSON}) into {key: value}; other keys are ignored."""
    out: dict[str, Any] = {}
    for k, v in props.items():
        if k.startswith(META_PREFIX):
            try:
                out[k[len(META_PREFIX):]] = json.loads(v)
            except json.JSONDecodeError as e:
                raise ExportFormatError(f"metadata {k!r} is not valid JSON: {e}") from None
    return out


def metadata_differences(expected: Mapping[str, str], actual: Mapping[str, str]) -> list[str]:
    """Human-readable differences between expected and actual pertvl metadata_props."""
    diffs = []
    exp, act = decode_metadata(expected), decode_metadata(actual)
    for key in sorted(set(exp) | set(act)):
        if key not in act:
            diffs.append(f"{key}: missing (expected {_short(exp[key])})")
        elif key not in exp:
            diffs.append(f"{key}: unexpected key (value {_short(act[key])})")
        elif exp[key] != act[key]:
            diffs.append(f"{key}: file has {_short(act[key])}, manifest says {_short(exp[key])}")
    return diffs


def _short(value: Any, limit: int = 120) -> str:
    text = json.dumps(value, sort_keys=True)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def read_manifest(export_dir: str | os.PathLike) -> dict[str, Any]:
    """Parse and sanity-check EXPORT_DIR/pertvl_export.json (FileNotFoundError, ExportFormatError)."""
    path = os.path.join(os.fspath(export_dir), MANIFEST_NAME)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: not found ({os.fspath(export_dir)} is not a pertvl export folder)")
    try:
        with open(path, encoding="utf-8") as f:
            manifest = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ExportFormatError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        got = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise ExportFormatError(f"{path}: expected format {FORMAT!r}, got {got!r}")
    for key in (*_COMMON_KEYS, "image", "text", "files"):
        if key not in manifest:
            raise ExportFormatError(f"{path}: missing required key {key!r}")
    return manifest
