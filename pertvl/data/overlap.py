"""Text-disjoint evaluation sets: which held-out reports occur word for word in training.

On Open-I, many findings sections are boilerplate ("The lungs are clear. No pneumothorax or
pleural effusion. Heart size normal."), so a test report's cleaned text is often identical to a
training report's, and its perturbations are then exactly training negatives. `text_overlap`
counts, per held-out split, the pairs and distinct texts whose cleaned text (THE cleaning rule,
pertvl.data.text.clean_text) occurs in the training split, and returns the overlapping texts so
that an evaluation can report the text-disjoint subset beside the full one.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
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
        return {"pairs": self.pairs, "pairs_in_train": self.pairs_in_train,
                "texts": self.texts, "texts_in_train": self.texts_in_train}


@dataclass(frozen=True)
class TextOverlap:
    """`text_overlap`'s answer: counts per held-out split and the overlapping cleaned texts."""

    splits: dict[str, SplitOverlap]
    in_train: frozenset[str] = field(default_factory=frozenset)  # held-out cleaned texts seen in training

    def is_disjoint(self, text: str) -> bool:
        """Whether a (raw or cleaned) report text belongs to the text-disjoint subset."""
        return clean_text(text) not in self.in_train

    def to_json(self) -> dict[str, Any]:
        """The counts (summary.json); the texts themselves are left out."""
        return {s: o.to_json() for s, o in self.splits.items()}

    def describe(self) -> str:
        """One line, e.g. 'test: 131 of 469 pairs (44 of 222 distinct texts) have a training text'."""
        return "; ".join(f"{s}: {o.pairs_in_train} of {o.pairs} pairs ({o.texts_in_train} of {o.texts} distinct "
                         "texts) have a cleaned text identical to a training report" for s, o in self.splits.items())


def text_overlap(pairs: Iterable[Pair], held_out: Iterable[str] = HELD_OUT) -> TextOverlap:
    """Count the held-out pairs and distinct texts whose cleaned text occurs in the training split.

    Args:
        pairs: pairs with splits assigned (a Pair's `split` is one of train/val/test).
        held_out: the splits to compare with train (default val and test).

    Returns:
        TextOverlap: per split the counts, and the set of held-out cleaned texts that are also
        training texts (empty cleaned texts are never counted).

    Raises:
        ValueError: a pair with an unknown split, or an unknown held-out split name.
    """
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
