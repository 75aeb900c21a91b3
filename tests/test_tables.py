"""The tables of docs/ARCHITECTURE.md: adding a loss term or an evaluation is its code plus one
table line, and it then runs through the real entry points.

A toy loss term (with a preset that sums it) and a toy evaluation are put in the tables for one test
(monkeypatch.setitem); nothing in pertvl names them. The term is summed and logged by the loss;
the evaluation runs as `pertvl eval <toy>` and reaches the comparison table and the demo report.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch

from pertvl.cli import main
from pertvl.data.perturb import PERTURBATIONS, type_label
from pertvl.data.records import PERTURBATION_TYPES
from pertvl.evaluate.catalog import EVALUATIONS
from pertvl.evaluate.encoder import image_array
from pertvl.evaluate.evaluation import Evaluation, MetricInfo, Suite
from pertvl.losses import LOSS_PRESETS, LOSS_TERMS, LossTerm, PretrainLoss

REPO = Path(__file__).resolve().parents[1]

TOY_TERM = "embed_norm"
TOY_WEIGHT = 0.01
TOY_PRESET = "toy_reg"
TOY_PRESET_LABEL = "Toy: global + embedding norm"
TOY_EVAL = "toy-alignment"
TOY_SCHEMA = "pertvl-toy-alignment/1"


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


@pytest.fixture
def toys(monkeypatch):
    """The toy term, its preset and the toy evaluation in the tables for one test."""
    monkeypatch.setitem(LOSS_TERMS, TOY_TERM, LossTerm(_embed_norm, None))
    monkeypatch.setitem(LOSS_PRESETS, TOY_PRESET, (("global", TOY_TERM), TOY_PRESET_LABEL))
    monkeypatch.setitem(EVALUATIONS, TOY_EVAL, TOY_EVALUATION)


def test_tables_are_plain_and_in_order():
    assert tuple(PERTURBATIONS) == PERTURBATION_TYPES  # the import-time check's invariant
    assert type_label("reverse") == "Reverse sentence" and type_label("nope") == "nope"
    assert list(LOSS_TERMS) == ["global", "local", "pert"]
    assert list(LOSS_PRESETS) == ["convirt", "gloria", "no_local", "full"]
    assert all(set(terms) <= set(LOSS_TERMS) for terms, _ in LOSS_PRESETS.values())
    assert TOY_EVAL not in EVALUATIONS


# ----------------------------------------------------------------------------- a loss term


def test_toy_term_is_summed_and_needs_no_extra_features(toys):
    out = SimpleNamespace(image=SimpleNamespace(global_emb=torch.randn(4, 8)), text=SimpleNamespace(
        global_emb=torch.randn(4, 8)), logit_scale=None)
    loss = PretrainLoss({"preset": TOY_PRESET, "weights": {TOY_TERM: TOY_WEIGHT}})
    assert loss.names == ("total", "global", TOY_TERM)
    assert loss.model_kwargs() == {"need_local": False, "need_perturbations": False}
    res = loss(out)
    assert res.total.item() == pytest.approx(res.terms["global"].item() + TOY_WEIGHT * res.terms[TOY_TERM].item(),
                                             rel=1e-6)
    with pytest.raises(ValueError, match="loss.alpha"):
        PretrainLoss({"preset": "full", "weights": {"local": 0.5}})


# ----------------------------------------------------------------------------- an evaluation


@pytest.fixture(scope="module")
def toy_run(tiny_train, tmp_path_factory) -> Path:
    """`pertvl train` (plain python, one rank, convirt) for the toy evaluation to score."""
    root = tmp_path_factory.mktemp("toy_run")
    run, log = root / "run", root / "train.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "RANK", "LOCAL_", "MASTER_"))}
    env.pop("WORLD_SIZE", None)
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", WANDB_MODE="offline", TOKENIZERS_PARALLELISM="false",
               TORCH_EXTENSIONS_DIR=str(root / "torch_extensions"))
    cmd = [sys.executable, "-m", "pertvl", "train", "--config", str(tiny_train.config), "--out", str(run),
           "--max-steps", "2", "--deepspeed-config", str(REPO / "ds_configs" / "cpu_zero0_fp32.json"),
           "--set", "loss.preset=convirt", "--set", "data.num_workers=1", "--no-wandb"]
    with open(log, "w") as f:
        proc = subprocess.run(cmd, env=env, cwd=REPO, stdout=f, stderr=subprocess.STDOUT, timeout=600)
    assert proc.returncode == 0, log.read_text()[-4000:]
    return run


@pytest.mark.slow
def test_toy_evaluation_through_pertvl_eval_and_the_reports(toys, toy_run, tiny_train, tmp_path, capsys):
    from pertvl.demo import report_sections
    from pertvl.evaluate import ablate
    from pertvl.evaluate.comparison import write_comparison_table

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
