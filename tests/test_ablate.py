"""`pertvl ablate`: orchestration, skip-on-re-run and the comparison table, with training and
evaluation replaced by stand-ins that write known results (the real 12-run ablation on the phantom
corpus takes far longer than a unit test; the lead runs it)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from pertvl import pipeline
from pertvl.cli import main as pertvl_main
from pertvl.evaluate import ablate
from pertvl.evaluate.grounding import GroundingResult, GroundingStat
from pertvl.evaluate.retrieval import RetrievalResult
from pertvl.evaluate.structure_result import AccuracyStat, StructureResult
from pertvl.evaluate.zeroshot import LabelAUROC, ZeroShotResult

# Known structure accuracy per preset and seed offsets: the table must give their mean ± std.
BASE = {"convirt": 0.30, "gloria": 0.34, "no_local": 0.62, "full": 0.70, "cf": 0.75, "reviewed": 0.68}  # cf, reviewed: --variant rows
SEED_OFFSET = {0: -0.02, 1: 0.0, 2: 0.05}
SPREAD = {"convirt": 1.0, "gloria": 0.5, "no_local": 2.0, "full": 0.2, "cf": 1.5, "reviewed": 1.0}  # a different std per preset
TYPES = ("shuffle_all", "antonym_adjectives")


def _value(preset: str, seed: int, shift: float = 0.0) -> float:
    return round(BASE[preset] + SPREAD[preset] * SEED_OFFSET[seed] + shift, 6)


def _stat(acc: float) -> AccuracyStat:
    return AccuracyStat(accuracy=acc, ci95=(acc - 0.05, acc + 0.05), n=100, correct=round(100 * acc), chance=0.1,
                        mean_candidates=10.0)


def _fabricated(kind: str, preset: str, seed: int) -> dict:
    if kind in ("structure", "structure-local"):
        return StructureResult(overall=_stat(_value(preset, seed)),
                               per_type={t: _stat(_value(preset, seed, 0.1 * (i + 1))) for i, t in enumerate(TYPES)},
                               images=100, images_without_valid_perturbation=0, skipped={},
                               bootstrap={"resamples": 10, "seed": 0},
                               score="local" if kind == "structure-local" else "global").to_json()
    if kind == "grounding":
        stat = GroundingStat(items=50, images=30, pointing=_value(preset, seed, 0.05), pointing_ci95=None,
                             pointing_chance=0.2, mass=0.1, mass_ci95=None, area=0.05)
        return GroundingResult(overall=stat, per_type={"nodule": stat}, images=30, images_without_finding_words=10,
                               skipped={}, grid=(4, 4), gamma1=4.0, bootstrap={"resamples": 10, "seed": 0}).to_json()
    if kind == "retrieval":
        r = {"R@1": _value(preset, seed, -0.2), "R@5": _value(preset, seed), "R@10": _value(preset, seed, 0.1)}
        return RetrievalResult(image_to_text=r, text_to_image=r, median_rank={"image_to_text": 3, "text_to_image": 3},
                               images=100, texts=90, match="report").to_json()
    auc = {"Pleural Effusion": _value(preset, seed, 0.2), "Consolidation": _value(preset, seed, 0.1)}
    return ZeroShotResult(per_label={k: LabelAUROC(v, 10, 20, 0, [["a", "no a"]]) for k, v in auc.items()},
                          images=30).to_json()


def _ft_value(row: str, seed: int, shift: float) -> float:
    return round(BASE[row] + SEED_OFFSET[seed] + shift, 6)


def _fabricated_finetune(task: str, row: str, seed: int, dataset: str | None) -> dict:
    """A CheXpert or NLI fine-tune result whose numbers are known from (row, seed)."""
    from pertvl.evaluate.finetune.chexpert import ChexpertResult, LabelScores
    from pertvl.evaluate.finetune.nli import ClassificationMetrics, NliResult

    if task == "chexpert":
        per_label = {lab: LabelScores(auroc=_ft_value(row, seed, 0.05 * i), accuracy=_ft_value(row, seed, 0.1 * i),
                                      n=20, n_pos=5, n_neg=15, excluded_uncertain=0, excluded_blank=0)
                     for i, lab in enumerate(("Consolidation", "Pleural Effusion"))}
        return ChexpertResult(per_label, [], {}, {}, {}).to_json()
    acc = _ft_value(row, seed, {"phantom": -0.3, "MedNLI": -0.4}[dataset])
    test = ClassificationMetrics(n=10, accuracy=acc, per_class={}, macro_f1=acc - 0.01, labels=[], confusion=[])
    return NliResult(None, test, [], 1, {}, {}, {"dataset": dataset}).to_json()


class StandIns:
    """Replaces pipeline.launch_train and pipeline.cli; records every call."""

    def __init__(self) -> None:
        self.trained: list[tuple[list[str], int]] = []
        self.calls: list[list[str]] = []
        self.fail: str | None = None

    def launch_train(self, args, *, nproc=2, log_file=None):
        self.trained.append((list(args), nproc))
        out = Path(args[args.index("--out") + 1])
        if self.fail and out.name == self.fail:
            raise pipeline.StageError(f"training exited with 1 ({out.name})")
        (out / "final").mkdir(parents=True, exist_ok=True)
        (out / "final" / "config.json").write_text("{}")
        (out / "final" / "model.safetensors").write_bytes(f"weights of {out.name}".encode())

    def cli(self, argv, what):
        self.calls.append(list(argv))
        out = Path(argv[argv.index("--out") + 1])
        if argv[0] == "finetune":  # out = RUN/finetune; fabricated results for (row, seed)
            row, seed = Path(argv[argv.index("--run") + 1]).name.rsplit("-s", 1)
            assert argv[argv.index("--seed") + 1] == seed
            name = argv[argv.index("--name") + 1]
            out.mkdir(parents=True, exist_ok=True)
            dataset = argv[argv.index("--dataset") + 1] if "--dataset" in argv else None
            (out / f"{name}.json").write_text(json.dumps(_fabricated_finetune(argv[1], row, int(seed), dataset)))
            return
        if argv[0] == "export":
            out.mkdir(parents=True, exist_ok=True)
            (out / "pertvl_export.json").write_text("{}")
            return
        assert argv[0] == "eval"
        source = Path(argv[argv.index("--run") + 1] if "--run" in argv else argv[argv.index("--export") + 1])
        run_name = source.name if "--run" in argv else source.parent.name
        preset, seed = run_name.rsplit("-s", 1)
        preset = preset.split("-without_")[0]  # leave-one-type-out runs: <preset>-without_<type>-s<seed>
        out.mkdir(parents=True, exist_ok=True)
        name = argv[argv.index("--name") + 1]
        (out / f"{name}.json").write_text(json.dumps(_fabricated(argv[1], preset, int(seed))))


@pytest.fixture
def stand_ins(monkeypatch) -> StandIns:
    s = StandIns()
    monkeypatch.setattr(pipeline, "launch_train", s.launch_train)
    monkeypatch.setattr(pipeline, "cli", s.cli)
    return s


@pytest.fixture
def inputs(tmp_path) -> dict[str, Path]:
    config = tmp_path / "demo.yaml"
    config.write_text("train:\n  max_steps: 5\n")
    shards = tmp_path / "shards"
    shards.mkdir()
    (shards / "manifest.json").write_text('{"format": "pertvl-shards/1"}')
    return {"config": config, "shards": shards, "out": tmp_path / "ablate"}


def _argv(inputs, *extra: str, tables: str = "IV") -> list[str]:
    return ["ablate", "--config", str(inputs["config"]), "--shards", str(inputs["shards"]),
            "--presets", "full,convirt,no_local,gloria", "--seeds", "0,1,2", "--max-steps", "7", "--nproc", "2",
            "--bootstrap", "50", "--out", str(inputs["out"]), "--tables", tables, *extra]


def test_ablation_table_in_paper_order_with_mean_and_std(stand_ins, inputs, capsys):
    assert pertvl_main(_argv(inputs)) == 0
    out = inputs["out"]
    printed = capsys.readouterr().out
    assert f"Comparison table: {out / 'comparison.md'}" in printed

    # 12 trainings with the same config/shards/steps, differing only in preset and seed.
    assert len(stand_ins.trained) == 12
    for args, nproc in stand_ins.trained:
        preset, seed = Path(args[args.index("--out") + 1]).name.rsplit("-s", 1)
        assert nproc == 2
        assert args[:4] == ["--config", str(inputs["config"]), "--shards", str(inputs["shards"])]
        assert f"loss.preset={preset}" in args and f"train.seed={seed}" in args
        assert args[args.index("--max-steps") + 1] == "7" and args[args.index("--resume") + 1] == "latest"
    evals = [c for c in stand_ins.calls if c[0] == "eval"]
    assert len(evals) == 12 * len(ablate.evaluations()) and not [c for c in stand_ins.calls if c[0] == "export"]
    assert all(c[c.index("--split") + 1] == "test" and "--run" in c for c in evals)
    assert all(c[c.index("--bootstrap") + 1] == "50" for c in evals if c[1] == "structure")

    doc = json.loads((out / "comparison.json").read_text())
    assert [r["config"] for r in doc["rows"]] == ["convirt", "gloria", "no_local", "full"]
    assert [r["seeds"] for r in doc["rows"]] == [3, 3, 3, 3]
    for row in doc["rows"]:
        p = row["config"]
        for key, shift in [("structure/overall", 0.0), ("structure/shuffle_all", 0.1),
                           ("structure/antonym_adjectives", 0.2), ("retrieval/image_to_text/R@1", -0.2),
                           ("zeroshot/mean_auroc", 0.15), ("grounding/pointing", 0.05)]:
            values = [_value(p, s, shift) for s in (0, 1, 2)]
            m = row["metrics"][key]
            assert m["mean"] == pytest.approx(np.mean(values), abs=1e-9)
            assert m["std"] == pytest.approx(np.std(values, ddof=1), abs=1e-9)
    md = (out / "comparison.md").read_text()
    labels = ["ConVIRT-like", "GLoRIA-like", "Ours w/o local", "Ours"]
    positions = [md.index(f"| {label} | 3 |") for label in labels]
    assert positions == sorted(positions)
    convirt = [_value("convirt", s) for s in (0, 1, 2)]
    assert f"| ConVIRT-like | 3 | {100 * np.mean(convirt):.1f} ± {100 * np.std(convirt, ddof=1):.1f} |" in md
    assert (out / "comparison.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    from PIL import Image

    with Image.open(out / "comparison.png") as im:
        assert im.size == (1500, 550)
    runs = json.loads((out / "runs.json").read_text())
    assert [(r["preset"], r["seed"]) for r in runs["runs"]][:4] == [("full", 0), ("convirt", 0), ("no_local", 0),
                                                                   ("gloria", 0)]
    assert "Ours w/o local" in printed and "structure overall" in printed


def test_rerun_skips_finished_runs_and_redoes_stale_ones(stand_ins, inputs):
    assert pertvl_main(_argv(inputs)) == 0
    out = inputs["out"]
    stand_ins.trained.clear()
    stand_ins.calls.clear()
    assert pertvl_main(_argv(inputs)) == 0
    assert stand_ins.trained == [] and stand_ins.calls == []

    # A deleted evaluation output re-runs that run's evaluation only.
    (out / "gloria-s1" / "eval" / "retrieval.json").unlink()
    assert pertvl_main(_argv(inputs)) == 0
    assert stand_ins.trained == [] and {c[c.index("--run") + 1] for c in stand_ins.calls} == {str(out / "gloria-s1")}

    # New weights (a run retrained by hand) invalidate that run's evaluation, nothing else.
    stand_ins.calls.clear()
    (out / "full-s2" / "final" / "model.safetensors").write_bytes(b"retrained")
    assert pertvl_main(_argv(inputs)) == 0
    assert stand_ins.trained == [] and {c[c.index("--run") + 1] for c in stand_ins.calls} == {str(out / "full-s2")}

    # A changed training config retrains everything.
    inputs["config"].write_text("train:\n  max_steps: 9\n")
    assert pertvl_main(_argv(inputs)) == 0
    assert len(stand_ins.trained) == 12


def test_export_path_and_failures(stand_ins, inputs, capsys):
    argv = _argv(inputs, "--eval-with", "export")
    argv[argv.index("--seeds") + 1] = "0"
    assert pertvl_main(argv) == 0
    exports = [c for c in stand_ins.calls if c[0] == "export"]
    assert len(exports) == 4 and all("--force" in c for c in exports)
    evals = [c for c in stand_ins.calls if c[0] == "eval"]
    assert all(c[c.index("--export") + 1].endswith("/export") for c in evals)
    doc = json.loads((inputs["out"] / "comparison.json").read_text())
    assert [r["metrics"]["structure/overall"]["std"] for r in doc["rows"]] == [None] * 4  # one seed

    stand_ins.fail = "gloria-s1"
    argv[argv.index("--seeds") + 1] = "0,1"
    assert pertvl_main(argv) == 1
    assert "stage 'gloria-s1.train' failed" in capsys.readouterr().err

    assert pertvl_main(_argv(inputs, "--presets", "convirt,bogus")) == 2
    assert "unknown ['bogus']" in capsys.readouterr().err
    missing = _argv(inputs)
    missing[missing.index("--shards") + 1] = str(inputs["out"] / "nowhere")
    assert pertvl_main(missing) == 2
    assert "no shard manifest" in capsys.readouterr().err


def test_settings_validate_and_order_runs_seed_major(tmp_path):
    s = ablate.AblationSettings(config="c.yaml", shards="s", presets=("gloria", "full"), seeds=(3, 1), out=str(tmp_path))
    assert [r.name for r in s.runs()] == ["gloria-s3", "full-s3", "gloria-s1", "full-s1"]
    assert s.runs()[0].eval_json("structure") == tmp_path / "gloria-s3" / "eval" / "structure.json"
    with pytest.raises(ValueError, match="must not repeat"):
        ablate.AblationSettings(config="c", shards="s", seeds=(0, 0))
    with pytest.raises(ValueError, match="eval_with"):
        ablate.AblationSettings(config="c", shards="s", eval_with="tensorflow")


@pytest.mark.slow
def test_real_tiny_ablation_end_to_end(tmp_path, minilm_path, monkeypatch, capsys):
    """The real `pertvl ablate` on a tiny phantom corpus (with its NLI set and counterfactuals) and a tiny
    model: `pertvl train` (1 rank, 2 steps), the torch evaluations, and Tables II and III as real
    `pertvl finetune` stages (2-epoch linear probes); one preset and the counterfactual-negatives
    variant, 2 seeds. The overrides reach the run configs, the variant trains on the shards'
    counterfactuals, the table's cells are mean ± sample std of the per-run JSONs (recomputed here from
    their fields), and a re-run skips every stage. (~40 s on 2 quiet cores, up to 5 min on busy ones.)"""
    import shutil
    from statistics import mean, stdev

    import torch
    import yaml
    from transformers import BertConfig, BertModel

    from pertvl.data.counterfactual import COUNTERFACTUAL_TYPES, write_counterfactuals
    from pertvl.data.records import PERTURBATION_TYPES

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("WANDB_MODE", "offline")
    bert = tmp_path / "tiny_bert"
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=128)).save_pretrained(bert)
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        shutil.copy(Path(minilm_path) / name, bert)
    corpus, shards = tmp_path / "corpus", tmp_path / "shards"
    assert pertvl_main(["data", "phantom", "--n", "80", "--seed", "0", "--size", "64", "--nli", "--out",
                        str(corpus)]) == 0
    assert pertvl_main(["perturb", "--pairs", str(corpus / "pairs.jsonl"), "--out",
                        str(corpus / "perturbations.jsonl"), "--seed", "0"]) == 0
    write_counterfactuals(corpus / "pairs.jsonl", corpus / "counterfactuals.jsonl", 0)
    assert pertvl_main(["pack", "--pairs", str(corpus / "pairs.jsonl"), "--perturbations",
                        str(corpus / "perturbations.jsonl"), "--counterfactuals", str(corpus / "counterfactuals.jsonl"),
                        "--out", str(shards), "--image-size", "64", "--maxcount", "16", "--workers", "1"]) == 0
    repo = Path(__file__).resolve().parents[1]
    config = tmp_path / "tiny.yaml"
    config.write_text(
        "data:\n  num_workers: 1\n  shuffle_buffer: 16\n"
        f"model:\n  text_name_or_path: {bert}\n  image_arch: resnet-tiny\n  embed_dim: 16\n"
        f"train:\n  deepspeed_config: {repo / 'ds_configs' / 'cpu_zero0_fp32.json'}\n  micro_batch: 8\n"
        "  grad_accum: 1\n  checkpoint_every: 100\nwandb:\n  enabled: false\n")
    out = tmp_path / "ablate"
    cf_types = [*PERTURBATION_TYPES, *COUNTERFACTUAL_TYPES]
    argv = ["ablate", "--config", str(config), "--shards", str(shards), "--presets", "convirt", "--seeds", "0,1",
            "--variant", f"cf:loss.preset=full,loss.pert_types=[{','.join(cf_types)}]",
            "--max-steps", "2", "--nproc", "1", "--bootstrap", "20", "--chexpert-finetune", "probe:2",
            "--nli-finetune", "probe:2", "--out", str(out)]  # --corpus: from the manifest's inputs.pairs
    assert pertvl_main(argv) == 0

    cfg = yaml.safe_load((out / "cf-s1" / "config.yaml").read_text())
    assert cfg["loss"]["preset"] == "full" and cfg["loss"]["pert_types"] == cf_types and cfg["train"]["seed"] == 1
    assert yaml.safe_load((out / "convirt-s0" / "config.yaml").read_text())["loss"]["preset"] == "convirt"
    logged = [json.loads(line) for line in (out / "cf-s0" / "metrics.jsonl").read_text().splitlines()]
    assert any(m.get(f"data/pert_negatives/{t}", 0) > 0 for m in logged for t in COUNTERFACTUAL_TYPES)

    def read(run: str, path: str) -> dict:
        return json.loads((out / run / path).read_text())

    fields = {  # column → its value in the per-run JSON files, read without pertvl's flattening
        "structure/overall": lambda r: read(r, "eval/structure.json")["overall"]["accuracy"],
        "retrieval/image_to_text/R@10": lambda r: read(r, "eval/retrieval.json")["image_to_text"]["R@10"],
        "zeroshot/mean_auroc": lambda r: read(r, "eval/zeroshot.json")["mean_auroc"],
        "chexpert/Consolidation/auroc":
            lambda r: read(r, "finetune/chexpert.json")["test"]["per_label"]["Consolidation"]["auroc"],
        "chexpert/Pleural Effusion/accuracy":
            lambda r: read(r, "finetune/chexpert.json")["test"]["per_label"]["Pleural Effusion"]["accuracy"],
        "chexpert/mean_accuracy": lambda r: read(r, "finetune/chexpert.json")["test"]["mean_accuracy"],
        "nli/phantom/accuracy": lambda r: read(r, "finetune/nli_phantom.json")["test"]["accuracy"],
    }
    assert read("cf-s0", "finetune/chexpert.json")["data"]["test_rows"] == sum(
        json.loads(line)["split"] != "train" for line in (corpus / "pairs.jsonl").read_text().splitlines())
    doc = json.loads((out / "comparison.json").read_text())
    assert [r["config"] for r in doc["rows"]] == ["convirt", "cf"] and set(fields) <= set(doc["summary"])
    md = (out / "comparison.md").read_text()
    for row in doc["rows"]:
        for key, field in fields.items():
            values = [field(f"{row['config']}-s{s}") for s in (0, 1)]
            if None in values:  # an undefined AUROC (one class) is left out of the mean, as the table does
                continue
            m = row["metrics"][key]
            assert m["mean"] == pytest.approx(mean(values), abs=1e-12) and m["n"] == 2
            assert m["std"] == pytest.approx(stdev(values), abs=1e-12)
        nli = [fields["nli/phantom/accuracy"](f"{row['config']}-s{s}") for s in (0, 1)]
        assert f"{100 * mean(nli):.1f} ± {100 * stdev(nli):.1f}" in md.split(f"| {row['label']} | 2 |")[1]
    capsys.readouterr()
    assert pertvl_main(argv) == 0
    assert capsys.readouterr().out.count("complete, skipped") == 4 * (1 + 1 + 2)  # train, eval, II, III


def test_holdout_types_train_lpert_presets_without_each_type_and_baselines_once(stand_ins, inputs, capsys):
    """`--holdout-type` (issue 13 §3): full/no_local once more per held-out type with loss.pert_types =
    the other types (evaluated on structure only), the plain runs of every preset once per seed (the
    comparison table, and the baselines of the holdout table); the table's rows are the held-out types."""
    from pertvl.data.records import PERTURBATION_TYPES

    argv = _argv(inputs, "--holdout-type", "shuffle_all", "--holdout-type", "antonym_adjectives")
    assert pertvl_main(argv) == 0
    trained = {Path(a[a.index("--out") + 1]).name: a for a, _ in stand_ins.trained}
    assert len(trained) == 3 * (4 + 2 * 2)
    for name, args in trained.items():
        sets = [args[i + 1] for i, a in enumerate(args) if a == "--set"]
        pert = [x for x in sets if x.startswith("loss.pert_types=")]
        if "-without_" in name:
            held = name.split("-without_")[1].rsplit("-s", 1)[0]
            assert pert == [f"loss.pert_types=[{','.join(t for t in PERTURBATION_TYPES if t != held)}]"]
        else:
            assert pert == []
    held_evals = [c[1] for c in stand_ins.calls if "-without_" in c[c.index("--run") + 1]]
    assert len(held_evals) == 3 * 2 * 2 and set(held_evals) == {"structure"}
    assert [r["config"] for r in json.loads((inputs["out"] / "comparison.json").read_text())["rows"]] == [
        "convirt", "gloria", "no_local", "full"]
    table = json.loads((inputs["out"] / "holdout.json").read_text())
    assert [r["type"] for r in table["rows"]] == ["shuffle_all", "antonym_adjectives"]
    for i, row in enumerate(table["rows"]):
        for preset in ("convirt", "gloria", "no_local", "full"):
            values = [_value(preset, s, 0.1 * (i + 1)) for s in (0, 1, 2)]
            assert row["metrics"][preset]["mean"] == pytest.approx(np.mean(values))
            assert row["metrics"][preset]["std"] == pytest.approx(np.std(values, ddof=1))
    md = (inputs["out"] / "holdout.md").read_text()
    assert "| held-out type T | Ours (trained without T) |" in md and "| antonym_adjectives |" in md
    assert "Leave-one-type-out table" in capsys.readouterr().out
    before = len(stand_ins.trained)
    assert pertvl_main(argv) == 0 and len(stand_ins.trained) == before  # complete runs are skipped
    assert pertvl_main([*_argv(inputs), "--holdout-type", "cf_laterality"]) == 2
    assert "evaluation-only" in capsys.readouterr().err


@pytest.fixture
def corpus_inputs(inputs, tmp_path) -> dict[str, Path]:
    """`inputs` whose shard manifest records the corpus it was packed from (inputs.pairs), with the files
    Tables II/III read, its train split and the counterfactual types it carries."""
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for name in ("labels.csv", "pairs.jsonl", "nli_train.jsonl", "nli_dev.jsonl", "nli_test.jsonl"):
        (corpus / name).write_text(f"{name}\n")
    (inputs["shards"] / "manifest.json").write_text(json.dumps({
        **MANIFEST, "inputs": {"pairs": str(corpus / "pairs.jsonl")}, "counterfactual_types": ["cf_laterality",
                                                                                               "cf_negation"]}))
    return {**inputs, "corpus": corpus}


MANIFEST = {"format": "pertvl-shards/1", "image_size": 64, "splits": {"train": {"num_samples": 8, "shards": [
    {"name": "train-000000.tar", "num_samples": 8, "bytes": 1, "sha256": "0"}]}}}


CF = "cf:loss.preset=full,loss.pert_types=[shuffle_all,reverse,cf_negation]"


def test_finetune_stages_and_a_variant_reach_the_table(stand_ins, corpus_inputs, tmp_path, capsys):
    """Tables II and III are stages of every comparison run (`pertvl finetune` with the run's weights,
    the corpus from the manifest); a --variant is one more row; the table's cells are mean ± sample std
    of the per-run JSONs; finished stages are skipped, and new weights re-run what depends on them."""
    inputs, corpus = corpus_inputs, corpus_inputs["corpus"]
    mednli = tmp_path / "mednli"
    mednli.mkdir()
    for name in ("mli_train_v1.jsonl", "mli_dev_v1.jsonl", "mli_test_v1.jsonl"):
        (mednli / name).write_text("{}\n")
    argv = [*_argv(inputs, "--variant", CF, "--mednli", str(mednli), tables="II,III,IV")]
    argv[argv.index("--presets") + 1] = "convirt,full"
    assert pertvl_main(argv) == 0
    out = inputs["out"]

    trained = {Path(a[a.index("--out") + 1]).name: a for a, _ in stand_ins.trained}
    assert sorted(trained) == sorted(f"{r}-s{s}" for r in ("convirt", "full", "cf") for s in (0, 1, 2))
    cf = trained["cf-s1"]
    assert [cf[i + 1] for i, a in enumerate(cf) if a == "--set"] == [
        "loss.preset=full", "loss.pert_types=[shuffle_all,reverse,cf_negation]", "train.seed=1"]
    finetunes = [c for c in stand_ins.calls if c[0] == "finetune"]
    assert len(finetunes) == 9 * 3  # chexpert, phantom NLI, MedNLI per run
    chexpert = next(c for c in finetunes if c[1] == "chexpert" and c[c.index("--run") + 1] == str(out / "cf-s2"))
    assert chexpert[chexpert.index("--csv") + 1] == str(corpus / "labels.csv")
    assert chexpert[chexpert.index("--split-from") + 1] == str(corpus / "pairs.jsonl")
    assert "--freeze-encoder" in chexpert and chexpert[chexpert.index("--out") + 1] == str(out / "cf-s2" / "finetune")
    nli = [c for c in finetunes if c[1] == "nli" and c[c.index("--run") + 1] == str(out / "full-s0")]
    assert [c[c.index("--dataset") + 1] for c in nli] == ["phantom", "MedNLI"]
    assert nli[1][nli[1].index("--dev") + 1] == str(mednli / "mli_dev_v1.jsonl")

    doc = json.loads((out / "comparison.json").read_text())
    assert [r["config"] for r in doc["rows"]] == ["convirt", "full", "cf"]
    expected = {"chexpert/Consolidation/auroc": 0.0, "chexpert/Pleural Effusion/auroc": 0.05,
                "chexpert/Consolidation/accuracy": 0.0, "chexpert/Pleural Effusion/accuracy": 0.1,
                "nli/phantom/accuracy": -0.3, "nli/MedNLI/accuracy": -0.4}
    for row in doc["rows"]:
        for key, shift in expected.items():
            values = [_ft_value(row["config"], s, shift) for s in (0, 1, 2)]
            assert row["metrics"][key]["mean"] == pytest.approx(sum(values) / 3, abs=1e-9)
            assert row["metrics"][key]["std"] == pytest.approx(np.std(values, ddof=1), abs=1e-9)
        aurocs = [[_ft_value(row["config"], s, x) for x in (0.0, 0.05)] for s in (0, 1, 2)]
        assert row["metrics"]["chexpert/mean_auroc"]["mean"] == pytest.approx(np.mean(aurocs), abs=1e-9)
        assert row["metrics"]["structure/overall"]["values"] == [_value(row["config"], s) for s in (0, 1, 2)]
    assert {"structure/overall", "chexpert/mean_auroc", "nli/phantom/accuracy", "nli/MedNLI/accuracy",
            "retrieval/image_to_text/R@10", "zeroshot/mean_auroc", "grounding/pointing"} <= set(doc["summary"])
    assert "nli/phantom/macro_f1" in doc["columns"] and "nli/phantom/macro_f1" not in doc["summary"]
    md = (out / "comparison.md").read_text()
    summary = md.split("## Summary")[1].split("\n## ")[0]
    assert "| Method | seeds | Structure overall |" in summary and "Avg AUROC" in summary
    assert "NLI phantom accuracy" in summary and "NLI MedNLI accuracy" in summary
    cf_nli = [_ft_value("cf", s, -0.3) for s in (0, 1, 2)]
    assert f"{100 * np.mean(cf_nli):.1f} ± {100 * np.std(cf_nli, ddof=1):.1f}" in summary.split("| cf |")[1]
    assert "linear probe on the frozen tower" in md and "The paper fine-tunes end to end" in md
    assert "Row cf: trained with `--set loss.preset=full --set loss.pert_types=" in md
    runs = json.loads((out / "runs.json").read_text())
    assert runs["variants"] == {"cf": ["loss.preset=full", "loss.pert_types=[shuffle_all,reverse,cf_negation]"]}

    # Re-run: every stage complete; new weights of one run re-run its evaluation and fine-tunes only.
    stand_ins.trained.clear()
    stand_ins.calls.clear()
    capsys.readouterr()
    assert pertvl_main(argv) == 0
    assert stand_ins.trained == [] and stand_ins.calls == []
    assert capsys.readouterr().out.count("complete, skipped") == 9 * (1 + 1 + 3)
    (out / "cf-s0" / "final" / "model.safetensors").write_bytes(b"retrained")
    assert pertvl_main(argv) == 0
    assert {c[c.index("--run") + 1] for c in stand_ins.calls} == {str(out / "cf-s0")}
    assert sorted(c[0] for c in stand_ins.calls) == ["eval"] * len(ablate.evaluations()) + ["finetune"] * 3
    # A changed fine-tune mode re-runs that table's stages, nothing else.
    stand_ins.calls.clear()
    assert pertvl_main([*argv, "--chexpert-finetune", "end-to-end:2"]) == 0
    assert {c[1] for c in stand_ins.calls} == {"chexpert"} and len(stand_ins.calls) == 9
    assert all("--freeze-encoder" not in c and c[c.index("--epochs") + 1] == "2" for c in stand_ins.calls)


def test_finetune_and_variant_inputs_are_checked_before_training(stand_ins, corpus_inputs, capsys):
    inputs, corpus = corpus_inputs, corpus_inputs["corpus"]

    def refused(*extra, tables="II,III,IV") -> str:
        assert pertvl_main(_argv(inputs, *extra, tables=tables)) == 2
        return capsys.readouterr().err

    (corpus / "nli_dev.jsonl").unlink()
    err = refused()
    assert f"--corpus {corpus}: missing {corpus / 'nli_dev.jsonl'}" in err and "pertvl data phantom --nli" in err
    assert pertvl_main(_argv(inputs, tables="II")) == 0  # Table II alone needs no NLI file
    stand_ins.trained.clear()
    (corpus / "nli_dev.jsonl").write_text("{}\n")
    other = corpus.parent / "elsewhere"
    other.mkdir()
    assert f"--corpus {other}: missing {other / 'labels.csv'}" in refused("--corpus", str(other))
    (inputs["shards"] / "manifest.json").write_text('{"format": "pertvl-shards/1"}')
    assert "records no source pairs (inputs.pairs): give --corpus DIR" in refused()
    assert "--tables: unknown ['V']" in refused(tables="IV,V")
    assert "needs Table IV" in refused("--holdout-type", "reverse", tables="II")
    err = refused("--corpus", str(corpus), "--radnli", str(other), tables="III")
    assert f"--radnli {other}: missing {other / 'radnli_dev_v1.jsonl'}, {other / 'radnli_test_v1.jsonl'}" in err
    assert "expected MODE[:EPOCHS]" in refused("--nli-finetune", "fast", tables="IV")

    # variants: syntax, names, the train config they make, counterfactuals the shards must carry
    assert "expected NAME:key=value" in refused("--variant", "cf")
    assert "train.seed is the ablation's" in refused("--variant", "cf:train.seed=3", tables="IV")
    assert "repeat or are loss presets" in refused("--variant", "full:loss.beta=0", tables="IV")
    assert "--variant cf: LossConfig: unknown pert_types ['cf_colour']" in refused(
        "--variant", "cf:loss.pert_types=[reverse,cf_colour]", tables="IV")
    assert "--variant typo: unknown config key 'train.max_stpes'" in refused(
        "--variant", "typo:train.max_stpes=3", tables="IV")
    assert stand_ins.trained == []
    (inputs["shards"] / "manifest.json").write_text(json.dumps(MANIFEST))  # packed without --counterfactuals
    err = refused("--variant", CF, tables="IV")
    assert "--variant cf: loss.pert_types asks for counterfactual negatives ['cf_negation']" in err
    assert "carry no counterfactuals" in err and "pertvl pack --counterfactuals" in err
    assert stand_ins.trained == []


def test_a_variant_trains_on_its_own_shards_of_the_same_pairs(stand_ins, inputs, tmp_path, capsys):
    """`data.shards=DIR` in a --variant (e.g. shards packed with `pertvl perturb --antonyms reviewed`)
    trains that row on DIR and evaluates it on the ablation's shards; DIR must hold the same pairs."""
    packed = {**MANIFEST, "inputs": {"pairs_sha256": "a" * 64}}
    (inputs["shards"] / "manifest.json").write_text(json.dumps(packed))
    reviewed = tmp_path / "shards-reviewed"
    reviewed.mkdir()
    variant = f"reviewed:loss.preset=full,data.shards={reviewed}"
    argv = _argv(inputs, "--variant", variant)
    argv[argv.index("--presets") + 1], argv[argv.index("--seeds") + 1] = "full", "0"

    assert pertvl_main(argv) == 2  # no manifest there yet
    assert f"--variant reviewed: data.shards {reviewed}: no shard manifest" in capsys.readouterr().err
    (reviewed / "manifest.json").write_text(json.dumps({**MANIFEST, "inputs": {"pairs_sha256": "b" * 64}}))
    assert pertvl_main(argv) == 2
    assert "were not packed from the pairs of" in capsys.readouterr().err
    assert stand_ins.trained == []

    (reviewed / "manifest.json").write_text(json.dumps(packed))
    assert pertvl_main(argv) == 0
    trained = {Path(a[a.index("--out") + 1]).name: a for a, _ in stand_ins.trained}
    assert trained["full-s0"][trained["full-s0"].index("--shards") + 1] == str(inputs["shards"])
    assert trained["reviewed-s0"][trained["reviewed-s0"].index("--shards") + 1] == str(reviewed)
    evals = [c for c in stand_ins.calls if c[0] == "eval" and str(inputs["out"] / "reviewed-s0") in c]
    assert evals and all(c[c.index("--shards") + 1] == str(inputs["shards"]) for c in evals)
