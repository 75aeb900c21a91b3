"""What the benchmarks share: the offline environment, the repository root, the Open-I reports,
phantom shards, the demo's training stream and a timer."""

from __future__ import annotations

import csv
import itertools
import os
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
OPENI_DIR = Path(os.environ.get("PERTVL_OPENI_DIR", REPO.parent / "shared" / "data" / "openi"))
OPENI = OPENI_DIR / "indiana_reports.csv"


def load_findings(path: Path) -> list[str]:
    """The non-empty findings sections of Open-I's indiana_reports.csv."""
    with open(path, newline="", encoding="utf-8") as f:
        return [r["findings"] for r in csv.DictReader(f) if r["findings"] and r["findings"].strip()]


def build_shards(out: Path, n: int, size: int, maxcount: int, workers: int) -> Path:
    """Phantoms → perturbations → shards in `out` (the corpus itself is deleted afterwards)."""
    from pertvl.data.perturb import perturb_pairs_file
    from pertvl.data.phantom import generate_phantoms
    from pertvl.data.shards import pack

    corpus = out.parent / f".{out.name}.corpus"
    generate_phantoms(n, seed=0, size=size, out=corpus, workers=workers)
    perturb_pairs_file(corpus / "pairs.jsonl", corpus / "perturbations.jsonl", seed=0)
    pack(corpus / "pairs.jsonl", corpus / "perturbations.jsonl", out, image_size=size, maxcount=maxcount,
         workers=workers)
    shutil.rmtree(corpus, ignore_errors=True)
    return out


def demo_stream(cfg, shards: Path, tokenizer, batch_size: int, num_workers: int):
    """Rank 0's training stream of a world of 2 (as the demo) under the config's data section."""
    from pertvl.data.stream import build_train_stream

    d = cfg["data"]
    return build_train_stream(
        shards, d["split"], tokenizer=tokenizer, batch_size=batch_size, world_size=2, rank=0,
        num_workers=num_workers, seed=0, augment=bool(d["augment"]), max_length=int(d["max_length"]),
        image_size=d["image_size"], shuffle_buffer=int(d["shuffle_buffer"]),
    )  # fmt: skip


def epochs(stream):
    """The stream's batches epoch after epoch (set_epoch 0, 1, …), without end."""
    for epoch in itertools.count():
        stream.set_epoch(epoch)
        yield from stream


class Timed:
    """Wall and CPU seconds (this process and its finished children) of a block, and the load average."""

    def __enter__(self) -> Timed:
        self.t0, self.c0 = time.perf_counter(), os.times()
        return self

    def __exit__(self, *exc: object) -> None:
        c1 = os.times()
        self.wall = time.perf_counter() - self.t0
        self.cpu = sum(getattr(c1, k) - getattr(self.c0, k)
                       for k in ("user", "system", "children_user", "children_system"))  # fmt: skip
        self.load = os.getloadavg()[0]


def alternate(steps: dict[str, Callable[[int], object]], warmup: int, rounds: int,
              untimed_first: bool = False) -> tuple[dict, dict, dict]:
    """Each step's warm-up calls, then rounds calling every step in turn (machine noise hits all alike).
    step(i) gets the call's index: 0..warmup-1 in the warm-up, then one per round; untimed_first: an
    untimed call before each timed one. Returns ({name: warm-up s}, {name: [wall s]}, {name: [CPU s]})."""
    warm: dict[str, float] = {}
    for name, step in steps.items():
        t0 = time.perf_counter()
        for i in range(warmup):
            step(i)
        warm[name] = time.perf_counter() - t0
    wall: dict[str, list[float]] = {name: [] for name in steps}
    cpu: dict[str, list[float]] = {name: [] for name in steps}
    for i in range(warmup, warmup + rounds):
        for name, step in steps.items():
            if untimed_first:
                step(i)
            t0, c0 = time.perf_counter(), time.process_time()
            step(i)
            wall[name].append(time.perf_counter() - t0)
            cpu[name].append(time.process_time() - c0)
    return warm, wall, cpu
