"""The text rules: one for ingestion (keep the report as written) and one for the model.

`normalize_report` (ingestion): whitespace collapsed, optionally the de-identification token removed.
`clean_text` is THE cleaning rule, applied once before perturbation; the cleaned text is what the
shards store, the text encoder reads and evaluation scores: (1) Unicode NFKC, accents stripped,
other non-ASCII dropped; (2) lower-case; (3) "XXXX"-style de-identification tokens removed (default);
(4) punctuation becomes a word boundary, except a hyphen inside a word ("t-spine") and a '.' or '/'
between digits ("2.5"); (5) at most `max_words` words (default 60; the authors' code capped at 50).
The result is lower-case words separated by single spaces; perturbations permute exactly these.
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


def clean_text(text: str | None, *, max_words: int | None = DEFAULT_MAX_WORDS, drop_deid: bool = True) -> str:
    """Apply the pertvl cleaning rule (see the module docstring). Empty input gives ""."""
    if not text:
        return ""
    if not text.isascii():  # NFKC and NFKD leave ASCII as it is; most reports are ASCII
        text = unicodedata.normalize("NFKD", unicodedata.normalize("NFKC", text))
        text = "".join(ch for ch in text if ord(ch) < 128 and not unicodedata.combining(ch))
    text = text.lower()
    if drop_deid:
        text = _DEID.sub(" ", text)
    # Replace every separator with a space, keeping the ones the rule protects.
    text = _SEPARATORS.sub(lambda m: m.group("keep") or " ", text)
    words = text.split()
    if max_words is not None and max_words > 0:
        words = words[:max_words]
    return " ".join(words)


def cleaning_rule(max_words: int | None = DEFAULT_MAX_WORDS, drop_deid: bool = True) -> dict:
    """`clean_text` stated as data for the export's pertvl_export.json, steps in order (Python `re`
    patterns; examples/ort_embed.py applies them without pertvl, the tests hold it equal to clean_text)."""
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
