"""NLI fine-tuning (Table III: MedNLI / RadNLI): the JSONL files, the sentence-pair fine-tune or probe, k-fold cross-validation.

See pertvl.evaluate.finetune for the protocols."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pertvl.evaluate.evaluation import Finetune, JsonResult, MetricInfo, to_json
from pertvl.evaluate.finetune.fit import (
    MAX_LISTED_PROBLEMS,
    EpochLog,
    FitSettings,
    encode_all,
    feature_loader,
    fit,
    fit_settings,
    format_number,
    format_skips,
    item_loader,
    linear_head,
    param_groups,
    seeded_generator,
    standardize,
)
from pertvl.evaluate.report import md_table, pct, print_paths, run_info, write_result
from pertvl.evaluate.torch_encoder import pick_device
from pertvl.files import atomic_write_text
from pertvl.train.rundir import RunDir

log = logging.getLogger(__name__)

# Word pieces per NLI sentence pair: MedNLI's longest pairs reach ~200+ pieces with BERT WordPiece
# vocabularies; 256 covers them (the authors used 512, which only pads). Longer pairs are truncated
# and reported; the value is capped at the encoder's max_position_embeddings.
NLI_MAX_LENGTH = 256
NLI_SCHEMA = "pertvl-finetune-nli/1"
NLI_CV_SCHEMA = "pertvl-finetune-nli-cv/1"
NLI_LABELS = ("entailment", "contradiction", "neutral")


@dataclass
class ClassScores:
    precision: float
    recall: float
    f1: float
    support: int


@dataclass
class ClassificationMetrics:
    """Single-label scores from one confusion matrix (rows = true, columns = predicted); an undefined
    precision/recall/F1 is 0.0 (scikit-learn's zero_division=0)."""

    n: int
    accuracy: float
    per_class: dict[str, ClassScores]
    macro_f1: float
    labels: list[str]
    confusion: list[list[int]]


def classification_metrics(y_true: Sequence[int], y_pred: Sequence[int],
                           labels: Sequence[str] = NLI_LABELS) -> ClassificationMetrics:
    """Accuracy, per-class precision/recall/F1/support and macro F1 (checked against sklearn's
    classification_report in the tests)."""
    y_true, y_pred = np.asarray(y_true, dtype=np.int64), np.asarray(y_pred, dtype=np.int64)
    k = len(labels)
    cm = np.zeros((k, k), dtype=np.int64)
    np.add.at(cm, (y_true, y_pred), 1)
    tp = np.diag(cm).astype(np.float64)
    predicted, support = cm.sum(0).astype(np.float64), cm.sum(1)
    precision = np.divide(tp, predicted, out=np.zeros(k), where=predicted > 0)
    recall = np.divide(tp, support, out=np.zeros(k), where=support > 0)
    denom = precision + recall
    f1 = np.divide(2 * precision * recall, denom, out=np.zeros(k), where=denom > 0)
    n = int(y_true.size)
    return ClassificationMetrics(
        n=n, accuracy=float(tp.sum() / n) if n else 0.0,
        per_class={lab: ClassScores(float(precision[i]), float(recall[i]), float(f1[i]), int(support[i]))
                   for i, lab in enumerate(labels)},
        macro_f1=float(f1.mean()), labels=list(labels), confusion=cm.tolist())


@dataclass
class NliExample:
    premise: str
    hypothesis: str
    label: int  # index into NLI_LABELS
    where: str  # "file:line"


@dataclass
class NliFile:
    """One MedNLI/RadNLI jsonl file: the usable examples and what was skipped (reason → count,
    and the first MAX_LISTED_PROBLEMS problems as "file:line: reason")."""

    path: str
    examples: list[NliExample]
    lines: int  # non-blank lines read
    skipped: dict[str, int] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)

    def label_counts(self) -> dict[str, int]:
        counts = Counter(NLI_LABELS[e.label] for e in self.examples)
        return {lab: counts.get(lab, 0) for lab in NLI_LABELS}

    def counts_text(self) -> str:
        """"entailment N, contradiction N, neutral N"."""
        return ", ".join(f"{lab} {n}" for lab, n in self.label_counts().items())

    def summary(self) -> dict[str, Any]:
        return {"file": self.path, "lines": self.lines, "examples": len(self.examples),
                "labels": self.label_counts(), "skipped": dict(self.skipped), "problems": self.problems}

    def describe(self) -> str:
        """One line: examples per label, lines read, skips (printed by the CLI)."""
        return (f"{self.path}: {len(self.examples)} examples ({self.counts_text()}; {self.lines} lines; "
                f"skipped: {format_skips(self.skipped)})")

    def subset(self, indices: Sequence[int], name: str) -> NliFile:
        """The examples at `indices` as an NliFile named `name` (a cross-validation fold)."""
        return NliFile(name, [self.examples[i] for i in indices], len(indices))


def nli_folds(examples: Sequence[NliExample], k: int, seed: int) -> list[list[int]]:
    """k label-stratified folds of example indices: each label's examples permuted by default_rng(seed)
    and dealt round-robin. ValueError for k < 2 or more folds than examples."""
    if k < 2:
        raise ValueError(f"cross-validation: expected at least 2 folds, got {k}")
    if k > len(examples):
        raise ValueError(f"cross-validation: {k} folds need at least {k} examples, got {len(examples)}")
    rng = np.random.default_rng(seed)
    folds: list[list[int]] = [[] for _ in range(k)]
    at = 0
    for label in range(len(NLI_LABELS)):
        idx = [i for i, e in enumerate(examples) if e.label == label]
        for i in rng.permutation(len(idx)):
            folds[at % k].append(idx[i])
            at += 1
    return [sorted(f) for f in folds]


def read_nli(path: str | os.PathLike) -> NliFile:
    """A MedNLI/RadNLI jsonl file (sentence1, sentence2, gold_label); bad lines are skipped, counted by
    reason and named (file:line). FileNotFoundError; ValueError when no example is usable."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such NLI file")
    examples: list[NliExample] = []
    skipped: Counter[str] = Counter()
    problems: list[str] = []
    lines = 0
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            lines += 1
            where = f"{path}:{number}"
            try:
                obj = json.loads(line)
                reason = None if isinstance(obj, dict) else f"not a JSON object ({type(obj).__name__})"
            except json.JSONDecodeError as e:
                obj, reason = None, f"not JSON ({e.msg})"
            if reason is None:
                reason = _nli_problem(obj)
            if reason is not None:
                skipped[reason] += 1
                if len(problems) < MAX_LISTED_PROBLEMS:
                    problems.append(f"{where}: {reason}")
                continue
            label = NLI_LABELS.index(str(obj["gold_label"]).strip().lower())
            examples.append(NliExample(obj["sentence1"].strip(), obj["sentence2"].strip(), label, where))
    if skipped:
        log.warning("%s: skipped %d of %d lines (%s); first: %s", path, sum(skipped.values()), lines,
                    ", ".join(f"{k} ×{v}" for k, v in skipped.items()), problems[0])
    if not examples:
        raise ValueError(f"{path}: no usable NLI example in {lines} lines"
                         + (f" (skipped: {dict(skipped)})" if skipped else ""))
    return NliFile(str(path), examples, lines, dict(skipped), problems)


def _nli_problem(obj: dict) -> str | None:
    for key in ("sentence1", "sentence2"):
        value = obj.get(key)
        if value is None:
            return f"missing {key}"
        if not isinstance(value, str) or not value.strip():
            return f"empty or non-text {key}"
    label = obj.get("gold_label")
    if label is None:
        return "missing gold_label"
    if str(label).strip().lower() not in NLI_LABELS:
        return f"gold_label {label!r} not one of {'/'.join(NLI_LABELS)}"
    return None


def _nli_class_tables(split: str, m: ClassificationMetrics) -> list[str]:
    rows = [[lab, format_number(c.precision), format_number(c.recall), format_number(c.f1), str(c.support)] for lab, c in m.per_class.items()]
    return [f"## {split}: per class", "", md_table(["class", "precision", "recall", "F1", "support"], rows),
            f"Confusion matrix ({split}; rows = true, columns = predicted):", "",
            md_table(["true \\ predicted", *m.labels],
                     [[lab, *map(str, row)] for lab, row in zip(m.labels, m.confusion, strict=True)])]


def _write_predictions(path: Path, splits: Iterable[tuple[str, list[tuple[str, int, int]]]]) -> dict[str, Path]:
    """NAME.predictions.jsonl: split, where (file:line), gold and predicted label of every scored item."""
    atomic_write_text(path, "".join(json.dumps({"split": split, "where": where, "gold": NLI_LABELS[gold],
                                                "predicted": NLI_LABELS[pred]}) + "\n"
                                    for split, items in splits for where, gold, pred in items))
    return {"predictions": path}


def _truncation_note(d: dict[str, Any]) -> str:
    t = d.get("truncated")
    if not t:
        return ""
    return f"; {t['pairs']} pairs truncated at {t['max_length']} word pieces (longest {t['longest']})"


@dataclass
class NliResult(JsonResult):
    """Its JSON: schema, info, settings, data, history, best_epoch, dev, test (the per-item predictions
    live in NAME.predictions.jsonl)."""

    SCHEMAS, WHAT = (NLI_SCHEMA,), "NLI fine-tune"

    dev: ClassificationMetrics | None  # None without a dev file (train/test protocol)
    test: ClassificationMetrics
    history: list[EpochLog]
    best_epoch: int
    data: dict[str, Any]
    settings: dict[str, Any]
    info: dict[str, Any]
    predictions: dict[str, list[tuple[str, int, int]]] = field(default_factory=dict)  # split → (file:line, gold, pred)
    schema: str = NLI_SCHEMA

    def to_json(self) -> dict[str, Any]:
        return {"schema": self.schema, "info": self.info, "settings": self.settings, "data": self.data,
                "history": to_json(self.history), "best_epoch": self.best_epoch, "dev": to_json(self.dev),
                "test": to_json(self.test)}

    def markdown(self, name: str) -> str:
        scored = [(s, m) for s, m in (("dev", self.dev), ("test", self.test)) if m is not None]
        selection = (f"best dev epoch {self.best_epoch} of {len(self.history)}" if self.dev is not None
                     else f"protocol train/test: last epoch of {len(self.history)} (no dev set)")
        parts = [f"# NLI fine-tuning: {name}", "",
                 f"Encoder: {self.info.get('encoder')} ({self.info.get('mode')}); {selection}.", "",
                 md_table(["split", "n", "accuracy", "macro F1"],
                          [[s, str(m.n), pct(m.accuracy), format_number(m.macro_f1)]
                           for s, m in scored])]
        for split, m in scored:
            parts += _nli_class_tables(split, m)
        parts.append("## Data")
        parts.append("")
        for split in ("train", "dev", "test"):
            if split not in self.data:
                continue
            d = self.data[split]
            labels = ", ".join(f"{lab} {n}" for lab, n in d["labels"].items())
            parts.append(f"- {split}: {d['examples']} examples ({labels}) from {d['file']} ({d['lines']} lines; "
                         f"skipped: {format_skips(d['skipped'])}{_truncation_note(d)})")
        return "\n".join(parts) + "\n"

    def figures(self, out_dir: Path, name: str) -> dict[str, Path]:
        return _write_predictions(Path(out_dir) / f"{name}.predictions.jsonl", self.predictions.items())

    def metrics(self) -> dict[str, float | None]:
        """"nli/DATASET/accuracy" and "nli/DATASET/macro_f1" on the test file (DATASET: info["dataset"],
        `pertvl finetune nli --dataset`; "nli/accuracy" without one), so one run's data sets are distinct columns."""
        dataset = self.info.get("dataset")
        prefix = f"nli/{dataset}" if dataset else "nli"
        return {f"{prefix}/accuracy": self.test.accuracy, f"{prefix}/macro_f1": self.test.macro_f1}

    @classmethod
    def metric_info(cls, key: str) -> MetricInfo:
        """Table III: test accuracy (in the summary; chance 1/3 on balanced labels), macro F1."""
        parts = key.split("/")
        dataset, metric = (parts[1], parts[2]) if len(parts) == 3 else ("", parts[-1])
        name = f"NLI {dataset}".strip()
        if metric == "accuracy":
            return MetricInfo(f"{name} accuracy", order=(dataset, 0), chance=1 / len(NLI_LABELS), summary=True)
        return MetricInfo(f"{name} {metric.replace('_', ' ')}", percent=False, order=(dataset, 1))


def finetune_nli(train: NliFile, dev: NliFile | None, test: NliFile, *, run: str | os.PathLike | None = None,
                 text_model: str | os.PathLike | None = None, export: str | os.PathLike | None = None,
                 settings: FitSettings | None = None, max_length: int = NLI_MAX_LENGTH,
                 info: dict[str, Any] | None = None) -> NliResult:
    """Fine-tune (or probe) a text encoder (exactly one of run / text_model / export) on NLI and score dev
    and test: without dev the last epoch is scored, with dev the best dev epoch. Pairs longer than
    `max_length` word pieces are truncated and counted per file."""
    import torch

    if sum(x is not None for x in (run, text_model, export)) != 1:
        raise ValueError("give exactly one of run / text_model / export")
    if max_length < 8:
        raise ValueError(f"max_length: expected at least 8 word pieces per pair, got {max_length}")
    settings = settings or FitSettings()
    if export is not None and not settings.freeze_encoder:
        settings = dataclasses.replace(settings, freeze_encoder=True)
    device = pick_device(settings.device)
    generator = seeded_generator(settings.seed)
    info = dict(info or {})
    splits = [("train", train), ("test", test)] if dev is None else [("train", train), ("dev", dev), ("test", test)]
    y = {name: torch.tensor([e.label for e in f.examples]) for name, f in splits}
    truncated: dict[str, dict[str, Any]] = {}

    if export is not None:
        from pertvl.infer import Embedder

        embedder = Embedder.from_export(export, batch_size=max(settings.batch_size, 32))
        info.update(encoder="onnx-probe", export=str(export), features="[u, v, |u-v|, u*v] of the global embeddings",
                    text="each sentence as the export's manifest says (its cleaning and max_length)")
        feats = {name: _pair_embeddings(embedder, f.examples) for name, f in splits}
        backbone = None
    else:
        if run is not None:
            dual, path = RunDir(run).load_model()
            backbone, tokenizer = dual.text.backbone, dual.tokenizer
            del dual  # the image tower and the projection heads are not used
            info.update(encoder="torch-run", run=str(run), model=str(path))
        else:
            from pertvl.model.text import load_text_backbone

            backbone, tokenizer = load_text_backbone(text_model)
            info.update(encoder="hf-text", text_model=str(text_model))
        backbone = backbone.to(device)
        backbone.requires_grad_(not settings.freeze_encoder)
        positions = getattr(backbone.config, "max_position_embeddings", None)
        if positions and max_length > int(positions):
            print(f"note: max_length {max_length} > the encoder's {positions} positions: pairs are cut at "
                  f"{positions} word pieces", flush=True)
            max_length = int(positions)
        collate = NliCollate(tokenizer, max_length)
        for name, f in splits:
            truncated[name] = nli_truncation(tokenizer, f.examples, max_length)
            t = truncated[name]
            if t["pairs"]:
                print(f"warning: {f.path}: {t['pairs']} of {len(f.examples)} sentence pairs exceed {max_length} "
                      f"word pieces (longest {t['longest']}) and are truncated; first: {t['first']}", flush=True)
                log.warning("%s: %d pairs truncated at %d word pieces", f.path, t["pairs"], max_length)

        def encode(batch):
            return backbone(**{k: v.to(device) for k, v in batch.items() if k != "labels"},
                            return_dict=True).last_hidden_state[:, 0]

        feats = None
        if settings.freeze_encoder:
            backbone.eval()
            feats = {}
            for name, f in splits:
                feats[name] = encode_all(encode, item_loader(f.examples, collate, settings.batch_size), device, settings)
    info["mode"] = "frozen encoder (linear probe)" if settings.freeze_encoder else "fine-tuned end to end"

    in_dim = int(feats["train"].shape[1]) if feats is not None else int(backbone.config.hidden_size)
    head = linear_head(in_dim, len(NLI_LABELS), settings.dropout).to(device)
    loss_fn = torch.nn.CrossEntropyLoss()
    if feats is not None:  # frozen: the head trains on precomputed, standardized features
        feats = standardize(feats, "train")
        module = head
        loader = feature_loader(feats["train"], y["train"], batch_size=settings.batch_size, shuffle=True,
                                 generator=generator)

        def step(batch):
            x, t = (b.to(device) for b in batch)
            return loss_fn(head(x).float(), t)

        def predict(name: str) -> np.ndarray:
            with torch.inference_mode():
                return head(feats[name].to(device)).float().argmax(1).cpu().numpy()

        groups = param_groups([], head.parameters(), settings)
    else:
        module = torch.nn.ModuleDict({"backbone": backbone, "head": head})
        loader = item_loader(train.examples, collate, settings.batch_size, shuffle=True, generator=generator)

        def step(batch):
            return loss_fn(head(encode(batch)).float(), batch["labels"].to(device))

        def predict(name: str) -> np.ndarray:
            loader = item_loader({"dev": dev, "test": test}[name].examples, collate, settings.batch_size)
            return encode_all(lambda batch: head(encode(batch)), loader, device, settings).argmax(1).numpy()

        groups = param_groups(backbone.parameters(), head.parameters(), settings)

    def on_epoch(epoch: int) -> dict[str, float | None]:
        return {"dev_accuracy": float((predict("dev") == y["dev"].numpy()).mean())}

    if dev is not None:
        history, best = fit(module, groups, loader, step, settings, device, on_epoch,
                            select=lambda m: m["dev_accuracy"])
    else:
        history, best = fit(module, groups, loader, step, settings, device)
    scored = [(name, f) for name, f in splits if name != "train"]
    preds = {name: predict(name) for name, _ in scored}
    result = {name: classification_metrics(y[name].numpy(), preds[name]) for name, _ in scored}
    predictions = {name: [(e.where, e.label, int(p)) for e, p in zip(f.examples, preds[name], strict=True)]
                   for name, f in scored}
    settings_json = {**asdict(settings), "device": str(device), "max_length": max_length,
                     "protocol": "train/dev/test" if dev is not None else "train/test",
                     "selection": "best dev accuracy (first on ties)" if dev is not None else "last epoch (no dev set)"}
    data: dict[str, Any] = {name: f.summary() for name, f in splits}
    for name, t in truncated.items():
        data[name]["truncated"] = t
    data.update(labels=list(NLI_LABELS),
                text="raw sentences to the model's tokenizer as a pair (no report cleaning)"
                if export is None else "the export's own text pipeline")
    return NliResult(result.get("dev"), result["test"], history, best, data, settings_json, info, predictions)


def nli_truncation(tokenizer, examples: Sequence[NliExample], max_length: int) -> dict[str, Any]:
    """How many sentence pairs exceed `max_length` word pieces ([CLS] a [SEP] b [SEP]) untruncated:
    {"pairs", "longest", "max_length", "first" (file:line of the first)}."""
    if not examples:
        return {"pairs": 0, "longest": 0, "max_length": max_length, "first": None}
    enc = tokenizer([e.premise for e in examples], [e.hypothesis for e in examples], truncation=False,
                    add_special_tokens=True)
    lengths = [len(ids) for ids in enc["input_ids"]]
    over = [i for i, n in enumerate(lengths) if n > max_length]
    return {"pairs": len(over), "longest": max(lengths), "max_length": max_length,
            "first": examples[over[0]].where if over else None}


@dataclass
class NliCvResult:
    """k-fold cross-validation on one NLI file (cross_validate_nli)."""

    folds: list[NliResult]  # per fold: the held-out fold is its test
    pooled: ClassificationMetrics  # over every example's out-of-fold prediction
    data: dict[str, Any]
    settings: dict[str, Any]
    info: dict[str, Any]
    schema: str = NLI_CV_SCHEMA

    @property
    def fold_accuracies(self) -> list[float]:
        return [f.test.accuracy for f in self.folds]

    @property
    def mean_accuracy(self) -> float:
        return float(np.mean(self.fold_accuracies))

    @property
    def std_accuracy(self) -> float:
        return float(np.std(self.fold_accuracies, ddof=1)) if len(self.folds) > 1 else 0.0

    def to_json(self) -> dict[str, Any]:
        return {"schema": self.schema, "info": self.info, "settings": self.settings, "data": self.data,
                "folds": [{"fold": k, "history": to_json(f.history), "train": f.data["train"],
                           "test": {**f.data["test"], "metrics": to_json(f.test)}}
                          for k, f in enumerate(self.folds, 1)],
                "accuracy": {"per_fold": self.fold_accuracies, "mean": self.mean_accuracy, "std": self.std_accuracy},
                "pooled": to_json(self.pooled)}

    def markdown(self, name: str) -> str:
        d = self.data["file"]
        labels = ", ".join(f"{lab} {n}" for lab, n in d["labels"].items())
        rows = []
        for k, f in enumerate(self.folds, 1):
            tr, te = f.data["train"], f.data["test"]
            rows.append([str(k), str(tr["examples"]), str(te["examples"]),
                         " / ".join(str(te["labels"][lab]) for lab in NLI_LABELS),
                         pct(f.test.accuracy), format_number(f.test.macro_f1)])
        parts = [f"# NLI cross-validation: {name}", "",
                 f"Encoder: {self.info.get('encoder')} ({self.info.get('mode')}); "
                 f"{self.settings['protocol']} on {d['file']} ({d['examples']} examples: {labels}); "
                 f"label-stratified folds (seed {self.settings['fold_seed']}); last epoch of each fold.", "",
                 f"Accuracy: mean {pct(self.mean_accuracy)} ± {100 * self.std_accuracy:.1f} (std over "
                 f"folds); pooled out-of-fold accuracy {pct(self.pooled.accuracy)}, macro F1 "
                 f"{format_number(self.pooled.macro_f1)}.", "",
                 md_table(["fold", "train", "test", "test entailment / contradiction / neutral", "accuracy",
                           "macro F1"], rows)]
        parts += _nli_class_tables("pooled out-of-fold", self.pooled)
        return "\n".join(parts) + "\n"

    def figures(self, out_dir: Path, name: str) -> dict[str, Path]:
        """Every example's out-of-fold prediction (split "foldK")."""
        return _write_predictions(Path(out_dir) / f"{name}.predictions.jsonl",
                                  ((f"fold{k}", fold.predictions["test"]) for k, fold in enumerate(self.folds, 1)))


def cross_validate_nli(data: NliFile, folds: int = 5, *, seed: int = 0, run: str | os.PathLike | None = None,
                       text_model: str | os.PathLike | None = None, export: str | os.PathLike | None = None,
                       settings: FitSettings | None = None, max_length: int = NLI_MAX_LENGTH,
                       info: dict[str, Any] | None = None,
                       on_fold: Callable[[int, NliFile, NliFile], None] | None = None) -> NliCvResult:
    """k-fold cross-validation on one file (`nli_folds`): fold k trains a fresh encoder on the other folds
    (last epoch) and is tested on itself; on_fold(k, train, test) is called before each fold trains."""
    settings = settings or FitSettings()
    parts = nli_folds(data.examples, folds, seed)
    results: list[NliResult] = []
    gold, pred = [], []
    for k, test_idx in enumerate(parts, 1):
        held = set(test_idx)
        train_idx = [i for i in range(len(data.examples)) if i not in held]
        train_k = data.subset(train_idx, f"{data.path} (fold {k} of {folds}: train)")
        test_k = data.subset(test_idx, f"{data.path} (fold {k} of {folds}: test)")
        if on_fold is not None:
            on_fold(k, train_k, test_k)
        r = finetune_nli(train_k, None, test_k, run=run, text_model=text_model, export=export, settings=settings,
                         max_length=max_length, info=info)
        results.append(r)
        gold += [g for _, g, _ in r.predictions["test"]]
        pred += [p for _, _, p in r.predictions["test"]]
    first = results[0]
    settings_json = {**first.settings, "protocol": f"{folds}-fold cross-validation", "folds": folds, "fold_seed": seed,
                     "selection": "last epoch of each fold"}
    summary = {"file": data.summary(), "folds": [len(p) for p in parts], "labels": list(NLI_LABELS),
               "text": first.data["text"]}
    return NliCvResult(results, classification_metrics(gold, pred), summary, settings_json, dict(first.info))


class NliCollate:
    """Examples → HF sentence-pair encoding ("[CLS] premise [SEP] hypothesis [SEP]", truncated to
    max_length word pieces, longest-first) + labels."""

    def __init__(self, tokenizer, max_length: int):
        self.tokenizer, self.max_length = tokenizer, max_length

    def __call__(self, examples: list[NliExample]) -> dict[str, Any]:
        import torch

        # The sentences as written: the tokenizer normalizes them as its model expects (an uncased
        # BERT lowercases and strips accents itself); report cleaning would drop "n't" cues.
        enc = self.tokenizer([e.premise for e in examples], [e.hypothesis for e in examples],
                             padding=True, truncation=True, max_length=self.max_length, return_tensors="pt")
        batch = {k: v for k, v in enc.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
        batch["labels"] = torch.tensor([e.label for e in examples])
        return batch


def _pair_embeddings(embedder, examples: Sequence[NliExample]):
    """[u, v, |u-v|, u*v] from the export's L2-normalized text embeddings (each distinct text once)."""
    import torch

    from pertvl.evaluate.encoder import embed_texts_unique

    texts = [e.premise for e in examples] + [e.hypothesis for e in examples]
    index, emb = embed_texts_unique(embedder, texts, batch_size=embedder.batch_size)
    u = emb[[index[e.premise] for e in examples]]
    v = emb[[index[e.hypothesis] for e in examples]]
    return torch.from_numpy(np.concatenate([u, v, np.abs(u - v), u * v], axis=1).astype(np.float32))


def nli_protocol(args) -> str:
    """"train/dev/test", "train/test" or "cv" from the CLI arguments; ValueError for a bad mix."""
    if args.cv is not None:
        if args.dev or args.test:
            raise ValueError("--cv K cross-validates on --train alone; drop --dev/--test (or drop --cv for the "
                             "train/dev/test or train/test protocol)")
        return "cv"
    if not args.test:
        raise ValueError("give --test JSONL (train/test or train/dev/test protocol) or --cv K (cross-validation "
                         "on --train)")
    return "train/dev/test" if args.dev else "train/test"


def nli_cli_main(args) -> int:
    try:
        protocol = nli_protocol(args)
        if args.export and not args.freeze_encoder:
            print("note: --export holds no torch weights: the ONNX encoder stays frozen and a linear probe "
                  "is trained on its embeddings (fine-tuning needs --run)", flush=True)
        info = {**run_info(), **({"dataset": args.dataset} if args.dataset else {})}
        common = dict(run=args.run, text_model=args.text_model, export=args.export,
                      settings=fit_settings(args, "nli"), max_length=args.max_length, info=info)
        if protocol == "cv":
            data = read_nli(args.train)
            print(data.describe(), flush=True)
            print(f"protocol: {args.cv}-fold cross-validation on {data.path} (label-stratified, seed {args.seed}; "
                  "last epoch of each fold)", flush=True)

            def on_fold(k: int, train: NliFile, test: NliFile) -> None:
                print(f"fold {k}/{args.cv}: train {len(train.examples)} ({train.counts_text()}), test "
                      f"{len(test.examples)} ({test.counts_text()})", flush=True)

            result: NliResult | NliCvResult = cross_validate_nli(data, args.cv, seed=args.seed, on_fold=on_fold,
                                                                 **common)
        else:
            train = read_nli(args.train)
            dev = read_nli(args.dev) if args.dev else None
            test = read_nli(args.test)
            for f in (train, dev, test):
                if f is not None:
                    print(f.describe(), flush=True)
            print(f"protocol: {protocol}" + (" (best dev epoch)" if dev else " (last epoch; no dev set)"), flush=True)
            result = finetune_nli(train, dev, test, **common)
    except (FileNotFoundError, ValueError) as e:
        print(f"pertvl finetune nli: {e}", file=sys.stderr)
        return 2
    paths = write_result(result, args.out, args.name or "nli")
    if isinstance(result, NliCvResult):
        print(f"NLI {args.cv}-fold CV: accuracy {100 * result.mean_accuracy:.1f}% ± {100 * result.std_accuracy:.1f} "
              f"(per fold: {', '.join(f'{100 * a:.1f}%' for a in result.fold_accuracies)}); pooled out-of-fold "
              f"accuracy {100 * result.pooled.accuracy:.1f}% (macro F1 {result.pooled.macro_f1:.3f})")
    else:
        dev_part = (f"dev accuracy {100 * result.dev.accuracy:.1f}% (macro F1 {result.dev.macro_f1:.3f}), "
                    if result.dev is not None else "")
        print(f"NLI: {dev_part}test accuracy {100 * result.test.accuracy:.1f}% (macro F1 "
              f"{result.test.macro_f1:.3f}); " + (f"best epoch {result.best_epoch}" if result.dev is not None
                                                  else f"last epoch {result.best_epoch}"))
    print_paths(paths)
    return 0


FINETUNE = Finetune("nli", "nli", "Table III: NLI fine-tuning of the text tower", NliResult, (NLI_SCHEMA,))
