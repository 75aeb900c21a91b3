"""`pertvl embed` and `pertvl similarity` (parsers in pertvl.evaluate.embed_cli): an ONNX export
applied to image files and report texts; embeddings, a similarity matrix and attention heatmaps."""

from __future__ import annotations

import importlib.util
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from pertvl.data.text import clean_text
from pertvl.errors import NotFoundError, UserError
from pertvl.evaluate.report import save_attention_map
from pertvl.files import write_json
from pertvl.infer import Embedder, attention_maps

log = logging.getLogger(__name__)


def _safe_name(text: str, limit: int = 40) -> str:
    keep = "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in text)
    return keep[:limit] or "_"


def save_attention_pngs(embedder: Embedder, images: np.ndarray, image_names: Sequence[str], texts: list[str],
                        out_dir: str | os.PathLike, gamma1: float = 4.0) -> list[dict[str, Any]]:
    """One PNG heatmap per (image, report, word); returns the index rows {"image", "text", "word_index",
    "word", "png"}."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    img = embedder.image_features(images)
    txt = embedder.text_features(texts)
    rows = []
    for i, name in enumerate(image_names):
        pixels = np.round(images[i, 0] * 255.0).clip(0, 255).astype(np.uint8)
        for j in range(len(texts)):
            if not txt.word_mask[j].any():
                log.warning("report %d is empty after cleaning: no attention maps", j)
                continue
            maps = attention_maps(img.regions[i], img.grid, txt.words[j], txt.word_mask[j], gamma1=gamma1)
            for k, (word, attn) in enumerate(zip(txt.word_lists[j], maps, strict=True)):
                png = out_dir / f"img{i:03d}_txt{j:03d}_w{k:03d}_{_safe_name(word)}.png"
                save_attention_map(pixels, attn, word, png)
                rows.append({"image": name, "text": j, "word_index": k, "word": word, "png": png.name})
    return rows


def read_texts(texts: Sequence[str], texts_file: str | os.PathLike | None) -> list[str]:
    """--texts, then one text per non-empty line of --texts-file (UTF-8); NotFoundError."""
    out = list(texts)
    if texts_file is not None:
        path = Path(texts_file)
        if not path.is_file():
            raise NotFoundError(f"--texts-file {path}: no such file")
        out += [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return out


def check_texts(embedder: Embedder, texts: Sequence[str]) -> list[dict[str, Any]]:
    """Refuse (UserError) a text with no words after the export's cleaning rule; return one {"text",
    "words", "dropped"} per text cut at the rule's word limit (also logged)."""
    cut = []
    for i, text in enumerate(texts):
        words = clean_text(text, max_words=None, drop_deid=embedder.drop_deid).split()
        if not any(ch.isalnum() for w in words for ch in w):
            raise UserError(f"text {i + 1} ({text[:40]!r}) has no words after cleaning (empty, punctuation or "
                            "de-identification marks only); give the report's text")  # fmt: skip
        if embedder.max_words and len(words) > embedder.max_words:
            cut.append({"text": i + 1, "words": len(words), "dropped": len(words) - embedder.max_words})
            log.warning("text %d: %d words; the model reads the first %d (%d dropped)",
                        i + 1, len(words), embedder.max_words, len(words) - embedder.max_words)  # fmt: skip
    return cut


def load_images(embedder: Embedder, paths: Sequence[str]) -> np.ndarray:
    """Embedder.load_images for files the user named: a missing or undecodable file is a UserError."""
    try:
        return embedder.load_images(paths)
    except FileNotFoundError as e:
        raise NotFoundError(str(e)) from e


def embed_main(args) -> int:
    """`pertvl embed`: write image_emb.npy, text_emb.npy, similarity.npy and index.json."""
    args.texts = read_texts(args.texts, args.texts_file)
    if not args.images and not args.texts:
        raise UserError("pertvl embed: give --images and/or --texts (or --texts-file)")
    if args.attention_maps and importlib.util.find_spec("matplotlib") is None:
        raise UserError("--attention-maps draws its PNGs with matplotlib, which the inference-only install "
                        "leaves out: pip install matplotlib (or 'pertvl[train]')")
    embedder = Embedder.from_export(args.export, int8=args.int8, batch_size=args.batch_size)
    cut = check_texts(embedder, args.texts)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    index: dict[str, Any] = {"export": str(args.export), "export_id": embedder.manifest["export_id"],
                             "variant": embedder.variant, "images": [], "texts": [], "files": {}}
    images = img_emb = txt_emb = None
    if args.images:
        images = load_images(embedder, args.images)
        img_emb = embedder.embed_images(images)
        np.save(out / "image_emb.npy", img_emb)
        index["images"] = [str(p) for p in args.images]
        index["files"]["image_emb"] = "image_emb.npy"
    if args.texts:
        txt_emb = embedder.embed_texts(args.texts)
        np.save(out / "text_emb.npy", txt_emb)
        index["texts"] = list(args.texts)
        index["cleaned_texts"] = embedder.clean(args.texts)
        index["texts_cut"] = cut  # texts longer than the cleaning rule's word limit, and the words dropped
        index["files"]["text_emb"] = "text_emb.npy"
    if img_emb is not None and txt_emb is not None:
        sim = (img_emb.astype(np.float64) @ txt_emb.astype(np.float64).T).astype(np.float32)
        np.save(out / "similarity.npy", sim)
        index["files"]["similarity"] = "similarity.npy"
    if args.attention_maps:
        if images is None or not args.texts:
            raise SystemExit("pertvl embed: --attention-maps needs both --images and --texts")
        rows = save_attention_pngs(embedder, images, index["images"], list(args.texts), args.attention_maps,
                                   gamma1=args.gamma1)
        write_json(Path(args.attention_maps) / "attention_maps.json", {"gamma1": args.gamma1, "maps": rows})
        index["attention_maps"] = {"dir": str(args.attention_maps), "count": len(rows)}
    write_json(out / "index.json", index)
    written = [f"{name} {list(np.load(out / name, mmap_mode='r').shape)}" for name in index["files"].values()]
    print(f"wrote {', '.join(written)} and index.json to {out}")
    if args.attention_maps:
        print(f"wrote {index['attention_maps']['count']} attention maps to {args.attention_maps}")
    return 0


def format_similarity_table(sim: np.ndarray, image_names: Sequence[str], texts: Sequence[str],
                            width: int = 70) -> str:
    """An image × report table of cosine scores, the best report of each image marked with '*'."""
    lines = ["reports:"]
    for j, t in enumerate(texts):
        short = t if len(t) <= width else t[: width - 3] + "..."
        lines.append(f"  R{j + 1}  {short}")
    names = [os.path.basename(str(n)) for n in image_names]
    w0 = max([len(n) for n in names] + [5])
    lines.append("")
    lines.append(f"{'image':<{w0}}" + "".join(f"{'R' + str(j + 1):>10}" for j in range(len(texts))))
    for i, name in enumerate(names):
        best = int(np.argmax(sim[i])) if sim.shape[1] else -1
        cells = "".join(f"{sim[i, j]:>9.4f}{'*' if j == best else ' '}" for j in range(sim.shape[1]))
        lines.append(f"{name:<{w0}}{cells}")
    return "\n".join(lines)


def similarity_main(args) -> int:
    """`pertvl similarity`: print the image × report cosine table."""
    texts = read_texts(args.texts, args.texts_file)
    if not texts:
        raise UserError("pertvl similarity: give --texts or --texts-file")
    embedder = Embedder.from_export(args.export, int8=args.int8, batch_size=args.batch_size)
    cut = check_texts(embedder, texts)
    sim = embedder.similarity(load_images(embedder, list(args.images)), texts)
    print(f"cosine similarity, export {args.export} ({embedder.variant})")
    print(format_similarity_table(sim, args.images, texts))
    for c in cut:
        print(f"note: R{c['text']} has {c['words']} words; the model read the first "
              f"{c['words'] - c['dropped']} ({c['dropped']} dropped)")
    return 0
