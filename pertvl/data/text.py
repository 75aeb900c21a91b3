"""The text rules: one for ingestion (keep the report as written) and one for the model.

`normalize_report` is what ingestion applies to raw report text: whitespace only, plus the
optional removal of the de-identification token. Nothing else of the raw text changes.

`clean_text` is THE cleaning rule of pertvl. It is applied once, before perturbation, and the
cleaned text is what is stored in the shards, fed to the text encoder at training time, and
scored at evaluation time, so the three always see the same words:

1. Unicode NFKC, then accents stripped and any remaining non-ASCII character dropped
   ("pleural effusión" -> "pleural effusion").
2. Lower-case.
3. De-identification tokens ("XXXX", any run of 3+ x's standing alone) removed when
   `drop_deid` is true (default): they carry no meaning and would be shuffled like words.
4. Punctuation becomes a word boundary, except a hyphen inside a word ("t-spine") and a
   decimal point or slash between digits ("2.5", "3/4"), which are kept.
5. Whitespace collapsed; at most `max_words` words are kept (default 60: the Open-I findings
   have median 29 and p95 59 words; the authors' code capped at 50).

The result is a sequence of lower-case words separated by single spaces; perturbations are
permutations of exactly these words.
"""

from __future__ import annotations

import re
import unicodedata

DEFAULT_MAX_WORDS = 60
_DEID = re.compile(r"(?<![A-Za-z0-9])[xX]{3,}(?![A-Za-z0-9])")
_WS = re.compile(r"\s+")
# Keep: letters/digits; hyphen between alphanumerics; '.' or '/' between digits.
_SEPARATORS = re.compile(r"(?P<keep>(?<=[a-z0-9])-(?=[a-z0-9])|(?<=[0-9])[./](?=[0-9]))|[^a-z0-9]")


def normalize_report(text: str | None, *, drop_deid: bool = False) -> str:
    """Ingestion rule: collapse whitespace; optionally drop "XXXX" tokens. Nothing else."""
    if text is None:
        return ""
    if drop_deid:
        text = _DEID.sub(" ", text)
    return _WS.sub(" ", text).strip()


def _to_ascii(text: str) -> str:
    if text.isascii():  # NFKC and NFKD leave ASCII as it is; most reports are ASCII
        return text
    text = unicodedata.normalize("NFKD", unicodedata.normalize("NFKC", text))
    return "".join(ch for ch in text if ord(ch) < 128 and not unicodedata.combining(ch))


def clean_text(text: str | None, *, max_words: int | None = DEFAULT_MAX_WORDS, drop_deid: bool = True) -> str:
    """Apply the pertvl cleaning rule (see the module docstring). Empty input gives ""."""
    if not text:
        return ""
    text = _to_ascii(text).lower()
    if drop_deid:
        text = _DEID.sub(" ", text)
    # Replace every separator with a space, keeping the ones the rule protects.
    text = _SEPARATORS.sub(lambda m: m.group("keep") or " ", text)
    words = text.split()
    if max_words is not None and max_words > 0:
        words = words[:max_words]
    return " ".join(words)


def cleaning_rule(max_words: int | None = DEFAULT_MAX_WORDS, drop_deid: bool = True) -> dict:
    """`clean_text` stated as data (the export's pertvl_export.json carries it), steps in order.

    Patterns are Python `re` syntax (look-behinds included); examples/ort_embed.py applies them
    without pertvl, and tests hold it equal to `clean_text`.
    """
    return {
        "rule": "pertvl.data.text.clean_text",
        "max_words": max_words,
        "drop_deid": drop_deid,
        "steps": [
            {"step": "ascii", "how": "if the text is not ASCII: Unicode NFKC, then NFKD, then drop combining "
             "marks and every character >= U+0080"},
            {"step": "lowercase"},
            *([{"step": "drop_deid", "pattern": _DEID.pattern, "replace_with": " "}] if drop_deid else []),
            {"step": "separators", "pattern": _SEPARATORS.pattern, "flavour": "python re",
             "how": "each match becomes its group 'keep' when that group matched, else one space"},
            {"step": "words", "how": "split on whitespace; keep the first max_words (all when null or <= 0); "
             "join with single spaces"},
        ],
        "empty_input": "gives the empty string",
    }
