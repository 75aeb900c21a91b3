"""Where a phantom's findings are, and which words of its report name them: the ground truth of
the grounding evaluation (pertvl.evaluate.grounding).

Only the recipe is stored: a phantom sample's `extra` holds its findings and `extra["render"]`
(corpus.render_ref). The masks are re-drawn from the phantom's own rendering stream
(render.finding_masks) and the report re-composed from its report stream, so each word is known to
state a present finding or not. The generator version must match and the re-composed report must
clean to the sample's text.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from pertvl.data.phantom.corpus import GENERATOR_VERSION, _streams
from pertvl.data.phantom.findings import TYPE_KEYWORDS, Finding, as_findings
from pertvl.data.phantom.language import compose_report
from pertvl.data.phantom.render import finding_masks
from pertvl.data.text import clean_text

__all__ = ["FindingWord", "PhantomTruth", "finding_words", "phantom_masks", "region_shares"]


@dataclass(frozen=True)
class FindingWord:
    """A word of the cleaned report that names a finding present in the image."""

    index: int  # position among the cleaned report's words
    word: str
    type: str  # the finding type (pertvl.data.phantom.findings.FINDING_TYPES)


@dataclass(frozen=True)
class PhantomTruth:
    """A phantom sample's findings and how it was rendered (from its json meta's `extra`)."""

    findings: tuple[Finding, ...]
    seed: int
    index: int
    size: int

    @classmethod
    def from_meta(cls, meta: Mapping[str, Any]) -> PhantomTruth:
        """Read it from a shard sample's json (or a pair's dict with `extra`); ValueError naming what is
        missing (not a phantom, or another generator version)."""
        extra = meta.get("extra") or {}
        render = extra.get("render")
        if "findings" not in extra or not isinstance(render, Mapping):
            raise ValueError("no phantom findings/render record in extra (not a phantom, or packed before "
                             "extra was carried into the shards)")
        if render.get("generator") != GENERATOR_VERSION:
            raise ValueError(f"rendered by {render.get('generator')!r}, this is {GENERATOR_VERSION!r}")
        return cls(tuple(as_findings(extra["findings"])), int(render["seed"]), int(render["index"]),
                   int(render["size"]))


def phantom_masks(truth: PhantomTruth) -> dict[str, np.ndarray]:
    """{finding type: bool [size, size]} at the phantom's render size (render.finding_masks)."""
    _, r_pix, _, _ = _streams(truth.seed, truth.index)
    return finding_masks(truth.findings, truth.size, r_pix)


def region_shares(mask: np.ndarray, grid: Sequence[int]) -> np.ndarray:
    """The share of each grid cell's area inside `mask`, float [h, w] in [0, 1] (area averaging; the
    shard image is the render resized once, so cell (r, c) covers the same part of both)."""
    h, w = (int(g) for g in grid)
    img = Image.fromarray(np.asarray(mask, dtype=np.float32), mode="F")
    return np.clip(np.asarray(img.resize((w, h), Image.Resampling.BOX), dtype=np.float64), 0.0, 1.0)


def finding_words(truth: PhantomTruth, text: str) -> list[FindingWord]:
    """The words of `text` (a cleaned report) that are a keyword of a finding type (TYPE_KEYWORDS)
    inside a sentence asserting that finding present. ValueError when the re-composed report does not
    clean to `text`."""
    _, _, r_text, _ = _streams(truth.seed, truth.index)
    sentences = compose_report(truth.findings, r_text)
    out: list[FindingWord] = []
    words: list[str] = []
    for s in sentences:
        present = {f.type for f in s.facts if f.present}
        for w in clean_text(s.text, max_words=None).split():
            for t in present:
                if w in TYPE_KEYWORDS[t]:
                    out.append(FindingWord(len(words), w, t))
            words.append(w)
    if " ".join(words) != text:
        raise ValueError("the report re-composed from the phantom's seed differs from the sample's text")
    return out
