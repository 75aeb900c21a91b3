"""Text-disjoint evaluation sets: which held-out reports occur word for word in training.

Many Open-I findings are boilerplate, so a test report's cleaned text is often a training report's
and its perturbations are then training negatives. `text_overlap` counts, per held-out split, the
pairs and distinct cleaned texts that occur in training, and returns those texts so that an
evaluation can report the text-disjoint subset beside the full one.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

from pertvl.data.records import SPLITS, Pair
from pertvl.data.text import clean_text

HELD_OUT = ("val", "test")


@dataclass(frozen=True)
class SplitOverlap:
    """How much of one held-out split's text occurs in training."""

    pairs: int  # pairs of the split with a non-empty cleaned text
    pairs_in_train: int  # ... whose cleaned text is also a training pair's
    texts: int  # distinct cleaned texts of the split
    texts_in_train: int  # ... that are also training texts

    def to_json(self) -> dict[str, int]:
        return asdict(self)


@dataclass(frozen=True)
class TextOverlap:
    """`text_overlap`'s answer: counts per held-out split and the overlapping cleaned texts."""

    splits: dict[str, SplitOverlap]
    in_train: frozenset[str] = field(default_factory=frozenset)  # held-out cleaned texts seen in training

    def to_json(self) -> dict[str, Any]:
        """The counts (summary.json); the texts themselves are left out."""
        return {s: o.to_json() for s, o in self.splits.items()}

    def describe(self) -> str:
        """One line: per split, how many held-out pairs and texts have a training text."""
        return "; ".join(f"{s}: {o.pairs_in_train} of {o.pairs} pairs ({o.texts_in_train} of {o.texts} distinct "
                         "texts) have a cleaned text identical to a training report" for s, o in self.splits.items())


def text_overlap(pairs: Iterable[Pair], held_out: Iterable[str] = HELD_OUT) -> TextOverlap:
    """Per held-out split, the pairs and distinct cleaned texts (empty ones never counted) that also
    occur in the training split, and the set of those texts. ValueError for a pair with an unknown split
    or an unknown held-out split name."""
    held = tuple(held_out)
    for s in held:
        if s not in SPLITS or s == "train":
            raise ValueError(f"held-out split must be one of {SPLITS[1:]}, got {s!r}")
    by_split: dict[str, list[str]] = {s: [] for s in SPLITS}
    for p in pairs:
        if p.split not in by_split:
            raise ValueError(f"pair {p.id!r} has split {p.split!r}, expected one of {SPLITS}")
        text = clean_text(p.text)
        if text:
            by_split[p.split].append(text)
    train = set(by_split["train"])
    splits = {}
    seen: set[str] = set()
    for s in held:
        texts = by_split[s]
        common = set(texts) & train
        seen |= common
        splits[s] = SplitOverlap(pairs=len(texts), pairs_in_train=sum(t in train for t in texts),
                                 texts=len(set(texts)), texts_in_train=len(common))
    return TextOverlap(splits, frozenset(seen))
