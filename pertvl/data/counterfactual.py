"""Counterfactual reports: fluent minimal edits of a phantom report that describe another image.

They are written with the report generator's own templates and words (pertvl.data.phantom.language),
so fluency cannot tell them from real reports, and checked to be false of the phantom. They are not
free of text cues, so the structure test reports them beside a text prior; the test without text cues
is the twin phantoms' (pertvl.data.phantom.twins). Four types (`COUNTERFACTUAL_TYPES`): a finding moved
to the other side, its severity moved to the far end of its scale, a present finding replaced by an
absent one of another type, and a finding negated or a negated one asserted.

1. The report is parsed back into sentences and the `Fact`s each asserts (`parse_report`); the parse
   must agree with the record's ``extra["findings"]``, else the record is refused with its id.
2. An edit changes one finding into a finding set the corpus could hold. Edited sentences are word
   substitutions where a template allows them, else a sentence drawn as the generator writes it
   (not the nearest template: shorter counterfactuals would be a text cue); dependent sentences
   (side negations, "otherwise clear", negation lists) follow.
3. The edit is parsed again from its words and kept only when it fits the counterfactual findings
   (`fits_findings`) and contradicts the phantom's own (`holds`).

Which finding and edit is drawn from sha256(seed|type|cleaned text); a type with no passing candidate
is unavailable with a `Reason`. Real text has no ground truth: `text_counterfactual_record` applies
laterality and negation rules to the words alone. Output: counterfactuals.jsonl (one
`CounterfactualRecord` per distinct cleaned text) + counterfactuals.summary.json (docs/PERTURBATIONS.md).
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from enum import StrEnum
from functools import cache, lru_cache
from itertools import islice
from pathlib import Path
from types import MappingProxyType
from typing import Any

import numpy as np

from pertvl.data.phantom.findings import (
    FINDING_TYPES,
    LOCATIONS,
    NEGATABLE,
    PARENCHYMAL,
    SEVERITIES,
    SIDES,
    TYPE_KEYWORDS,
    Finding,
    as_findings,
    consistent,
    mirrored,
    other_side,
    severity_words,
)
from pertvl.data.phantom.language import (
    BONES,
    HEART_NORMAL,
    LUNG_VOLUMES,
    LUNGS_OTHERWISE,
    LUNGS_PLAIN,
    MAX_WORDS,
    MEDIASTINUM,
    MIN_WORDS,
    NEG_NOUNS,
    OTHERWISE_TYPES,
    Fact,
    compose_report,
    fact_holds,
    otherwise_last,
)
from pertvl.data.records import read_jsonl, read_pairs, summary_path_for
from pertvl.data.text import clean_text
from pertvl.files import atomic_write_text, write_json


@dataclass(frozen=True)
class CounterfactualRule:
    """One counterfactual type: its stable name, a short label for tables, and its rule."""

    name: str
    label: str
    rule: str


COUNTERFACTUAL_TYPES: Mapping[str, CounterfactualRule] = MappingProxyType({
    r.name: r for r in (
        CounterfactualRule("cf_laterality", "laterality swap",
                           "a finding on one side moved to the other side (left <-> right)"),
        CounterfactualRule("cf_severity", "severity swap",
                           "a finding's severity moved to the far end of its scale (small <-> large, mild <-> severe)"),
        CounterfactualRule("cf_finding", "finding swap",
                           "a present finding replaced by an absent finding of another type"),
        CounterfactualRule("cf_negation", "negation flip",
                           "a present finding negated, or a negated finding asserted"),
    )
})
# Real text has no ground truth to swap severity or finding type against.
TEXT_COUNTERFACTUAL_TYPES = ("cf_laterality", "cf_negation")


class Reason(StrEnum):
    """Why a counterfactual type is unavailable for a report (a closed vocabulary)."""

    NO_LATERALIZED_FINDING = "no_lateralized_finding"  # no finding on one side only
    NO_GRADED_FINDING = "no_graded_finding"  # no finding, hence no severity to move
    NO_PRESENT_FINDING = "no_present_finding"  # no lung or pleural finding to replace
    NO_VALID_EDIT = "no_valid_edit"  # every candidate edit failed the checks (impossible phantom, template rules)
    NO_MIRROR_LOCATION = "no_mirror_location"  # text: a right middle lobe / lingula has no other-side twin
    NO_NEGATABLE_SENTENCE = "no_negatable_sentence"  # text: no sentence a negation rule applies to
    EMPTY_TEXT = "empty_text"


UNAVAILABLE_REASONS = tuple(r.value for r in Reason)


class Kind(StrEnum):
    """What a report sentence is, by the template that wrote it."""

    PRESENT = "present"  # states one finding with its side, severity, location
    NEGATION = "negation"  # "No pneumothorax or pleural effusion."
    SIDE_NEGATION = "side_negation"  # "No right pleural effusion." beside a left one
    HEART_NORMAL = "heart_normal"  # "Heart size is normal." (cardiomegaly absent)
    LUNGS_CLEAR = "lungs_clear"  # "The lungs are (otherwise) clear( without X or Y)."
    LUNG_VOLUMES = "lung_volumes"  # "Normal lung volumes." (never with atelectasis)
    MEDIASTINUM = "mediastinum"
    BONES = "bones"


_NEG_NOUN_TYPE = {n: t for t, nouns in NEG_NOUNS.items() for n in nouns}
_NEG_FRAMES = ("no evidence of ", "there is no ", "there are no ", "negative for ", "no ")  # longest first
_NEG_SUFFIXES = (" is not seen", " are not seen")
_SIDE_NEGATION = re.compile(r"^(?:(?:there is )?no (?P<s1>left|right) (?P<t1>pleural effusion|pneumothorax)"
                            r"|the (?P<s2>left|right) costophrenic angle is sharp"
                            r"|no pneumothorax on the (?P<s3>left|right))$")
# Template phrases written for some severities only: a severity edit must keep within them.
_SEVERITY_BOUND = {("pleural_effusion", "costophrenic"): ("small",),
                   ("pleural_effusion", "meniscus"): ("moderate", "large"),
                   ("pneumothorax", "apical"): ("small",), ("edema", "perihilar"): ("severe",),
                   ("atelectasis", "hemidiaphragm"): ("moderate",)}
_LOBE = re.compile(r"\b(left|right) (?:(upper|middle|lower) (?:lobe|lung zone|lung)|lung (base))\b")
_WORD = re.compile(r"[a-z]+(?:-[a-z]+)*")


@dataclass(frozen=True)
class ReportSentence:
    """One parsed report sentence. `nouns`: the negated noun phrases of a NEGATION sentence or of
    a LUNGS_CLEAR sentence's "without" clause; `frame`: the rest (to rebuild it when a noun goes)."""

    text: str
    kind: Kind
    facts: tuple[Fact, ...] = ()
    nouns: tuple[str, ...] = ()
    frame: str = ""


def _body(sentence: str) -> str:
    return sentence.strip().rstrip(".").lower()


def _split_nouns(joined: str) -> tuple[str, ...] | None:
    nouns = tuple(n.strip() for n in re.split(r",? or |, ", joined))
    return nouns if all(n in _NEG_NOUN_TYPE for n in nouns) else None


def _present_fact(body: str) -> Fact | None:
    """The fact of a PRESENT sentence, or None when the words do not state one finding."""
    words = set(_WORD.findall(body))
    types = [t for t in FINDING_TYPES if words & set(TYPE_KEYWORDS[t])]
    if len(types) != 1:
        return None
    t = types[0]
    sev_of = {w: s for s in SEVERITIES[t] for w in severity_words(t, s)}  # adverbs included
    sevs = {sev_of[w] for w in words if w in sev_of}
    if len(sevs) != 1:
        return None
    sev = sevs.pop()
    for (bt, word), allowed in _SEVERITY_BOUND.items():
        if bt == t and word in words and sev not in allowed:
            return None  # a template that is never written with this severity
    loc: str | None = None
    if t == "cardiomegaly":
        side = None
    elif t == "edema":
        side = "bilateral"
    elif t in ("consolidation", "nodule"):
        lobes = {f"{m[0]} {m[1] or 'lower'} lobe" for m in _LOBE.findall(body)}
        if len(lobes) != 1:
            return None
        loc = lobes.pop()
        side = loc.split()[0]
    else:
        sides = {s for s in ("left", "right") if s in words}
        if words & {"bilateral", "bilaterally", "both"}:
            sides.add("bilateral")
        if len(sides) != 1:
            return None
        side = sides.pop()
        if t == "atelectasis":
            loc = f"{side} lower lobe"
    try:
        return Fact.of(Finding(t, sev, side, loc))
    except ValueError:
        return None


def _parse_sentence(text: str, present: frozenset[str]) -> ReportSentence | None:
    """Parse one sentence; `present` = the finding types the report states (for 'the lungs are clear')."""
    body = _body(text)
    if body in HEART_NORMAL:
        return ReportSentence(text, Kind.HEART_NORMAL, (Fact("cardiomegaly", False),))
    if body in LUNG_VOLUMES:
        return ReportSentence(text, Kind.LUNG_VOLUMES)
    if body in MEDIASTINUM:
        return ReportSentence(text, Kind.MEDIASTINUM)
    if body in BONES:
        return ReportSentence(text, Kind.BONES)
    m = _SIDE_NEGATION.match(body)
    if m:
        side = m["s1"] or m["s2"] or m["s3"]
        t = "pneumothorax" if (m["t1"] == "pneumothorax" or m["s3"]) else "pleural_effusion"
        return ReportSentence(text, Kind.SIDE_NEGATION, (Fact(t, False, side),))
    base, _, rest = body.partition(" without ")
    if base in LUNGS_PLAIN or base in LUNGS_OTHERWISE:
        nouns = _split_nouns(rest) if rest else ()
        if nouns is None:
            return None
        facts = [Fact(t, False) for t in PARENCHYMAL if t not in present]
        facts += [Fact(_NEG_NOUN_TYPE[n], False) for n in nouns]
        return ReportSentence(text, Kind.LUNGS_CLEAR, tuple(facts), nouns, base)
    for suffix in _NEG_SUFFIXES:
        if body.endswith(suffix):
            nouns = _split_nouns(body[: -len(suffix)])
            if nouns is not None and len(nouns) == 1:
                return ReportSentence(text, Kind.NEGATION, (Fact(_NEG_NOUN_TYPE[nouns[0]], False),), nouns,
                                      "{} " + suffix.split()[-2] + " not seen")
    for frame in _NEG_FRAMES:
        if body.startswith(frame):
            nouns = _split_nouns(body[len(frame):])
            if nouns is not None:
                return ReportSentence(text, Kind.NEGATION, tuple(Fact(_NEG_NOUN_TYPE[n], False) for n in nouns),
                                      nouns, frame + "{}")
            break
    fact = _present_fact(body)
    if fact is None:
        return None
    return ReportSentence(text, Kind.PRESENT, (fact,))


def parse_report(text: str) -> list[ReportSentence]:
    """The sentences of a phantom report and the facts each asserts (those `compose_report` attaches),
    read from the words alone; "the lungs are clear" asserts the absence of every parenchymal finding the
    report does not state. ValueError for a sentence the templates do not write."""
    bodies = [s for s in re.split(r"(?<=\.)\s+", text.strip()) if s]
    present = frozenset(f.type for s in bodies if (f := _present_fact(_body(s))) is not None)
    out = []
    for s in bodies:
        parsed = _parse_sentence(s, present)
        if parsed is None:
            raise ValueError(f"not a sentence of the phantom report templates: {s!r}")
        out.append(parsed)
    return out


def _join(nouns: Sequence[str]) -> str:
    if len(nouns) <= 2:
        return " or ".join(nouns)
    return ", ".join(nouns[:-1]) + ", or " + nouns[-1]


def _capitalize(body: str) -> str:
    return body[0].upper() + body[1:] + "."


def _without_noun(s: ReportSentence, t: str) -> ReportSentence | None:
    """`s` with the negated nouns of type `t` removed (None: nothing left to say)."""
    nouns = tuple(n for n in s.nouns if _NEG_NOUN_TYPE[n] != t)
    if s.kind is Kind.LUNGS_CLEAR:
        body = s.frame + (" without " + _join(nouns) if nouns else "")
    elif not nouns:
        return None
    else:
        frame = s.frame
        if frame.startswith("there "):  # the verb agrees with the first noun
            frame = "there are no {}" if nouns[0].endswith("nodules") else "there is no {}"
        body = frame.format(_join(nouns))
    text = _capitalize(body)
    return replace(s, text=text, nouns=nouns)


_BANK_SEED = 13  # any fixed value: the banks must not depend on the caller's seed
_BANK_DRAWS = 48


@cache
def _present_bank(f: Finding) -> tuple[str, ...]:
    """The sentences the generator writes for finding `f`: _BANK_DRAWS draws, sorted, repeats kept."""
    texts = [s.text for k in range(_BANK_DRAWS) for s in compose_report([f], np.random.default_rng([_BANK_SEED, k]))
             if s.facts == (Fact.of(f),)]
    return tuple(sorted(texts))


@lru_cache(maxsize=1)
def _absence_bank() -> dict[tuple[str, str], tuple[str, ...]]:
    """Sentences stating an absence, by (kind, type), repeats kept as the generator drew them."""
    bank: dict[tuple[str, str], list[str]] = {}
    ptx = Finding("pneumothorax", "small", "left")
    for k in range(8 * _BANK_DRAWS):
        for fs in ([], [ptx]):
            for s in compose_report(fs, np.random.default_rng([_BANK_SEED, 1, k])):
                p = _parse_sentence(s.text, frozenset())
                types = ":".join(_NEG_NOUN_TYPE[n] for n in p.nouns)
                if p.kind is Kind.HEART_NORMAL:
                    bank.setdefault((p.kind, "cardiomegaly"), []).append(s.text)
                elif p.kind is Kind.LUNGS_CLEAR and len(p.nouns) <= 1:
                    otherwise = "otherwise" if p.frame in LUNGS_OTHERWISE else ""
                    bank.setdefault((p.kind, f"{otherwise}:{types}"), []).append(s.text)
                elif p.kind is Kind.NEGATION and len(p.nouns) == 1:
                    bank.setdefault((p.kind, types), []).append(s.text)
    return {k: tuple(sorted(v)) for k, v in bank.items()}


def _edit_distance(a: Sequence[str], b: Sequence[str]) -> int:
    prev = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        cur = [i]
        for j, y in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (x != y)))
        prev = cur
    return prev[-1]


def _drawn(bank: Sequence[str], rng: random.Random, limit: int = 4) -> list[str]:
    """Up to `limit` distinct sentences drawn from a bank with its repeats (as the generator writes them)."""
    out: list[str] = []
    for _ in range(4 * limit):
        if not bank or len(out) == limit:
            break
        t = bank[rng.randrange(len(bank))]
        if t not in out:
            out.append(t)
    return out


def _nearest(texts: Iterable[str], to: str, limit: int = 4) -> list[str]:
    """The `limit` texts nearest to `to` in word edit distance (ties: more shared words, then text)."""
    ref = _WORD.findall(to.lower())

    def key(t: str) -> tuple[int, int, str]:
        ws = _WORD.findall(t.lower())
        return _edit_distance(ws, ref), -len(set(ws) & set(ref)), t
    return sorted(texts, key=key)[:limit]


def _consistent(fs: Sequence[Finding]) -> bool:
    """Whether the corpus could hold these findings: one per type, and `consistent`."""
    return len({f.type for f in fs}) == len(fs) and consistent(fs)


def holds(fact: Fact, findings: Sequence[Finding]) -> bool:
    """`fact_holds`, with the severity and location of a present bilateral fact checked too (fact_holds
    answers those by side alone, so a severity edit of edema would never count as false)."""
    if fact.present and fact.side == "bilateral":
        return fact_holds(fact, findings) and fact_holds(replace(fact, side=None), findings)
    return fact_holds(fact, findings)


def fits_findings(sentences: Sequence[ReportSentence], findings: Sequence[Finding]) -> str | None:
    """None when `sentences` form a report the generator could write for `findings`, else the first
    rule broken: every fact holds, plus `compose_report`'s report-level rules (one heart sentence, "the
    lungs are clear" exactly when the lungs are normal, "otherwise" placement, side negations, negations,
    MIN_WORDS-MAX_WORDS words).
    """
    fs = as_findings(findings)
    present = {f.type for f in fs}
    for s in sentences:
        for fa in s.facts:
            if not holds(fa, fs):
                return f"false for the findings: {s.text!r}"
    stated = sorted((s.facts[0] for s in sentences if s.kind is Kind.PRESENT), key=repr)
    if stated != sorted((Fact.of(f) for f in fs), key=repr):
        return "the findings are not stated one sentence each"
    kinds = Counter(s.kind for s in sentences)
    heart = [s for s in sentences if s.kind is Kind.HEART_NORMAL
             or (s.kind is Kind.PRESENT and s.facts[0].type == "cardiomegaly")]
    if len(heart) != 1:
        return "not exactly one heart sentence"
    if kinds[Kind.MEDIASTINUM] > ("mediastinal" not in heart[0].text) or kinds[Kind.BONES] > 1:
        return "repeated mediastinum or bones sentence"
    lungs = [s for s in sentences if s.kind is Kind.LUNGS_CLEAR]
    lungs_normal = not present & set(PARENCHYMAL)
    if len(lungs) > 1 or (lungs_normal and not lungs) or ("edema" in present and lungs):
        return "lungs-clear sentence missing, repeated or beside edema"
    if lungs:
        if (lungs[0].frame in LUNGS_OTHERWISE) != bool(present & OTHERWISE_TYPES):
            return "'otherwise' disagrees with the findings"
        if lungs[0].nouns and not lungs_normal:
            return "'without' clause beside a parenchymal finding"
        if lungs[0].frame in LUNGS_OTHERWISE:
            at = sentences.index(lungs[0])
            if any(s.kind is Kind.PRESENT and s.facts[0].type != "cardiomegaly" for s in sentences[at + 1:]):
                return "'otherwise clear' before a finding"
    if kinds[Kind.LUNG_VOLUMES] > ("atelectasis" not in present):
        return "lung volumes beside atelectasis"
    unilateral = {(f.type, f.side) for f in fs if f.type in ("pleural_effusion", "pneumothorax")
                  and f.side in ("left", "right")}
    side_neg = [s.facts[0] for s in sentences if s.kind is Kind.SIDE_NEGATION]
    if len({fa.type for fa in side_neg}) != len(side_neg) or any(
            (fa.type, other_side(fa.side)) not in unilateral for fa in side_neg):
        return "side negation without a finding on the other side"
    negated = [_NEG_NOUN_TYPE[n] for s in sentences for n in s.nouns]
    if len(set(negated)) != len(negated):
        return "a type negated twice"
    if set(NEGATABLE) - present and not negated:
        return "no explicit negation"
    n_words = sum(len(s.text.split()) for s in sentences)
    if not MIN_WORDS <= n_words <= MAX_WORDS:
        return f"{n_words} words (the generator writes {MIN_WORDS}-{MAX_WORDS})"
    return None


def _contradicted(sentences: Sequence[ReportSentence], findings: Sequence[Finding]) -> tuple[Fact, ...]:
    """The facts of the report that do not hold for these (the real) findings (`holds`)."""
    return tuple(fa for s in sentences for fa in s.facts if not holds(fa, findings))


@dataclass(frozen=True)
class Counterfactual:
    """One counterfactual report: type, report as written and cleaned, its findings, and the facts
    false of the phantom (never empty)."""

    type: str
    report: str
    text: str
    findings: tuple[Finding, ...]
    contradicted: tuple[Fact, ...]


_Candidate = tuple[list[str], list[Finding]]  # sentence texts as written, counterfactual findings


def _swap_words(text: str, mapping: Mapping[str, str]) -> str:
    """Replace whole words by `mapping` (lower-case keys), keeping a capital first letter."""
    def sub(m: re.Match[str]) -> str:
        w = m.group(0)
        new = mapping[w.lower()]
        return new[0].upper() + new[1:] if w[0].isupper() else new
    pattern = r"\b(" + "|".join(re.escape(k) for k in sorted(mapping, key=len, reverse=True)) + r")\b"
    return re.sub(pattern, sub, text, flags=re.IGNORECASE)


def _replace_finding(fs: Sequence[Finding], old: Finding | None, new: Finding | None) -> list[Finding]:
    out = [f for f in fs if f != old] + ([new] if new is not None else [])
    return sorted(out, key=lambda f: FINDING_TYPES.index(f.type))


# The "lungs are clear" wording with and without 'otherwise', closest first.
_OTHERWISE_TWIN = {"the lungs are clear": "the lungs are otherwise clear",
                   "lungs are clear bilaterally": "lungs are otherwise clear",
                   "both lungs are clear": "lungs are otherwise clear",
                   "the lungs are clear bilaterally": "the lungs are otherwise clear",
                   "the lungs are otherwise clear": "the lungs are clear",
                   "otherwise the lungs are clear": "the lungs are clear",
                   "lungs are otherwise clear": "lungs are clear bilaterally"}


def _repair(texts: list[str], cf: Sequence[Finding]) -> list[str] | None:
    """Make the sentences around an edit follow the counterfactual findings (side negations, negated
    present types, "otherwise" and the "without" clause); None when the result does not parse."""
    present = {f.type for f in cf}
    unilateral = {(f.type, f.side) for f in cf if f.side in ("left", "right")}
    try:
        sents = parse_report(" ".join(texts))
    except ValueError:
        return None
    out: list[ReportSentence] = []
    for s in sents:
        if s.kind is Kind.SIDE_NEGATION:
            fa = s.facts[0]
            if (fa.type, other_side(fa.side)) not in unilateral:
                continue
        if s.kind in (Kind.NEGATION, Kind.LUNGS_CLEAR):
            kept: ReportSentence | None = s
            for t in sorted({_NEG_NOUN_TYPE[n] for n in s.nouns} & present):
                kept = _without_noun(kept, t) if kept is not None else None
            if kept is None:
                continue
            s = kept
        if s.kind is Kind.LUNGS_CLEAR:
            if "edema" in present:
                continue
            nouns = () if present & set(PARENCHYMAL) else s.nouns
            frame = s.frame
            if (frame in LUNGS_OTHERWISE) != bool(present & OTHERWISE_TYPES):
                frame = _OTHERWISE_TWIN[frame]
            body = frame + (" without " + _join(nouns) if nouns else "")
            s = replace(s, text=_capitalize(body), frame=frame, nouns=nouns)
        if s.kind is Kind.LUNG_VOLUMES and "atelectasis" in present:
            continue
        out.append(s)
    out = otherwise_last(out, lambda s: s.kind is Kind.LUNGS_CLEAR and s.frame in LUNGS_OTHERWISE,
                         lambda s: s.kind is Kind.PRESENT and s.facts[0].type != "cardiomegaly")
    return [s.text for s in out]


def _with_replaced(texts: list[str], i: int, new: str | None, cf: list[Finding]) -> _Candidate | None:
    edited = texts[:i] + ([new] if new is not None else []) + texts[i + 1:]
    repaired = _repair(edited, cf)
    return None if repaired is None else (repaired, cf)


def _present_index(sents: Sequence[ReportSentence], t: str) -> int:
    return next(i for i, s in enumerate(sents) if s.kind is Kind.PRESENT and s.facts[0].type == t)


def _laterality(sents: list[ReportSentence], fs: list[Finding], rng: random.Random) -> Iterable[_Candidate]:
    texts = [s.text for s in sents]
    for f in rng.sample(fs, len(fs)):
        g = mirrored(f)
        if g is None:
            continue
        cf = _replace_finding(fs, f, g)
        if not _consistent(cf):
            continue
        # The finding's sentence and its side negation ("No right pleural effusion.") swap sides.
        new = [_swap_words(s.text, {"left": "right", "right": "left"})
               if s.facts and s.facts[0].type == f.type and s.kind in (Kind.PRESENT, Kind.SIDE_NEGATION)
               else s.text for s in sents]
        yield new, cf
        i = _present_index(sents, f.type)
        for alt in _nearest(_present_bank(g), texts[i]):
            if alt != new[i]:
                yield from filter(None, [_with_replaced(new, i, alt, cf)])


def _far_severities(f: Finding, rng: random.Random) -> list[str]:
    scale = SEVERITIES[f.type]
    k = scale.index(f.severity)
    dist = {s: abs(j - k) for j, s in enumerate(scale) if s != f.severity}
    top = max(dist.values())
    far = [s for s in dist if dist[s] == top]
    return rng.sample(far, len(far)) + [s for s in dist if dist[s] != top]


def _severity_words_map(t: str, old: str, new: str) -> dict[str, str]:
    """Word-for-word severity substitution (focal -> dense, mildly -> severely, small -> large)."""
    a, b = severity_words(t, old), severity_words(t, new)
    return {x: b[min(j, len(b) - 1)] for j, x in enumerate(a)}


def _severity(sents: list[ReportSentence], fs: list[Finding], rng: random.Random) -> Iterable[_Candidate]:
    texts = [s.text for s in sents]
    for f in rng.sample(fs, len(fs)):
        i = _present_index(sents, f.type)
        for sev in _far_severities(f, rng):
            g = replace(f, severity=sev)
            cf = _replace_finding(fs, f, g)
            direct = _swap_words(texts[i], _severity_words_map(f.type, f.severity, sev))
            yield texts[:i] + [direct] + texts[i + 1:], cf
            for alt in _nearest(_present_bank(g), texts[i]):
                yield texts[:i] + [alt] + texts[i + 1:], cf


def _new_finding(t: str, like: Finding | None, taken: Sequence[Finding], rng: random.Random) -> list[Finding]:
    """Findings of type `t`, most like `like` first (its side; its severity's rank on the scale)."""
    scale = SEVERITIES[t]
    if like is not None:
        old = SEVERITIES[like.type]
        rank = old.index(like.severity) / max(1, len(old) - 1)
        sevs = [scale[round(rank * (len(scale) - 1))]]
    else:
        sevs = rng.sample(scale, len(scale))
    sides = list(SIDES[t])
    rng.shuffle(sides)
    if like is not None and like.side in sides:
        sides.remove(like.side)
        sides.insert(0, like.side)
    out = []
    for side in sides:
        locs: list[str | None] = [None]
        if t in LOCATIONS:
            locs = [lb for lb in LOCATIONS[t] if lb.startswith(side or "?")]
            rng.shuffle(locs)
            if like is not None and like.location in locs:
                locs.remove(like.location)
                locs.insert(0, like.location)
        for sev in sevs:
            for loc in locs:
                g = Finding(t, sev, side, loc)
                if _consistent([*taken, g]):
                    out.append(g)
    return out


def _finding(sents: list[ReportSentence], fs: list[Finding], rng: random.Random) -> Iterable[_Candidate]:
    texts = [s.text for s in sents]
    # Cardiomegaly lives in the heart sentence every report has: swap lung and pleural findings only.
    olds = [f for f in fs if f.type != "cardiomegaly"]
    absent = [t for t in FINDING_TYPES if t != "cardiomegaly" and t not in {f.type for f in fs}]
    pairs = [(f, t) for f in olds for t in absent]
    negated = {_NEG_NOUN_TYPE[n] for s in sents for n in s.nouns}
    # A type the report does not negate first: then only the finding's sentence changes.
    for f, t in sorted(rng.sample(pairs, len(pairs)), key=lambda p: p[1] in negated):
        i = _present_index(sents, f.type)
        rest = [h for h in fs if h != f]
        for g in _new_finding(t, f, rest, rng)[:2]:
            cf = _replace_finding(fs, f, g)
            for alt in _drawn(_present_bank(g), rng):
                yield from filter(None, [_with_replaced(texts, i, alt, cf)])


def _negation(sents: list[ReportSentence], fs: list[Finding], rng: random.Random) -> Iterable[_Candidate]:
    texts = [s.text for s in sents]
    bank = _absence_bank()
    negated = {_NEG_NOUN_TYPE[n]: i for i, s in enumerate(sents) for n in s.nouns}
    heart_normal = next((i for i, s in enumerate(sents) if s.kind is Kind.HEART_NORMAL), None)
    moves: list[tuple[str, Any]] = [("negate", f) for f in fs] + [("assert", t) for t in sorted(negated)]
    if heart_normal is not None:
        moves.append(("assert", "cardiomegaly"))
    for move, what in rng.sample(moves, len(moves)):
        if move == "negate":
            f = what
            i = _present_index(sents, f.type)
            cf = _replace_finding(fs, f, None)
            if f.type == "cardiomegaly":
                pool = bank[(Kind.HEART_NORMAL, "cardiomegaly")]
            elif (f.type in PARENCHYMAL and not {h.type for h in cf} & set(PARENCHYMAL)
                  and not any(s.kind is Kind.LUNGS_CLEAR for s in sents)):
                # The lungs are now normal, and a report of normal lungs says "the lungs are clear".
                otherwise = "otherwise" if {h.type for h in cf} & OTHERWISE_TYPES else ""
                pool = bank.get((Kind.LUNGS_CLEAR, f"{otherwise}:"), ()) + bank.get(
                    (Kind.LUNGS_CLEAR, f"{otherwise}:{f.type}"), ())
            else:
                pool = bank.get((Kind.NEGATION, f.type), ())
            for alt in _drawn(pool, rng, limit=6):
                yield from filter(None, [_with_replaced(texts, i, alt, cf)])
        else:
            t = what
            i = heart_normal if t == "cardiomegaly" else negated[t]
            for g in _new_finding(t, None, fs, rng)[:2]:
                cf = _replace_finding(fs, None, g)
                for alt in _drawn(_present_bank(g), rng):
                    s = sents[i]
                    if (s.kind is Kind.NEGATION and len(s.nouns) == 1) or s.kind is Kind.HEART_NORMAL:
                        yield from filter(None, [_with_replaced(texts, i, alt, cf)])
                    else:  # the negation names other types too: they stay, the assertion goes first
                        edited = texts[:i] + [alt] + texts[i:]
                        repaired = _repair(edited, cf)
                        if repaired is not None:
                            yield repaired, cf


_EDITS = {"cf_laterality": _laterality, "cf_severity": _severity, "cf_finding": _finding, "cf_negation": _negation}
_MAX_TRIES = 64  # candidates checked per type before giving up (the first passes almost always)


def _rng(seed: int, cftype: str, text: str) -> random.Random:
    digest = hashlib.sha256(f"{seed}|{cftype}|{text}".encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


def _no_candidate_reason(cftype: str, fs: Sequence[Finding]) -> Reason:
    if cftype == "cf_laterality" and not any(f.side in ("left", "right") for f in fs):
        return Reason.NO_LATERALIZED_FINDING
    if cftype == "cf_severity" and not fs:
        return Reason.NO_GRADED_FINDING
    if cftype == "cf_finding" and not any(f.type != "cardiomegaly" for f in fs):
        return Reason.NO_PRESENT_FINDING
    return Reason.NO_VALID_EDIT


def phantom_counterfactuals(report: str, findings: Iterable[Finding | dict[str, Any]], seed: int = 0,
                            types: Iterable[str] | None = None) -> dict[str, Counterfactual | Reason]:
    """{type: Counterfactual or the Reason it is unavailable} of one phantom report and its true
    findings (``extra["findings"]``); `types` default to all four. ValueError when the report is not one the
    templates write or disagrees with the findings."""
    fs = as_findings(findings)
    sents = parse_report(report)
    wrong = _contradicted(sents, fs)
    if wrong:
        raise ValueError(f"the report states {wrong[0]} which its findings {fs} contradict")
    stated = {s.facts[0] for s in sents if s.kind is Kind.PRESENT}
    if stated != {Fact.of(f) for f in fs}:
        raise ValueError(f"the report does not state its findings {fs} one sentence each")
    cleaned = clean_text(report)
    out: dict[str, Counterfactual | Reason] = {}
    for cftype in (types or COUNTERFACTUAL_TYPES):
        if cftype not in COUNTERFACTUAL_TYPES:
            raise ValueError(f"unknown counterfactual type {cftype!r}; expected one of {tuple(COUNTERFACTUAL_TYPES)}")
        out[cftype] = _no_candidate_reason(cftype, fs)
        for texts, cf in islice(_EDITS[cftype](sents, fs, _rng(seed, cftype, cleaned)), _MAX_TRIES):
            new = " ".join(texts)
            try:
                parsed = parse_report(new)  # the words alone decide what the edit asserts
            except ValueError:
                continue
            contradicted = _contradicted(parsed, fs)
            if contradicted and fits_findings(parsed, cf) is None and clean_text(new) != cleaned:
                out[cftype] = Counterfactual(cftype, new, clean_text(new), tuple(cf), contradicted)
                break
    return out


# Reviewed rules. A sentence is negated when it holds one of these cues (NegEx-style triggers).
_TEXT_NEGATION = re.compile(r"\b(no|not|without|negative for|free of|none)\b", re.IGNORECASE)
_SIDE_SWAP = {"left": "right", "right": "left", "left-sided": "right-sided", "right-sided": "left-sided"}
_SIDE = re.compile(r"\b(left|right)(-sided)?\b", re.IGNORECASE)
_NO_MIRROR = re.compile(r"\b(middle lobe|lingula|lingular)\b", re.IGNORECASE)
# Words of normal statements: "No heart size normal." is no sentence, and "The left lung is
# clear." mirrored is not false.
_NORMAL_WORDS = re.compile(r"\b(normal|clear|unremarkable|intact|limits|midline|sharp|expanded)\b",
                           re.IGNORECASE)
# A sentence with a verb or a leading article is a clause: "No " cannot go in front of it.
_CLAUSE = re.compile(r"^(the|a|an|this|these|there)\b|\b(is|are|was|were|has|have|had|appears?|remains?|shows?|"
                     r"demonstrates?|measures?|projects?|overlies|overlie|seen|noted|identified)\b", re.IGNORECASE)
# Negated -> asserted, first rule that matches (applied once, to the first cue).
_ASSERT_RULES = (
    (re.compile(r"\b(there (?:is|are)) no ", re.IGNORECASE), r"\1 "),
    (re.compile(r"^no evidence of ", re.IGNORECASE), "there is evidence of "),
    (re.compile(r"\b(is|are) not (seen|identified|present|visualized|noted|demonstrated|enlarged)\b", re.IGNORECASE),
     r"\1 \2"),
    (re.compile(r"\bnegative for\b", re.IGNORECASE), "positive for"),
    (re.compile(r"\bno ", re.IGNORECASE), ""),
    (re.compile(r"\bwithout\b", re.IGNORECASE), "with"),
)
# Asserted -> negated.
_NEGATE_RULES = (
    (re.compile(r"^(there (?:is|are)) (?:an? )?", re.IGNORECASE), r"\1 no "),
    # not before "unchanged"/"stable": "is not unchanged" denies the change, not the finding
    (re.compile(r"\b(is|are)\b(?! not\b)(?! (?:unchanged|stable|again|similar)\b)", re.IGNORECASE), r"\1 not"),
)


def _sentences_with_space(text: str) -> list[str]:
    return re.split(r"(?<=[.!?])(\s+)", text)


def _restore_case(new: str, old: str) -> str:
    if not new:
        return new
    return new[0].upper() + new[1:] if old[:1].isupper() else new[0].lower() + new[1:]


def _negate_sentence(s: str) -> str | None:
    body = s.rstrip(".").rstrip()
    for pattern, repl in _NEGATE_RULES:
        new, n = pattern.subn(repl, body, count=1)
        if n:
            return _restore_case(new, body) + s[len(body):]
    if _NORMAL_WORDS.search(body) or _CLAUSE.search(body):
        return None  # "No heart size normal.", "No the heart and lungs have ...": no sentence
    return "No " + body[0].lower() + body[1:] + s[len(body):]


def _assert_sentence(s: str) -> str | None:
    body = s.rstrip(".").rstrip()
    for pattern, repl in _ASSERT_RULES:
        new, n = pattern.subn(repl, body, count=1)
        if n and new.strip():
            return _restore_case(new, body) + s[len(body):]
    return None


def _text_laterality(text: str) -> str | Reason:
    parts = _sentences_with_space(text)
    lateral = [s for s in parts[::2] if s and not _TEXT_NEGATION.search(s)
               and len({m.group(1).lower() for m in _SIDE.finditer(s)}) == 1 and not _NORMAL_WORDS.search(s)]
    if not lateral:
        return Reason.NO_LATERALIZED_FINDING
    if _NO_MIRROR.search(text):
        return Reason.NO_MIRROR_LOCATION
    return _swap_words(text, _SIDE_SWAP)


def _text_negation(text: str) -> str | Reason:
    parts = _sentences_with_space(text)
    sentences = [(i, s) for i, s in enumerate(parts) if i % 2 == 0 and re.search("[A-Za-z]", s)]
    # 1. an asserted finding sentence (not a normal statement) is negated;
    # 2. else the first negated sentence is asserted; 3. else an asserted normal statement is negated.
    order = ([(i, s, _negate_sentence) for i, s in sentences
              if not _TEXT_NEGATION.search(s) and not _NORMAL_WORDS.search(s)]
             + [(i, s, _assert_sentence) for i, s in sentences if _TEXT_NEGATION.search(s)]
             + [(i, s, _negate_sentence) for i, s in sentences
                if not _TEXT_NEGATION.search(s) and _NORMAL_WORDS.search(s)])
    for i, s, flip in order:
        new = flip(s)
        if new is not None and new != s:
            return "".join(parts[:i] + [new] + parts[i + 1:])
    return Reason.NO_NEGATABLE_SENTENCE


def _text_results(text: str) -> dict[str, str | Reason]:
    text = re.sub(r"\s+", " ", text or "").strip()
    if not text:
        return {t: Reason.EMPTY_TEXT for t in TEXT_COUNTERFACTUAL_TYPES}
    return {"cf_laterality": _text_laterality(text), "cf_negation": _text_negation(text)}


@dataclass
class CounterfactualRecord:
    """One line of counterfactuals.jsonl; each type is in exactly one of the two maps."""

    text: str
    counterfactuals: dict[str, str]
    unavailable: dict[str, str]
    seed: int

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> CounterfactualRecord:
        try:
            rec = cls(text=d["text"], counterfactuals=dict(d["counterfactuals"]),
                      unavailable=dict(d["unavailable"]), seed=int(d["seed"]))
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"not a counterfactual record (needs text, counterfactuals, unavailable, seed): {e}") from e
        bad = [r for r in rec.unavailable.values() if r not in UNAVAILABLE_REASONS]
        if bad or set(rec.counterfactuals) & set(rec.unavailable):
            raise ValueError(f"counterfactual record {rec.text[:40]!r}: bad reasons {bad} or a type in both maps")
        return rec


def counterfactual_record(report: str, findings: Iterable[Finding | dict[str, Any]], seed: int = 0,
                          types: Iterable[str] | None = None) -> CounterfactualRecord:
    """`phantom_counterfactuals` as a record (cleaned texts)."""
    made = phantom_counterfactuals(report, findings, seed, types)
    return CounterfactualRecord(
        text=clean_text(report),
        counterfactuals={t: c.text for t, c in made.items() if isinstance(c, Counterfactual)},
        unavailable={t: c.value for t, c in made.items() if isinstance(c, Reason)}, seed=seed)


def text_counterfactual_record(text: str, seed: int = 0) -> CounterfactualRecord:
    """`cf_laterality` and `cf_negation` of a real report from its words alone, as a record (cleaned
    texts, the reason of each missing type; `seed` is stored only).

    cf_laterality: when an asserted sentence without normal-statement words names exactly one side, every
    "left"/"right" ("-sided") of the report is swapped; not made for the right middle lobe or lingula.
    cf_negation: the first of an asserted finding sentence (negated), a negated sentence (asserted at its
    first cue), an asserted normal statement (negated) is flipped (rules: `_NEGATE_RULES`, `_ASSERT_RULES`).
    """
    results = _text_results(text)
    cleaned = clean_text(text)
    made = {t: clean_text(r) for t, r in results.items() if not isinstance(r, Reason)}
    unavailable = {t: r.value for t, r in results.items() if isinstance(r, Reason)}
    for t in [t for t, c in made.items() if c == cleaned]:  # a flip the cleaning undid
        del made[t]
        unavailable[t] = Reason.NO_NEGATABLE_SENTENCE.value if t == "cf_negation" else Reason.NO_LATERALIZED_FINDING.value
    return CounterfactualRecord(cleaned, made, unavailable, seed)


@dataclass
class CounterfactualSummary:
    """counterfactuals.summary.json: what was read, written, and why types are missing."""

    pairs_file: str
    out: str
    pairs: int
    distinct_texts: int
    counterfactuals: dict[str, int]  # type -> records with that counterfactual
    unavailable: dict[str, dict[str, int]]  # type -> reason -> records
    seed: int
    types: list[str] = field(default_factory=lambda: list(COUNTERFACTUAL_TYPES))

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def write_counterfactuals(pairs_jsonl: str | Path, out_jsonl: str | Path, seed: int = 0) -> CounterfactualSummary:
    """Write one record per distinct cleaned report of a phantom pairs.jsonl (first-seen order) and the
    summary beside it. ValueError naming the file and pair for a pair without or with disagreeing findings."""
    pairs = list(read_pairs(pairs_jsonl))
    findings_of: dict[str, tuple[str, str, list[Finding]]] = {}
    for p in pairs:
        if "findings" not in p.extra:
            raise ValueError(f"{pairs_jsonl}: pair {p.id!r} has no extra['findings']: counterfactual reports need "
                             "a phantom's ground truth (use text_counterfactual_record for real text)")
        try:
            fs = as_findings(p.extra["findings"])
        except (ValueError, TypeError) as e:
            raise ValueError(f"{pairs_jsonl}: pair {p.id!r}: bad findings: {e}") from e
        cleaned = clean_text(p.text)
        seen = findings_of.setdefault(cleaned, (p.id, p.text, fs))
        if seen[2] != fs:
            raise ValueError(f"{pairs_jsonl}: pairs {seen[0]!r} and {p.id!r} have the same cleaned report but "
                             "different findings: a counterfactual of the text would not contradict both images")
    records = []
    for pid, report, fs in findings_of.values():
        try:
            records.append(counterfactual_record(report, fs, seed))
        except ValueError as e:
            raise ValueError(f"{pairs_jsonl}: pair {pid!r}: {e}") from e
    atomic_write_text(out_jsonl, "".join(json.dumps(r.to_json(), ensure_ascii=False) + "\n" for r in records))
    summary = CounterfactualSummary(
        pairs_file=str(pairs_jsonl), out=str(out_jsonl), pairs=len(pairs), distinct_texts=len(records),
        counterfactuals={t: sum(t in r.counterfactuals for r in records) for t in COUNTERFACTUAL_TYPES},
        unavailable={t: dict(sorted(Counter(r.unavailable[t] for r in records if t in r.unavailable).items()))
                     for t in COUNTERFACTUAL_TYPES}, seed=seed)
    write_json(summary_path_for(out_jsonl), summary.to_json())
    return summary


def read_counterfactuals(path: str | Path) -> list[CounterfactualRecord]:
    """The records of a counterfactuals.jsonl (a bad line raises naming the file and line)."""
    return list(read_jsonl(path, CounterfactualRecord.from_json))
