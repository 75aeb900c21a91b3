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

    @property
    def name(self) -> str:
        return f"{self.preset}-s{self.seed}"

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

    def __post_init__(self) -> None:
        from pertvl.losses import LOSS_PRESETS

        unknown = [p for p in self.presets if p not in LOSS_PRESETS]
        if unknown or not self.presets:
            raise ValueError(f"presets: unknown {unknown}; choose from {', '.join(LOSS_PRESETS)}")
        if len(set(self.presets)) != len(self.presets) or len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"presets and seeds must not repeat: {list(self.presets)} / {list(self.seeds)}")
        if not self.seeds:
            raise ValueError("seeds: expected at least one")
        if self.eval_with not in ("torch", "export"):
            raise ValueError(f"eval_with: expected 'torch' or 'export', got {self.eval_with!r}")

    def runs(self) -> list[AblationRun]:
        """Seed-major order: an interrupted ablation has complete comparisons for its first seeds."""
        return [AblationRun(p, s, Path(self.out)) for s in self.seeds for p in self.presets]


@dataclass
class AblationResult:
    paths: dict[str, Path]  # the comparison table's json / markdown / png
    table: dict[str, Any]  # its JSON document
    runs: list[AblationRun]
    skipped_stages: list[str]


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


def cli_main(args) -> int:
    """`pertvl ablate`."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("WANDB_MODE", "offline")
    try:
        presets = _csv_list(args.presets, "presets") if args.presets else paper_presets()
        settings = AblationSettings(
            config=args.config, shards=args.shards, presets=presets,
            seeds=_csv_list(args.seeds, "seeds", int), out=args.out, max_steps=args.max_steps, nproc=args.nproc,
            eval_with=args.eval_with, split=args.split, bootstrap=args.bootstrap, no_wandb=args.no_wandb,
            force=args.force,
        )
        print(f"ablation: presets {', '.join(settings.presets)} × seeds {', '.join(map(str, settings.seeds))} "
              f"({len(settings.runs())} runs) → {settings.out}", flush=True)
        result = run_ablation(settings)
    except (ValueError, FileNotFoundError) as e:
        print(f"pertvl ablate: {e}", file=sys.stderr)
        return 2
    except pipeline.StageError as e:
        print(f"pertvl ablate: {e}", file=sys.stderr)
        return 1
    print("\n".join(["", "Ablation complete.", *structure_summary(result.table)]))
    print(f"Comparison table: {result.paths['markdown']}")
    for kind in ("json", "png"):
        print(f"  {kind}: {result.paths[kind]}")
    return 0
