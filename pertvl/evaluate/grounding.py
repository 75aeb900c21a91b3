"""Grounding of the local branch: does a finding word attend to where the finding is drawn?

For every test phantom and every word of its report that names a present finding, the
word→region attention (pertvl.infer.attention_maps) against the finding's mask re-drawn from the
phantom's seed and area-averaged to the region grid (share per cell). Per item: the pointing game
(the most-attended cell overlaps the mask; ties share credit; chance: the share of cells in the
mask) and the attention mass in the mask (chance: the mask's area share). Means per finding type
with cluster-bootstrap CIs over images. Non-phantoms, mismatching reports, truncated words and
empty masks are skipped and counted. Untrained local branches (convirt, no_local) are measured too.
"""

from __future__ import annotations

import argparse
import itertools
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pertvl.evaluate.encoder import image_array, with_text
from pertvl.evaluate.evaluation import Evaluation, JsonResult, MetricInfo, Suite, add_bootstrap_arguments
from pertvl.evaluate.report import ci, md_table, new_figure, pct, save_png

SCHEMA = "pertvl-grounding/1"
CONFIDENCE = 0.95
TIE = 1e-9  # relative: attention within this of the maximum is tied with it


@dataclass
class GroundingItem:
    image: int  # index among the scored images (the bootstrap's cluster)
    type: str
    word: str
    pointing: float  # 1/0, or the in-mask share of tied maxima
    pointing_chance: float
    mass: float
    area: float


def item_scores(attn: np.ndarray, share: np.ndarray) -> tuple[float, float, float, float]:
    """(pointing, pointing chance, mass in mask, area share) of one attention map [h, w] (sums to 1)
    against a mask's per-cell share [h, w]."""
    attn = np.asarray(attn, dtype=np.float64)
    share = np.asarray(share, dtype=np.float64)
    if attn.shape != share.shape:
        raise ValueError(f"attention {attn.shape} and mask {share.shape} differ in grid")
    inside = share > 0
    top = attn >= attn.max() * (1 - TIE)
    return (float(inside[top].mean()), float(inside.mean()), float((attn * share).sum() / max(attn.sum(), 1e-300)),
            float(share.mean()))


def cluster_bootstrap_ci(values: np.ndarray, clusters: np.ndarray, resamples: int, seed: int
                         ) -> tuple[float, float] | None:
    """Percentile CI of the mean of `values` with whole clusters (images) resampled; None for
    fewer than 2 clusters or 0 resamples."""
    values = np.asarray(values, dtype=np.float64)
    ids, inv = np.unique(np.asarray(clusters), return_inverse=True)
    if resamples <= 0 or len(ids) < 2:
        return None
    sums = np.bincount(inv, weights=values, minlength=len(ids))
    counts = np.bincount(inv, minlength=len(ids)).astype(np.float64)
    rng = np.random.default_rng(seed)
    stats = np.empty(resamples)
    for start in range(0, resamples, 256):  # bounded memory for many images
        pick = rng.integers(0, len(ids), (min(256, resamples - start), len(ids)))
        stats[start : start + len(pick)] = sums[pick].sum(1) / counts[pick].sum(1)
    alpha = (1 - CONFIDENCE) / 2
    lo, hi = np.quantile(stats, [alpha, 1 - alpha])
    return float(lo), float(hi)


@dataclass
class GroundingStat:
    items: int
    images: int
    pointing: float | None
    pointing_ci95: tuple[float, float] | None
    pointing_chance: float | None
    mass: float | None
    mass_ci95: tuple[float, float] | None
    area: float | None

    @classmethod
    def of(cls, items: list[GroundingItem], resamples: int, seed: int) -> GroundingStat:
        if not items:
            return cls(0, 0, None, None, None, None, None, None)
        img = np.array([it.image for it in items])
        p = np.array([it.pointing for it in items])
        m = np.array([it.mass for it in items])
        return cls(len(items), len(set(img.tolist())), float(p.mean()), cluster_bootstrap_ci(p, img, resamples, seed),
                   float(np.mean([it.pointing_chance for it in items])), float(m.mean()),
                   cluster_bootstrap_ci(m, img, resamples, seed), float(np.mean([it.area for it in items])))


@dataclass
class GroundingResult(JsonResult):
    """The grounding evaluation's outcome; its JSON is these fields, "schema" first."""

    SCHEMAS, WHAT = (SCHEMA,), "grounding"

    overall: GroundingStat
    per_type: dict[str, GroundingStat]
    images: int
    images_without_finding_words: int
    skipped: dict[str, int]
    grid: tuple[int, int]
    gamma1: float
    bootstrap: dict[str, Any]
    words: dict[str, int] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)
    schema: str = SCHEMA
    items: list[GroundingItem] = field(default_factory=list, repr=False, compare=False)  # not serialized

    def markdown(self, name: str) -> str:
        from pertvl.data.phantom.findings import FINDING_TYPES

        def row(label: str, s: GroundingStat) -> list[str]:
            return [label, str(s.items), str(s.images), pct(s.pointing), ci(s.pointing_ci95), pct(s.pointing_chance),
                    pct(s.mass), ci(s.mass_ci95), pct(s.area)]

        rows = [row("**all finding words**", self.overall)]
        rows += [row(f"{t.replace('_', ' ')} (`{t}`)", self.per_type[t]) for t in FINDING_TYPES if t in self.per_type]
        b = self.bootstrap
        words = ", ".join(f"{w} {c}" for w, c in sorted(self.words.items()))
        return "\n".join([
            f"# Grounding of the local branch: {name}",
            "",
            md_table(["finding", "words", "images", "pointing game", "95% CI", "chance (cells in mask)",
                      "attention mass in mask", "95% CI", "mask area share (chance)"], rows),
            f"{self.images} images with finding words; {self.images_without_finding_words} without (normal images); "
            + (f"skipped: {', '.join(f'{k} {v}' for k, v in sorted(self.skipped.items()))}; " if self.skipped else "")
            + f"region grid {self.grid[0]}×{self.grid[1]}, γ1 = {self.gamma1:g}. Words: {words or 'none'}.",
            "",
            "Word→region attention of the local branch (GLoRIA's attention over the report's words, then the "
            "regions) of each finding word of the report, against the finding's mask re-drawn from the phantom's "
            "seed and area-averaged to the grid. Pointing game: the most-attended cell overlaps the mask; chance: "
            "the share of cells that overlap it. Mass: attention × in-mask share of each cell, summed; chance: the "
            "mask's area share. CI: percentile bootstrap over images "
            f"({b.get('resamples')} resamples, seed {b.get('seed')}). The local branch is trained by L_local "
            "(gloria, full presets); other models' numbers are those of an untrained local branch.",
        ]) + "\n"

    def figures(self, out_dir: Path, name: str) -> dict[str, Path]:
        return {"png": plot_grounding(self, Path(out_dir) / f"{name}.png", f"Grounding of the local branch: {name}")}

    def metrics(self) -> dict[str, float | None]:
        o = self.overall
        out: dict[str, float | None] = {"grounding/pointing": o.pointing, "grounding/pointing_chance": o.pointing_chance,
                                        "grounding/mass": o.mass, "grounding/area": o.area}
        out.update({f"grounding/pointing/{t}": s.pointing for t, s in self.per_type.items()})
        return out

    @classmethod
    def metric_info(cls, key: str) -> MetricInfo:
        from pertvl.data.phantom.findings import FINDING_TYPES

        metric = key.split("/", 1)[1]
        fixed = {"pointing": "Pointing game", "pointing_chance": "Pointing chance", "mass": "Attention mass in mask",
                 "area": "Mask area (mass chance)"}
        if metric in fixed:  # the pointing game and its chance are summary columns
            return MetricInfo(fixed[metric], order=(0, list(fixed).index(metric)),
                              summary=metric in ("pointing", "pointing_chance"))
        t = metric.split("/", 1)[-1]
        return MetricInfo(f"Pointing: {t.replace('_', ' ')}",
                          order=(1, FINDING_TYPES.index(t) if t in FINDING_TYPES else len(FINDING_TYPES), t))

    def headline(self) -> str:
        o = self.overall
        if o.items == 0:
            return f"grounding: no finding words scored ({self.images_without_finding_words} images without any)"
        return (f"grounding: pointing game {pct(o.pointing)} (chance {pct(o.pointing_chance)}), attention mass in "
                f"the finding's mask {pct(o.mass)} (area {pct(o.area)}) over {o.items} finding words in "
                f"{o.images} images")


GROUNDING_FIGSIZE = (11.0, 4.5)  # → 1100 × 450 px


def plot_grounding(result: GroundingResult, out_png: Path, title: str) -> Path:
    """Two panels, one group per finding type (+ all): pointing game vs its chance, mass vs area."""
    from pertvl.data.phantom.findings import FINDING_TYPES

    keys = ["all"] + [t for t in FINDING_TYPES if t in result.per_type]
    stats = [result.overall] + [result.per_type[t] for t in keys[1:]]
    labels = [k.replace("_", " ") for k in keys]
    x = np.arange(len(keys))
    fig = new_figure(GROUNDING_FIGSIZE)
    axes = fig.subplots(1, 2)
    for ax, (what, lo_hi, chance, name) in zip(axes, (("pointing", "pointing_ci95", "pointing_chance", "pointing game"),
                                                      ("mass", "mass_ci95", "area", "attention mass in mask")),
                                               strict=True):
        vals = np.array([np.nan if getattr(s, what) is None else 100 * getattr(s, what) for s in stats])
        err = np.array([[0.0, 0.0] if getattr(s, lo_hi) is None else
                        [100 * (getattr(s, what) - getattr(s, lo_hi)[0]), 100 * (getattr(s, lo_hi)[1] - getattr(s, what))]
                        for s in stats]).T
        ax.bar(x - 0.2, np.nan_to_num(vals), 0.4, yerr=err, capsize=3, color="#4f81bd", label=name)
        ax.bar(x + 0.2, [0 if getattr(s, chance) is None else 100 * getattr(s, chance) for s in stats], 0.4,
               color="#c0c0c0", label="chance")
        ax.set_xticks(x, [f"{lab}\nn={s.items}" for lab, s in zip(labels, stats, strict=True)], fontsize=8,
                      rotation=30, ha="right")
        ax.set_ylim(0, 105)
        ax.set_ylabel("%")
        ax.grid(axis="y", alpha=0.3)
        ax.set_axisbelow(True)
        ax.legend(fontsize=8, loc="upper right")
        ax.set_title(name, fontsize=10)
    fig.suptitle(title, fontsize=11)
    return save_png(fig, out_png)


def evaluate_grounding(encoder: Any, samples: Iterable[Any], gamma1: float = 4.0, bootstrap: int = 1000,
                       seed: int = 0, batch_size: int = 32) -> GroundingResult:
    """The grounding evaluation over phantom shard samples. The encoder needs `image_features` and
    `text_features` (an export or a run; ValueError otherwise); `gamma1` is GLoRIA's attention temperature."""
    from pertvl.data.phantom.grounding import PhantomTruth, finding_words, phantom_masks, region_shares
    from pertvl.infer import attention_maps

    if not (hasattr(encoder, "image_features") and hasattr(encoder, "text_features")):
        raise ValueError("grounding needs the local branch (image_features/text_features): an ONNX export "
                         "(--export) or a run (--run)")
    skipped: Counter = Counter()
    words_seen: Counter = Counter()
    items: list[GroundingItem] = []
    no_words = 0
    grid: tuple[int, int] = (0, 0)
    scored = 0

    def with_finding_words() -> Iterator[tuple[Any, Any, str, list]]:
        """(sample, truth, text, finding words) of the phantoms whose report names a present finding."""
        nonlocal no_words
        for sample, text in with_text(samples, skipped):
            try:
                truth = PhantomTruth.from_meta(sample.meta)
            except ValueError:
                skipped["not_a_phantom"] += 1
                continue
            try:
                fwords = finding_words(truth, text)
            except ValueError:
                skipped["report_mismatch"] += 1
                continue
            if not fwords:
                no_words += 1
                continue
            yield sample, truth, text, fwords

    pending = with_finding_words()
    while batch := list(itertools.islice(pending, batch_size)):
        images = np.stack([image_array(s) for s, _, _, _ in batch])
        img = encoder.image_features(images)
        txt = encoder.text_features([text for _, _, text, _ in batch])
        grid = tuple(int(g) for g in img.grid)
        for row, (_, truth, _, fwords) in enumerate(batch):
            seen = txt.word_lists[row]
            maps = attention_maps(img.regions[row], grid, txt.words[row], txt.word_mask[row], gamma1=gamma1)
            masks = phantom_masks(truth)
            shares = {t: region_shares(masks[t], grid) for t in {w.type for w in fwords}}
            kept = 0
            for w in fwords:
                if w.index >= len(seen) or seen[w.index] != w.word:  # cut by the encoder's max_length
                    skipped["finding_word_truncated"] += 1
                    continue
                if not (shares[w.type] > 0).any():  # drawn thinner than half a pixel at this size: no target
                    skipped["empty_mask"] += 1
                    continue
                p, pc, m, a = item_scores(maps[w.index], shares[w.type])
                items.append(GroundingItem(scored, w.type, w.word, p, pc, m, a))
                words_seen[w.word] += 1
                kept += 1
            scored += kept > 0
    by_type: dict[str, list[GroundingItem]] = defaultdict(list)
    for it in items:
        by_type[it.type].append(it)
    return GroundingResult(
        overall=GroundingStat.of(items, bootstrap, seed),
        per_type={t: GroundingStat.of(v, bootstrap, seed) for t, v in sorted(by_type.items())},
        images=scored,
        images_without_finding_words=no_words,
        skipped=dict(skipped),
        grid=grid,
        gamma1=float(gamma1),
        bootstrap={"resamples": bootstrap, "seed": seed, "confidence": CONFIDENCE,
                   "method": "percentile, images resampled"},
        words=dict(sorted(words_seen.items())),
        items=items,
    )


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--gamma1", type=float, default=4.0, help="GLoRIA's attention temperature γ1 (default 4.0)")
    add_bootstrap_arguments(p)


def run(encoder: Any, data: Iterable[Any], options: argparse.Namespace) -> GroundingResult:
    return evaluate_grounding(encoder, data, gamma1=options.gamma1, bootstrap=options.bootstrap, seed=options.seed,
                              batch_size=options.batch_size)


EVALUATION = Evaluation(
    name="grounding",
    help="grounding of the local branch on phantoms: pointing game and attention mass in the finding's mask",
    description="Pointing game and attention mass of each finding word's word→region attention inside the "
    "finding's phantom mask, per finding type (needs phantom shards); writes NAME.json, NAME.md and NAME.png.",
    add_arguments=add_arguments, run=run, result_type=GroundingResult, schemas=(SCHEMA,),
    title="Grounding of the local branch (phantom masks)", suites=frozenset({Suite.DEMO, Suite.ABLATE}))
