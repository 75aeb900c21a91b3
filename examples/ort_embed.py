"""Embed images and reports with a pertvl export, using onnxruntime, tokenizers, numpy and Pillow only.

Every preprocessing rule comes from the export's pertvl_export.json (no pertvl import):

    python examples/ort_embed.py EXPORT --image chest.png --text "No pleural effusion." "Small left effusion."

prints the cosine similarity of each image with each report; --save FILE.npz also writes the
embeddings (image_emb [N, D], text_emb [M, D], unit length).
"""

from __future__ import annotations

import argparse
import json
import re
import unicodedata
from pathlib import Path

import numpy as np
import onnxruntime as ort
from PIL import Image, ImageOps
from tokenizers import Tokenizer


def clean(text: str, rule: dict) -> str:
    """The export's text cleaning: rule = manifest["text"]["cleaning"], its steps in order."""
    if not text:
        return ""
    for step in rule["steps"]:
        kind = step["step"]
        if kind == "ascii" and not text.isascii():
            text = unicodedata.normalize("NFKD", unicodedata.normalize("NFKC", text))
            text = "".join(ch for ch in text if ord(ch) < 128 and not unicodedata.combining(ch))
        elif kind == "lowercase":
            text = text.lower()
        elif kind == "drop_deid":
            text = re.sub(step["pattern"], step["replace_with"], text)
        elif kind == "separators":
            text = re.sub(step["pattern"], lambda m: m.group("keep") or " ", text)
        elif kind == "words":
            words = text.split()
            if rule["max_words"] and rule["max_words"] > 0:
                words = words[: rule["max_words"]]
            text = " ".join(words)
    return text


def tokenize(tokenizer: Tokenizer, texts: list[str], max_length: int, pad_id: int) -> dict[str, np.ndarray]:
    """input_ids, attention_mask and word_ids [N, L] int64 of cleaned texts (manifest["text"]["tokenization"])."""
    tokenizer.no_padding()
    tokenizer.enable_truncation(max_length=max_length)
    encs = tokenizer.encode_batch([t.split() for t in texts], is_pretokenized=True)
    length = max(len(e.ids) for e in encs)
    feeds = {"input_ids": np.full((len(encs), length), pad_id, np.int64),
             "attention_mask": np.zeros((len(encs), length), np.int64),
             "word_ids": np.full((len(encs), length), -1, np.int64)}
    for i, e in enumerate(encs):
        feeds["input_ids"][i, : len(e.ids)] = e.ids
        feeds["attention_mask"][i, : len(e.ids)] = 1
        feeds["word_ids"][i, : len(e.ids)] = [-1 if w is None else w for w in e.word_ids]
    return feeds


def load_image(path: str, size: int) -> np.ndarray:
    """[1, size, size] float32 in [0, 1] by manifest["image"]["preprocessing"]'s steps."""
    with Image.open(path) as im:
        im.draft(im.mode, (size, size))
        im.load()
        im = ImageOps.exif_transpose(im)
    if im.mode in ("I", "F") or im.mode.startswith("I;16"):
        x = np.asarray(im, dtype=np.float64)
        lo, hi = x.min(), x.max()
        x = np.zeros(x.shape) if hi <= lo else np.round((x - lo) * (255.0 / (hi - lo)))
        im = Image.fromarray(x.astype(np.uint8), mode="L")
    elif im.mode != "L":
        im = im.convert("L")
    w, h = im.size
    if min(w, h) != size:
        scale = size / min(w, h)
        w, h = (size, max(size, round(h * scale))) if w <= h else (max(size, round(w * scale)), size)
        im = im.resize((w, h), Image.Resampling.BILINEAR)
    left, top = int(round((w - size) / 2.0)), int(round((h - size) / 2.0))
    im = im.crop((left, top, left + size, top + size))
    return (np.asarray(im, dtype=np.float32) / 255.0)[None]


def embed(export: Path, images: list[str], texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """(image_emb [N, D], text_emb [M, D]) from the fp32 towers of an export folder."""
    manifest = json.loads((export / "pertvl_export.json").read_text())
    image_session = ort.InferenceSession(str(export / "image_encoder.onnx"), providers=["CPUExecutionProvider"])
    text_session = ort.InferenceSession(str(export / "text_encoder.onnx"), providers=["CPUExecutionProvider"])
    size = manifest["image"]["preprocessing"]["size"]
    pixels = np.stack([load_image(p, size) for p in images])
    image_emb = image_session.run(["image_emb"], {"images": pixels})[0]
    tok = manifest["text"]["tokenization"]
    tokenizer = Tokenizer.from_file(str(export / tok["tokenizer_file"]))
    cleaned = [clean(t, manifest["text"]["cleaning"]) for t in texts]
    feeds = tokenize(tokenizer, cleaned, manifest["text"]["max_length"], tok["pad_id"])
    text_emb = text_session.run(["text_emb"], feeds)[0]
    return image_emb, text_emb  # both unit length (manifest[tower]["output_norm"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("export", type=Path, help="the export folder (pertvl_export.json, *.onnx, tokenizer.json)")
    parser.add_argument("--image", nargs="+", required=True, help="image files")
    parser.add_argument("--text", nargs="+", required=True, help="report texts")
    parser.add_argument("--save", help="write image_emb and text_emb to this .npz")
    args = parser.parse_args()
    image_emb, text_emb = embed(args.export, args.image, args.text)
    if args.save:
        np.savez(args.save, image_emb=image_emb, text_emb=text_emb)
    for path, row in zip(args.image, image_emb @ text_emb.T, strict=True):
        print(path, " ".join(f"{s:.4f}" for s in row))


if __name__ == "__main__":
    main()
