"""The fine-tunes' files: NAME.json, NAME.md and the per-item predictions."""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
from pathlib import Path
from typing import Any

from pertvl.evaluate.finetune.chexpert import ChexpertResult
from pertvl.evaluate.finetune.metrics import ClassificationMetrics
from pertvl.evaluate.finetune.nli import NliCvResult, NliResult
from pertvl.evaluate.finetune.tasks import NLI_LABELS, UNCERTAIN_NAMES, format_skips
from pertvl.evaluate.markdown import markdown_table
from pertvl.files import atomic_write_text, write_json

log = logging.getLogger(__name__)


def format_number(x: float | None, pct: bool = False) -> str:
    if x is None:
        return "—"
    return f"{100 * x:.1f}%" if pct else f"{x:.3f}"


def _nli_class_tables(split: str, m: ClassificationMetrics) -> list[str]:
    rows = [[lab, format_number(c.precision), format_number(c.recall), format_number(c.f1), str(c.support)] for lab, c in m.per_class.items()]
    return [f"## {split}: per class", "", markdown_table(["class", "precision", "recall", "F1", "support"], rows), "",
            f"Confusion matrix ({split}; rows = true, columns = predicted):", "",
            markdown_table(["true \\ predicted", *m.labels],
                      [[lab, *map(str, row)] for lab, row in zip(m.labels, m.confusion, strict=True)]), ""]


def _truncation_note(d: dict[str, Any]) -> str:
    t = d.get("truncated")
    if not t:
        return ""
    return f"; {t['pairs']} pairs truncated at {t['max_length']} word pieces (longest {t['longest']})"


def nli_markdown(result: NliResult, title: str) -> str:
    scored = [(s, m) for s, m in (("dev", result.dev), ("test", result.test)) if m is not None]
    selection = (f"best dev epoch {result.best_epoch} of {len(result.history)}" if result.dev is not None
                 else f"protocol train/test: last epoch of {len(result.history)} (no dev set)")
    parts = [f"# {title}", "",
             f"Encoder: {result.info.get('encoder')} ({result.info.get('mode')}); {selection}.", "",
             markdown_table(["split", "n", "accuracy", "macro F1"],
                       [[s, str(m.n), format_number(m.accuracy, True), format_number(m.macro_f1)] for s, m in scored]), ""]
    for split, m in scored:
        parts += _nli_class_tables(split, m)
    parts.append("## Data")
    parts.append("")
    for split in ("train", "dev", "test"):
        if split not in result.data:
            continue
        d = result.data[split]
        labels = ", ".join(f"{lab} {n}" for lab, n in d["labels"].items())
        parts.append(f"- {split}: {d['examples']} examples ({labels}) from {d['file']} ({d['lines']} lines; "
                     f"skipped: {format_skips(d['skipped'])}{_truncation_note(d)})")
    return "\n".join(parts) + "\n"


def nli_cv_markdown(result: NliCvResult, title: str) -> str:
    d = result.data["file"]
    labels = ", ".join(f"{lab} {n}" for lab, n in d["labels"].items())
    rows = []
    for k, f in enumerate(result.folds, 1):
        tr, te = f.data["train"], f.data["test"]
        rows.append([str(k), str(tr["examples"]), str(te["examples"]),
                     " / ".join(str(te["labels"][lab]) for lab in NLI_LABELS),
                     format_number(f.test.accuracy, True), format_number(f.test.macro_f1)])
    parts = [f"# {title}", "",
             f"Encoder: {result.info.get('encoder')} ({result.info.get('mode')}); "
             f"{result.settings['protocol']} on {d['file']} ({d['examples']} examples: {labels}); "
             f"label-stratified folds (seed {result.settings['fold_seed']}); last epoch of each fold.", "",
             f"Accuracy: mean {format_number(result.mean_accuracy, True)} ± {100 * result.std_accuracy:.1f} (std over "
             f"folds); pooled out-of-fold accuracy {format_number(result.pooled.accuracy, True)}, macro F1 "
             f"{format_number(result.pooled.macro_f1)}.", "",
             markdown_table(["fold", "train", "test", "test entailment / contradiction / neutral", "accuracy", "macro F1"],
                       rows), ""]
    parts += _nli_class_tables("pooled out-of-fold", result.pooled)
    return "\n".join(parts) + "\n"


def chexpert_markdown(result: ChexpertResult, title: str) -> str:
    rows = [[name, format_number(s.auroc), format_number(s.accuracy, True), str(s.n), str(s.n_pos), str(s.n_neg),
             str(s.blank_negatives), f"{s.excluded_uncertain} / {s.excluded_blank}"]
            for name, s in result.per_label.items()]
    rows.append(["**mean**", format_number(result.mean_auroc), format_number(result.mean_accuracy, True), "", "", "", "", ""])
    d = result.data
    return "\n".join([
        f"# {title}", "",
        f"Encoder: {result.info.get('encoder')} ({result.info.get('mode')}); {result.settings['epochs']} epochs, "
        f"{result.settings['image_size']} px; uncertain policy {UNCERTAIN_NAMES[d['uncertain_policy']]}; "
        f"blank cells: {'negative (0)' if d.get('blank_policy', 'zero') == 'zero' else 'masked'}; "
        f"{'frontal views only' if d['frontal_only'] else 'all views'}.", "",
        markdown_table(["label", "AUROC", "accuracy", "n", "positives", "negatives", "of which blank",
                   "excluded (uncertain / blank)"], rows),
        "",
        f"Split: {d['split']['method']}. Train rows {d['train_rows']}, test rows {d['test_rows']} "
        f"({d['test_images_scored']} test images scored). Rows left out: {format_skips(d['rows_skipped'])}. Images "
        f"missing: {d['images_missing']}, undecodable: {d['images_undecodable']}.",
        "",
        "Accuracy at probability 0.5; 1/0 test labels are scored"
        + (", blank cells as negatives." if d.get("blank_policy", "zero") == "zero" else "; blank cells are not."),
    ]) + "\n"


def write_outputs(result: NliResult | NliCvResult | ChexpertResult, out_dir: str | os.PathLike,
                  name: str) -> dict[str, Path]:
    """Write NAME.json, NAME.md and the per-item predictions (NLI: NAME.predictions.jsonl with split,
    where, gold, predicted; CheXpert: NAME.predictions.csv with Path and per label the test value and
    the predicted probability), so any other metric can be computed from them.

    Returns:
        {"json": path, "markdown": path, "predictions": path}.
    """
    out = Path(out_dir)
    paths = {"json": out / f"{name}.json", "markdown": out / f"{name}.md"}
    write_json(paths["json"], result.to_json())
    if isinstance(result, NliCvResult):
        md = nli_cv_markdown(result, f"NLI cross-validation: {name}")
        paths["predictions"] = out / f"{name}.predictions.jsonl"
        lines = [json.dumps({"split": f"fold{k}", "where": where, "gold": NLI_LABELS[gold],
                             "predicted": NLI_LABELS[pred]})
                 for k, fold in enumerate(result.folds, 1) for where, gold, pred in fold.predictions["test"]]
        atomic_write_text(paths["predictions"], "".join(line + "\n" for line in lines))
    elif isinstance(result, NliResult):
        md = nli_markdown(result, f"NLI fine-tuning: {name}")
        paths["predictions"] = out / f"{name}.predictions.jsonl"
        lines = [json.dumps({"split": split, "where": where, "gold": NLI_LABELS[gold], "predicted": NLI_LABELS[pred]})
                 for split, items in result.predictions.items() for where, gold, pred in items]
        atomic_write_text(paths["predictions"], "".join(line + "\n" for line in lines))
    else:
        md = chexpert_markdown(result, f"CheXpert fine-tuning: {name}")
        paths["predictions"] = out / f"{name}.predictions.csv"
        labels = list(result.per_label)
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(["Path", *labels, *[f"{lab} probability" for lab in labels]])
        for path, values, probs in result.predictions:
            w.writerow([path, *["" if math.isnan(v) else f"{v:.1f}" for v in values], *[f"{p:.9g}" for p in probs]])
        atomic_write_text(paths["predictions"], buf.getvalue())
    atomic_write_text(paths["markdown"], md)
    return paths
