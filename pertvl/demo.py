"""The main job (`make demo` / `pertvl demo`): the whole pipeline on the embedded offline corpus.

phantoms -> perturb -> counterfactual reports and twin phantoms of the test split (evaluated, not
trained on) -> pack shards -> train with DeepSpeed on N ranks -> export to ONNX (parity checked)
-> every evaluation of the DEMO suite (pertvl.evaluate.catalog) on onnxruntime -> a report folder
with their tables, training curves, attention-map examples and the W&B offline run. Default
locations: shards/demo, runs/demo (corpus, checkpoints, W&B run, final encoders), export/demo,
runs/demo/report.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
from pathlib import Path
from typing import Any

from pertvl.data.phantom.twins import EDITS as TWIN_EDITS
from pertvl.pipeline import Stage, StageError, StageRunner, cli, launch_train

log = logging.getLogger(__name__)


# The two budgets of the main job. "short" shows the pipeline in minutes, before the model is grounded;
# "long" is the learning curve's run (docs/results/learning-curve: same corpus seed, configuration and
# steps), where the twin test's laterality score rises far above chance.
BUDGETS = {
    "short": {"n": 1000, "max_steps": None, "run": "runs/demo", "shards": "shards/demo", "export": "export/demo"},
    "long": {"n": 5000, "max_steps": 1000, "run": "runs/demo-long", "shards": "shards/demo-long",
             "export": "export/demo-long"},
}


def with_budget(args: argparse.Namespace) -> argparse.Namespace:
    """`args` with every option the user left out taken from its budget (--long or the short one)."""
    budget = BUDGETS["long" if getattr(args, "long", False) else "short"]
    return argparse.Namespace(**{**budget, **{k: v for k, v in vars(args).items() if v is not None}})


def build_stages(args: argparse.Namespace) -> list[Stage]:
    run = Path(args.run)
    corpus = run / "corpus"
    shards = Path(args.shards)
    export = Path(args.export)
    report = run / "report"
    evals = report / "eval"
    pairs = corpus / "pairs.jsonl"
    perts = corpus / "perturbations.jsonl"
    cfs = corpus / "counterfactuals.jsonl"

    train_args = ["--config", args.config, "--shards", str(shards), "--out", str(run), "--seed", str(args.seed),
                  "--resume", "latest"]
    if args.max_steps:
        train_args += ["--max-steps", str(args.max_steps)]
    eval_common = ["--export", str(export), "--shards", str(shards), "--split", "test", "--out", str(evals)]

    from pertvl.evaluate.catalog import demo_evaluations

    eval_stages = [
        Stage(f"eval-{e.name}", [evals / f"{e.key}.json"],
              (lambda e=e: cli(["eval", e.name, *eval_common, "--name", e.key], f"{e.name} eval")),
              {"export": str(export)})
        for e in demo_evaluations()
    ]
    return [
        Stage("phantoms", [pairs, corpus / "summary.json"],
              lambda: cli(["data", "phantom", "--n", str(args.n), "--seed", str(args.seed), "--size",
                           str(args.image_size), "--out", str(corpus), "--preview", "--nli"], "phantom corpus"),
              {"n": args.n, "seed": args.seed, "size": args.image_size}),
        Stage("perturb", [perts],
              lambda: cli(["perturb", "--pairs", str(pairs), "--out", str(perts), "--seed", str(args.seed),
                           "--antonyms", args.antonyms], "perturb"),
              {"seed": args.seed, "pairs": str(pairs), "antonyms": args.antonyms}),
        # Counterfactual reports of every phantom (pertvl.data.counterfactual), packed beside the
        # perturbations for the grounded structure test; the training stream never reads them.
        Stage("counterfactuals", [cfs], lambda: _write_counterfactuals(pairs, cfs, args.seed),
              {"seed": args.seed, "pairs": str(pairs)}),
        Stage("pack", [shards / "manifest.json"],
              lambda: cli(["pack", "--pairs", str(pairs), "--perturbations", str(perts), "--counterfactuals",
                           str(cfs), "--out", str(shards), "--image-size", str(args.image_size), "--maxcount", "64",
                           "--workers", "2"], "pack"),
              {"size": args.image_size, "pairs": str(pairs), "counterfactuals": str(cfs)}),
        Stage("verify", [shards / "manifest.json"], lambda: cli(["shards", "verify", str(shards)], "verify shards"),
              {"shards": str(shards)}),
        # Twin phantoms of the test split (pertvl.data.phantom.twins), packed in SHARDS/twins where
        # `pertvl eval twins` looks for them; evaluation only.
        Stage("twins", [shards / "twins" / "manifest.json"],
              lambda: cli(["data", "twins", "--corpus", str(corpus), "--out", str(run / "twins"), "--shards",
                           str(shards / "twins"), "--image-size", str(args.image_size)], "twin phantoms"),
              {"corpus": str(corpus), "size": args.image_size}),
        Stage("train", [run / "final" / "config.json"],
              lambda: launch_train(train_args, nproc=args.nproc),
              {"args": train_args, "nproc": args.nproc, "config": _file_text(args.config)}),
        Stage("export", [export / "pertvl_export.json"],
              lambda: cli(["export", "--run", str(run), "--out", str(export)], "export"),
              {"run": str(run)}),
        *eval_stages,  # one per evaluation of the DEMO suite (pertvl.evaluate.catalog)
        Stage("report", [report / "README.md"], lambda: write_report(run, export, report, corpus),
              {"run": str(run)}),
    ]


def _write_counterfactuals(pairs: Path, out: Path, seed: int) -> None:
    from pertvl.data.counterfactual import write_counterfactuals

    summary = write_counterfactuals(pairs, out, seed)
    print(f"counterfactual reports of {summary.distinct_texts} distinct phantom reports: "
          + ", ".join(f"{t} {n}" for t, n in summary.counterfactuals.items()) + f" -> {out}", flush=True)


def _file_text(path: str) -> str:
    try:
        return Path(path).read_text()
    except OSError as e:
        raise StageError(f"stage 'train' cannot start: config {path}: {e}") from e


# Figures the report opens with, in order: (file under the report folder, one-line caption).
REPORT_FIGURES = (
    ("training_curves.png", "Training: each loss per optimizer step (smoothed), from metrics.jsonl."),
    ("eval/structure.png", "Structure test: accuracy per perturbation type with 95 % CIs, beside chance and "
                           "the control anchors."),
    ("eval/grounding.png", "Grounding of the local branch: pointing game and attention mass in the finding, "
                           "beside chance (the finding's area)."),
    ("eval/twins.png", "Twin phantoms: text, image and group score per edit type with 95 % CIs, beside chance "
                       "(25 % text and image, 16.7 % group); any text-only scorer has text score 0 %."),
    ("eval/twins_examples.png", "One twin pair per edit type: two images of one patient that differ in one fact, "
                                "their reports (the differing words in bold)."),
)


def write_report(run: Path, export: Path, report: Path, corpus: Path) -> None:
    """runs/NAME/report/README.md: the headline, the figures, finding-word attention maps, then the full results."""
    import yaml

    from pertvl.data.records import read_pairs
    from pertvl.evaluate.report import finding_attention_maps, plot_training_curves
    from pertvl.export.card import write_model_card
    from pertvl.infer import Embedder

    report.mkdir(parents=True, exist_ok=True)
    evals = report / "eval"
    plot_training_curves(run / "metrics.jsonl", report / "training_curves.png")
    test_pairs = [p for p in read_pairs(corpus / "pairs.jsonl") if p.split == "test" and p.labels
                  and not p.labels.get("No Finding")]
    maps = finding_attention_maps(Embedder.from_export(export), test_pairs, corpus, report / "attention")

    lines = ["# pertvl demo report", "",
             f"Corpus: {corpus} (synthetic phantoms; see {corpus / 'preview.png'})  ",
             f"Run: {run} · ONNX export: {export} (its MODEL_CARD.md)", ""]
    try:  # the same lines `pertvl demo` prints at the end go under "Results in full"
        results = _results(evals)
        headline = [r.headline() for r in results.values()]
        lines += ["## Headline", "", *[f"- {line}" for line in _short_headline(results)], ""]
    except (OSError, KeyError, TypeError, ValueError) as e:
        headline = []
        lines += ["## Headline", "", f"- (no headline numbers: {e})", ""]
    write_model_card(export, yaml.safe_load((run / "config.yaml").read_text()), headline or None)
    lines += ["## Figures", ""]
    for name, caption in REPORT_FIGURES:
        if (report / name).is_file():
            lines += [f"![{Path(name).stem}]({name})", "", f"*{caption}*", ""]
    if maps:
        lines += ["## Where the finding words look", "",
                  "Word → region attention of the words that name a finding present in the image (ONNX "
                  "outputs); white: the finding's true outline from the phantom's recipe.", ""]
        for png, caption in maps:
            lines += [f"![{png.stem}]({os.path.relpath(png, report)})", "", f"*{caption}*", ""]
    lines += ["## Results in full", "", "### Each evaluation's headline", "",
              *[f"- {line}" for line in headline], "", *report_sections(evals, "onnxruntime"),
              "## Weights & Biases", ""]
    wandb_runs = sorted((run / "wandb").glob("offline-run-*")) if (run / "wandb").is_dir() else []
    if wandb_runs:
        lines += [f"- offline run: {w} (upload with `wandb sync {w}`)" for w in wandb_runs]
    else:
        lines += ["- no W&B run (trained with --no-wandb)"]
    (report / "README.md").write_text("\n".join(lines) + "\n")


def report_sections(evals: Path, where: str = "") -> list[str]:
    """A section per evaluation of the DEMO suite whose EVAL/KEY.md exists: its title, its Markdown
    (its own title line dropped, its headings nested under the section's, each heading once: one
    that another evaluation used already gets the evaluation's name)."""
    from pertvl.evaluate.catalog import demo_evaluations

    lines: list[str] = []
    seen: set[str] = set()
    for e in demo_evaluations():
        md = evals / f"{e.key}.md"
        if md.is_file():
            lines += [f"### {e.title}" + (f", {where}" if where else ""), ""]
            for line in _demoted(md, 2, evals.name).splitlines():
                if line.startswith("#"):
                    line = f"{line} ({e.name})" if line in seen else line
                    seen.add(line)
                lines.append(line)
            lines.append("")
    return lines


def _demoted(markdown: Path, levels: int = 1, folder: str = "") -> str:
    """An evaluation's Markdown without its top-level title, its headings moved `levels` down, and
    its relative image links (figures beside it) made relative to the report, one `folder` up."""
    text = markdown.read_text().splitlines()
    if text and text[0].startswith("# "):
        text = text[1:]
    out = "\n".join("#" * levels + line if line.startswith("#") else line for line in text).strip("\n")
    return re.sub(r"!\[([^\]]*)\]\((?![a-z]+:|/)([^)]+)\)", rf"![\1]({folder}/\2)", out) if folder else out


def _short_headline(results: dict[str, Any]) -> list[str]:
    """At most four short lines, each number beside its control: the twin test's group score (chance
    16.7 %), structure with the own and a wrong image, retrieval and zero-shot beside chance, the
    pointing game beside chance. The counterfactual test needs its empirical null and text prior
    beside it: it stays in the full lines."""
    m: dict[str, float | None] = {k: v for r in results.values() for k, v in r.metrics().items()}

    def p(key: str) -> str:
        return "n/a" if m.get(key) is None else f"{100 * m[key]:.1f} %"

    def pts(key: str) -> str:
        lo, hi = m.get(f"{key}_ci_low"), m.get(f"{key}_ci_high")
        return "n/a" if m.get(key) is None else f"{100 * m[key]:+.1f} pts" + (
            "" if lo is None or hi is None else f" [{100 * lo:+.1f}, {100 * hi:+.1f}]")

    lines = []
    if "twins" in results:
        per = ", ".join(f"{e} {p(f'twins/global/{e}/group')}" for e in TWIN_EDITS if f"twins/global/{e}/group" in m)
        lines.append(f"twin test, group score {p('twins/global/group')} (chance 16.7 %); per edit: {per}")
    if "structure" in results:
        lines.append(f"structure (Table IV): own image {p('structure/overall')}, wrong image "
                     f"{p('structure/wrong_image')}: margin {pts('structure/margin')}")
    if "retrieval" in results:
        chance = min(1.0, 10 / max(1, results["retrieval"].texts))
        auroc = m.get("zeroshot/mean_auroc")
        lines.append(f"image→report R@10 {p('retrieval/image_to_text/R@10')} (chance {100 * chance:.1f} %)"
                     + ("" if auroc is None else f"; zero-shot AUROC {auroc:.3f} (chance 0.5)"))
    if "grounding" in results:
        lines.append(f"pointing game {p('grounding/pointing')} (chance {p('grounding/pointing_chance')})")
    return lines


def _results(evals: Path) -> dict[str, Any]:
    """Each demo evaluation's result, read from EVAL/KEY.json (raises OSError when one is missing)."""
    from pertvl.evaluate.catalog import demo_evaluations, result_from_json

    return {e.key: result_from_json(json.loads((evals / f"{e.key}.json").read_text())) for e in demo_evaluations()}


def _headline(evals: Path) -> list[str]:
    """The numbers worth printing at the end of the main job: each demo evaluation's headline."""
    return [r.headline() for r in _results(evals).values()]


def cli_main(args: argparse.Namespace) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("WANDB_MODE", "offline")
    args = with_budget(args)
    runner = StageRunner(Path(args.run) / ".stages", force=args.force)
    try:
        runner.run_all(build_stages(args))
    except StageError as e:
        print(f"pertvl demo: {e}", flush=True)
        return 1
    report = Path(args.run) / "report"
    print("\nDemo complete.")
    try:
        for line in _headline(report / "eval"):
            print(f"  {line}")
    except (OSError, KeyError, TypeError, ValueError) as e:  # the report is still there; say why no headline
        print(f"  (no headline numbers: {e})")
    print(f"Report: {report / 'README.md'}")
    return 0
