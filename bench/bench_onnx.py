"""onnxruntime vs torch eager, batch 32, same threads: the image towers (small ResNet, ResNet-50, 224 px)
and the text tower (MiniLM, ~40-word reports) in fp32 (goal 1.5x) and int8 (goal 2x); exit 1 when missed.

    python bench/bench_onnx.py [--quick] [--threads N] [--variants]
    python bench/bench_onnx.py --structure-export export/NAME --shards shards/NAME [--split test] [--limit N]

`--variants` also times the other text graphs (information). `--structure-export`: int8 structure
accuracy of a trained export within 1 point of fp32 (docs/EXPORT.md).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from common import alternate

FP32_GOAL = 1.5
INT8_GOAL = 2.0
STRUCTURE_POINTS = 1.0


def reports_of_about(n_words: int, count: int) -> list[str]:
    """`count` cleaned reports of ~n_words words made of the real sentences of the parity set."""
    from pertvl.data.text import clean_text
    from pertvl.export.samples import REAL_REPORTS

    words = " ".join(clean_text(t) for t in REAL_REPORTS).split()
    rng = np.random.default_rng(0)
    out = []
    for _ in range(count):
        n = int(rng.integers(n_words - 8, n_words + 9))
        start = int(rng.integers(0, len(words)))
        out.append(" ".join(words[(start + i) % len(words)] for i in range(n)))
    return out


def bench_tower(label: str, torch_fn, others: dict, repeats: int, warmup: int) -> list[dict]:
    """Rows of the table for one tower: torch_fn, then each of `others` ({name: callable}) beside it."""
    fns = {"torch": torch_fn} | others
    steps = {k: (lambda i, f=f: f()) for k, f in fns.items()}
    _, times, _ = alternate(steps, warmup, repeats, untimed_first=True)
    base = min(times["torch"])
    rows = []
    for name, ts in times.items():
        rows.append({"tower": label, "runtime": name, "best_s": min(ts), "median_s": statistics.median(ts),
                     "speedup": base / min(ts), "speedup_median": statistics.median(times["torch"]) / statistics.median(ts)})
    return rows


def runs(sessions: dict, feeds: dict) -> dict:
    """{name: a call of session.run on feeds}, as bench_tower times them."""
    return {name: (lambda s=s: s.run(None, feeds)) for name, s in sessions.items()}


def structure_hook(args) -> int:
    """fp32 vs int8 structure accuracy of one export, per split and over all of them."""
    import itertools

    from pertvl.data.shards import iter_samples
    from pertvl.evaluate.structure import evaluate_structure
    from pertvl.infer import Embedder

    splits = [s for s in args.split.split(",") if s]
    embedders = {v: Embedder.from_export(args.structure_export, int8=v == "int8") for v in ("fp32", "int8")}
    correct = {"fp32": 0.0, "int8": 0.0}
    total = 0
    for split in splits:
        samples = iter_samples(args.shards, split)
        samples = list(itertools.islice(samples, args.limit) if args.limit else samples)
        acc = {v: evaluate_structure(e, samples, bootstrap=0).overall for v, e in embedders.items()}
        for v, r in acc.items():
            correct[v] += r.accuracy * r.n
        total += acc["fp32"].n
        print(f"{split}: structure accuracy fp32 {100 * acc['fp32'].accuracy:.2f}%, int8 {100 * acc['int8'].accuracy:.2f}% "
              f"over {acc['fp32'].n} images ({100 * (acc['int8'].accuracy - acc['fp32'].accuracy):+.2f} points)")
    diff = 100 * (correct["int8"] - correct["fp32"]) / max(total, 1)
    ok = abs(diff) <= STRUCTURE_POINTS
    print(f"int8 vs fp32 over {total} images ({'+'.join(splits)}): {diff:+.2f} points (goal within {STRUCTURE_POINTS}) "
          f"-> {'OK' if ok else 'MISSED'}")
    return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="3 repetitions, no extra variants")
    p.add_argument("--threads", type=int, help="threads for torch and onnxruntime (default: physical cores)")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--words", type=int, default=40, help="approximate words per report")
    p.add_argument("--repeats", type=int, help="timed repetitions (default 3 quick / 8)")
    p.add_argument("--variants", action="store_true", help="also time the other text graphs, and torch on the unpadded module")
    p.add_argument("--structure-export", help="int8 accuracy hook: an export made with --quantize int8")
    p.add_argument("--shards", help="packed shards for the structure hook")
    p.add_argument("--split", default="test", help="split(s) for the structure hook, comma-separated (test)")
    p.add_argument("--limit", type=int)
    args = p.parse_args(argv)
    if args.structure_export:
        if not args.shards:
            p.error("--structure-export needs --shards")
        return structure_hook(args)

    import onnxruntime as ort
    import torch

    from pertvl.export.runtime import physical_cores

    threads = args.threads or physical_cores()
    torch.set_num_threads(threads)
    repeats = args.repeats or (3 if args.quick else 8)
    warmup = 1 if args.quick else 2
    print(f"batch {args.batch}, {threads} threads (torch and onnxruntime), best of {repeats}; torch {torch.__version__}, "
          f"onnxruntime {ort.__version__}")
    with tempfile.TemporaryDirectory(prefix="bench_onnx_") as tmp:
        rows = run_benchmarks(Path(tmp), args, threads, repeats, warmup)
    return report(rows)


def run_benchmarks(tmp: Path, args, threads: int, repeats: int, warmup: int) -> list[dict]:
    """Export the towers into `tmp` and time them; returns the result rows."""
    import torch

    from pertvl.data.tokenize import encode_texts
    from pertvl.export.graphs import export_image_tower, export_text_tower, optimize_text_graph
    from pertvl.export.int8 import quantize_int8
    from pertvl.export.onnx import export_model
    from pertvl.export.runtime import open_session
    from pertvl.export.samples import phantom_like_images
    from pertvl.export.towers import ImageTower, TextTower
    from pertvl.model import create_model

    size, b = 224, args.batch

    def session(path):
        t0 = time.perf_counter()
        s = open_session(path, ["CPUExecutionProvider"], threads)
        return s, time.perf_counter() - t0

    images = phantom_like_images(b, size, seed=0)
    image_feeds = {"images": images}
    rows: list[dict] = []

    # small ResNet + MiniLM: the exporter as users run it (default text graph, int8 variants)
    torch.manual_seed(0)
    model = create_model({"image_arch": "resnet-tiny"}).eval()
    t0 = time.perf_counter()
    export_model(model, tmp / "small", image_size=size, quantize="int8", parity=False)
    print(f"exported small ResNet + MiniLM with int8 in {time.perf_counter() - t0:.1f} s")
    texts = reports_of_about(args.words, b)
    enc = encode_texts(model.tokenizer, texts, max_length=128)
    text_feeds = {k: getattr(enc, k) for k in ("input_ids", "attention_mask", "word_ids")}
    print(f"reports: {np.mean([len(t.split()) for t in texts]):.1f} words, {enc.input_ids.shape[1]} word pieces (padded)")
    sessions, loads = {}, {}
    for tower in ("image", "text"):
        for variant, name in (("fp32", f"{tower}_encoder.onnx"), ("int8", f"{tower}_encoder.int8.onnx")):
            sessions[(tower, variant)], loads[(tower, variant)] = session(tmp / "small" / name)
    print("session load times: " + ", ".join(f"{t}/{v} {s:.2f} s" for (t, v), s in loads.items()))

    img_t, txt_t = ImageTower(model).eval(), TextTower(model).eval()
    ids, mask, wids = (torch.from_numpy(text_feeds[k]) for k in ("input_ids", "attention_mask", "word_ids"))
    x = torch.from_numpy(images)
    with torch.inference_mode():
        ref_text = [o.numpy() for o in txt_t(ids, mask, wids)]
        got_text = sessions[("text", "fp32")].run(None, text_feeds)
        diff = max(float(np.abs(r.astype(np.float64) - g.astype(np.float64)).max())
                   for r, g in zip(ref_text[:2], got_text[:2], strict=True))
        print(f"text fp32 max abs diff vs torch on the bench batch: {diff:.2e}; "
              f"word masks equal: {bool((ref_text[2] == got_text[2]).all())}")
        images_runs = runs({v: sessions[("image", v)] for v in ("fp32", "int8")}, image_feeds)
        rows += bench_tower("image small ResNet 224px", lambda: img_t(x), images_runs, repeats, warmup)
        text_sessions = {v: sessions[("text", v)] for v in ("fp32", "int8")}
        if args.variants and not args.quick:
            for label, trace, fuse in (("fp32 sdpa trace", "sdpa", False), ("fp32 eager trace", "eager", False),
                                       ("fp32 eager trace + ORT fusion", "eager", True)):
                path = tmp / f"text_{trace}_{fuse}.onnx"
                export_text_tower(model, path, 128, 17, trace=trace)
                if fuse:
                    cfg = model.text.backbone.config
                    optimize_text_graph(path, cfg.num_attention_heads, cfg.hidden_size)
                text_sessions[label] = session(path)[0]
            # the int8 tower without the default residual pass on the FFN input layers
            export_model(model, tmp / "small-nores", image_size=size, quantize="int8", parity=False, int8_residual=())
            text_sessions["int8, no residual pass"] = session(tmp / "small-nores" / "text_encoder.int8.onnx")[0]
        rows += bench_tower(f"text MiniLM ~{args.words} words", lambda: txt_t(ids, mask, wids),
                            runs(text_sessions, text_feeds), repeats, warmup)
        if args.variants and not args.quick:  # what the same trick does for torch (not a goal)
            unpadded = TextTower(model, unpadded=True).eval()
            others = {"torch, unpadded module": lambda: unpadded(ids, mask, wids)}
            rows += bench_tower(f"text MiniLM ~{args.words} words", lambda: txt_t(ids, mask, wids), others,
                                repeats, warmup)
    sessions.clear()  # free the small model's sessions before ResNet-50

    # ResNet-50 image tower, random init
    torch.manual_seed(0)
    model = create_model({"image_arch": "resnet50"}).eval()
    with torch.inference_mode():
        grid = model.encode_image(x[:2]).grid
    path, path8 = tmp / "r50.onnx", tmp / "r50.int8.onnx"
    export_image_tower(model, path, size, 17, (grid[0] * grid[1], model.local_dim))
    quantize_int8(path, path8, "image")
    img_t = ImageTower(model).eval()
    with torch.inference_mode():
        r50_runs = runs({"fp32": session(path)[0], "int8": session(path8)[0]}, image_feeds)
        rows += bench_tower("image ResNet-50 224px", lambda: img_t(x), r50_runs, repeats, warmup)

    return rows


def report(rows: list[dict]) -> int:
    """Print the table; 1 when a goal is missed."""
    print()
    print(f"{'tower':28s} {'runtime':28s} {'best s':>8s} {'median s':>9s} {'x torch':>8s} {'(median)':>9s}  goal")
    missed = []
    for r in rows:
        goal = {"fp32": FP32_GOAL, "int8": INT8_GOAL}.get(r["runtime"])
        status = ""
        if goal is not None:
            ok = r["speedup"] >= goal
            status = f">= {goal}x {'OK' if ok else 'MISSED'}"
            if not ok:
                missed.append(f"{r['tower']} {r['runtime']}: {r['speedup']:.2f}x < {goal}x")
        print(f"{r['tower']:28s} {r['runtime']:28s} {r['best_s']:8.3f} {r['median_s']:9.3f} {r['speedup']:7.2f}x "
              f"{r['speedup_median']:8.2f}x  {status}")
    print("\nint8: the image towers quantize only their MatMuls (convolutions stay fp32, see pertvl.export.int8); "
          "int8 structure accuracy: run with --structure-export/--shards on a trained export.")
    if missed:
        print("MISSED: " + "; ".join(missed))
        return 1
    print("all speed goals met")
    return 0


if __name__ == "__main__":
    sys.exit(main())
