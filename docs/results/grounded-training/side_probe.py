"""Diagnostic of docs/GROUNDING.md: does a run keep the SIDE of a lateralized finding — in its image
embedding, in its region features, in its report embedding?

Images of the demo shards (train + val + test) with exactly one lateralized finding (left or right,
from the phantom's `extra.findings`); a standardized logistic-regression probe per feature set,
5-fold cross-validated accuracy. The majority class (right) is 57.9 %; the probes:

  image_global          the L2-normalized global image embedding (what the structure test scores)
  image_regions_mean    the region features averaged over the grid (no position left)
  image_regions_halves  the region features averaged over the image-left and image-right halves,
                        side by side (position kept at the coarsest grain)
  text_global           the report's global embedding
With --baselines (no run): the images' 16x16 average-pooled pixels, and the untrained demo tower
(seed 0) — what a probe reads without any training.

    PYTHONPATH=. python docs/results/grounded-training/side_probe.py RUN [--json OUT.json]
    PYTHONPATH=. python docs/results/grounded-training/side_probe.py --baselines
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import cross_val_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from pertvl.data.shards import iter_samples


def lateralized(shards: str) -> tuple[np.ndarray, list[str], np.ndarray]:
    images, texts, left = [], [], []
    for split in ("train", "val", "test"):
        for s in iter_samples(shards, split):
            sides = {f["side"] for f in s.meta.get("extra", {}).get("findings", []) if f.get("side") in ("left", "right")}
            if len(sides) == 1:
                images.append(s.image.astype(np.float32)[None] / 255.0)
                texts.append(s.meta["text"])
                left.append(sides.pop() == "left")
    return np.stack(images), texts, np.array(left)


def probe(features: np.ndarray, y: np.ndarray) -> float:
    clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=5000))
    return float(cross_val_score(clf, features, y, cv=5).mean())


def image_features(model, x: np.ndarray) -> dict[str, np.ndarray]:
    with torch.inference_mode():
        out = model.encode_image(torch.from_numpy(x))
    h, w = out.grid
    grid = out.regions.reshape(len(x), h, w, -1)
    return {"image_global": F.normalize(out.global_emb, dim=-1).numpy(),
            "image_regions_mean": grid.mean((1, 2)).numpy(),
            "image_regions_halves": torch.cat([grid[:, :, : w // 2].mean((1, 2)),
                                               grid[:, :, w // 2 :].mean((1, 2))], 1).numpy()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run", nargs="?", help="a run folder (RUN/final)")
    ap.add_argument("--shards", default="shards/demo")
    ap.add_argument("--baselines", action="store_true")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    x, texts, y = lateralized(args.shards)
    out: dict[str, float | int] = {"n": int(len(y)), "majority": float(max(y.mean(), 1 - y.mean()))}
    if args.baselines:
        from pertvl.model import create_model

        out["pixels_16x16"] = probe(F.avg_pool2d(torch.from_numpy(x), x.shape[-1] // 16).flatten(1).numpy(), y)
        torch.manual_seed(0)
        model = create_model({"image_arch": "resnet-tiny", "embed_dim": 128, "text_pooling": "mean"}).eval()
        out.update({f"untrained_{k}": probe(v, y) for k, v in image_features(model, x).items()})
    else:
        from pertvl.evaluate.torch_encoder import TorchEncoder

        enc = TorchEncoder.from_run(args.run, device="cpu", batch_size=64)
        out.update({k: probe(v, y) for k, v in image_features(enc.model, x).items()})
        out["text_global"] = probe(enc.embed_texts(texts), y)
    print(json.dumps(out))
    if args.json:
        args.json.write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
