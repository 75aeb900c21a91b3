"""The main job as a user runs it, shrunk: every stage, skip-if-complete, and a failing stage named."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pertvl.cli import main
from pertvl.evaluate.catalog import demo_evaluations
from pertvl.pipeline import Stage, StageError, StageRunner

REPO = Path(__file__).resolve().parents[1]


def test_stage_runner_skips_complete_stages_and_reruns_changed_ones(tmp_path):
    out = tmp_path / "out.txt"
    calls = []

    def make(text):
        def run():
            calls.append(text)
            out.write_text(text)
        return run

    runner = StageRunner(tmp_path / ".stages")
    runner.run(Stage("write", [out], make("a"), {"v": 1}), 1, 1)
    runner.run(Stage("write", [out], make("a"), {"v": 1}), 1, 1)
    assert calls == ["a"] and runner.skipped == ["write"]
    runner.run(Stage("write", [out], make("b"), {"v": 2}), 1, 1)  # parameters changed
    out.unlink()
    runner.run(Stage("write", [out], make("c"), {"v": 2}), 1, 1)  # output gone
    assert calls == ["a", "b", "c"]
    with pytest.raises(StageError, match="stage 'broken' failed: ZeroDivisionError"):
        runner.run(Stage("broken", [out], lambda: 1 / 0), 1, 1)
    with pytest.raises(StageError, match="did not write"):
        runner.run(Stage("lazy", [tmp_path / "never"], lambda: None), 1, 1)


def test_demo_long_budget_fills_only_what_the_user_left_out():
    from pertvl.cli import build_parser
    from pertvl.demo import build_stages, with_budget

    def stages(*argv):
        args = with_budget(build_parser().parse_args(["demo", *argv]))
        return args, {s.name: s for s in build_stages(args)}

    args, st = stages("--long")
    assert (args.n, args.max_steps, args.run, args.shards) == (5000, 1000, "runs/demo-long", "shards/demo-long")
    assert st["phantoms"].params["n"] == 5000 and st["train"].params["args"][-2:] == ["--max-steps", "1000"]
    args, st = stages("--long", "--n", "300", "--run", "elsewhere")
    assert (args.n, args.max_steps, args.run, args.export) == (300, 1000, "elsewhere", "export/demo-long")
    args, st = stages()
    assert (args.n, args.max_steps, args.run) == (1000, None, "runs/demo")
    assert "--max-steps" not in st["train"].params["args"]


@pytest.mark.slow
def test_demo_end_to_end_small(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(REPO)  # configs/ and ds_configs/ are resolved like a user's `make demo`
    args = ["demo", "--n", "96", "--image-size", "64", "--nproc", "1", "--max-steps", "2",
            "--shards", str(tmp_path / "shards"), "--run", str(tmp_path / "run"), "--export", str(tmp_path / "export")]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "Demo complete." in printed and "structure accuracy" in printed
    assert "image-grounding margin" in printed and "grounding: pointing game" in printed
    assert "grounded structure" in printed and "grounded margin" in printed  # counterfactual reports (issue 13)
    report = tmp_path / "run" / "report"
    text = (report / "README.md").read_text()
    assert "structure (local S) accuracy" in printed  # the structure test scored by S(I, T) (issue 14)
    assert "twins (global cosine) over" in printed and "twins (local S(I, T)) over" in printed
    for heading in ("Headline", "Clinical semantic structure", "Controls: the same test with another anchor",
                    "Retrieval", "Zero-shot", "Grounding of the local branch", "Twin phantoms", "Training",
                    "Weights & Biases"):
        assert heading in text
    head = text.split("## Headline")[1].split("## Figures")[0]
    bullets = [line for line in head.splitlines() if line.startswith("- ")]
    assert 1 <= len(bullets) <= 5 and all(len(b) <= 160 for b in bullets), bullets  # short lines
    assert "twin test, group score" in head and "wrong image" in head and head.count("chance") >= 3
    full = text.split("## Results in full")[1].split("## Clinical")[0]  # each evaluation's full headline line
    assert "image-grounding margin" in full and "grounded structure" in full
    assert "Grounded structure: original vs" in text
    grounding = json.loads((report / "eval" / "grounding.json").read_text())
    assert grounding["overall"]["items"] > 0 and not grounding["skipped"].get("not_a_phantom")
    structure = json.loads((report / "eval" / "structure.json").read_text())
    manifest = json.loads((tmp_path / "shards" / "manifest.json").read_text())
    assert structure["overall"]["n"] == manifest["splits"]["test"]["num_samples"]
    assert manifest["counterfactual_types"] and structure["grounded"]["samples_without_record"] == 0
    assert structure["text_disjoint"]["images"] == structure["images"]
    assert (report / "training_curves.png").stat().st_size > 0
    # The report opens with the headline and the figures; the full results come after, each heading once.
    order = [text.index(h) for h in ("## Headline", "## Figures", "## Results in full", "## Weights & Biases")]
    assert order == sorted(order) and "![" in text.split("## Figures")[1].split("## Results in full")[0]
    assert "(training_curves.png)" in text and "(eval/structure.png)" in text
    headings = [line for line in text.splitlines() if line.startswith("#")]
    assert len(headings) == len(set(headings)), [h for h in headings if headings.count(h) > 1]
    maps = sorted((report / "attention").glob("*.png"))
    assert maps and all(f"(attention/{m.name})" in text for m in maps)  # finding words only, each embedded
    card = (tmp_path / "export" / "MODEL_CARD.md").read_text()
    assert "image-grounding margin" in card.split("## Evaluation results")[1] and "Not evaluated" not in card
    twins = json.loads((report / "eval" / "twins.json").read_text())
    twin_summary = json.loads((tmp_path / "run" / "twins" / "summary.json").read_text())
    assert twins["pairs"] == twin_summary["pairs"] > 0 and set(twins["scores"]) == {"global", "local"}
    assert "](eval/twins_examples.png)" in text and (report / "eval" / "twins_examples.png").is_file()
    assert list((tmp_path / "run" / "wandb").glob("offline-run-*"))
    # Re-running skips every stage whose outputs are complete.
    assert main(args) == 0
    again = capsys.readouterr().out
    stages = 9 + len(demo_evaluations())  # phantoms, perturb, counterfactuals, pack, verify, twins, train, export, report
    assert again.count("complete, skipped") == stages and f"[{stages}/{stages}]" in again
    # A failing stage says which and why.
    bad = args + ["--config", str(tmp_path / "missing.yaml"), "--force"]
    assert main(bad) == 1
    assert "stage 'train'" in capsys.readouterr().out
