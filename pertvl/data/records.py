"""The Pair record and the pairs.jsonl / summary.json I/O shared by every data source.

Every source (Open-I XML / Kaggle CSV / R2Gen JSON, the phantom generator) produces the same
records, so everything downstream (perturb, pack, evaluate) reads one format.
"""

from __future__ import annotations

import json
import logging
import os
import random
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pertvl.files import atomic_write_text
from pertvl.files import write_json as write_json

SPLITS = ("train", "val", "test")


@dataclass
class SkipTally:
    """Skipped records counted by reason; the first `limit` of each reason named for summary.json.

    With a `logger`, every skip is also named in the log (the summary keeps only the first few).
    """

    limit: int = 20
    logger: logging.Logger | None = None
    skipped: Counter = field(default_factory=Counter)
    examples: dict[str, list[str]] = field(default_factory=dict)

    def skip(self, reason: str, record: str, detail: str = "") -> None:
        self.skipped[reason] += 1
        shown = self.examples.setdefault(reason, [])
        if len(shown) < self.limit:
            shown.append(f"{record}: {detail}" if detail else record)
        if self.logger is not None:
            self.logger.warning("skipped %s (%s)%s", record, reason, f": {detail}" if detail else "")


# The nine perturbation types of Table I, in the paper's order. These names are used
# everywhere: perturbations.jsonl, shard samples, batches (index k of the K axis), W&B, eval tables.
PERTURBATION_TYPES = ("shuffle_all", "swap_adjacent", "reverse", "shuffle_within_trigrams",
                      "shuffle_trigrams", "shuffle_nouns_adjectives", "shuffle_all_but_nouns_adjectives",
                      "shuffle_nouns_verbs_adjectives", "antonym_adjectives")
PROJECTIONS = ("Frontal", "Lateral", "unknown")

# Study-level split fractions (train, val, test). The test share matches the paper's
# 469 of 6,469 pairs (7.25 %).
DEFAULT_SPLIT_FRACTIONS = (0.8775, 0.05, 0.0725)


@dataclass
class Pair:
    """One image/report pair. `id` is unique per image; `study_id` groups the views of a report."""

    id: str
    study_id: str
    image: str  # path of the image file (relative to the pairs file's images root or absolute)
    projection: str  # Frontal | Lateral | unknown
    text: str  # the report section (normalized whitespace; see pertvl.data.text.normalize_report)
    split: str = "train"
    labels: dict[str, float] | None = None  # CheXpert-style 1.0/0.0 labels when known
    source: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        if not d["extra"]:
            d.pop("extra")
        if d["labels"] is None:
            d.pop("labels")
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Pair:
        missing = [k for k in ("id", "study_id", "image", "projection", "text") if k not in d]
        if missing:
            raise ValueError(f"pair record {d.get('id', '?')!r} lacks field(s) {sorted(missing)}")
        return cls(d["id"], d["study_id"], d["image"], d["projection"], d["text"], split=d.get("split", "train"),
                   labels=d.get("labels"), source=d.get("source", ""), extra=d.get("extra") or {})


@dataclass
class IngestResult:
    """What an ingester returns: the pairs (splits assigned) and the content of its summary.json."""

    pairs: list[Pair]
    summary: dict[str, Any]


def write_pairs(path: str | os.PathLike, pairs: Iterable[Pair]) -> int:
    lines = [json.dumps(p.to_json(), ensure_ascii=False) for p in pairs]
    atomic_write_text(path, "".join(line + "\n" for line in lines))
    return len(lines)


def read_jsonl(path: str | os.PathLike, parse: Callable[[Any], Any], what: str = "") -> Iterator[Any]:
    """`parse` of every non-blank line of a JSONL file; a bad line raises a ValueError naming the file
    and line (after `what`, e.g. "not a pair record: ")."""
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield parse(json.loads(line))
            except (ValueError, TypeError) as e:
                raise ValueError(f"{path}:{lineno}: {what}{e}") from e


def read_pairs(path: str | os.PathLike) -> Iterator[Pair]:
    """The pairs of a pairs.jsonl (a bad line raises naming the file and line)."""
    return read_jsonl(path, Pair.from_json, "not a pair record: ")


def assign_splits(pairs: list[Pair], fractions: tuple[float, float, float] = DEFAULT_SPLIT_FRACTIONS,
                  seed: int = 0, group: Callable[[Pair], str] | None = None) -> None:
    """Assign whole studies (or whole `group(pair)`s, e.g. subjects) to train/val/test in place,
    deterministically from `seed`.

    Groups are sorted, shuffled with `random.Random(seed)`, and filled into test, then val,
    until each holds its fraction of the *pairs*; the rest go to train. All views of a study
    land on the same side, and the result does not depend on the input order.
    """
    key = group or (lambda p: p.study_id)
    if len(fractions) != 3 or abs(sum(fractions) - 1.0) > 1e-6 or min(fractions) < 0:
        raise ValueError(f"split fractions must be three non-negative numbers summing to 1, got {fractions}")
    per_study = Counter(key(p) for p in pairs)
    studies = sorted(per_study)
    random.Random(seed).shuffle(studies)
    n = len(pairs)
    targets = {"test": round(fractions[2] * n), "val": round(fractions[1] * n)}
    filled = {"test": 0, "val": 0}
    split_of: dict[str, str] = {}
    for study in studies:
        name = next((s for s in ("test", "val") if filled[s] < targets[s]), "train")
        split_of[study] = name
        if name != "train":
            filled[name] += per_study[study]
    for p in pairs:
        p.split = split_of[key(p)]


def assign_paper_split(pairs: list[Pair], n_train: int = 6000) -> None:
    """The paper's row-order split: the first `n_train` pairs train, the rest test (leaks studies)."""
    for i, p in enumerate(pairs):
        p.split = "train" if i < n_train else "test"


def split_counts(pairs: Iterable[Pair]) -> dict[str, int]:
    c = Counter(p.split for p in pairs)
    return {s: c.get(s, 0) for s in SPLITS}


def summary_path_for(out: str | os.PathLike) -> Path:
    """DIR/NAME.jsonl -> DIR/NAME.summary.json."""
    out = Path(out)
    return out.with_name(out.name.removesuffix(".jsonl") + ".summary.json")
