"""`pertvl ablate`: the paper's loss configurations (and variants) × seeds, trained and evaluated alike.

Per seed and row (a preset of pertvl.losses.LOSS_PRESETS, or a --variant NAME:key=value,...), in
OUT/<row>-s<seed>/: train (`pertvl train` under torchrun, the one config with the row's `--set`
overrides, so rows differ only in those), optionally export, then Table IV (the ABLATE suite's
evaluations on --split), Table II (`pertvl finetune chexpert`) and Table III (`pertvl finetune nli`;
pertvl.evaluate.ablate_finetune). Fine-tunes default to linear probes (the cost: docs/FINETUNE.md).
--holdout-type T retrains the L_pert presets without T and writes OUT/holdout.{md,json}. Then
OUT/comparison.{md,json,png} (mean ± sample std over seeds) and OUT/runs.json. Stages are
pertvl.pipeline stages: a finished stage with unchanged parameters (the weights' sha256 included)
is skipped on re-run.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pertvl import pipeline
from pertvl.data.records import PERTURBATION_TYPES, write_json
from pertvl.evaluate.ablate_finetune import DEFAULT_MODES, TABLES, FinetuneMode, FinetuneSpec, finetune_specs
from pertvl.files import sha256_file

log = logging.getLogger(__name__)

STRUCTURE = "structure"  # the key of the structure evaluation (Table IV; the holdout table reads its JSON)


def paper_presets() -> tuple[str, ...]:
    """The built-in loss presets (the paper's rows), the default of --presets."""
    from pertvl.losses import LOSS_PRESETS

    return tuple(LOSS_PRESETS)


def evaluations() -> list:
    """The evaluations of the ABLATE suite that read shard samples (table order)."""
    from pertvl.evaluate.catalog import in_suite
    from pertvl.evaluate.evaluation import Suite

    return in_suite(Suite.ABLATE)


@dataclass(frozen=True)
class Variant:
    """One more row of the ablation: NAME, trained with `pertvl train --set` overrides on top of the
    config; a `data.shards=DIR` override trains it on other shards packed from the same pairs."""

    name: str
    overrides: tuple[str, ...]

    @property
    def shards(self) -> str | None:
        """The variant's training shards (its data.shards override), or None for the ablation's."""
        from pertvl.config import parse_override

        found = [parse_override(o).get("data", {}).get("shards") for o in self.overrides]
        return next((str(x) for x in reversed(found) if x is not None), None)


@dataclass(frozen=True)
class AblationRun:
    preset: str
    seed: int
    root: Path
    holdout: str | None = None  # the perturbation type L_pert is trained without (--holdout-type)
    variant: Variant | None = None  # a --variant row (preset: the variant's name)

    @property
    def name(self) -> str:
        return f"{self.preset}-s{self.seed}" if self.holdout is None else f"{self.preset}-without_{self.holdout}-s{self.seed}"

    def pert_types(self) -> list[str] | None:
        """loss.pert_types of the run: every type of the batch but the held-out one (None: the default)."""
        if self.holdout is None:
            return None
        return [t for t in PERTURBATION_TYPES if t != self.holdout]

    @property
    def dir(self) -> Path:
        return self.root / self.name

    @property
    def weights(self) -> Path:
        return self.dir / "final" / "model.safetensors"

    @property
    def export(self) -> Path:
        return self.dir / "export"

    @property
    def eval_dir(self) -> Path:
        return self.dir / "eval"

    def eval_json(self, evaluation: str) -> Path:
        return self.eval_dir / f"{evaluation}.json"

    @property
    def finetune_dir(self) -> Path:
        return self.dir / "finetune"


@dataclass
class AblationSettings:
    config: str
    shards: str
    presets: tuple[str, ...] = field(default_factory=paper_presets)
    seeds: tuple[int, ...] = (0, 1, 2)
    out: str = "runs/ablate"
    max_steps: int | None = None
    nproc: int = 2
    eval_with: str = "torch"
    split: str = "test"
    bootstrap: int = 1000
    no_wandb: bool = False
    force: bool = False
    holdout_types: tuple[str, ...] = ()  # leave-one-type-out: the types to hold out, one run each
    variants: tuple[Variant, ...] = ()  # more rows: --variant NAME:key=value[,key=value]
    tables: tuple[str, ...] = ("II", "III", "IV")  # pertvl.evaluate.ablate_finetune.TABLES
    corpus: str | None = None  # the phantom corpus of Tables II/III (None: the shards' manifest says)
    finetune_modes: dict[str, FinetuneMode] = field(default_factory=lambda: dict(DEFAULT_MODES))
    user_nli: dict[str, str | None] = field(default_factory=dict)  # {"MedNLI": folder, "RadNLI": folder}

    def __post_init__(self) -> None:
        from pertvl.losses import LOSS_PRESETS, LossConfig

        unknown = [p for p in self.presets if p not in LOSS_PRESETS]
        if unknown or not self.presets:
            raise ValueError(f"presets: unknown {unknown}; choose from {', '.join(LOSS_PRESETS)}")
        if len(set(self.presets)) != len(self.presets) or len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"presets and seeds must not repeat: {list(self.presets)} / {list(self.seeds)}")
        if not self.seeds:
            raise ValueError("seeds: expected at least one")
        if self.eval_with not in ("torch", "export"):
            raise ValueError(f"eval_with: expected 'torch' or 'export', got {self.eval_with!r}")
        self.tables = tuple(dict.fromkeys(self.tables))
        bad = [t for t in self.tables if t not in TABLES]
        if bad or not self.tables:
            raise ValueError(f"--tables: unknown {bad}; choose from {', '.join(TABLES)} ({'; '.join(f'{k}: {v}' for k, v in TABLES.items())})")
        self.variants = tuple(self.variants)
        names = [v.name for v in self.variants]
        clash = [n for n in names if n in LOSS_PRESETS or names.count(n) > 1]
        if clash:
            raise ValueError(f"--variant: the names {sorted(set(clash))} repeat or are loss presets; a variant is a new row")
        self.finetune_modes = {**DEFAULT_MODES, **self.finetune_modes}
        self.holdout_types = tuple(self.holdout_types)
        if self.holdout_types:
            if len(set(self.holdout_types)) != len(self.holdout_types):
                raise ValueError(f"holdout types must not repeat: {list(self.holdout_types)}")
            for t in self.holdout_types:  # refused with the known types, cf_* as evaluation-only
                if t.startswith("cf_"):  # not among the default training negatives: nothing to hold out
                    raise ValueError(f"--holdout-type {t}: counterfactual types are evaluation-only for "
                                     f"--holdout-type (they are training negatives only when loss.pert_types "
                                     f"names them); hold out one of {list(PERTURBATION_TYPES)}")
                if t not in PERTURBATION_TYPES:
                    LossConfig(pert_types=[t])  # raises the message naming the known types
            if not self.pert_presets:
                raise ValueError(f"--holdout-type needs a preset that trains L_pert (e.g. full, no_local); "
                                 f"got presets {list(self.presets)}")
            if "IV" not in self.tables:
                raise ValueError("--holdout-type needs Table IV (the structure evaluation) in --tables")

    @property
    def pert_presets(self) -> tuple[str, ...]:
        """The presets that train L_pert (trained once per held-out type)."""
        from pertvl.losses import LossConfig

        return tuple(p for p in self.presets if LossConfig(preset=p).uses_perturbations)

    @property
    def baseline_presets(self) -> tuple[str, ...]:
        """The presets without L_pert (trained once per seed; the reference of the holdout table)."""
        return tuple(p for p in self.presets if p not in self.pert_presets)

    def runs(self) -> list[AblationRun]:
        """Seed-major order: an interrupted ablation has complete comparisons for its first seeds.
        Per seed: every preset, every variant, then every L_pert preset per held-out type."""
        return [run for s in self.seeds for run in (*self.comparison_runs(s), *self.holdout_runs(s))]

    def comparison_runs(self, seed: int) -> list[AblationRun]:
        """The rows of comparison.md for one seed: the presets, then the variants."""
        root = Path(self.out)
        return [*(AblationRun(p, seed, root) for p in self.presets),
                *(AblationRun(v.name, seed, root, variant=v) for v in self.variants)]

    def holdout_runs(self, seed: int) -> list[AblationRun]:
        """The leave-one-type-out runs of one seed (their baselines are the comparison runs)."""
        return [AblationRun(p, seed, Path(self.out), t) for t in self.holdout_types for p in self.pert_presets]


def _stage(name: str, outputs: list[Path], fn: Any, params: dict[str, Any]) -> pipeline.Stage:
    """A stage whose StageError from inside (launch_train's "training exited with N", a failing `pertvl`
    call) is re-raised naming the stage (StageRunner passes StageErrors through unchanged)."""

    def run() -> None:
        try:
            fn()
        except pipeline.StageError as e:
            raise pipeline.StageError(f"stage {name!r} failed: {e}") from e

    return pipeline.Stage(name, outputs, run, params)


def _train_stage(run: AblationRun, s: AblationSettings, config_text: str, shards_sha: str) -> pipeline.Stage:
    sets = ([f"loss.preset={run.preset}", f"train.seed={run.seed}"] if run.variant is None
            else [*run.variant.overrides, f"train.seed={run.seed}"])
    shards = run.variant.shards if run.variant is not None and run.variant.shards else s.shards
    if shards != s.shards:  # `pertvl train --shards` wins over --set data.shards: pass the variant's
        shards_sha = sha256_file(Path(shards) / "manifest.json")
    args = ["--config", s.config, "--shards", shards, "--out", str(run.dir), "--resume", "latest",
            *(x for item in sets for x in ("--set", item))]
    if run.holdout is not None:
        args += ["--set", f"loss.pert_types=[{','.join(run.pert_types())}]"]
    if s.max_steps:
        args += ["--max-steps", str(s.max_steps)]
    if s.no_wandb:
        args.append("--no-wandb")
    return _stage(
        f"{run.name}.train", [run.dir / "final" / "config.json", run.weights],
        lambda: pipeline.launch_train(args, nproc=s.nproc),
        {"args": args, "nproc": s.nproc, "config": config_text, "shards_manifest": shards_sha})


def _export_stage(run: AblationRun, weights_sha: str) -> pipeline.Stage:
    return _stage(f"{run.name}.export", [run.export / "pertvl_export.json"],
                  lambda: pipeline.cli(["export", "--run", str(run.dir), "--out", str(run.export), "--force"],
                                       f"export of {run.name}"), {"weights_sha256": weights_sha})


def _eval_stage(run: AblationRun, s: AblationSettings, weights_sha: str, shards_sha: str) -> pipeline.Stage:
    """Every evaluation of the ABLATE suite; a leave-one-type-out run only the structure one (its table's)."""
    source = ["--export", str(run.export)] if s.eval_with == "export" else ["--run", str(run.dir)]
    common = [*source, "--shards", s.shards, "--split", s.split, "--out", str(run.eval_dir)]
    evals = evaluations() if run.holdout is None else [e for e in evaluations() if e.key == STRUCTURE]

    def evaluate() -> None:
        for e in evals:
            # --bootstrap goes to every evaluation that has the option (structure's CIs)
            extra = ["--bootstrap", str(s.bootstrap)] if "--bootstrap" in e.options() else []
            pipeline.cli(["eval", e.name, *common, "--name", e.key, *extra], f"{e.name} evaluation of {run.name}")

    return _stage(f"{run.name}.eval", [run.eval_json(e.key) for e in evals], evaluate,
                  {"weights_sha256": weights_sha, "eval_with": s.eval_with, "split": s.split,
                   "bootstrap": s.bootstrap, "shards_manifest": shards_sha,
                   "evaluations": [e.name for e in evals]})


def _finetune_stage(run: AblationRun, spec: FinetuneSpec, weights_sha: str) -> pipeline.Stage:
    """`pertvl finetune …` on the run's weights (Table II or III); re-run when the weights or inputs change."""
    argv = spec.command(run.dir, run.finetune_dir, run.seed)
    return _stage(f"{run.name}.finetune-{spec.stem}", [run.finetune_dir / f"{spec.stem}.json"],
                  lambda: pipeline.cli(argv, f"Table {spec.table} fine-tune {spec.stem} of {run.name}"),
                  {"weights_sha256": weights_sha, "argv": argv,
                   "inputs": {str(p): sha256_file(p) for p in spec.inputs}})


def check_variants(s: AblationSettings) -> None:
    """Each variant's config must load as `pertvl train` loads it, and cf_* training negatives need
    shards packed with counterfactuals; ValueError naming the variant otherwise."""
    from pertvl.config import RunConfig, load_config
    from pertvl.data.stream import check_counterfactuals, resolve_source
    from pertvl.losses import LossConfig

    for v in s.variants:
        try:
            loss = LossConfig.from_dict(RunConfig.from_dict(load_config(s.config, list(v.overrides))).loss)
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"--variant {v.name}: {e.args[0] if e.args else e}") from None
        shards = v.shards or s.shards
        try:
            if v.shards:
                _check_same_pairs(Path(v.shards), Path(s.shards))
            check_counterfactuals(resolve_source(shards, "train"), loss.pert_types, shards)
        except (OSError, ValueError) as e:
            raise ValueError(f"--variant {v.name}: {e}") from None


def _check_same_pairs(variant: Path, shards: Path) -> None:
    """A variant's own shards must be packed from the ablation's pairs (same splits, same images)."""
    def pairs_sha(folder: Path) -> str | None:
        manifest = folder / "manifest.json"
        if not manifest.is_file():
            raise ValueError(f"data.shards {folder}: no shard manifest (pack them with `pertvl pack`)")
        return (json.loads(manifest.read_text(encoding="utf-8")).get("inputs") or {}).get("pairs_sha256")

    mine, theirs = pairs_sha(variant), pairs_sha(shards)
    if mine is None or mine != theirs:
        raise ValueError(f"data.shards {variant} were not packed from the pairs of {shards} (manifest "
                         f"inputs.pairs_sha256 {mine} vs {theirs}): a row must train on the same pairs")


def run_ablation(s: AblationSettings) -> tuple[dict[str, Path], dict[str, Any]]:
    """Train, (export,) evaluate and fine-tune every run, then write the comparison (and holdout) table:
    (paths, the comparison table's JSON document) as write_tables returns them. Raises pipeline.StageError naming the failed stage; FileNotFoundError / ValueError for bad inputs."""
    config = Path(s.config)
    manifest = Path(s.shards) / "manifest.json"
    if not config.is_file():
        raise FileNotFoundError(f"{config}: training config not found")
    if not manifest.is_file():
        raise FileNotFoundError(f"{manifest}: no shard manifest (pack shards with `pertvl pack`, or run `pertvl demo`)")
    specs = finetune_specs(s.tables, Path(s.corpus) if s.corpus else None, s.shards, s.finetune_modes, s.user_nli)
    check_variants(s)
    config_text = config.read_text(encoding="utf-8")
    shards_sha = sha256_file(manifest)
    out = Path(s.out)
    out.mkdir(parents=True, exist_ok=True)
    runner = pipeline.StageRunner(out / ".stages", force=s.force)
    runs = s.runs()
    per_run = {run: 1 + (s.eval_with == "export") + ("IV" in s.tables) + (0 if run.holdout else len(specs))
               for run in runs}
    total, index = sum(per_run.values()), 0
    for run in runs:
        index += 1
        runner.run(_train_stage(run, s, config_text, shards_sha), index, total)
        weights_sha = sha256_file(run.weights)  # what export/eval/fine-tunes depend on
        if s.eval_with == "export":
            index += 1
            runner.run(_export_stage(run, weights_sha), index, total)
        if "IV" in s.tables:
            index += 1
            runner.run(_eval_stage(run, s, weights_sha, shards_sha), index, total)
        for spec in [] if run.holdout else specs:
            index += 1
            runner.run(_finetune_stage(run, spec, weights_sha), index, total)

    paths, table = write_tables(s, specs)
    holdout = {"holdout_types": list(s.holdout_types)} if s.holdout_types else {}
    write_json(out / "runs.json", {
        "config": str(config), "shards": s.shards, "split": s.split, "eval_with": s.eval_with,
        "max_steps": s.max_steps, "nproc": s.nproc, "presets": list(s.presets), "seeds": list(s.seeds),
        "variants": {v.name: list(v.overrides) for v in s.variants}, "tables": list(s.tables), **holdout,
        "finetunes": {spec.stem: spec.command(Path("RUN"), Path("RUN/finetune"), 0) for spec in specs},
        "runs": [{"preset": r.preset, "seed": r.seed, "holdout": r.holdout, "dir": str(r.dir),
                  **({"overrides": list(r.variant.overrides)} if r.variant else {}),
                  **({"pert_types": r.pert_types()} if r.holdout else {}),
                  "results": [str(p) for p in _result_files(r, specs, s)]} for r in runs],
        "stage_seconds": runner.timings, "stages_skipped": runner.skipped,
    })
    return paths, table


def _result_files(run: AblationRun, specs: list[FinetuneSpec], s: AblationSettings) -> list[Path]:
    """The JSON results of a comparison run: its evaluations (Table IV suite), then its fine-tunes."""
    evals = [run.eval_json(e.key) for e in evaluations()] if "IV" in s.tables else []
    return [*evals, *(run.finetune_dir / f"{spec.stem}.json" for spec in specs)]


def write_tables(s: AblationSettings, specs: list[FinetuneSpec]) -> tuple[dict[str, Path], dict[str, Any]]:
    """OUT/comparison.{md,json,png} from every comparison run's result files, and OUT/holdout.{md,json}
    with --holdout-type. Returns (paths, the comparison table's JSON document)."""
    from pertvl.evaluate.comparison import flatten_metrics, write_comparison_table

    out = Path(s.out)
    results: dict[str, list[dict[str, float | None]]] = {}
    for seed in s.seeds:
        for run in s.comparison_runs(seed):
            flat: dict[str, float | None] = {}
            for path in _result_files(run, specs, s):
                flat.update(flatten_metrics(json.loads(path.read_text(encoding="utf-8"))))
            results.setdefault(run.preset, []).append(flat)
    paths = write_comparison_table(results, out, "comparison", notes=table_notes(s, specs))
    table = json.loads(paths["json"].read_text(encoding="utf-8"))
    if s.holdout_types:
        runs = [r for seed in s.seeds for r in (*s.comparison_runs(seed), *s.holdout_runs(seed))
                if r.holdout or r.preset in s.baseline_presets]
        held = holdout_table(s, {r.name: json.loads(r.eval_json(STRUCTURE).read_text(encoding="utf-8")) for r in runs})
        paths.update({f"holdout_{k}": v for k, v in write_holdout_table(held, out).items()})
    return paths, table


def table_notes(s: AblationSettings, specs: list[FinetuneSpec]) -> list[str]:
    """How the rows and the fine-tune columns were made (under the summary table)."""
    steps = f"{s.max_steps} steps" if s.max_steps else "the config's steps"
    notes = [f"Every row: `pertvl train --config {s.config}` on {s.shards} ({steps}, {s.nproc} ranks), seeds "
             f"{', '.join(map(str, s.seeds))}; evaluations on the {s.split} split."]
    notes += [f"Row {v.name}: trained with `--set {' --set '.join(v.overrides)}` (where a preset's row has "
              f"`--set loss.preset=P`)." for v in s.variants]
    for table, task in (("II", "chexpert"), ("III", "nli")):
        mine = [spec for spec in specs if spec.table == table]
        if not mine:
            continue
        mode = s.finetune_modes[table]
        paper = " The paper fine-tunes end to end." if mode.mode == "probe" else ""
        where = ("the phantoms' labels.csv (frontal views), trained on the pretraining's train-split images, "
                 "tested on the val + test phantoms (never seen in pretraining); accuracy at p = 0.5"
                 if table == "II" else
                 "test accuracy (dev-selected epoch where a dev file exists; RadNLI: last epoch) on "
                 + ", ".join(spec.stem.removeprefix("nli_") for spec in mine))
        notes.append(f"Table {table}, {TABLES[table]}: {mode.describe(task)}; {where}.{paper}")
    return notes


def holdout_table(s: AblationSettings, structure: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The leave-one-type-out table: per held-out type T and preset, the structure accuracy on T (pairwise,
    chance 0.5) over seeds (mean, sample std, n, values): the L_pert presets from their runs trained
    without T, the baselines from their comparison runs."""
    from statistics import mean, stdev

    from pertvl.losses import preset_label

    columns = [{"preset": p, "label": preset_label(p), "trained_without_type": p in s.pert_presets}
               for p in s.presets]
    rows = []
    for t in s.holdout_types:
        metrics = {}
        for p in s.presets:
            holdout = t if p in s.pert_presets else None
            values = {}
            for seed in s.seeds:
                run = AblationRun(p, seed, Path(s.out), holdout)
                stat = (structure[run.name].get("per_type") or {}).get(t) or {}
                values[f"s{seed}"] = stat.get("accuracy")
            measured = [v for v in values.values() if v is not None]
            metrics[p] = {"mean": mean(measured) if measured else None,
                          "std": stdev(measured) if len(measured) > 1 else None,
                          "n": len(measured), "values": values}
        rows.append({"type": t, "metrics": metrics})
    return {"schema": "pertvl-holdout/1", "metric": "structure per-type accuracy on the held-out type",
            "chance": 0.5, "seeds": list(s.seeds), "columns": columns, "rows": rows}


def holdout_markdown(table: dict[str, Any]) -> str:
    """The leave-one-type-out table in Markdown (percentages, mean ± std over seeds)."""

    def cell(m: dict[str, Any]) -> str:
        if m.get("mean") is None:
            return "—"
        std = "" if m.get("std") is None else f" ± {100 * m['std']:.1f}"
        return f"{100 * m['mean']:.1f}{std} %"

    heads = [f"{c['label']} (trained without T)" if c["trained_without_type"] else c["label"]
             for c in table["columns"]]
    lines = [
        "Leave-one-type-out: structure accuracy on the held-out type T (original vs its type-T "
        f"perturbation, chance {100 * table['chance']:.0f} %), mean ± std over seeds "
        f"{', '.join(map(str, table['seeds']))}. Presets marked \"trained without T\" trained L_pert on every "
        "other type (loss.pert_types); the others do not train L_pert.",
        "",
        "| held-out type T | " + " | ".join(heads) + " |",
        "|---|" + "---:|" * len(heads),
    ]
    for row in table["rows"]:
        lines.append(f"| {row['type']} | " + " | ".join(cell(row["metrics"][c["preset"]]) for c in table["columns"]) + " |")
    return "\n".join(lines) + "\n"


def write_holdout_table(table: dict[str, Any], out: Path) -> dict[str, Path]:
    """OUT/holdout.json and OUT/holdout.md."""
    from pertvl.data.records import atomic_write_text

    paths = {"json": out / "holdout.json", "markdown": out / "holdout.md"}
    write_json(paths["json"], table)
    atomic_write_text(paths["markdown"], holdout_markdown(table))
    return paths


def structure_summary(table: dict[str, Any]) -> list[str]:
    """One line per preset: the table's first column (structure overall), mean ± std over seeds."""
    from pertvl.evaluate.catalog import metric_info

    if not table["columns"]:
        return []
    first = table["columns"][0]
    info = metric_info(first)
    scale, digits, unit = (100.0, 1, "%") if info.percent else (1.0, 3, "")
    lines = []
    for row in table["rows"]:
        m = row["metrics"].get(first) or {}
        if m.get("mean") is None:
            lines.append(f"  {row['label']:<16} {info.label.lower()} —")
            continue
        std = "" if m.get("std") is None else f" ± {scale * m['std']:.{digits}f}"
        lines.append(f"  {row['label']:<16} {info.label.lower()} {scale * m['mean']:.{digits}f}{unit}{std} "
                     f"(n={m['n']} seeds)")
    return lines


def _csv_list(text: str, what: str, cast=str) -> tuple:
    try:
        items = tuple(cast(x.strip()) for x in text.split(",") if x.strip())
    except ValueError:
        raise ValueError(f"--{what}: expected a comma-separated list, got {text!r}") from None
    return items


def holdout_types_arg(values: list[str]) -> tuple[str, ...]:
    """--holdout-type values (each may be comma-separated); `all` = every type of the batch."""
    items = [x.strip() for v in values for x in v.split(",") if x.strip()]
    if "all" in items:
        return PERTURBATION_TYPES
    return tuple(dict.fromkeys(items))


def parse_variant(text: str) -> Variant:
    """"NAME:key=value[,key=value]" → Variant; a comma inside [...] or {...} belongs to its value, values
    are parsed as `pertvl train --set` parses them. ValueError naming the --variant and what is wrong."""
    import re

    from pertvl.config import parse_override

    name, sep, rest = text.partition(":")
    name = name.strip()
    if not sep or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.]*", name):
        raise ValueError(f"--variant {text!r}: expected NAME:key=value[,key=value] with NAME of letters, digits, "
                         "'_' or '.' (the run folders are OUT/NAME-s<seed>)")
    items, depth, start = [], 0, 0
    for i, ch in enumerate(rest + ","):
        depth += (ch in "[{") - (ch in "]}")
        if ch == "," and depth == 0:
            items.append(rest[start:i].strip())
            start = i + 1
    items = [x for x in items if x]
    if not items or depth:
        raise ValueError(f"--variant {text!r}: expected at least one key=value after the name, brackets balanced")
    for item in items:
        try:
            parsed = parse_override(item)
        except Exception as e:  # a YAML error reads as the override's own message
            raise ValueError(f"--variant {name}: {item!r}: {e}") from None
        if (parsed.get("train") or {}).get("seed") is not None or item.split("=", 1)[0].strip() == "train.seed":
            raise ValueError(f"--variant {name}: train.seed is the ablation's (--seeds), not a variant's")
    return Variant(name, tuple(items))


def cli_main(args) -> int:
    from pertvl.evaluate.ablate_finetune import parse_mode

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("WANDB_MODE", "offline")
    try:
        presets = _csv_list(args.presets, "presets") if args.presets else paper_presets()
        holdout = holdout_types_arg(args.holdout_type or [])
        modes = {t: parse_mode(v, option) for t, v, option in (
            ("II", args.chexpert_finetune, "--chexpert-finetune"), ("III", args.nli_finetune, "--nli-finetune")) if v}
        settings = AblationSettings(
            config=args.config, shards=args.shards, presets=presets,
            seeds=_csv_list(args.seeds, "seeds", int), out=args.out, max_steps=args.max_steps, nproc=args.nproc,
            eval_with=args.eval_with, split=args.split, bootstrap=args.bootstrap, no_wandb=args.no_wandb,
            force=args.force, holdout_types=holdout, variants=tuple(parse_variant(v) for v in args.variant or []),
            tables=_csv_list(args.tables, "tables"), corpus=args.corpus, finetune_modes=modes,
            user_nli={"MedNLI": args.mednli, "RadNLI": args.radnli})
        what = f" × held-out types {', '.join(holdout)}" if holdout else ""
        rows = [*settings.presets, *(v.name for v in settings.variants)]
        print(f"ablation: {', '.join(rows)} × seeds {', '.join(map(str, settings.seeds))}{what} "
              f"({len(settings.runs())} runs; tables {', '.join(settings.tables)}) → {settings.out}", flush=True)
        paths, table = run_ablation(settings)
    except (ValueError, FileNotFoundError) as e:
        print(f"pertvl ablate: {e}", file=sys.stderr)
        return 2
    except pipeline.StageError as e:
        print(f"pertvl ablate: {e}", file=sys.stderr)
        return 1
    print("\n".join(["", "Ablation complete.", *structure_summary(table)]))
    print(f"Comparison table: {paths['markdown']}")
    for kind in ("json", "png"):
        print(f"  {kind}: {paths[kind]}")
    if holdout:
        print(f"Leave-one-type-out table: {paths['holdout_markdown']}\n  json: {paths['holdout_json']}")
    return 0
