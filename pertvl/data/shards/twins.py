"""`pertvl data twins`: the twin phantoms of a corpus' test split (pertvl.data.phantom.twins), written
as a folder and packed as their own evaluation shards. Twin reports carry no perturbations: every
type is "not_requested" in their perturbations.jsonl."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from pertvl.data.perturb import NOT_REQUESTED, PerturbationRecord
from pertvl.data.phantom.twins import generate_twins
from pertvl.data.records import PERTURBATION_TYPES, read_pairs
from pertvl.data.shards.packing import pack
from pertvl.data.text import clean_text
from pertvl.files import atomic_write_text


def write_no_perturbations(pairs_path: Path, out: Path) -> int:
    """perturbations.jsonl with every type not requested, one record per distinct cleaned text."""
    texts = sorted({clean_text(p.text) for p in read_pairs(pairs_path)})
    lines = [json.dumps(PerturbationRecord(t, {}, dict.fromkeys(PERTURBATION_TYPES, NOT_REQUESTED), 0).to_json(),
                        ensure_ascii=False) for t in texts]
    atomic_write_text(out, "".join(line + "\n" for line in lines))
    return len(lines)


def make_twin_shards(corpus: str, out: str, shards: str | None, image_size: int | None = None) -> dict[str, Any]:
    """Generate the twin set of `corpus` into `out`, and pack it into `shards` when given."""
    summary = generate_twins(corpus, out)
    if shards:
        folder = Path(out)
        write_no_perturbations(folder / "pairs.jsonl", folder / "perturbations.jsonl")
        size = image_size or _corpus_size(folder / "pairs.jsonl")
        result = pack(folder / "pairs.jsonl", folder / "perturbations.jsonl", shards, image_size=size,
                      maxcount=256, workers=1, command=["pertvl", "data", "twins", "--corpus", corpus, "--out", out,
                                                        "--shards", shards])
        summary["shards"] = {"folder": str(result.folder), "samples": result.samples_written,
                             "skipped": len(result.skipped)}
    return summary


def _corpus_size(pairs_path: Path) -> int:
    """The twins' own image size (they are drawn at the size of their corpus)."""
    from PIL import Image

    first = next(iter(read_pairs(pairs_path)), None)
    if first is None:
        return 224
    with Image.open(pairs_path.parent / first.image) as im:
        return im.size[0]


def cli_main(args: argparse.Namespace) -> int:
    """`pertvl data twins`: print the pairs per edit type and where the set is."""
    try:
        s = make_twin_shards(args.corpus, args.out, args.shards, args.image_size)
    except (ValueError, KeyError) as e:
        print(f"pertvl: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"pertvl: error: cannot read the corpus {args.corpus} or write {args.out}: {e}", file=sys.stderr)
        return 1
    print(f"twin phantoms of {s['phantoms']} {s['split']} phantoms ({s['phantoms_with_twins']} with a twin): "
          f"{s['pairs']} pairs: " + ", ".join(f"{e} {n}" for e, n in s["pairs_per_edit"].items()) + f" -> {args.out}")
    print("  changed words per pair (mean): "
          + ", ".join(f"{e} {c['mean']}" for e, c in s["changed_words"].items()))
    if s["skipped"]:
        print("  skipped: " + "; ".join(f"{k} {v}" for k, v in s["skipped"].items()))
    if "shards" in s:
        print(f"  shards: {s['shards']['folder']} ({s['shards']['samples']} samples, split test)")
    return 0
