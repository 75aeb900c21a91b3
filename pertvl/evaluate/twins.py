"""`pertvl eval twins`: the twin-phantom grounding test (Winoground's scores on twin pairs).

A twin pair is two images I0, I1 of one patient that differ in one fact, with reports T0, T1 that
differ only in its words. With s(I, T) the global cosine (and the local S when available):
text score = each image prefers its own report, image score = each report prefers its own image,
group = both, pairwise = the share of the two images preferring their own report. Chance 25 / 25 /
16.7 / 50 %; a scorer that ignores the image has text score exactly 0, so no text-prior baseline is
needed. Beside every number: an empirical null (random scores, same bootstrap). Ties fail.
"""

from __future__ import annotations

import argparse
import os
import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pertvl.data.phantom.twins import EDITS
from pertvl.evaluate.evaluation import Evaluation, JsonResult, MetricInfo, Suite, add_bootstrap_arguments
from pertvl.evaluate.report import ci, md_table, new_figure, pct, save_png

SCHEMA = "pertvl-twins/1"
METRICS = ("text", "image", "group", "pairwise")
CHANCE = {"text": 0.25, "image": 0.25, "group": 1 / 6, "pairwise": 0.5}
SCORE_NAMES = {"global": "global cosine", "local": "local S(I, T)"}
TWINS_SUBFOLDER = "twins"  # where the demo packs the twin set inside its shard folder
NULL_SEED = 1  # the random-score null's scores (its bootstrap uses --seed like the model's)


@dataclass(frozen=True)
class TwinPair:
    pair: str
    edit: str
    finding: str
    texts: tuple[str, str]
    images: tuple[int, int]


def outcomes(s: np.ndarray) -> dict[str, np.ndarray]:
    """Per pair [P] the text, image and group outcomes (0/1) and the pairwise preference (0, ½, 1)
    from scores s [P, 2, 2] with s[p, i, t] = s(I_i, T_t)."""
    s = np.asarray(s, dtype=np.float64)
    t0 = s[:, 0, 0] > s[:, 0, 1]
    t1 = s[:, 1, 1] > s[:, 1, 0]
    i0 = s[:, 0, 0] > s[:, 1, 0]
    i1 = s[:, 1, 1] > s[:, 0, 1]
    text, image = t0 & t1, i0 & i1
    return {"text": text.astype(float), "image": image.astype(float), "group": (text & image).astype(float),
            "pairwise": (t0.astype(float) + t1.astype(float)) / 2}


@dataclass
class TwinStat:
    """Means over `n` pairs (None for n = 0) and their 95 % CIs; the JSON is these fields."""

    n: int
    text: float | None
    image: float | None
    group: float | None
    pairwise: float | None
    text_ci95: list[float] | None
    image_ci95: list[float] | None
    group_ci95: list[float] | None
    pairwise_ci95: list[float] | None

    @property
    def values(self) -> dict[str, float | None]:
        return {m: getattr(self, m) for m in METRICS}

    @property
    def ci95(self) -> dict[str, list[float] | None]:
        return {m: getattr(self, f"{m}_ci95") for m in METRICS}


def twin_stat(out: Mapping[str, np.ndarray], rows: np.ndarray, bootstrap: int, seed: int) -> TwinStat:
    """Means over `rows` with percentile-bootstrap CIs (the same resampled pairs for every metric)."""
    n = int(len(rows))
    values = {m: (float(out[m][rows].mean()) if n else None) for m in METRICS}
    cis: dict[str, list[float] | None] = dict.fromkeys(METRICS)
    if bootstrap > 0 and n >= 2:
        idx = np.random.default_rng(seed).integers(0, n, size=(bootstrap, n))
        for m in METRICS:
            means = out[m][rows][idx].mean(axis=1)
            cis[m] = [float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))]
    return TwinStat(n, **values, **{f"{m}_ci95": c for m, c in cis.items()})


@dataclass
class TwinScores:
    overall: TwinStat
    per_edit: dict[str, TwinStat]
    null_random_scores: TwinStat


def twin_scores(s: np.ndarray, edits: Sequence[str], bootstrap: int = 1000, seed: int = 0) -> TwinScores:
    """The statistics of scores s [P, 2, 2] of pairs whose edit types are `edits` [P]."""
    edits = np.asarray(list(edits), dtype=object)
    out = outcomes(s)
    every = np.arange(len(edits))
    per_edit = {e: twin_stat(out, np.flatnonzero(edits == e), bootstrap, seed) for e in EDITS if (edits == e).any()}
    null = outcomes(np.random.default_rng(NULL_SEED).standard_normal((len(edits), 2, 2)))
    return TwinScores(twin_stat(out, every, bootstrap, seed), per_edit, twin_stat(null, every, bootstrap, seed))


@dataclass(kw_only=True)
class TwinResult(JsonResult):
    """The twin test's outcome: per score ("global", "local") its TwinScores; its JSON is these fields,
    "schema" first."""

    SCHEMAS, WHAT = (SCHEMA,), "twins"

    pairs: int
    pairs_per_edit: dict[str, int]
    chance: dict[str, float] = field(default_factory=lambda: dict(CHANCE))
    scores: dict[str, TwinScores]
    skipped: dict[str, int]
    bootstrap: dict[str, Any]
    info: dict[str, Any] = field(default_factory=dict)
    schema: str = SCHEMA
    examples: list[dict[str, Any]] = field(default_factory=list, repr=False, compare=False)  # not serialized

    def markdown(self, name: str) -> str:
        return twins_markdown(self, name)

    def figures(self, out_dir: Path, name: str) -> dict[str, Path]:
        paths = {"png": plot_twins(self, Path(out_dir) / f"{name}.png")}
        if self.examples:
            paths["examples_png"] = plot_examples(self.examples, Path(out_dir) / f"{name}_examples.png")
        return paths

    def metrics(self) -> dict[str, float | None]:
        out: dict[str, float | None] = {}
        for score, sc in self.scores.items():
            for m in METRICS:
                out[f"twins/{score}/{m}"] = sc.overall.values[m]
                for e, st in sc.per_edit.items():
                    out[f"twins/{score}/{e}/{m}"] = st.values[m]
        return out

    @classmethod
    def metric_info(cls, key: str) -> MetricInfo:
        parts = key.split("/")[1:]
        score, metric = parts[0], parts[-1]
        edit = parts[1] if len(parts) == 3 else "all"
        label = f"twins {metric} ({edit}, {'local S' if score == 'local' else 'cosine'})"
        order = (0 if score == "global" else 1, (("all", *EDITS).index(edit) if edit in ("all", *EDITS) else 9),
                 METRICS.index(metric) if metric in METRICS else 9)
        return MetricInfo(label, chance=CHANCE.get(metric), order=order,
                          summary=edit == "all" and metric == "group" and score == "global")

    def headline(self) -> str:
        """Per score the overall text/image/group with CIs, then per edit type, one line each."""
        lines = []
        for score, sc in self.scores.items():
            o, null = sc.overall, sc.null_random_scores
            lines.append(f"twins ({SCORE_NAMES.get(score, score)}) over {o.n} pairs: text {_stat_text(o, 'text')}, "
                         f"image {_stat_text(o, 'image')}, group {_stat_text(o, 'group')} (chance 25/25/16.7%; "
                         f"random-score null {pct(null.text)}/{pct(null.image)}/{pct(null.group)}; any text-only "
                         "scorer: text 0%)")
            lines += [f"  {e} (n={st.n}): text {_stat_text(st, 'text')}, image {_stat_text(st, 'image')}, group "
                      f"{_stat_text(st, 'group')}" for e, st in sc.per_edit.items()]
        return "\n    ".join(lines)


def _stat_text(st: TwinStat, m: str) -> str:
    c = st.ci95[m]
    return pct(st.values[m]) + (f" [{100 * c[0]:.0f}, {100 * c[1]:.0f}]" if c else "")


def _row(label: str, st: TwinStat) -> list[str]:
    return [label, str(st.n), *[f"{pct(st.values[m])} {ci(st.ci95[m])}" for m in METRICS]]


def twins_markdown(r: TwinResult, name: str) -> str:
    lines = [f"# Twin phantoms (image grounding): {name}", ""]
    for score, sc in r.scores.items():
        rows = [_row("**all**", sc.overall)] + [_row(e, st) for e, st in sc.per_edit.items()]
        rows += [_row("random-score null (all pairs)", sc.null_random_scores),
                 ["chance", "", *[pct(CHANCE[m]) for m in METRICS]],
                 ["any text-only scorer", "", "0.0%", "—", "0.0%", "50.0%"],
                 ["any image-only scorer", "", "—", "0.0%", "0.0%", "—"]]
        lines += [f"## Score: {SCORE_NAMES.get(score, score)}", "",
                  md_table(["edit", "pairs", "text score", "image score", "group score", "pairwise (one direction)"],
                           rows)]
    b = r.bootstrap
    lines += [
        f"{r.pairs} twin pairs" + (f"; skipped: {', '.join(f'{k} {v}' for k, v in sorted(r.skipped.items()))}"
                                    if r.skipped else "") + ".",
        "",
        "Each pair: two images of one patient that differ in one fact (the edit), with reports that differ only in "
        "the words of that fact. Text score: each image scores its own report above its twin's; image score: each "
        "report scores its own image above its twin's; group: both. A scorer that ignores the image cannot pass the "
        "text score (0% by construction, so text priors cancel); one that ignores the text cannot pass the image "
        "score. Pairwise: the one-direction preference of the structure test (chance 50%). CI: percentile "
        f"bootstrap over pairs ({b.get('resamples')} resamples, seed {b.get('seed')}); pairs of one phantom share "
        "its side-0 image, so the CIs are somewhat narrow.",
        "",
    ]
    lines += [f"![twin scores per edit type]({name}.png)", ""]
    lines += examples_markdown(r.examples, f"{name}_examples.png")
    return "\n".join(lines) + "\n"


def examples_markdown(examples: Sequence[Mapping[str, Any]], figure: str) -> list[str]:
    """One pair per edit type, the words that differ in bold, and the figure of their images."""
    if not examples:
        return []
    rows = []
    for ex in examples:
        t0, t1 = highlighted(*ex["texts"])
        rows.append([ex["edit"], ex["finding"].replace("_", " "), t0, t1])
    return ["Example pairs (the differing words in bold):", "",
            md_table(["edit", "finding", "T0 (image 0)", "T1 (image 1)"], rows), f"![twin pairs, one per edit type]({figure})",
            ""]


def highlighted(a: str, b: str, mark: str = "**") -> tuple[str, str]:
    """Both texts with the words outside their common blocks wrapped in `mark`."""
    import difflib

    wa, wb = a.split(), b.split()
    oa, ob = list(wa), list(wb)
    for tag, i1, i2, j1, j2 in difflib.SequenceMatcher(None, wa, wb, autojunk=False).get_opcodes():
        if tag != "equal":
            oa[i1:i2] = [f"{mark}{w}{mark}" for w in wa[i1:i2]] if i2 > i1 else []
            ob[j1:j2] = [f"{mark}{w}{mark}" for w in wb[j1:j2]] if j2 > j1 else []
    return " ".join(oa), " ".join(ob)


def plot_twins(r: TwinResult, out_png: str | os.PathLike) -> Path:
    """Per score a bar group per edit type (and all): text, image, group score with 95 % CIs, and
    the chance lines (25 % text and image, 16.7 % group)."""
    fig = new_figure((6.5 * max(1, len(r.scores)), 4.2))
    axes = fig.subplots(1, max(1, len(r.scores)), squeeze=False)[0]
    colors = {"text": "#4C72B0", "image": "#DD8452", "group": "#55A868"}
    for ax, (score, sc) in zip(axes, r.scores.items(), strict=False):
        groups = [("all", sc.overall), *sc.per_edit.items()]
        x = np.arange(len(groups))
        for j, m in enumerate(("text", "image", "group")):
            vals = np.array([100 * (st.values[m] or 0.0) for _, st in groups])
            lo = np.array([100 * st.ci95[m][0] if st.ci95[m] else v for (_, st), v in zip(groups, vals, strict=True)])
            hi = np.array([100 * st.ci95[m][1] if st.ci95[m] else v for (_, st), v in zip(groups, vals, strict=True)])
            ax.bar(x + (j - 1) * 0.27, vals, 0.27, color=colors[m], label=f"{m} score",
                   yerr=[vals - lo, hi - vals], capsize=2)
        ax.axhline(25, color="0.3", ls="--", lw=1, label="chance text/image 25%")
        ax.axhline(100 / 6, color="0.3", ls=":", lw=1, label="chance group 16.7%")
        ax.set_xticks(x, [f"{g}\n(n={st.n})" for g, st in groups], fontsize=8)
        ax.set_ylim(0, 100)
        ax.set_ylabel("% of twin pairs")
        ax.set_title(f"Twin phantoms, {SCORE_NAMES.get(score, score)}", fontsize=10)
        ax.legend(fontsize=7, loc="upper right")
    return save_png(fig, out_png)


def _bold_words(text: str) -> str:
    """Matplotlib text with each run of **marked** words in one bold mathtext segment (line breaks kept)."""
    def line(words: list[str]) -> str:
        out: list[str] = []
        run: list[str] = []
        for w in [*words, ""]:
            marked = w.startswith("**") and w.endswith("**") and len(w) > 4
            if marked and re.fullmatch(r"[A-Za-z0-9.,-]+", w[2:-2]):
                run.append(w[2:-2].replace("-", "{-}"))
                continue
            if run:
                out.append("$\\mathbf{" + "\\ ".join(run) + "}$")
                run = []
            if w:
                out.append(f"[{w[2:-2]}]" if marked else w.replace("$", ""))
        return " ".join(out)

    return "\n".join(line(ln.split()) for ln in text.split("\n"))


def _wrap(text: str, width: int = 70) -> str:
    """Lines of at most `width` characters, not counting the ** marks."""
    lines: list[list[str]] = [[]]
    used = 0
    for w in text.split():
        n = len(w.replace("**", ""))
        if lines[-1] and used + 1 + n > width:
            lines.append([])
            used = 0
        used += n + (1 if lines[-1] else 0)
        lines[-1].append(w)
    return "\n".join(" ".join(ln) for ln in lines)


def plot_examples(examples: Sequence[Mapping[str, Any]], out_png: str | os.PathLike) -> Path:
    """One row per example twin pair: image 0, image 1, and the two reports (differing words bold)."""
    fig = new_figure((13.0, 2.9 * len(examples)))
    grid = fig.add_gridspec(len(examples), 3, width_ratios=[1, 1, 2.8])
    for i, ex in enumerate(examples):
        t0, t1 = highlighted(*ex["texts"])
        for k in (0, 1):
            ax = fig.add_subplot(grid[i, k])
            ax.imshow(ex["images"][k], cmap="gray", vmin=0, vmax=255)
            ax.set_axis_off()
            ax.set_title(f"image {k}", fontsize=9)
        ax = fig.add_subplot(grid[i, 2])
        ax.set_axis_off()
        ax.text(0, 1.0, f"{ex['edit']} ({ex['finding'].replace('_', ' ')})", va="top", fontsize=10,
                fontweight="bold", transform=ax.transAxes)
        ax.text(0, 0.84, "T0: " + _bold_words(_wrap(t0)), va="top", fontsize=8, transform=ax.transAxes)
        ax.text(0, 0.42, "T1: " + _bold_words(_wrap(t1)), va="top", fontsize=8, transform=ax.transAxes)
    return save_png(fig, out_png)


def collect_pairs(samples: Iterable[Any]) -> tuple[list[TwinPair], list[Any], dict[str, int]]:
    """The complete twin pairs of shard samples (meta.extra.twin), the samples their image rows index,
    and the counts of samples left out (not a twin record; a pair without both sides)."""
    sides: dict[str, dict[int, Any]] = {}
    skipped: Counter = Counter()
    for sample in samples:
        twin = (sample.meta.get("extra") or {}).get("twin")
        if not isinstance(twin, Mapping) or twin.get("side") not in (0, 1) or "pair" not in twin:
            skipped["not a twin record"] += 1
            continue
        sides.setdefault(str(twin["pair"]), {})[int(twin["side"])] = sample
    kept: list[Any] = []
    pairs: list[TwinPair] = []
    for pid, both in sides.items():
        if set(both) != {0, 1}:
            skipped["pair without both sides"] += len(both)
            continue
        tw = both[0].meta["extra"]["twin"]
        texts = (str(both[0].meta["text"]), str(both[1].meta["text"]))
        pairs.append(TwinPair(pid, str(tw["edit"]), str(tw["finding"]), texts, (len(kept), len(kept) + 1)))
        kept += [both[0], both[1]]
    return pairs, kept, dict(skipped)


def model_scores(encoder: Any, samples: Sequence[Any], pairs: Sequence[TwinPair], score: str,
                 batch_size: int = 32) -> np.ndarray:
    """s [P, 2, 2] of the model: s[p, i, t] = s(I_i, T_t) by the global cosine or the local S(I, T)."""
    from pertvl.evaluate.encoder import ImageBatcher
    from pertvl.evaluate.structure import anchors_and_scorer

    batcher = ImageBatcher(encoder, batch_size, regions=score == "local")
    for sample in samples:
        batcher.add(sample)
    texts = [t for p in pairs for t in p.texts]
    anchors, index, _, scorer = anchors_and_scorer(encoder, batcher, texts, score == "local", batch_size)
    prepared = scorer.prepare(anchors)
    img = np.array([p.images[i] for p in pairs for i in (0, 1) for _ in (0, 1)], dtype=np.int64)
    txt = np.array([index[p.texts[t]] for p in pairs for _ in (0, 1) for t in (0, 1)], dtype=np.int64)
    return np.asarray(scorer(prepared[img], txt), dtype=np.float64).reshape(len(pairs), 2, 2)


def examples_of(pairs: Sequence[TwinPair], samples: Sequence[Any]) -> list[dict[str, Any]]:
    """The first pair of each edit type, with its images and texts (for the report's figure)."""
    out = []
    for e in EDITS:
        p = next((p for p in pairs if p.edit == e), None)
        if p is not None:
            out.append({"edit": e, "finding": p.finding, "texts": p.texts,
                        "images": [np.asarray(samples[i].image) for i in p.images]})
    return out


def evaluate_twins(encoder: Any, samples: Iterable[Any], scores: Sequence[str] = ("global", "local"),
                   bootstrap: int = 1000, seed: int = 0, batch_size: int = 32) -> TwinResult:
    """The twin test of `encoder` on the twin records among `samples` (the local score only when the
    encoder has the local branch)."""
    pairs, kept, skipped = collect_pairs(samples)
    if not pairs:
        raise ValueError("no twin pairs among the samples: give the shards of `pertvl data twins` (--shards)")
    edits = [p.edit for p in pairs]
    usable = [s for s in scores if s != "local" or hasattr(encoder, "image_features")]
    result = {s: twin_scores(model_scores(encoder, kept, pairs, s, batch_size), edits, bootstrap, seed)
              for s in usable}
    return TwinResult(scores=result, pairs=len(pairs), pairs_per_edit=dict(Counter(edits)), skipped=skipped,
                      bootstrap={"resamples": bootstrap, "seed": seed}, examples=examples_of(pairs, kept))


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--scores", default="global,local",
                   help="comma-separated: global (cosine), local (S(I, T); needs the local branch) (default both)")
    add_bootstrap_arguments(p)
    p.add_argument("--twins", help="the twin shards (`pertvl data twins --shards`); default: SHARDS/twins when it "
                   "exists, else --shards itself")


def load(options: argparse.Namespace) -> Iterable[Any] | None:
    """The twin shards' samples of --split: --twins, else SHARDS/twins; None: read --shards itself."""
    from pertvl.data.shards import iter_samples

    folder = options.twins or (Path(options.shards) / TWINS_SUBFOLDER if options.shards else None)
    if folder is None or not (options.twins or (Path(folder) / "manifest.json").is_file()):
        return None
    return iter_samples(folder, options.split)


def run(encoder: Any, data: Iterable[Any], options: argparse.Namespace) -> TwinResult:
    scores = [s.strip() for s in str(options.scores).split(",") if s.strip()]
    bad = [s for s in scores if s not in SCORE_NAMES]
    if bad or not scores:
        raise SystemExit(f"pertvl: error: --scores: expected global and/or local, got {options.scores!r}")
    return evaluate_twins(encoder, data, scores, options.bootstrap, options.seed,
                          getattr(options, "batch_size", None) or 32)


EVALUATION = Evaluation(
    name="twins",
    help="twin-phantom grounding test: text, image and group score on image pairs that differ in one fact",
    description="Text, image and group score of the twin pairs of `pertvl data twins`, overall and per edit "
    "type with bootstrap CIs; writes NAME.json, NAME.md, NAME.png and NAME_examples.png.",
    add_arguments=add_arguments, run=run, load=load, result_type=TwinResult, schemas=(SCHEMA,),
    title="Twin phantoms: image grounding (text / image / group score)", suites=frozenset({Suite.DEMO}))
