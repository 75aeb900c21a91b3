"""MODEL_CARD.md of an export, in Hugging Face's model-card sections, from the manifest and the
run's config; the demo rewrites it with its evaluation headlines (`results`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from pertvl.files import atomic_write_text

CARD_NAME = "MODEL_CARD.md"
PAPER = ('X. Zhong, K. Batmanghelich and L. Sun, "Enhancing Biomedical Multi-modal Representation Learning '
         'with Multi-scale Pre-training and Perturbed Report Discrimination."')
_SOURCES = {
    "phantom": "synthetic chest radiograph phantoms (`pertvl data phantom`): drawn shapes and template reports, "
               "no patient data",
    "mimic-cxr": "MIMIC-CXR-JPG (`pertvl data mimic-cxr`)",
    "table": "a user's own table of images and reports (`pertvl data csv`)",
}


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def training_data(config: Mapping[str, Any] | None) -> list[str]:
    """Lines on what the run trained on: the shards' pairs, their source and per-split counts."""
    shards = ((config or {}).get("data") or {}).get("shards")
    if not shards:
        return ["Unknown: the export was made without a run config (`pertvl export --checkpoint`)."]
    manifest = _read_json(Path(shards) / "manifest.json") if "://" not in str(shards) else None
    if manifest is None:
        return [f"Shards `{shards}` (their manifest.json was not readable at export time)."]
    splits = {s: v.get("num_samples", 0) for s, v in manifest.get("splits", {}).items()}
    pairs = (manifest.get("inputs") or {}).get("pairs")
    summary = _read_json(Path(pairs).parent / "summary.json") if pairs else None
    source = (summary or {}).get("source") or (summary or {}).get("layout") or "unknown"
    kind = "phantom" if str(source).startswith("phantom") else "table" if str(source).startswith("table") else source
    return [
        f"- Source: {_SOURCES.get(kind, source)}.",
        f"- Pairs: {pairs or 'unknown'}; packed at {manifest.get('image_size', '?')} px into `{shards}`.",
        "- Samples per split: " + ", ".join(f"{s} {n:,}" for s, n in splits.items())
        + " (the model trained on `train`; the split keeps whole studies or subjects apart).",
        f"- Skipped while packing: {manifest.get('skipped_counts') or manifest.get('skipped') or 'none'}.",
    ]


def model_card(manifest: Mapping[str, Any], config: Mapping[str, Any] | None = None,
               results: Sequence[str] | None = None) -> str:
    """The card's Markdown. `results`: evaluation headlines (None: not evaluated yet)."""
    model = (config or {}).get("model") or manifest.get("model_config") or {}
    train = (config or {}).get("train") or {}
    loss = (config or {}).get("loss") or {}
    pre, text = manifest["image"]["preprocessing"], manifest["text"]
    lines = [
        "# Model card: pertvl image and report encoders", "",
        "## Model details", "",
        "A dual encoder for chest radiographs and their reports, pretrained with pertvl (global and local "
        "contrastive losses plus perturbed report discrimination), exported to ONNX.", "",
        f"- Export {manifest['export_id']}, pertvl {manifest['pertvl_version']}, created {manifest.get('created')}.",
        f"- Image tower: {model.get('image_arch', '?')}, {pre['size']} x {pre['size']} grayscale input; "
        f"text tower: {model.get('text_name_or_path') or 'the default MiniLM'}, up to {text['max_length']} "
        "word pieces.",
        f"- Outputs: unit-length {manifest['embedding_dim']}-d embeddings (cosine = dot product), "
        f"{manifest['local_dim']}-d region and word features.",
        "- Use: `pertvl.infer.Embedder` or plain onnxruntime (docs/EXPORT.md, examples/ort_embed.py).", "",
        "## Intended use", "",
        "Research on vision-language representation learning: image-report retrieval, zero-shot "
        "probing, word-region attention, and as a starting point for fine-tuning, on data like the "
        "training data below.", "",
        "## Out-of-scope use", "",
        "- Not for clinical decisions, diagnosis, triage or any patient care: it is not a medical device and "
        "was not validated for any of it.",
        "- Not for images or reports unlike the training data (other modalities, languages, report styles) "
        "without evaluating it there first.", "",
        "## Training data", "", *training_data(config), "",
        "## Training configuration", "",
        f"- Loss preset `{loss.get('preset', '?')}`; steps {train.get('max_steps') or 'by epochs'} "
        f"(epochs {train.get('epochs', '?')}), micro-batch {train.get('micro_batch', '?')} x accumulation "
        f"{train.get('grad_accum', '?')}, learning rate {train.get('lr', '?')}, seed {train.get('seed', '?')}.",
        f"- Export command: `{manifest.get('command') or '?'}`; the full run config is the run's config.yaml "
        f"({(manifest.get('source') or {}).get('path', '?')}).", "",
        "## Evaluation results", "",
        *([f"- {r}" for r in results] if results else [
            "Not evaluated when exported. `pertvl eval structure|retrieval|zeroshot|grounding --export DIR "
            "--shards SHARDS --out OUT` gives each number beside its control, with a 95 % CI and n; the demo "
            "rewrites this section with its results."]), "",
        "## Limitations", "",
        "- Trained on what the training data section says; a model trained on phantoms has seen no real "
        "radiograph, and its numbers say nothing about real images.",
        "- Reports are cleaned to lower-case ASCII words (at most "
        f"{text['cleaning'].get('max_words')}); punctuation and casing are lost.",
        "- Structure and grounding scores come with controls because a model can pass them by shortcuts "
        "(word identity, text-only priors); read each number beside its control.", "",
        "## How to cite", "", PAPER, "",
    ]
    return "\n".join(lines)


def write_model_card(export_dir: str | os.PathLike, config: Mapping[str, Any] | None = None,
                     results: Sequence[str] | None = None, manifest: Mapping[str, Any] | None = None) -> Path:
    """Write EXPORT_DIR/MODEL_CARD.md (the manifest read from the folder unless given)."""
    export_dir = Path(export_dir)
    if manifest is None:
        manifest = json.loads((export_dir / "pertvl_export.json").read_text(encoding="utf-8"))
    path = export_dir / CARD_NAME
    atomic_write_text(path, model_card(manifest, config, results))
    return path
