"""Twin phantoms: image pairs that differ in one fact, each with its own report, the two reports
differing only in the words of that fact (a Winoground-style test set: Thrush et al., CVPR 2022).

For a test phantom and one of its findings, an edit (`EDITS`) makes a twin truth: the finding on the
other side, at the other end of its severity scale, the other finding in the same place
(`OTHER_FINDING`), absent, or a normal heart for cardiomegaly; truths the sampler could not draw are
skipped and counted. Both images are drawn from the phantom's own pixel generator with one findings
generator per finding type (`finding_rngs`, SeedSequence(seed, spawn_key=(i, 100 + type index))), so
every finding but the edited one is drawn identically. Side 0's report is the corpus report
re-composed from its generator (each sentence's facts known); side 1's keeps every sentence still
true and replaces the others by the grammar's sentence of the twin's fact that changes the fewest
words (`twin_report`). The word difference of every pair is recorded and counted.
"""

from __future__ import annotations

import difflib
import os
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from pertvl.data.counterfactual import fits_findings, parse_report
from pertvl.data.phantom.corpus import _streams
from pertvl.data.phantom.findings import (
    FINDING_TYPES,
    NEGATABLE,
    PARENCHYMAL,
    SEVERITIES,
    Finding,
    as_findings,
    chexpert_labels,
    consistent,
    mirrored,
    other_side,
)
from pertvl.data.phantom.language import (
    NEG_NOUNS,
    Fact,
    Sentence,
    compose_report,
    fact_holds,
    fact_sentences,
    is_lungs_clear,
    lungs_clear_sentences,
    otherwise_last,
)
from pertvl.data.phantom.render import encode_png, render_phantom
from pertvl.data.records import Pair, read_pairs, write_pairs
from pertvl.files import atomic_write_bytes, write_json

EDITS = ("laterality", "severity", "finding", "negation", "cardiomegaly")

# Finding identity: the other finding drawn in the same place.
OTHER_FINDING = {"nodule": "consolidation", "consolidation": "nodule",
                 "pleural_effusion": "pneumothorax", "pneumothorax": "pleural_effusion"}

_STREAM_BASE = 100  # spawn_key (i, 100 + type index): clear of the corpus' own (i, 0..3) children


@dataclass(frozen=True)
class Edit:
    """One twin: edit `kind` turns finding `before` into `after` (None: absent)."""

    kind: str
    before: Finding
    after: Finding | None


def _edited(f: Finding, kind: str) -> tuple[bool, Finding | None]:
    """(whether `kind` applies to `f`, the edited finding or None for absent)."""
    t = f.type
    if kind == "laterality":
        g = mirrored(f)
        return g is not None, g
    if kind == "severity":
        scale = SEVERITIES[t]
        return True, replace(f, severity=scale[0] if f.severity == scale[-1] else scale[-1])
    if kind == "finding":
        other = OTHER_FINDING.get(t)
        if other is None or f.side not in ("left", "right"):
            return False, None
        return True, Finding(other, SEVERITIES[other][SEVERITIES[t].index(f.severity)], f.side, f.location)
    if kind == "negation":
        return t in NEGATABLE, None
    return t == "cardiomegaly", None  # cardiomegaly


def twin_edits(findings: Sequence[Finding]) -> tuple[list[tuple[Edit, list[Finding]]], Counter[str]]:
    """Every edit of every finding that gives a valid twin truth, with that truth, in canonical finding
    order then EDITS order; and the skips as {"<kind>: <reason>": count}."""
    out: list[tuple[Edit, list[Finding]]] = []
    skipped: Counter[str] = Counter()
    for f in findings:
        for kind in EDITS:
            applies, after = _edited(f, kind)
            if not applies:
                continue
            rest = [g for g in findings if g is not f]
            try:
                twin = as_findings([*rest, after] if after is not None else rest)
            except ValueError:  # the other finding type is already there
                twin = None
            if twin is None or not consistent(twin):
                skipped[f"{kind}: twin truth the sampler cannot draw"] += 1
                continue
            out.append((Edit(kind, f, after), twin))
    return out, skipped


def finding_rngs(seed: int, index: int, findings: Sequence[Finding], edit: Edit | None = None
                 ) -> dict[str, np.random.Generator]:
    """One fresh findings generator per finding type of phantom `index`; a finding-identity twin's
    new finding takes the generator of the finding it replaces (so it lands in the same place)."""
    def gen(ftype: str) -> np.random.Generator:
        key = (index, _STREAM_BASE + FINDING_TYPES.index(ftype))
        return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=key))

    source = {f.type: f.type for f in findings}
    if edit is not None and edit.after is not None and edit.after.type != edit.before.type:
        source[edit.after.type] = edit.before.type
    return {t: gen(s) for t, s in source.items()}


def word_diff(a: str, b: str) -> tuple[list[str], list[str]]:
    """The words of `a` and of `b` outside their longest common word subsequence blocks."""
    wa, wb = a.split(), b.split()
    removed: list[str] = []
    added: list[str] = []
    for tag, i1, i2, j1, j2 in difflib.SequenceMatcher(None, wa, wb, autojunk=False).get_opcodes():
        if tag != "equal":
            removed += wa[i1:i2]
            added += wb[j1:j2]
    return removed, added


def _twin_facts(fact: Fact, edit: Edit) -> list[Fact]:
    """The facts a sentence asserting `fact` (false of the twin) may state in the twin's report instead."""
    f0, f1 = edit.before, edit.after
    if fact.present:
        if fact.type != f0.type:
            return []
        if f1 is not None:
            return [Fact.of(f1)]
        return [Fact(f0.type, False)]  # never "no left effusion": the grammar writes it only opposite one
    if fact.side is not None:  # "no right effusion" of a left one that moved right
        return [Fact(fact.type, False, other_side(fact.side))]
    if f1 is not None and fact.type == f1.type:  # "no consolidation" when the nodule became one
        return [Fact(f0.type, False)]
    return []


def twin_report(sentences: Sequence[Sentence], before: Sequence[Finding], after: Sequence[Finding], edit: Edit
                ) -> tuple[list[Sentence] | None, str | None]:
    """The twin's report: `sentences` with each sentence false of `after` replaced by the grammar's
    sentence of the twin's fact with the fewest changed words, then the generator's report-level rules
    applied (`_conform`). (sentences, None), or (None, reason) when that cannot be done or the result is
    also true of `before`.
    """
    out: list[Sentence] = []
    replaced = None  # where the edited finding's own sentence was
    for s in sentences:
        if all(fact_holds(fa, after) for fa in s.facts):
            out.append(s)
            continue
        if len(s.facts) != 1:
            swapped = _swap_negated(s, edit)
            if swapped is None:
                return None, "a false sentence asserts several facts"
            out.append(swapped)
            continue
        # one mediastinum mention per report: the heart sentence may name it only when no other does
        mediastinum = any("mediastin" in x.text.lower() for x in sentences if x is not s)
        cands = [c for fa in _twin_facts(s.facts[0], edit) for c in fact_sentences(fa)
                 if all(fact_holds(x, after) for x in c.facts) and not (mediastinum and "mediastin" in c.text.lower())]
        if not cands:
            return None, "no sentence of the grammar states the twin's fact"
        if s.facts[0].present and s.facts[0].type == edit.before.type:
            replaced = len(out)
        out.append(_nearest(s, cands))
    out = _conform(out, after, edit, replaced)
    if all(fact_holds(fa, before) for s in out for fa in s.facts):
        return None, "twin report also true of the original"
    return out, None


def _swap_negated(s: Sentence, edit: Edit) -> Sentence | None:
    """A negation list naming the twin's new finding type ("No pneumothorax or focal consolidation."
    when a nodule became a consolidation) with the replaced type's noun in its place, the verb agreeing."""
    a, b = edit.before.type, edit.after.type if edit.after is not None else None
    if b is None or a not in NEG_NOUNS or is_lungs_clear(s) or any(fa.present or fa.side for fa in s.facts):
        return None
    low = s.text.lower()
    found = [(k, n) for k, n in enumerate(NEG_NOUNS[b]) if re.search(rf"\b{re.escape(n)}\b", low)]
    if not found:
        return None
    k, noun = max(found, key=lambda kn: len(kn[1]))
    new = NEG_NOUNS[a][min(k, len(NEG_NOUNS[a]) - 1)]
    text = re.sub(rf"\b{re.escape(noun)}\b", new, low, count=1)
    first_plural = re.match(r"^(?:no evidence of |negative for |there (?:is|are) no |no )?(\w+(?: \w+)*?)(?:,| or |\.| is | are )",
                            text)
    plural = bool(first_plural) and any(text[first_plural.start(1):].startswith(n) for n in NEG_NOUNS["nodule"])
    verb = "are" if plural else "is"
    text = re.sub(r"^there (?:is|are) no ", f"there {verb} no ", text)
    text = re.sub(r" (?:is|are) not seen\.$", f" {verb} not seen.", text)
    facts = tuple(Fact(a, False) if fa.type == b else fa for fa in s.facts)
    return Sentence(text[0].upper() + text[1:], facts, frozenset(a if t == b else t for t in s.topics))


def _nearest(s: Sentence, candidates: Sequence[Sentence]) -> Sentence:
    """The candidate with the fewest words changed from `s` (the first of equals)."""
    return min(candidates, key=lambda c: sum(map(len, word_diff(s.text, c.text))))


def _conform(out: list[Sentence], after: Sequence[Finding], edit: Edit, replaced: int | None) -> list[Sentence]:
    """The generator's report-level rules for the twin's findings: side negations only opposite a
    one-sided effusion/pneumothorax, "otherwise clear" exactly when a non-edema finding is present, and a
    lungs-clear sentence whenever the lungs are normal (the edited finding's sentence becomes it)."""
    present = {f.type for f in after}
    one_sided = {(f.type, f.side) for f in after if f.type in ("pleural_effusion", "pneumothorax")}
    res: list[Sentence] = []
    for i, s in enumerate(out):
        fa = s.facts[0] if len(s.facts) == 1 else None
        if fa is not None and not fa.present and fa.side in ("left", "right") and (
                (fa.type, other_side(fa.side)) not in one_sided):
            replaced = replaced - 1 if replaced is not None and replaced > i else replaced
            continue
        if is_lungs_clear(s):
            head, sep, tail = s.text.rstrip(".").partition(" without ")
            frame = _nearest(replace(s, text=head + "."), lungs_clear_sentences(present))
            s = replace(s, text=frame.text.rstrip(".") + sep + tail + ".") if sep else frame
        res.append(s)
    if not present & set(PARENCHYMAL) and replaced is not None and not any(is_lungs_clear(s) for s in res):
        without = edit.before.type if edit.before.type in NEGATABLE else None
        res[replaced] = _nearest(res[replaced], lungs_clear_sentences(present, without))
    return otherwise_last(res, lambda s: is_lungs_clear(s) and "otherwise" in s.text.lower(),
                          lambda s: any(fa.present and fa.type != "cardiomegaly" for fa in s.facts))


def _truth(findings: Sequence[Finding]) -> list[dict[str, Any]]:
    return [f.to_json() for f in findings]


def _phantom_twins(pair: Any, images_dir: Path, skipped: Counter) -> list[Pair]:
    """The twin pairs (two Pair records each) of one corpus phantom; images written to `images_dir`."""
    ref = pair.extra.get("render") or {}
    seed, index, size = int(ref["seed"]), int(ref["index"]), int(ref["size"])
    before = as_findings(pair.extra.get("findings") or [])
    sentences = compose_report(before, _streams(seed, index)[2])
    if " ".join(s.text for s in sentences) != pair.text:
        skipped["report not reproduced from the seed"] += 1
        return []
    edits, skips = twin_edits(before)
    skipped.update(skips)
    out: list[Pair] = []
    base_png = None
    for edit, after in edits:
        report, reason = twin_report(sentences, before, after, edit)
        rule = None if report is None else fits_findings(parse_report(" ".join(s.text for s in report)), after)
        if report is None or rule is not None:
            skipped[f"{edit.kind}: {reason or 'breaks a report rule: ' + rule}"] += 1
            continue
        if base_png is None:
            base_png = f"images/{pair.id}-twin-0.png"
            img0 = render_phantom(before, size, _streams(seed, index)[1], finding_rngs(seed, index, before))
            atomic_write_bytes(images_dir.parent / base_png, encode_png(img0))
        tid = f"{pair.id}-twin-{edit.kind}-{edit.before.type}"
        img1 = render_phantom(after, size, _streams(seed, index)[1], finding_rngs(seed, index, after, edit))
        atomic_write_bytes(images_dir / f"{tid}-1.png", encode_png(img1))
        texts = [pair.text, " ".join(s.text for s in report)]
        removed, added = word_diff(*texts)
        twin = {"pair": tid, "edit": edit.kind, "finding": edit.before.type, "phantom": pair.id,
                "truth": [_truth(before), _truth(after)], "texts": texts,
                "diff": {"removed": removed, "added": added}}
        for side, (fs, image) in enumerate(((before, base_png), (after, f"images/{tid}-1.png"))):
            out.append(Pair(id=f"{tid}-{side}", study_id=pair.id, image=image, projection="Frontal",
                            text=texts[side], split="test", labels=chexpert_labels(fs), source="phantom-twin",
                            extra={"findings": _truth(fs), "twin": {**twin, "side": side}}))
    return out


def generate_twins(corpus: str | os.PathLike, out: str | os.PathLike, split: str = "test") -> dict[str, Any]:
    """The twin set of a phantom corpus' `split`: OUT/images/*.png, OUT/pairs.jsonl (two records per
    twin pair, extra["twin"] holding the pair id, edit, both truths and texts, the word diff and the
    side) and OUT/summary.json. ValueError naming the file when it holds no phantom records."""
    corpus, out = Path(corpus), Path(out)
    pairs_path = corpus / "pairs.jsonl"
    source = [p for p in read_pairs(pairs_path) if p.split == split]
    bad = [p.id for p in source if "render" not in (p.extra or {}) or "findings" not in (p.extra or {})]
    if not source or bad:
        raise ValueError(f"{pairs_path}: no phantom records in split {split!r}" if not source else
                         f"{pairs_path}: {bad[0]!r} is not a phantom record (extra.findings/extra.render missing)")
    images = out / "images"
    images.mkdir(parents=True, exist_ok=True)
    skipped: Counter = Counter()
    twins: list[Pair] = []
    for p in source:
        twins += _phantom_twins(p, images, skipped)
    write_pairs(out / "pairs.jsonl", twins)
    summary = twin_summary(twins, len(source), dict(skipped), str(corpus), split)
    write_json(out / "summary.json", summary)
    return summary


def twin_summary(twins: Sequence[Pair], phantoms: int, skipped: dict[str, int], corpus: str, split: str
                 ) -> dict[str, Any]:
    """Counts of a twin set: pairs per edit and per (edit, finding type), changed words per pair."""
    sides0 = [p.extra["twin"] for p in twins if p.extra["twin"]["side"] == 0]
    per_edit = {e: [t for t in sides0 if t["edit"] == e] for e in EDITS}
    return {
        "source": "phantom-twins",
        "corpus": corpus,
        "split": split,
        "phantoms": phantoms,
        "phantoms_with_twins": len({t["phantom"] for t in sides0}),
        "pairs": len(sides0),
        "records": len(twins),
        "pairs_per_edit": {e: len(ts) for e, ts in per_edit.items()},
        "pairs_per_edit_and_finding": {e: dict(Counter(t["finding"] for t in ts)) for e, ts in per_edit.items()},
        "changed_words": {e: _diff_counts(ts) for e, ts in per_edit.items()},
        "skipped": dict(sorted(skipped.items())),
    }


def _diff_counts(twins: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Words removed + added per pair (histogram), and how many pairs share all other words."""
    n = [len(t["diff"]["removed"]) + len(t["diff"]["added"]) for t in twins]
    return {"histogram": {str(k): c for k, c in sorted(Counter(n).items())},
            "max": max(n, default=0), "mean": round(sum(n) / len(n), 2) if n else None}
