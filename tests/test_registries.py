"""The three registries of docs/ARCHITECTURE.md, each shown from this file alone.

`register_toys()` registers a toy perturbation type, a toy loss term (with a preset that sums it)
and a toy evaluation; nothing in pertvl names them. They then run through the real entry points:
`pertvl perturb` and `pertvl eval text-structure` (the type, its label in the report),
`pertvl train` in a subprocess that loads this file as a plugin (PERTVL_PLUGINS=this file:register_toys;
the term appears as loss/<name> in metrics.jsonl), and `pertvl eval <toy>`, the comparison table and
the demo report's sections (the evaluation). In-process registrations are undone after each test
(`Registry.scoped`), so the rest of a test session sees the built-in registries only.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from pertvl.cli import main
from pertvl.data.perturb import PERTURBATIONS, TOO_FEW_WORDS, RuleInput, register_type
from pertvl.data.records import PERTURBATION_TYPES
from pertvl.evaluate.encoder import image_array
from pertvl.evaluate.evaluation import Evaluation, MetricInfo, Suite
from pertvl.evaluate.registry import EVALUATIONS
from pertvl.evaluate.registry import register as register_evaluation
from pertvl.losses import LOSS_PRESETS, LOSS_TERMS, LossConfig, PretrainLoss, register_preset, register_term

REPO = Path(__file__).resolve().parents[1]
PLUGIN = f"{Path(__file__).resolve()}:register_toys"

TOY_TYPE = "swap_ends"
TOY_TYPE_LABEL = "Swap first and last words"
TOY_TERM = "embed_norm"
TOY_WEIGHT = 0.01
TOY_PRESET = "toy_reg"
TOY_PRESET_LABEL = "Toy: global + embedding norm"
TOY_EVAL = "toy-alignment"
TOY_SCHEMA = "pertvl-toy-alignment/1"


# ----------------------------------------------------------------------------- the three toys


def _swap_ends(x: RuleInput) -> list[str] | str:
    """The first and the last word trade places (the registry catches an identical result)."""
    if len(x.words) < 2:
        return TOO_FEW_WORDS
    return [x.words[-1], *x.words[1:-1], x.words[0]]


def _embed_norm(out, config, rank: int, world_size: int):
    """Mean squared norm of the global image embeddings: needs no feature beyond the global ones."""
    return out.image.global_emb.float().pow(2).sum(-1).mean()


@dataclass
class ToyAlignment:
    """Mean cosine of each image with its own report, and with the other reports."""

    matched: float
    mismatched: float
    n: int
    info: dict[str, Any] = field(default_factory=dict)
    schema: str = TOY_SCHEMA

    def to_json(self) -> dict[str, Any]:
        return {"schema": self.schema, "matched": self.matched, "mismatched": self.mismatched, "n": self.n,
                "info": dict(self.info)}

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> ToyAlignment:
        if d.get("schema") != TOY_SCHEMA:
            raise ValueError(f"not a toy alignment result: {d.get('schema')!r}")
        return cls(float(d["matched"]), float(d["mismatched"]), int(d["n"]), dict(d.get("info", {})))

    def markdown(self, name: str) -> str:
        return (f"# Toy alignment: {name}\n\n| | mean cosine |\n| :--- | ---: |\n| matched | {self.matched:.3f} |\n"
                f"| mismatched | {self.mismatched:.3f} |\n\n{self.n} images.\n")

    def figures(self, out_dir: Path, name: str) -> dict[str, Path]:
        return {}

    def metrics(self) -> dict[str, float | None]:
        return {"toy_alignment/gap": self.matched - self.mismatched}

    @classmethod
    def metric_info(cls, key: str) -> MetricInfo:
        return MetricInfo("Toy cosine gap", percent=False, order=(0,))

    def headline(self) -> str:
        return f"toy alignment gap {self.matched - self.mismatched:.3f} over {self.n} images"


def _toy_args(p) -> None:
    p.add_argument("--max-images", type=int, default=64, help="images to score")


def _toy_run(encoder, samples, options) -> ToyAlignment:
    samples = [s for _, s in zip(range(options.max_images), samples, strict=False)]
    images = np.stack([image_array(s) for s in samples])
    v = encoder.embed_images(images)
    t = encoder.embed_texts([s.meta["text"] for s in samples])
    sim = (v / np.linalg.norm(v, axis=1, keepdims=True)) @ (t / np.linalg.norm(t, axis=1, keepdims=True)).T
    n = len(samples)
    off = (sim.sum() - np.trace(sim)) / max(n * (n - 1), 1)
    return ToyAlignment(float(np.trace(sim) / n), float(off), n)


TOY_EVALUATION = Evaluation(
    name=TOY_EVAL, help="toy: matched vs mismatched cosine", description="A toy evaluation from a test.",
    add_arguments=_toy_args, run=_toy_run, result_type=ToyAlignment, schemas=(TOY_SCHEMA,), title="Toy alignment",
    suites=frozenset({Suite.DEMO, Suite.ABLATE}),
)


def register_toys() -> None:
    """The plugin entry: one registration per registry (and a preset that sums the toy term)."""
    register_type(TOY_TYPE, _swap_ends, TOY_TYPE_LABEL)
    register_term(TOY_TERM, _embed_norm, weight=TOY_WEIGHT, label="mean |v|²")
    register_preset(TOY_PRESET, ("global", TOY_TERM), TOY_PRESET_LABEL)
    register_evaluation(TOY_EVALUATION)


@pytest.fixture
def toys():
    """The toys registered in this process for one test, removed afterwards."""
    with PERTURBATIONS.scoped(), LOSS_TERMS.scoped(), LOSS_PRESETS.scoped(), EVALUATIONS.scoped():
        register_toys()
        yield


# ----------------------------------------------------------------------------- registries themselves


def test_builtins_are_fixed_and_registrations_are_scoped(toys):
    assert PERTURBATIONS.builtin == PERTURBATION_TYPES  # the import-time check's invariant
    assert list(PERTURBATIONS)[-1] == TOY_TYPE and list(LOSS_TERMS) == ["global", "local", "pert", TOY_TERM]
    with pytest.raises(ValueError, match="built in"):
        register_term("local", _embed_norm)
    with pytest.raises(ValueError, match="already registered"):
        register_type(TOY_TYPE, _swap_ends)
    with pytest.raises(ValueError, match="unknown"):
        register_preset("bad", ("global", "nope"))
    with LOSS_TERMS.scoped():
        register_term("scratch", _embed_norm)
        assert "scratch" in LOSS_TERMS
    assert "scratch" not in LOSS_TERMS


def test_registrations_end_with_the_fixture():
    assert TOY_TYPE not in PERTURBATIONS and TOY_TERM not in LOSS_TERMS and TOY_EVAL not in EVALUATIONS
    assert list(LOSS_PRESETS) == ["convirt", "gloria", "no_local", "full"]


# ----------------------------------------------------------------------------- a perturbation type


def test_toy_perturbation_type_through_perturb_and_text_structure(toys, tmp_path, capsys, minilm_path):
    text = "heart size is normal and the lungs are clear"
    assert main(["perturb", "--text", text, "--types", f"reverse,{TOY_TYPE}"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["perturbations"][TOY_TYPE] == "clear size is normal and the lungs are heart"
    assert record["unavailable"]["shuffle_all"] == "not_requested"
    # Without a request the nine are computed, the record and the shard formats unchanged.
    assert main(["perturb", "--text", text]) == 0
    record = json.loads(capsys.readouterr().out)
    assert set(record["perturbations"]) | set(record["unavailable"]) == set(PERTURBATION_TYPES)

    csv_path = tmp_path / "indiana_reports.csv"
    csv_path.write_text("uid,findings,impression\n"
                        '1,"The heart size is normal. The lungs are clear.",No acute disease.\n'
                        '2,"Small left pleural effusion. No pneumothorax.",Left effusion.\n'
                        '3,"Mild cardiomegaly with clear lungs.",Cardiomegaly.\n')
    out = tmp_path / "eval"
    assert main(["eval", "text-structure", "--text-model", minilm_path, "--device", "cpu", "--reports",
                 str(csv_path), "--out", str(out), "--types", f"reverse,{TOY_TYPE}", "--bootstrap", "0"]) == 0
    result = json.loads((out / "text_structure.json").read_text())
    # the requested types, then the text counterfactual rows (issue 13)
    assert list(result["per_type"]) == ["reverse", TOY_TYPE, "cf_laterality", "cf_negation"]
    assert result["per_type"][TOY_TYPE]["n"] == 3
    assert f"| {TOY_TYPE_LABEL} (`{TOY_TYPE}`) |" in (out / "text_structure.md").read_text()


# ----------------------------------------------------------------------------- a loss term


@pytest.fixture(scope="module")
def toy_run(tiny_train, tmp_path_factory) -> Path:
    """`pertvl train` (plain python, one rank) with the toy preset, the toys loaded as a plugin."""
    root = tmp_path_factory.mktemp("toy_run")
    run, log = root / "run", root / "train.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "RANK", "LOCAL_", "MASTER_"))}
    env.pop("WORLD_SIZE", None)
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", WANDB_MODE="offline", TOKENIZERS_PARALLELISM="false",
               PERTVL_PLUGINS=PLUGIN, TORCH_EXTENSIONS_DIR=str(root / "torch_extensions"))
    cmd = [sys.executable, "-m", "pertvl", "train", "--config", str(tiny_train.config), "--out", str(run),
           "--max-steps", "4", "--deepspeed-config", str(REPO / "ds_configs" / "cpu_zero0_fp32.json"),
           "--set", f"loss.preset={TOY_PRESET}", "--set", "data.num_workers=1", "--no-wandb"]
    with open(log, "w") as f:
        proc = subprocess.run(cmd, env=env, cwd=REPO, stdout=f, stderr=subprocess.STDOUT, timeout=600)
    assert proc.returncode == 0, log.read_text()[-4000:]
    return run


def test_toy_term_is_summed_and_needs_no_extra_features(toys):
    loss = PretrainLoss({"preset": TOY_PRESET})
    assert loss.names == ("total", "global", TOY_TERM)
    assert loss.model_kwargs() == {"need_local": False, "need_perturbations": False}
    assert LOSS_TERMS[TOY_TERM].weight_in(LossConfig(preset=TOY_PRESET, weights={TOY_TERM: 0.5})) == 0.5
    with pytest.raises(ValueError, match="loss.alpha"):
        PretrainLoss({"preset": "full", "weights": {"local": 0.5}})


@pytest.mark.slow
def test_toy_loss_term_is_logged_by_pertvl_train(toy_run):
    metrics = [json.loads(line) for line in (toy_run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2, 3, 4]
    for m in metrics:
        assert {k for k in m if k.startswith("loss/")} == {"loss/total", "loss/global", f"loss/{TOY_TERM}"}
        assert m["loss/total"] == pytest.approx(m["loss/global"] + TOY_WEIGHT * m[f"loss/{TOY_TERM}"], rel=1e-6)
    assert (toy_run / "final" / "model.safetensors").is_file()


# ----------------------------------------------------------------------------- an evaluation


@pytest.mark.slow
def test_toy_evaluation_through_pertvl_eval_and_the_reports(toys, toy_run, tiny_train, tmp_path, capsys):
    from pertvl.demo import report_sections
    from pertvl.evaluate import ablate
    from pertvl.evaluate.report import write_comparison_table

    out = tmp_path / "eval"
    assert main(["eval", TOY_EVAL, "--run", str(toy_run), "--device", "cpu", "--shards", str(tiny_train.shards),
                 "--split", "test", "--out", str(out), "--max-images", "8"]) == 0
    assert "toy alignment gap" in capsys.readouterr().out
    doc = json.loads((out / "toy_alignment.json").read_text())
    assert doc["schema"] == TOY_SCHEMA and doc["n"] == 8 and doc["info"]["encoder"] == "torch"
    assert doc["info"]["split"] == "test"  # the shared provenance, added by `pertvl eval`

    # The reports: the demo's sections and the ablation's comparison table pick it up.
    sections = "\n".join(report_sections(out))
    assert "## Toy alignment" in sections and "| matched |" in sections
    assert TOY_EVAL in [e.name for e in ablate.evaluations()]
    paths = write_comparison_table({TOY_PRESET: [{"toy_alignment": doc}], "full": [{"toy_alignment/gap": 0.1}]},
                                   tmp_path, "comparison")
    table = json.loads(paths["json"].read_text())
    assert table["columns"] == ["toy_alignment/gap"]
    assert [r["label"] for r in table["rows"]] == ["Ours", TOY_PRESET_LABEL]
    md = paths["markdown"].read_text()
    assert "## Toy alignment" in md and "| Method | seeds | Toy cosine gap |" in md
