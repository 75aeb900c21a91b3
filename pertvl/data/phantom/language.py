"""The language of the phantom corpus: Open-I style reports and synthetic NLI items from the findings.

Every sentence keeps the `Fact`s it asserts: `write_report` states each present finding with its
side, severity and location and some absent ones as negations (MIN_WORDS-MAX_WORDS words, varied
wording and order); `make_nli_items` derives MedNLI-style items whose labels follow from those facts.
The wording uses the words the antonym lexicon flips (left/right, small/large, mild/severe, ...), so an
antonym-perturbed report describes another image. Left and right are the PATIENT's sides.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np

from pertvl.data.phantom.findings import (
    FINDING_TYPES,
    LOCATIONS,
    NEGATABLE,
    PARENCHYMAL,
    SEVERITIES,
    SIDES,
    Finding,
    as_findings,
    other_side,
    pick,
    severity_words,
)

MIN_WORDS, MAX_WORDS = 10, 45  # the length range of a composed report, in words


@dataclass(frozen=True)
class Fact:
    """A claim: finding `type` is present (with optional side/severity/location) or absent (on `side`)."""

    type: str
    present: bool
    side: str | None = None
    severity: str | None = None
    location: str | None = None

    @classmethod
    def of(cls, f: Finding) -> Fact:
        """The fact stating finding `f` present with its side, severity and location."""
        return cls(f.type, True, f.side, f.severity, f.location)


def fact_holds(fact: Fact, findings: Sequence[Finding]) -> bool:
    """Whether `fact` is true of these findings: a present fact when a finding of its type covers
    its side and matches the severity and location it names; an absent one when none covers its side."""
    same = [f for f in findings if f.type == fact.type]
    if fact.present:
        return any(
            (f.side == "bilateral" if fact.side == "bilateral" else f.covers(fact.side))
            and (fact.severity is None or f.severity == fact.severity)
            and (fact.location is None or f.location == fact.location)
            for f in same
        )
    return not any(f.covers(fact.side) for f in same)


@dataclass(frozen=True)
class Sentence:
    """One report sentence, the facts it asserts, and the finding types it speaks about."""

    text: str
    facts: tuple[Fact, ...] = ()
    topics: frozenset[str] = field(default_factory=frozenset)

    @property
    def words(self) -> int:
        return len(self.text.split())


def _sentence(text: str, facts: Iterable[Fact] = (), topics: Iterable[str] = ()) -> Sentence:
    text = text.strip()
    return Sentence(text[0].upper() + text[1:] + ".", tuple(facts), frozenset(topics))


_ADVERB = {"mild": "mildly", "moderate": "moderately", "severe": "severely"}


def _lobe_phrases(lobe: str) -> list[str]:
    """The ways a report names a lobe (drawn 3:1:1 where there are three)."""
    side, level, _ = lobe.split(" ")
    if level == "upper":
        return [lobe, f"{side} upper lung", f"{side} upper lung zone"]
    if level == "lower":
        return [lobe, f"{side} lung base", f"{side} lower lung zone"]
    return [lobe]


def _lobe_phrase(lobe: str, rng: np.random.Generator) -> str:
    phrases = _lobe_phrases(lobe)
    return pick(rng, phrases, [3, 1, 1]) if len(phrases) == 3 else phrases[0]


def _present_sentence(f: Finding, rng: np.random.Generator) -> Sentence:
    """A sentence stating finding `f` with its side, severity and location."""
    where = _lobe_phrase(f.location, rng) if f.type in ("consolidation", "nodule") else None
    w = pick(rng, severity_words(f.type, f.severity), [3, 1, 1]) if f.type == "consolidation" else None
    return _sentence(pick(rng, _present_options(f, where, w)), [Fact.of(f)], [f.type])


def _present_options(f: Finding, where: str | None, w: str | None) -> list[str]:
    """The templates stating `f`, given its drawn lobe phrase `where` and consolidation's severity word `w`."""
    sev, side = f.severity, f.side
    if f.type == "pleural_effusion":
        if side == "bilateral":
            opts = [f"{sev} bilateral pleural effusions", f"there are {sev} bilateral pleural effusions",
                    f"{sev} pleural effusions bilaterally", f"bilateral {sev} pleural effusions are present"]
            if sev == "small":
                opts.append("blunting of both costophrenic angles consistent with small bilateral effusions")
        else:
            opts = [f"there is a {sev} {side} pleural effusion", f"{sev} {side} pleural effusion",
                    f"a {sev} {side} pleural effusion is present", f"{sev} pleural effusion on the {side}",
                    f"{sev} {side} effusion"]
            if sev == "small":
                opts += [
                    f"blunting of the {side} costophrenic angle consistent with a small pleural effusion",
                    f"the {side} costophrenic angle is blunted by a small effusion"]
            else:
                opts.append(f"{sev} {side} pleural effusion with a meniscus")
    elif f.type == "pneumothorax":
        opts = [f"there is a {sev} {side} pneumothorax", f"{sev} {side} pneumothorax",
                f"{sev} pneumothorax on the {side}", f"{sev} {side} pneumothorax with a visible pleural line",
                f"there is a {sev} pneumothorax in the {side} hemithorax"]
        if sev == "small":
            opts.append(f"a small {side} apical pneumothorax is present")
    elif f.type == "consolidation":
        opts = [f"there is {w} consolidation in the {where}", f"{w} {where} consolidation",
                f"{w} airspace consolidation in the {where}", f"{w} consolidation of the {where}"]
    elif f.type == "cardiomegaly":
        adv = _ADVERB[sev]
        opts = [f"the heart is {adv} enlarged", f"{sev} cardiomegaly", f"there is {sev} cardiomegaly",
                f"heart size is {adv} enlarged", f"the cardiac silhouette is {adv} enlarged",
                f"{sev} enlargement of the cardiac silhouette"]
    elif f.type == "nodule":
        opts = [f"there is a {sev} nodule in the {where}", f"{sev} {where} nodule",
                f"a {sev} pulmonary nodule is seen in the {where}", f"{sev} nodular opacity in the {where}",
                f"{sev} rounded opacity in the {where} compatible with a nodule"]
    elif f.type == "atelectasis":
        opts = [f"{sev} {side} basilar atelectasis", f"there is {sev} atelectasis at the {side} lung base",
                f"{sev} {side} lower lobe atelectasis", f"{sev} plate-like atelectasis at the {side} base",
                f"linear opacity at the {side} base consistent with {sev} atelectasis"]
        if sev == "moderate":
            opts.append(f"moderate {side} lower lobe atelectasis with elevation of the {side} hemidiaphragm")
    else:  # edema
        opts = [f"there is {sev} pulmonary edema", f"{sev} interstitial edema",
                f"{sev} pulmonary edema with increased interstitial markings",
                f"increased interstitial markings consistent with {sev} edema",
                f"findings of {sev} pulmonary vascular congestion and edema"]
        if sev == "severe":
            opts.append("severe pulmonary edema with bilateral perihilar airspace opacities")
    return opts


HEART_NORMAL = ("heart size is normal", "the heart is normal in size", "normal heart size",
                 "the cardiomediastinal silhouette is normal",
                 "heart size and mediastinal contours are normal",
                 "the cardiac silhouette is within normal limits", "the heart size is within normal limits")


NEG_NOUNS = {"pneumothorax": ("pneumothorax",), "pleural_effusion": ("pleural effusion", "effusion"),
             "consolidation": ("focal consolidation", "focal airspace consolidation", "consolidation"),
             "edema": ("pulmonary edema", "edema"),
             "nodule": ("suspicious pulmonary nodules", "pulmonary nodules")}


def _join(nouns: Sequence[str], rng: np.random.Generator) -> str:
    if len(nouns) <= 2:
        return " or ".join(nouns)
    comma = pick(rng, [", or ", " or "])
    return ", ".join(nouns[:-1]) + comma + nouns[-1]


def _negation_sentence(types: Sequence[str], rng: np.random.Generator) -> Sentence:
    """'No pneumothorax or pleural effusion.' for absent `types` (1-3 of them)."""
    nouns = [pick(rng, NEG_NOUNS[t]) for t in types]
    joined = _join(nouns, rng)
    verb = "are" if nouns[0].endswith("nodules") else "is"
    opts = _negation_options(joined, verb, single=len(types) == 1)
    return _sentence(pick(rng, opts, [4, 2, 1, 1] + [1] * (len(opts) - 4)),
                     [Fact(t, False) for t in types], types)


def _negation_options(joined: str, verb: str, single: bool) -> list[str]:
    opts = [f"no {joined}", f"there {verb} no {joined}", f"no evidence of {joined}", f"negative for {joined}"]
    return [*opts, f"{joined} {verb} not seen"] if single else opts


def _side_negation_options(ftype: str, side: str) -> list[str]:
    if ftype == "pleural_effusion":
        return [f"no {side} pleural effusion", f"the {side} costophrenic angle is sharp",
                f"there is no {side} pleural effusion"]
    return [f"no {side} pneumothorax", f"no pneumothorax on the {side}"]


def _lungs_clear_sentence(present: set[str], extra_neg: Sequence[str], rng: np.random.Generator) -> Sentence:
    """'The lungs are clear.' (or 'otherwise clear'), optionally '... without X or Y'."""
    base = pick(rng, LUNGS_OTHERWISE if present & OTHERWISE_TYPES else LUNGS_PLAIN)
    if extra_neg:
        base += " without " + _join([pick(rng, NEG_NOUNS[t]) for t in extra_neg], rng)
    return _lungs_sentence(base, present, extra_neg)


OTHERWISE_TYPES = frozenset({"pleural_effusion", "pneumothorax", "consolidation", "nodule", "atelectasis"})
LUNGS_OTHERWISE = ("the lungs are otherwise clear", "otherwise the lungs are clear",
                   "lungs are otherwise clear")
LUNGS_PLAIN = ("the lungs are clear", "lungs are clear bilaterally", "both lungs are clear",
                "the lungs are clear bilaterally")


def _lungs_sentence(text: str, present: Iterable[str], extra_neg: Sequence[str] = ()) -> Sentence:
    facts = [Fact(t, False) for t in PARENCHYMAL if t not in set(present)] + [Fact(t, False) for t in extra_neg]
    topics = set(PARENCHYMAL) | {"pleural_effusion", "pneumothorax"}  # conservative: never 'unaddressed'
    return _sentence(text, facts, topics)


def lungs_clear_sentences(present: Iterable[str], without: str | None = None) -> list[Sentence]:
    """The "lungs are (otherwise) clear" sentences the grammar writes beside these present finding
    types, and with `without` (an absent negatable type) also each "... without <it>" variant."""
    present = set(present)
    frames = LUNGS_OTHERWISE if present & OTHERWISE_TYPES else LUNGS_PLAIN
    out = [_lungs_sentence(f, present) for f in frames]
    if without is not None and not present & set(PARENCHYMAL):
        out += [_lungs_sentence(f"{f} without {noun}", present, [without]) for f in frames
                for noun in NEG_NOUNS[without]]
    return out


T = TypeVar("T")


def otherwise_last(items: list[T], otherwise: Callable[[T], bool], finding: Callable[[T], bool]) -> list[T]:
    """`items` with the first "lungs are otherwise clear" sentence (`otherwise`) moved after the last
    sentence of a finding it is 'otherwise' to (`finding`), where `_compose_once` puts it."""
    at = next((i for i, x in enumerate(items) if otherwise(x)), None)
    last = max((i for i, x in enumerate(items) if finding(x)), default=-1)
    if at is None or last < at:
        return items
    out = list(items)
    out.insert(last, out.pop(at))
    return out


def is_lungs_clear(sentence: Sentence) -> bool:
    body = sentence.text.rstrip(".").lower()
    return any(body == f or body.startswith(f + " without ") for f in (*LUNGS_OTHERWISE, *LUNGS_PLAIN))


LUNG_VOLUMES = ("lung volumes are normal", "normal lung volumes")

BONES = ("no acute bony abnormality", "the osseous structures are intact",
          "visualized osseous structures are unremarkable", "no acute osseous abnormality")

MEDIASTINUM = ("the mediastinal contours are normal", "the trachea is midline",
                "mediastinal contours are within normal limits")


def fact_sentences(fact: Fact) -> list[Sentence]:
    """Every sentence the grammar can write that asserts exactly `fact`: a fully specified present
    finding, an absent type (a normal heart for cardiomegaly), or a pleural finding absent on one side.
    The twin reports choose among these, staying in the generator's distribution."""
    t = fact.type
    if fact.present:
        f = Finding(t, fact.severity, fact.side, fact.location)
        wheres = _lobe_phrases(f.location) if t in ("consolidation", "nodule") else [None]
        ws = severity_words(t, f.severity) if t == "consolidation" else (None,)
        texts = [o for where in wheres for w in ws for o in _present_options(f, where, w)]
        return [_sentence(x, [fact], [t]) for x in texts]
    if t == "cardiomegaly":
        return [_sentence(x, [fact], [t]) for x in HEART_NORMAL] if fact.side is None else []
    if fact.side is not None:
        if t not in ("pleural_effusion", "pneumothorax") or fact.side not in ("left", "right"):
            return []
        return [_sentence(x, [fact], [t]) for x in _side_negation_options(t, fact.side)]
    if t not in NEG_NOUNS:
        return []
    out = []
    for noun in NEG_NOUNS[t]:
        verb = "are" if noun.endswith("nodules") else "is"
        out += [_sentence(x, [fact], [t]) for x in _negation_options(noun, verb, single=True)]
    return out


def compose_report(findings: Sequence[Finding | dict[str, Any]], rng: np.random.Generator) -> list[Sentence]:
    """The sentences of a report for these findings (at most one per type), with their facts, in
    report order; MIN_WORDS..MAX_WORDS words."""
    fs = as_findings(findings)
    for _ in range(50):
        sents = _compose_once(fs, rng)
        n = sum(s.words for s in sents)
        if MIN_WORDS <= n <= MAX_WORDS:
            return sents
    raise ValueError(f"could not compose a report of {MIN_WORDS}-{MAX_WORDS} words for {fs}")  # pragma: no cover


def _compose_once(fs: list[Finding], rng: np.random.Generator) -> list[Sentence]:
    present = {f.type for f in fs}
    by_type = {f.type: f for f in fs}
    heart = (_present_sentence(by_type["cardiomegaly"], rng) if "cardiomegaly" in present
             else _sentence(pick(rng, HEART_NORMAL), [Fact("cardiomegaly", False)], ["cardiomegaly"]))
    findings_s = [_present_sentence(f, rng) for f in fs if f.type != "cardiomegaly"]
    order = rng.permutation(len(findings_s))
    findings_s = [findings_s[i] for i in order]

    absent = [t for t in NEGATABLE if t not in present]
    absent = [absent[i] for i in rng.permutation(len(absent))]
    n_neg = min(len(absent), int(pick(rng, [1, 2, 3, 4], [3, 4, 2, 1])))
    negated, spare = absent[:n_neg], absent[n_neg:]

    mandatory: list[Sentence] = list(findings_s)
    optional: list[Sentence] = []
    lungs_normal = not (present & set(PARENCHYMAL))
    # Negations: either folded into the lungs sentence ("clear without X or Y") or stand-alone.
    neg_groups: list[list[str]] = []
    if lungs_normal and negated and rng.random() < 0.3:
        take = int(rng.integers(1, min(3, len(negated)) + 1))
        mandatory.append(_lungs_clear_sentence(present, negated[:take], rng))
        negated = negated[take:]
    elif lungs_normal:
        mandatory.append(_lungs_clear_sentence(present, (), rng))
    elif "edema" not in present and rng.random() < 0.4:
        optional.append(_lungs_clear_sentence(present, (), rng))
    while negated:
        take = int(rng.integers(1, min(3, len(negated)) + 1))
        neg_groups.append(negated[:take])
        negated = negated[take:]
    for i, group in enumerate(neg_groups):
        (mandatory if i == 0 else optional).append(_negation_sentence(group, rng))
    if spare and rng.random() < 0.5:
        optional.append(_negation_sentence(spare[:1], rng))
    for f in fs:
        if f.type in ("pleural_effusion", "pneumothorax") and f.side != "bilateral" and rng.random() < 0.5:
            other = other_side(f.side)  # "No right pleural effusion." beside a left one
            text = pick(rng, _side_negation_options(f.type, other))
            optional.append(_sentence(text, [Fact(f.type, False, other)], [f.type]))
    if "atelectasis" not in present and rng.random() < 0.25:
        optional.append(_sentence(pick(rng, LUNG_VOLUMES), topics=["atelectasis"]))
    if "mediastinal" not in heart.text and rng.random() < 0.3:
        optional.append(_sentence(pick(rng, MEDIASTINUM)))
    bones = _sentence(pick(rng, BONES)) if rng.random() < 0.6 else None

    # Add optional sentences until the drawn length target is reached.
    target = int(rng.integers(14, 40))
    total = heart.words + sum(s.words for s in mandatory) + (bones.words if bones else 0)
    for i in rng.permutation(len(optional)):
        s = optional[i]
        if total + s.words <= min(target, MAX_WORDS) or total < MIN_WORDS:
            mandatory.append(s)
            total += s.words
    # Order: the body shuffled, findings a little more often first; heart usually first, bones last.
    keys = rng.random(len(mandatory)) - np.array([0.3 if s.facts and s.facts[0].present else 0.0
                                                   for s in mandatory])
    body = [mandatory[i] for i in np.argsort(keys, kind="stable")]
    # "The lungs are otherwise clear" follows the findings it is 'otherwise' to.
    later = [s for s in body if "otherwise" in s.text.lower()]
    if later:
        body.remove(later[0])
        last = max((i for i, s in enumerate(body) if any(fa.present for fa in s.facts)), default=-1)
        body.insert(last + 1 + int(rng.integers(0, len(body) - last)), later[0])
    pos = 0 if rng.random() < 0.55 else int(rng.integers(0, len(body) + 1))
    body.insert(pos, heart)
    if bones is not None:
        body.insert(len(body) if rng.random() < 0.85 else int(rng.integers(0, len(body) + 1)), bones)
    return body


def write_report(findings: Sequence[Finding | dict[str, Any]], rng: np.random.Generator) -> str:
    """An Open-I findings-style report of these findings ("Heart size is normal. Small left pleural
    effusion. No pneumothorax.")."""
    return " ".join(s.text for s in compose_report(findings, rng))


@dataclass(frozen=True)
class NliItem:
    """One MedNLI-style item, with the structured hypothesis kept for checking."""

    sentence1: str
    sentence2: str
    gold_label: str
    pairID: str  # noqa: N815 (MedNLI's field name)
    hypothesis: Fact
    premise_topics: frozenset[str]

    def to_json(self) -> dict[str, str]:
        return {"sentence1": self.sentence1, "sentence2": self.sentence2,
                "gold_label": self.gold_label, "pairID": self.pairID}


_HYP_NOUN = {"pleural_effusion": "pleural effusion", "pneumothorax": "pneumothorax",
             "consolidation": "consolidation", "nodule": "pulmonary nodule", "atelectasis": "atelectasis",
             "edema": "pulmonary edema"}


def hypothesis_text(fact: Fact, rng: np.random.Generator, definite: bool = False) -> str:
    """A plain statement of `fact` (worded unlike the report grammar); `definite` phrases a present
    fact about an already-mentioned finding ("The pleural effusion is large.")."""
    t, side, sev, loc = fact.type, fact.side, fact.severity, fact.location
    if fact.present and definite:
        if t == "cardiomegaly":
            return _sentence(f"the heart is {_ADVERB[sev]} enlarged").text
        if loc is not None:
            return _sentence(f"the {_HYP_NOUN[t]} is in the {loc}").text
        if sev is not None:
            return _sentence(f"the {_HYP_NOUN[t]} is {sev}").text
        return _sentence(f"the {_HYP_NOUN[t]} is on the {side} side").text
    if not fact.present:
        if t == "cardiomegaly":
            return _sentence(pick(rng, ["the heart is normal in size", "there is no cardiomegaly",
                                         "the heart is not enlarged"])).text
        if side is not None:
            if t == "pleural_effusion":
                return _sentence(pick(rng, [f"there is no {side} pleural effusion",
                                             f"the {side} pleural space is free of fluid"])).text
            return _sentence(f"there is no {side} {_HYP_NOUN[t]}").text
        opts = {
            "pleural_effusion": ["there is no pleural effusion", "no pleural fluid is seen"],
            "pneumothorax": ["there is no pneumothorax", "the lungs are fully expanded without pneumothorax"],
            "consolidation": ["there is no consolidation", "there is no focal consolidation"],
            "nodule": ["there are no pulmonary nodules", "no nodule is seen"],
            "atelectasis": ["there is no atelectasis"],
            "edema": ["there is no pulmonary edema", "there is no edema"],
        }[t]
        return _sentence(pick(rng, opts)).text
    # present, indefinite
    sev_s = f"{sev} " if sev else ""
    if t == "cardiomegaly":
        if sev:
            return _sentence(f"the cardiac silhouette is {_ADVERB[sev]} enlarged").text
        return _sentence(pick(rng, ["the heart is enlarged", "there is cardiomegaly",
                                     "the heart is not normal in size"])).text
    if t == "edema":
        return _sentence(pick(rng, [f"the patient has {sev_s}pulmonary edema", f"there is {sev_s}interstitial edema"])).text
    if loc is not None:
        if t == "consolidation":
            return _sentence(pick(rng, [f"there is {sev_s}consolidation in the {loc}", f"the {loc} is consolidated"]
                                   if not sev else [f"there is {sev_s}consolidation in the {loc}"])).text
        return _sentence(f"there is a {sev_s}{_HYP_NOUN[t]} in the {loc}").text
    if side == "bilateral":
        return _sentence(pick(rng, [f"there are {sev_s}bilateral pleural effusions",
                                     "pleural effusions are present on both sides"] if not sev
                               else [f"there are {sev_s}bilateral pleural effusions"])).text
    if side is not None:
        if t == "pleural_effusion" and not sev:
            return _sentence(pick(rng, [f"there is a {side} pleural effusion", f"there is fluid in the {side} pleural space",
                                         f"the {side} costophrenic angle is not sharp"])).text
        if t == "pneumothorax" and not sev:
            return _sentence(pick(rng, [f"there is a {side} pneumothorax", f"air is present in the {side} pleural space"])).text
        if t == "atelectasis":
            return _sentence(f"there is {sev_s}atelectasis at the {side} lung base").text
        return _sentence(f"there is a {sev_s}{side} {_HYP_NOUN[t]}").text
    art = "" if t in ("consolidation", "atelectasis") else "a "
    return _sentence(f"there is {art}{sev_s}{_HYP_NOUN[t]}").text


def _random_present_fact(t: str, rng: np.random.Generator) -> Fact:
    """A fully specified present fact of type `t` with random attributes."""
    loc = pick(rng, LOCATIONS[t]) if t in LOCATIONS else None
    side = loc.split(" ")[0] if loc else pick(rng, SIDES[t])
    return Fact(t, True, side, pick(rng, SEVERITIES[t]), loc)


def _entailed(fact: Fact, rng: np.random.Generator) -> Fact:
    """A fact the premise fact entails: the same claim, possibly less specific."""
    if not fact.present:
        return fact
    sev = fact.severity if rng.random() < 0.5 else None
    loc = fact.location
    side = fact.side
    if loc is not None and rng.random() < 0.3 and fact.type != "atelectasis":
        loc = None  # 'consolidation in the right lower lobe' entails 'a right consolidation'
    if fact.type == "cardiomegaly":
        side = None
    return Fact(fact.type, True, side, sev, loc)


def _contradicting(fact: Fact, findings: Sequence[Finding], rng: np.random.Generator) -> tuple[Fact, bool]:
    """A fact the premise fact (true of `findings`) falsifies, and whether to phrase it definitely."""
    t = fact.type
    if not fact.present:
        if fact.side is not None:
            sev = pick(rng, SEVERITIES[t]) if rng.random() < 0.5 else None
            return Fact(t, True, fact.side, sev), False
        f = _random_present_fact(t, rng)
        drop = rng.random() < 0.5
        return Fact(t, True, None if t == "cardiomegaly" else f.side, None if drop else f.severity,
                    None if drop else f.location), False
    # "There is no <type>" half of the time, else a wrong side, lobe or severity.
    if rng.random() < 0.5:
        return Fact(t, False), False
    options: list[tuple[Fact, bool]] = [(Fact(t, False), False)]
    same = [f for f in findings if f.type == t]
    if fact.location is not None:
        for lobe in LOCATIONS[t]:
            if not fact_holds(Fact(t, True, location=lobe), same):
                options.append((Fact(t, True, lobe.split(" ")[0], None, lobe), True))
    elif fact.side in ("left", "right") and not fact_holds(Fact(t, True, other_side(fact.side)), same):
        options.append((Fact(t, True, other_side(fact.side)), True))
    if fact.severity is not None and t != "edema" and len(same) == 1:
        others = [s for s in SEVERITIES[t] if s != fact.severity]
        options.append((Fact(t, True, None, pick(rng, others)), True))
    return options[int(rng.integers(len(options)))]


def _pick_fact(facts: Sequence[Fact], rng: np.random.Generator, p_present: float) -> Fact:
    """A premise fact: a present one with probability `p_present` when both kinds exist."""
    present = [f for f in facts if f.present]
    absent = [f for f in facts if not f.present]
    pool = present if present and (not absent or rng.random() < p_present) else absent
    return pool[int(rng.integers(len(pool)))]


def make_nli_items(sentences: Sequence[Sentence], findings: Sequence[Finding | dict[str, Any]],
                   rng: np.random.Generator, pair_id: str) -> list[NliItem]:
    """[entailment, contradiction, neutral] MedNLI-style items sharing one premise: the report
    without the sentences about one held-out type, which the neutral hypothesis speaks about. The
    entailment restates a premise fact (maybe less specifically), the contradiction falsifies one (of the
    true findings, by construction). Item ids are f"{pair_id}-nli-{e|c|n}".
    """
    fs = as_findings(findings)
    held = list(FINDING_TYPES)
    held = [held[i] for i in rng.permutation(len(held))]
    for t_neutral in held:
        premise = [s for s in sentences if t_neutral not in s.topics]
        facts = [fa for s in premise for fa in s.facts]
        if facts:  # always found: every report has a heart sentence and at least one more
            break
    topics = frozenset(t for s in premise for t in s.topics)
    text = " ".join(s.text for s in premise)

    # Source facts are drawn so that a hypothesis' polarity ("no ...") gives its label away as
    # little as possible: contradictions of absent facts are positive statements, so contradict
    # present facts more often.
    ent = _entailed(_pick_fact(facts, rng, 0.5), rng)
    con, definite = _contradicting(_pick_fact(facts, rng, 0.75), fs, rng)
    neu = Fact(t_neutral, False) if rng.random() < 0.5 else _random_present_fact(t_neutral, rng)
    if neu.present and t_neutral == "cardiomegaly":
        neu = Fact("cardiomegaly", True, None, neu.severity)
    return [
        NliItem(text, hypothesis_text(ent, rng), "entailment", f"{pair_id}-nli-e", ent, topics),
        NliItem(text, hypothesis_text(con, rng, definite), "contradiction", f"{pair_id}-nli-c", con, topics),
        NliItem(text, hypothesis_text(neu, rng), "neutral", f"{pair_id}-nli-n", neu, topics),
    ]
