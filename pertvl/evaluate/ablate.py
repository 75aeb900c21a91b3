"""`pertvl ablate`: the paper's four loss configurations × seeds, trained and evaluated alike, in one table.

For every seed and preset (convirt = L_global; gloria = + L_local; no_local = L_global + L_pert;
full = all three — pertvl.losses.LOSS_PRESETS, plus registered presets), in OUT/<preset>-s<seed>/:

1. train: `pertvl train --config CONFIG --shards SHARDS --out RUN --resume latest --set loss.preset=P
   --set train.seed=S [--max-steps N]` under torchrun on --nproc ranks (pertvl.pipeline.launch_train).
   Everything else — data, encoders, steps, schedule — comes from the one config, so the presets
   differ in their loss only, and a seed gives every preset the same initialization and data order.
2. (--eval-with export only) export: `pertvl export --run RUN --out RUN/export`.
3. eval: `pertvl eval NAME` for every evaluation of the ABLATE suite (pertvl.evaluate.registry:
   structure, retrieval, zeroshot, and registered ones) on the --split of the same shards into RUN/eval.
   Default --eval-with torch: the run's torch weights (RUN/final) are scored directly. The ONNX
   path gives the same numbers within rounding (checked by the export's parity test and by
   `pertvl eval --export` vs `--run`), and skipping 12 exports saves their tracing and parity time;
   --eval-with export scores the ONNX exports on onnxruntime instead.

Leave-one-type-out (--holdout-type T, repeatable, or `all`; issue 13 §3): per seed, every preset
that trains L_pert (`full`, `no_local`) is trained once per held-out type T with
`--set loss.pert_types=[every type but T]` in OUT/<preset>-without_<T>-s<seed>/, and the presets
without L_pert (`convirt`, `gloria`: their accuracy on T is the reference) once, in the same folders
as a plain ablation (shared, skipped when complete). Every run is evaluated as above; the table is
OUT/holdout.{md,json} (`holdout_table`): one row per held-out type, the structure accuracy on T
(original vs T, pairwise, chance 50 %), mean ± std over seeds, for each preset.

Then OUT/comparison.{md,json,png} (pertvl.evaluate.report.write_comparison_table): one row per
preset in the paper's order, mean ± sample std over seeds. OUT/runs.json lists every run.

Stages go through pertvl.pipeline.StageRunner (stamps in OUT/.stages): a finished stage whose
parameters are unchanged is skipped on re-run. The parameters of export and eval include the
sha256 of the trained weights, so a retrained run is always re-exported and re-evaluated.
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
from pertvl.data.records import write_json

log = logging.getLogger(__name__)



def paper_presets() -> tuple[str, ...]:
    """The built-in loss presets (the paper's rows), the default of --presets."""
    from pertvl.losses import LOSS_PRESETS

    return LOSS_PRESETS.builtin


def evaluations() -> list:
    """The registered evaluations of the ABLATE suite that read shard samples (registry order)."""
    from pertvl.evaluate.evaluation import Source, Suite
    from pertvl.evaluate.registry import in_suite

    return [e for e in in_suite(Suite.ABLATE) if e.source is Source.SHARDS]


@dataclass(frozen=True)
class AblationRun:
    """One (preset, seed) cell of the ablation and its folders."""

    preset: str
    seed: int
    root: Path
    holdout: str | None = None  # the perturbation type L_pert is trained without (--holdout-type)

    @property
    def name(self) -> str:
        return f"{self.preset}-s{self.seed}" if self.holdout is None else f"{self.preset}-without_{self.holdout}-s{self.seed}"

    def pert_types(self) -> list[str] | None:
        """loss.pert_types of the run: every type of the batch but the held-out one (None: the default)."""
        if self.holdout is None:
            return None
        from pertvl.data.records import PERTURBATION_TYPES

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
        self.holdout_types = tuple(self.holdout_types)
        if self.holdout_types:
            if len(set(self.holdout_types)) != len(self.holdout_types):
                raise ValueError(f"holdout types must not repeat: {list(self.holdout_types)}")
            for t in self.holdout_types:  # refused with the known types, cf_* as evaluation-only
                if t.startswith("cf_"):  # not among the default training negatives: nothing to hold out
                    raise ValueError(f"--holdout-type {t}: counterfactual types are evaluation-only for "
                                     f"--holdout-type (they are training negatives only when loss.pert_types "
                                     f"names them); hold out one of {list(_batch_types())}")
                others = [x for x in _batch_types() if x != t]
                if t not in _batch_types() or not others:
                    LossConfig(pert_types=[t])  # raises the message naming the known types
            if not self.pert_presets:
                raise ValueError(f"--holdout-type needs a preset that trains L_pert (e.g. full, no_local); "
                                 f"got presets {list(self.presets)}")

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
        With holdout types: per seed, the baselines, then every L_pert preset per held-out type."""
        root = Path(self.out)
        if not self.holdout_types:
            return [AblationRun(p, s, root) for s in self.seeds for p in self.presets]
        return [run for s in self.seeds for run in (
            *(AblationRun(p, s, root) for p in self.baseline_presets),
            *(AblationRun(p, s, root, t) for t in self.holdout_types for p in self.pert_presets))]


@dataclass
class AblationResult:
    paths: dict[str, Path]  # the comparison table's json / markdown / png
    table: dict[str, Any]  # its JSON document
    runs: list[AblationRun]
    skipped_stages: list[str]


def _batch_types() -> tuple[str, ...]:
    from pertvl.data.records import PERTURBATION_TYPES

    return PERTURBATION_TYPES


def _fingerprint(path: Path) -> str:
    from pertvl.files import sha256_file

    return sha256_file(path)


def _named(stage: str, fn):
    """fn, with a StageError from inside (launch_train's "training exited with N", a failing
    `pertvl` call) re-raised naming the stage (StageRunner passes StageErrors through unchanged)."""

    def run() -> None:
        try:
            fn()
        except pipeline.StageError as e:
            raise pipeline.StageError(f"stage {stage!r} failed: {e}") from e

    return run


def _train_stage(run: AblationRun, s: AblationSettings, config_text: str, shards_sha: str) -> pipeline.Stage:
    args = ["--config", s.config, "--shards", s.shards, "--out", str(run.dir), "--resume", "latest",
            "--set", f"loss.preset={run.preset}", "--set", f"train.seed={run.seed}"]
    if run.holdout is not None:
        args += ["--set", f"loss.pert_types=[{','.join(run.pert_types())}]"]
    if s.max_steps:
        args += ["--max-steps", str(s.max_steps)]
    if s.no_wandb:
        args.append("--no-wandb")
    return pipeline.Stage(
        f"{run.name}.train", [run.dir / "final" / "config.json", run.weights],
        _named(f"{run.name}.train", lambda: pipeline.launch_train(args, nproc=s.nproc)),
        {"args": args, "nproc": s.nproc, "config": config_text, "shards_manifest": shards_sha},
    )


def _export_stage(run: AblationRun, weights_sha: str) -> pipeline.Stage:
    return pipeline.Stage(
        f"{run.name}.export", [run.export / "pertvl_export.json"],
        _named(f"{run.name}.export", lambda: pipeline.cli(["export", "--run", str(run.dir), "--out", str(run.export),
                                                           "--force"], f"export of {run.name}")),
        {"weights_sha256": weights_sha},
    )


def _eval_stage(run: AblationRun, s: AblationSettings, weights_sha: str, shards_sha: str) -> pipeline.Stage:
    source = ["--export", str(run.export)] if s.eval_with == "export" else ["--run", str(run.dir)]
    common = [*source, "--shards", s.shards, "--split", s.split, "--out", str(run.eval_dir)]
    evals = evaluations()

    def evaluate() -> None:
        for e in evals:
            # --bootstrap goes to every evaluation that has the option (structure's CIs)
            extra = ["--bootstrap", str(s.bootstrap)] if "--bootstrap" in e.options() else []
            pipeline.cli(["eval", e.name, *common, "--name", e.key, *extra], f"{e.name} evaluation of {run.name}")

    return pipeline.Stage(
        f"{run.name}.eval", [run.eval_json(e.key) for e in evals], _named(f"{run.name}.eval", evaluate),
        {"weights_sha256": weights_sha, "eval_with": s.eval_with, "split": s.split, "bootstrap": s.bootstrap,
         "shards_manifest": shards_sha, "evaluations": [e.name for e in evals]},
    )


def run_ablation(s: AblationSettings) -> AblationResult:
    """Train, (export,) evaluate every preset × seed and write the comparison table.

    Raises:
        pipeline.StageError: naming the stage that failed and why.
        FileNotFoundError: the config or the shard manifest is missing.
    """
    from pertvl.evaluate.report import write_comparison_table

    config = Path(s.config)
    manifest = Path(s.shards) / "manifest.json"
    if not config.is_file():
        raise FileNotFoundError(f"{config}: training config not found")
    if not manifest.is_file():
        raise FileNotFoundError(f"{manifest}: no shard manifest (pack shards with `pertvl pack`, or run `pertvl demo`)")
    config_text = config.read_text(encoding="utf-8")
    shards_sha = _fingerprint(manifest)
    out = Path(s.out)
    out.mkdir(parents=True, exist_ok=True)
    runner = pipeline.StageRunner(out / ".stages", force=s.force)
    runs = s.runs()
    per_run = 3 if s.eval_with == "export" else 2
    total, index = per_run * len(runs), 0
    for run in runs:
        index += 1
        runner.run(_train_stage(run, s, config_text, shards_sha), index, total)
        weights_sha = _fingerprint(run.weights)  # export/eval depend on the weights actually trained
        if s.eval_with == "export":
            index += 1
            runner.run(_export_stage(run, weights_sha), index, total)
        index += 1
        runner.run(_eval_stage(run, s, weights_sha, shards_sha), index, total)

    keys = [e.key for e in evaluations()]
    if s.holdout_types:
        structure = _structure_key()
        table = holdout_table(s, {r.name: json.loads(r.eval_json(structure).read_text(encoding="utf-8")) for r in runs})
        paths = write_holdout_table(table, out)
        write_json(out / "holdout_runs.json", {
            "config": str(config), "shards": s.shards, "split": s.split, "eval_with": s.eval_with,
            "max_steps": s.max_steps, "nproc": s.nproc, "presets": list(s.presets), "seeds": list(s.seeds),
            "holdout_types": list(s.holdout_types),
            "runs": [{"preset": r.preset, "seed": r.seed, "holdout": r.holdout, "dir": str(r.dir),
                      "pert_types": r.pert_types(), "eval": {k: str(r.eval_json(k)) for k in keys}} for r in runs],
            "stage_seconds": runner.timings, "stages_skipped": runner.skipped,
        })
        return AblationResult(paths, table, runs, list(runner.skipped))
    results: dict[str, list[dict[str, Any]]] = {p: [] for p in s.presets}
    for run in runs:
        results[run.preset].append({k: json.loads(run.eval_json(k).read_text(encoding="utf-8")) for k in keys})
    paths = write_comparison_table(results, out, "comparison")
    table = json.loads(paths["json"].read_text(encoding="utf-8"))
    write_json(out / "runs.json", {
        "config": str(config), "shards": s.shards, "split": s.split, "eval_with": s.eval_with,
        "max_steps": s.max_steps, "nproc": s.nproc, "presets": list(s.presets), "seeds": list(s.seeds),
        "runs": [{"preset": r.preset, "seed": r.seed, "dir": str(r.dir),
                  "eval": {k: str(r.eval_json(k)) for k in keys}} for r in runs],
        "stage_seconds": runner.timings, "stages_skipped": runner.skipped,
    })
    return AblationResult(paths, table, runs, list(runner.skipped))


def _structure_key() -> str:
    """The file stem of the structure evaluation's JSON in RUN/eval."""
    for e in evaluations():
        if e.name == "structure":
            return e.key
    raise ValueError("--holdout-type needs the structure evaluation in the ablate suite; it is not registered")


def holdout_table(s: AblationSettings, structure: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The leave-one-type-out table (JSON document) from each run's structure result, by run name.

    One row per held-out type T; for every preset the structure accuracy on T (original vs the
    type-T perturbation, pairwise; chance 0.5): the L_pert presets from their runs trained
    without T, the baselines from their one run per seed. mean ± sample std over seeds (std null
    with one seed), n = seeds with a measured accuracy, and every seed's value.
    """
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
    from pertvl.evaluate.registry import metric_info

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
        return _batch_types()
    return tuple(dict.fromkeys(items))


def cli_main(args) -> int:
    """`pertvl ablate`."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("WANDB_MODE", "offline")
    try:
        presets = _csv_list(args.presets, "presets") if args.presets else paper_presets()
        holdout = holdout_types_arg(getattr(args, "holdout_type", None) or [])
        settings = AblationSettings(
            config=args.config, shards=args.shards, presets=presets,
            seeds=_csv_list(args.seeds, "seeds", int), out=args.out, max_steps=args.max_steps, nproc=args.nproc,
            eval_with=args.eval_with, split=args.split, bootstrap=args.bootstrap, no_wandb=args.no_wandb,
            force=args.force, holdout_types=holdout,
        )
        what = f" × held-out types {', '.join(holdout)}" if holdout else ""
        print(f"ablation: presets {', '.join(settings.presets)} × seeds {', '.join(map(str, settings.seeds))}{what} "
              f"({len(settings.runs())} runs) → {settings.out}", flush=True)
        result = run_ablation(settings)
    except (ValueError, FileNotFoundError) as e:
        print(f"pertvl ablate: {e}", file=sys.stderr)
        return 2
    except pipeline.StageError as e:
        print(f"pertvl ablate: {e}", file=sys.stderr)
        return 1
    if holdout:
        print("\n" + holdout_markdown(result.table))
        print(f"Leave-one-type-out table: {result.paths['markdown']}\n  json: {result.paths['json']}")
        return 0
    print("\n".join(["", "Ablation complete.", *structure_summary(result.table)]))
    print(f"Comparison table: {result.paths['markdown']}")
    for kind in ("json", "png"):
        print(f"  {kind}: {result.paths[kind]}")
    return 0
