"""Text-disjoint evaluation sets: which held-out reports occur word for word in training.

Many Open-I findings are boilerplate, so a test report's cleaned text is often a training report's
and its perturbations are then training negatives. `text_overlap` counts, per held-out split, the
pairs and distinct cleaned texts that occur in training (summary.json's `text_overlap`).
"""

from __future__ import annotations

from collections.abc import Iterable

from pertvl.data.records import SPLITS, Pair
from pertvl.data.text import clean_text

HELD_OUT = ("val", "test")


def text_overlap(pairs: Iterable[Pair], held_out: Iterable[str] = HELD_OUT) -> dict[str, dict[str, int]]:
    """Per held-out split: `pairs` (with a non-empty cleaned text), `pairs_in_train` (of those, whose
    cleaned text is also a training pair's), `texts` (distinct cleaned texts) and `texts_in_train` (of
    those, also training texts). ValueError for a pair with an unknown split or an unknown held-out
    split name."""
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
    return {s: {"pairs": len(by_split[s]), "pairs_in_train": sum(t in train for t in by_split[s]),
                "texts": len(set(by_split[s])), "texts_in_train": len(set(by_split[s]) & train)}
            for s in held}


def describe_overlap(overlap: dict[str, dict[str, int]]) -> str:
    """One line: per split of `text_overlap`, how many held-out pairs and texts have a training text."""
    return "; ".join(f"{s}: {o['pairs_in_train']} of {o['pairs']} pairs ({o['texts_in_train']} of {o['texts']} "
                     "distinct texts) have a cleaned text identical to a training report" for s, o in overlap.items())
