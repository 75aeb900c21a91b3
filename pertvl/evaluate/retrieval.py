"""Image→report and report→image Recall@K by cosine of global embeddings.

The gallery is the split's distinct report texts. match="report" (default): an image matches every
gallery text equal to its report (identical templated reports would otherwise only measure list
order); match="study": its study's report. Ties rank against the correct item (TIE_TOLERANCE).
With the training split's texts, `text_disjoint` holds the recalls over the queries whose cleaned
report is no training report, against the same gallery. JSON: RetrievalResult's fields.
"""

from __future__ import annotations

import argparse
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pertvl.evaluate.encoder import Encoder, ImageBatcher, embed_texts_unique, l2_normalize, with_text
from pertvl.evaluate.evaluation import Evaluation, JsonResult, MetricInfo, Suite
from pertvl.evaluate.report import md_table, pct
from pertvl.evaluate.structure_result import TIE_TOLERANCE

SCHEMA = "pertvl-retrieval/2"
DEFAULT_KS = (1, 5, 10)


@dataclass
class RetrievalResult(JsonResult):
    """Recall@K in both directions; keys of the recall maps are "R@K". Its JSON is these fields,
    "schema" first."""

    SCHEMAS, WHAT = (SCHEMA,), "retrieval"

    image_to_text: dict[str, float]
    text_to_image: dict[str, float]
    median_rank: dict[str, float]
    images: int
    texts: int
    match: str
    skipped: dict[str, int] = field(default_factory=dict)
    tie_tolerance: float = TIE_TOLERANCE
    schema: str = SCHEMA
    text_disjoint: dict[str, Any] | None = None  # recalls over the queries whose text is no training text
    info: dict[str, Any] = field(default_factory=dict)
    # First-correct ranks per query (not serialized): what the text-disjoint subset is computed from.
    i2t_ranks: np.ndarray | None = field(default=None, repr=False, compare=False)
    t2i_ranks: np.ndarray | None = field(default=None, repr=False, compare=False)

    def markdown(self, name: str) -> str:
        ks = list(self.image_to_text)
        rows = [
            ["image → report", *[pct(self.image_to_text[k]) for k in ks], f"{self.median_rank['image_to_text']:g}"],
            ["report → image", *[pct(self.text_to_image[k]) for k in ks], f"{self.median_rank['text_to_image']:g}"],
        ]
        return (
            f"# Retrieval: {name}\n\n"
            + md_table(["", *ks, "median rank"], rows)
            + f"\n{self.images} images, {self.texts} distinct reports in the gallery; matching by {self.match}; "
            f"ties (within {self.tie_tolerance:g} cosine) rank against the correct item.\n"
            + self._disjoint_markdown()
        )

    def _disjoint_markdown(self) -> str:
        td = self.text_disjoint
        if td is None:
            return ""
        ks = list(self.image_to_text)
        rows = [["image → report", *[pct(td["image_to_text"].get(k)) for k in ks]],
                ["report → image", *[pct(td["text_to_image"].get(k)) for k in ks]]]
        return ("\n## Text-disjoint subset: queries whose report is no training report\n\n"
                + md_table(["", *ks], rows)
                + f"\n{td['images']} of {self.images} image queries and {td['texts']} of {self.texts} report queries "
                f"have a report that is none of the {td['train_texts']} distinct training texts; same gallery.\n")

    def metrics(self) -> dict[str, float | None]:
        out: dict[str, float | None] = {f"retrieval/image_to_text/{k}": v for k, v in self.image_to_text.items()}
        out.update({f"retrieval/text_to_image/{k}": v for k, v in self.text_to_image.items()})
        if self.text_disjoint is not None:
            out.update({f"retrieval/text_disjoint_image_to_text/{k}": v
                        for k, v in self.text_disjoint["image_to_text"].items()})
            out.update({f"retrieval/text_disjoint_text_to_image/{k}": v
                        for k, v in self.text_disjoint["text_to_image"].items()})
        return out

    @classmethod
    def metric_info(cls, key: str) -> MetricInfo:
        _, direction, k = key.split("/", 2)
        arrow = {"image_to_text": "I→R", "text_to_image": "R→I",
                 "text_disjoint_image_to_text": "text-disjoint I→R", "text_disjoint_text_to_image": "text-disjoint R→I"}
        number = int(k[2:]) if k.startswith("R@") and k[2:].isdigit() else 0
        return MetricInfo(f"{arrow.get(direction, direction)} {k}", order=(list(arrow).index(direction)
                                                                             if direction in arrow else 2, number),
                          summary=(direction, k) == ("image_to_text", "R@10"))

    def headline(self) -> str:
        i2t = ", ".join(f"{k} {100 * v:.1f}%" for k, v in self.image_to_text.items())
        t2i = ", ".join(f"{k} {100 * v:.1f}%" for k, v in self.text_to_image.items())
        line = f"image→report {i2t}; report→image {t2i} ({self.images} images, {self.texts} reports)"
        if self.text_disjoint is not None and self.text_disjoint["images"]:
            td = self.text_disjoint
            line += (f"; text-disjoint image→report R@1 {pct(td['image_to_text'].get('R@1'))} "
                     f"({td['images']} of {self.images} images)") if "R@1" in td["image_to_text"] else ""
        return line


def first_hit_ranks(sim: np.ndarray, hit: np.ndarray) -> np.ndarray:
    """1-based rank [Q] of each query's best correct item in sim [Q, G] (hit [Q, G] marks the correct
    items), a wrong item within TIE_TOLERANCE ranking ahead. ValueError for a query without a hit."""
    if not hit.any(axis=1).all():
        bad = int(np.flatnonzero(~hit.any(axis=1))[0])
        raise ValueError(f"query {bad} has no correct item in the gallery (check the study ids)")
    best = np.where(hit, sim, -np.inf).max(axis=1)
    ahead = (~hit) & (sim >= best[:, None] - TIE_TOLERANCE)
    return 1 + ahead.sum(axis=1)


def retrieval_recall(image_emb: np.ndarray, text_emb: np.ndarray, ks: Sequence[int] = DEFAULT_KS, *,
                     study_ids: Sequence[Any], text_study_ids: Sequence[Any] | None = None) -> RetrievalResult:
    """Image→text and text→image Recall@K of image_emb [N, D] and text_emb [M, D] by cosine; an image and
    a text match when their `study_ids` [N] and `text_study_ids` [M] (default `study_ids`) are equal.
    Raises ValueError on inconsistent shapes or a query without a match."""
    image_emb, text_emb = np.asarray(image_emb), np.asarray(text_emb)
    if image_emb.ndim != 2 or text_emb.ndim != 2 or image_emb.shape[1] != text_emb.shape[1]:
        raise ValueError(
            f"expected image_emb [N, D] and text_emb [M, D], got {tuple(image_emb.shape)} and {tuple(text_emb.shape)}"
        )
    n, m = len(image_emb), len(text_emb)
    if n == 0 or m == 0:
        raise ValueError("retrieval needs at least one image and one text")
    img_groups = np.asarray(list(study_ids), dtype=object)
    txt_groups = img_groups if text_study_ids is None else np.asarray(list(text_study_ids), dtype=object)
    sim = l2_normalize(image_emb) @ l2_normalize(text_emb).T
    hit = img_groups[:, None] == txt_groups[None, :]
    i2t = first_hit_ranks(sim, hit)
    t2i = first_hit_ranks(sim.T, hit.T)
    return RetrievalResult(
        image_to_text={f"R@{k}": float(np.mean(i2t <= k)) for k in ks},
        text_to_image={f"R@{k}": float(np.mean(t2i <= k)) for k in ks},
        median_rank={"image_to_text": float(np.median(i2t)), "text_to_image": float(np.median(t2i))},
        images=n, texts=m, match="study", i2t_ranks=i2t, t2i_ranks=t2i)


def _recalls(ranks: np.ndarray, ks: Sequence[str]) -> dict[str, float | None]:
    return {k: (float(np.mean(ranks <= int(k[2:]))) if ranks.size else None) for k in ks}


def evaluate_retrieval(
    encoder: Encoder, samples: Iterable[Any], ks: Sequence[int] = DEFAULT_KS, match: str = "report",
    batch_size: int = 32, train_texts: Iterable[str] | None = None) -> RetrievalResult:
    """Retrieval over shard samples (`.meta`: text, study_id, id): every image against the gallery of
    distinct reports; `train_texts` adds the text-disjoint subset."""
    if match not in ("report", "study"):
        raise ValueError(f"match must be 'report' or 'study', got {match!r}")
    batcher = ImageBatcher(encoder, batch_size)
    skipped: Counter = Counter()
    image_groups: list[Any] = []
    image_texts: list[str] = []
    gallery: dict[tuple[Any, str], int] = {}
    for sample, text in with_text(samples, skipped):
        meta = sample.meta
        group = text if match == "report" else str(meta.get("study_id", meta.get("id", sample.key)))
        batcher.add(sample)
        image_groups.append(group)
        image_texts.append(text)
        gallery.setdefault((group, text), len(gallery))
    image_emb = batcher.finish()
    entries = list(gallery)
    index, text_emb = embed_texts_unique(encoder, [t for _, t in entries], batch_size)
    gallery_emb = text_emb[[index[t] for _, t in entries]]
    result = retrieval_recall(image_emb, gallery_emb, ks, study_ids=image_groups,
                              text_study_ids=[g for g, _ in entries])
    result.match = match
    result.skipped = dict(skipped)
    if train_texts is not None:
        from pertvl.data.text import clean_text

        train = {clean_text(t) for t in train_texts} - {""}
        img_rows = np.array([clean_text(t) not in train for t in image_texts], dtype=bool)
        txt_rows = np.array([clean_text(t) not in train for _, t in entries], dtype=bool)
        ks_ = list(result.image_to_text)
        result.text_disjoint = {"train_texts": len(train), "images": int(img_rows.sum()), "texts": int(txt_rows.sum()),
                                "image_to_text": _recalls(result.i2t_ranks[img_rows], ks_),
                                "text_to_image": _recalls(result.t2i_ranks[txt_rows], ks_)}
    return result


def _ks(text: str) -> tuple[int, ...]:
    try:
        ks = tuple(int(k) for k in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--ks must be comma-separated integers, got {text!r}") from None
    if not ks or min(ks) < 1:
        raise argparse.ArgumentTypeError(f"--ks must be positive integers, got {text!r}")
    return ks


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ks", type=_ks, default=DEFAULT_KS, help="comma-separated K values (default 1,5,10)")
    p.add_argument("--match", choices=["report", "study"], default="report",
                   help="report: an image matches every identical report text (default); study: its study's report")


def run(encoder: Encoder, data: Iterable[Any], options: argparse.Namespace) -> RetrievalResult:
    """`pertvl eval retrieval`: `evaluate_retrieval` over the shard samples; for a held-out split,
    with the text-disjoint subset against the same shards' training split."""
    from pertvl.evaluate.structure import training_samples

    metas = training_samples(options, "text-disjoint subset")
    r = evaluate_retrieval(encoder, data, ks=options.ks, match=options.match, batch_size=options.batch_size,
                           train_texts=None if metas is None else [m.get("text") or "" for m in metas])
    if r.text_disjoint is not None:
        td = r.text_disjoint
        print(f"text-disjoint subset: {td['images']} of {r.images} image queries, {td['texts']} of {r.texts} "
              f"report queries have a report that is no training report")
    return r


EVALUATION = Evaluation(
    name="retrieval", help="image→report and report→image Recall@K",
    description="Recall@K in both directions against the gallery of distinct reports of the split.",
    add_arguments=add_arguments, run=run, result_type=RetrievalResult, schemas=(SCHEMA,), title="Retrieval",
    suites=frozenset({Suite.DEMO, Suite.ABLATE}))
