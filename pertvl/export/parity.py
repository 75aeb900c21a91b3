"""The parity and speed checks of an export: torch against onnxruntime on the same inputs."""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from pertvl.data.text import clean_text
from pertvl.data.tokenize import encode_texts
from pertvl.export import IMAGE_INPUTS, IMAGE_OUTPUTS, TEXT_INPUTS, TEXT_OUTPUTS, ParityError
from pertvl.export.runtime import open_session
from pertvl.export.samples import REAL_REPORTS, phantom_like_images, random_vocab_texts
from pertvl.export.towers import ImageTower, TextTower

PARITY_TOLERANCE = 1e-4


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a.astype(np.float64), b.astype(np.float64)
    num = (a * b).sum(-1)
    return num / np.maximum(np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1), 1e-12)


def parity_bound(name: str, tolerance: float, scale: float) -> float:
    """The allowed max abs difference of one output: `tolerance` for the L2-normalized embeddings,
    `tolerance × max(1, scale)` for the unnormalized local features, whose rounding grows with them."""
    return tolerance if name in ("image_emb", "text_emb") else tolerance * max(1.0, scale)


def parity_inputs(model: nn.Module, image_size: int, max_length: int,
                  batch_sizes: Sequence[int] = (1, 3, 8), word_counts: Sequence[int] = (5, 60)):
    """The parity cases: (tower, description, inputs dict of numpy arrays): random and phantom-like
    images, random-vocabulary reports of each word count and the real report sentences, at each
    batch size."""
    cases = []
    rng = np.random.default_rng(0)
    for b in batch_sizes:
        cases.append(("image", f"random uniform, batch {b}",
                      {"images": rng.random((b, 1, image_size, image_size), dtype=np.float32)}))
    cases.append(("image", "phantom-like, batch 4", {"images": phantom_like_images(4, image_size, seed=1)}))
    for b in batch_sizes:
        for w in word_counts:
            texts = random_vocab_texts(model.tokenizer, b, w, seed=b * 100 + w)
            enc = encode_texts(model.tokenizer, texts, max_length=max_length)
            cases.append(("text", f"random words, batch {b}, {w} words", {k: getattr(enc, k) for k in TEXT_INPUTS}))
    real = [clean_text(t) for t in REAL_REPORTS]
    enc = encode_texts(model.tokenizer, real, max_length=max_length)
    cases.append(("text", f"real reports, batch {len(real)}", {k: getattr(enc, k) for k in TEXT_INPUTS}))
    return cases


def run_torch(model: nn.Module, tower: str, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    """The wrapped tower's outputs in torch (float32, CPU), as numpy."""
    module = ImageTower(model) if tower == "image" else TextTower(model)
    names = IMAGE_INPUTS if tower == "image" else TEXT_INPUTS
    with torch.inference_mode():
        outs = module.eval()(*(torch.from_numpy(feeds[k]) for k in names))
    return [o.detach().cpu().numpy() for o in outs]


def check_parity(model: nn.Module, files: dict[str, Path], cases, tolerance: float | None) -> dict[str, Any]:
    """Run every case through torch and onnxruntime and compare. `tolerance`: see `parity_bound`
    (None: report only, for int8). Returns the manifest's parity entry: per tower and output the
    max |torch - onnxruntime| (`max_abs`) and max |torch output| (`scale`), the worst cosine of the
    global embeddings (`min_cosine`), and the same per case. ParityError names the file, output
    and case beyond the bound, or shapes and word masks that disagree.
    """
    sessions = {t: open_session(p, ["CPUExecutionProvider"]) for t, p in files.items()}
    names = {"image": IMAGE_OUTPUTS, "text": TEXT_OUTPUTS}
    max_abs = {t: dict.fromkeys(names[t], 0.0) for t in files}
    scale = {t: dict.fromkeys(names[t], 0.0) for t in files}
    min_cos = dict.fromkeys(files, 1.0)
    rows = []
    for tower, what, feeds in cases:
        if tower not in sessions:
            continue
        ref = run_torch(model, tower, feeds)
        got = sessions[tower].run(list(names[tower]), feeds)
        diffs, scales = {}, {}
        for name, r, g in zip(names[tower], ref, got, strict=True):
            where = f"{files[tower].name}: output {name!r}"
            if r.shape != g.shape:
                raise ParityError(f"{where} has shape {g.shape}, torch gives {r.shape} ({what})")
            if r.dtype == np.bool_:
                bad = int((r != g.astype(bool)).sum())
                if bad:
                    raise ParityError(f"{where} differs from torch in {bad} entries ({what})")
                diffs[name] = scales[name] = 0.0
                continue
            r64 = r.astype(np.float64)
            diffs[name] = float(np.abs(r64 - g.astype(np.float64)).max()) if r.size else 0.0
            scales[name] = float(np.abs(r64).max()) if r.size else 0.0
            max_abs[tower][name] = max(max_abs[tower][name], diffs[name])
            scale[tower][name] = max(scale[tower][name], scales[name])
            if tolerance is not None and diffs[name] > parity_bound(name, tolerance, scales[name]):
                raise ParityError(
                    f"{where} differs from torch by {diffs[name]:.3g} > {parity_bound(name, tolerance, scales[name]):.3g} "
                    f"(tolerance {tolerance:g}, output magnitude {scales[name]:.3g}; {what})"
                )
        cos = float(_cosines(ref[0], got[0]).min())
        min_cos[tower] = min(min_cos[tower], cos)
        rows.append({"tower": tower, "file": files[tower].name, "input": what,
                     "shape": list(next(iter(feeds.values())).shape), "max_abs": diffs, "scale": scales,
                     "min_cosine": cos})
    return {"max_abs": max_abs, "scale": scale, "min_cosine": min_cos, "cases": rows}


def measure_speed(files: dict[str, dict[str, Path]], cases, repeats: int = 3) -> dict[str, Any]:
    """onnxruntime time of fp32 vs int8 per tower on the largest parity batch (best of `repeats`)."""
    out: dict[str, Any] = {}
    for tower in ("image", "text"):
        feeds = max((c for c in cases if c[0] == tower), key=lambda c: next(iter(c[2].values())).size)
        times = {}
        for variant, path in files[tower].items():
            session = open_session(path, ["CPUExecutionProvider"])
            session.run(None, feeds[2])
            best = float("inf")
            for _ in range(repeats):
                t0 = time.perf_counter()
                session.run(None, feeds[2])
                best = min(best, time.perf_counter() - t0)
            times[variant] = best
        out[tower] = {"input": feeds[1], "seconds": times,
                      "int8_speedup": times["fp32"] / times["int8"] if "int8" in times else None}
    return out
