"""loss.pert_types (issue 13 §2-3): L_pert on a subset of the perturbation types, the count of the
negatives it used in the run's metrics, and `pertvl ablate --holdout-type` (plan and table)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from pertvl.data.records import PERTURBATION_TYPES
from pertvl.losses import LossConfig, PretrainLoss, perturbation_loss

K = len(PERTURBATION_TYPES)
HELD = "antonym_adjectives"


def _output(b=6, d=8, seed=3):
    g = torch.Generator().manual_seed(seed)

    def r(*s):
        return torch.randn(*s, generator=g).requires_grad_()

    valid = torch.rand(b, K, generator=g) < 0.7
    valid[:, PERTURBATION_TYPES.index(HELD)] = True
    valid[0] = False  # a row without negatives stays out of the mean
    image = SimpleNamespace(global_emb=r(b, d), regions=None, grid=None)
    text = SimpleNamespace(global_emb=r(b, d), words=None, word_mask=None)
    return SimpleNamespace(image=image, text=text, pert_emb=r(b, K, d), pert_valid=valid, logit_scale=None)


def test_default_is_all_nine_types_and_bit_identical():
    assert LossConfig().pert_types == list(PERTURBATION_TYPES) and LossConfig().pert_holdout == ()
    out = _output()
    ref = perturbation_loss(out.image.global_emb, out.text.global_emb, out.pert_emb, out.pert_valid, 0.07)
    for cfg in ({"preset": "no_local"}, {"preset": "no_local", "pert_types": list(reversed(PERTURBATION_TYPES))}):
        res = PretrainLoss(cfg)(out)
        assert torch.equal(res.terms["pert"], ref)
    assert LossConfig().mask_pert_valid(out.pert_valid) is out.pert_valid
    assert LossConfig().pert_type_mask() is None


def test_a_held_out_type_contributes_nothing_to_l_pert():
    k = PERTURBATION_TYPES.index(HELD)
    cfg = {"preset": "no_local", "pert_types": [t for t in PERTURBATION_TYPES if t != HELD]}
    assert LossConfig(**cfg).pert_holdout == (HELD,)
    out = _output()
    loss = PretrainLoss(cfg)(out).terms["pert"]
    full = PretrainLoss({"preset": "no_local"})(out).terms["pert"]
    assert loss.item() != full.item()  # the type is valid in the batch: holding it out changes L_pert
    dropped = out.pert_valid.clone()
    dropped[:, k] = False
    assert torch.equal(loss, perturbation_loss(out.image.global_emb, out.text.global_emb, out.pert_emb, dropped))
    loss.backward()
    assert torch.all(out.pert_emb.grad[:, k] == 0) and out.pert_emb.grad.abs().sum() > 0
    # whatever the held-out type's embedding holds, the loss is the same
    changed = _output()
    with torch.no_grad():
        changed.pert_emb[:, k] = torch.randn_like(changed.pert_emb[:, k]) * 100
    assert torch.equal(PretrainLoss(cfg)(changed).terms["pert"], loss.detach())


def test_pert_types_validation():
    with pytest.raises(ValueError, match=r"unknown pert_types \['antonyms'\]; the training batch carries \['shuffle_all'"):
        LossConfig(pert_types=["antonyms"])
    with pytest.raises(ValueError, match=r"\['cf_laterality'\] are counterfactual types, evaluation-only for now"):
        LossConfig(pert_types=["reverse", "cf_laterality"])
    with pytest.raises(ValueError, match="pert_types is empty"):
        LossConfig(pert_types=[])
    with pytest.raises(ValueError, match="repeats a type"):
        LossConfig(pert_types=["reverse", "reverse"])
    assert LossConfig.from_dict({"pert_types": ["reverse", "shuffle_all"]}).pert_types == ["shuffle_all", "reverse"]


# ------------------------------------------------------------------------- a real training run


def _train(setup, run: Path, tmp_path: Path, *extra: str) -> list[dict]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline",
           "TOKENIZERS_PARALLELISM": "false", "TORCH_EXTENSIONS_DIR": str(tmp_path / "torch_extensions")}
    for k in [k for k in env if k.startswith(("RANK", "LOCAL_", "MASTER_", "SLURM_")) or k == "WORLD_SIZE"]:
        env.pop(k)
    proc = subprocess.run(
        [sys.executable, "-m", "pertvl", "train", "--config", str(setup.config), "--out", str(run),
         "--max-steps", "2", "--no-wandb", "--set", "train.checkpoint_every=0", "--set", "data.num_workers=1",
         *extra], env=env, capture_output=True, text=True, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]


def test_training_without_a_type_logs_fewer_negatives_and_none_of_it(tiny_train, tmp_path: Path) -> None:
    base = _train(tiny_train, tmp_path / "all", tmp_path)
    held = _train(tiny_train, tmp_path / "held", tmp_path,
                  "--set", f"loss.pert_types=[{','.join(t for t in PERTURBATION_TYPES if t != HELD)}]")
    assert [m["step"] for m in held] == [1, 2]
    for a, b in zip(base, held, strict=True):  # same seed, same data order
        assert b[f"data/pert_negatives/{HELD}"] == 0 < a[f"data/pert_negatives/{HELD}"]
        assert b["data/pert_negatives"] == a["data/pert_negatives"] - a[f"data/pert_negatives/{HELD}"]
        assert a["data/pert_negatives"] == sum(a[f"data/pert_negatives/{t}"] for t in PERTURBATION_TYPES)
        for t in PERTURBATION_TYPES:
            if t != HELD:
                assert b[f"data/pert_negatives/{t}"] == a[f"data/pert_negatives/{t}"]
    config = json.loads((tmp_path / "held" / "final" / "config.json").read_text())
    assert HELD not in json.dumps(config.get("loss", config))


# ------------------------------------------------------------------------- pertvl ablate --holdout-type


def test_holdout_plan_runs_and_train_arguments(tmp_path: Path) -> None:
    from pertvl.evaluate.ablate import AblationSettings, _train_stage, holdout_types_arg

    assert holdout_types_arg(["all"]) == PERTURBATION_TYPES
    assert holdout_types_arg(["reverse,shuffle_all", "reverse"]) == ("reverse", "shuffle_all")
    s = AblationSettings(config="c.yaml", shards="sh", seeds=(0, 1), out=str(tmp_path),
                         holdout_types=("reverse", HELD))
    assert s.pert_presets == ("no_local", "full") and s.baseline_presets == ("convirt", "gloria")
    names = [r.name for r in s.runs()]
    assert names == [
        "convirt-s0", "gloria-s0",
        "no_local-without_reverse-s0", "full-without_reverse-s0",
        f"no_local-without_{HELD}-s0", f"full-without_{HELD}-s0",
        "convirt-s1", "gloria-s1",
        "no_local-without_reverse-s1", "full-without_reverse-s1",
        f"no_local-without_{HELD}-s1", f"full-without_{HELD}-s1",
    ]  # fmt: skip
    for run in s.runs():
        args = _train_stage(run, s, "cfg", "sha").params["args"]
        sets = [args[i + 1] for i, a in enumerate(args) if a == "--set"]
        assert f"loss.preset={run.preset}" in sets and f"train.seed={run.seed}" in sets
        pert = [x for x in sets if x.startswith("loss.pert_types=")]
        if run.holdout is None:
            assert run.preset in ("convirt", "gloria") and pert == []
        else:
            types = pert[0].removeprefix("loss.pert_types=[").removesuffix("]").split(",")
            assert run.holdout not in types and len(types) == len(PERTURBATION_TYPES) - 1
            assert LossConfig(pert_types=types).pert_holdout == (run.holdout,)  # the value train parses
    # the plain ablation is unchanged: four presets per seed, same folder names as before
    assert [r.name for r in AblationSettings(config="c", shards="s", seeds=(0,)).runs()] == [
        "convirt-s0", "gloria-s0", "no_local-s0", "full-s0"]
    with pytest.raises(ValueError, match="unknown pert_types"):
        AblationSettings(config="c", shards="s", holdout_types=("nope",))
    with pytest.raises(ValueError, match="evaluation-only"):
        AblationSettings(config="c", shards="s", holdout_types=("cf_negation",))
    with pytest.raises(ValueError, match="needs a preset that trains L_pert"):
        AblationSettings(config="c", shards="s", presets=("convirt",), holdout_types=("reverse",))


def test_holdout_table_from_fabricated_results(tmp_path: Path) -> None:
    from pertvl.evaluate.ablate import AblationSettings, holdout_markdown, holdout_table, write_holdout_table

    s = AblationSettings(config="c", shards="s", seeds=(0, 1), out=str(tmp_path), holdout_types=("reverse", HELD))
    acc = {"convirt": 0.2, "gloria": 0.3, "no_local": 0.6, "full": 0.8}
    structure = {}
    for run in s.runs():
        value = acc[run.preset] + 0.1 * run.seed + (0.01 if run.holdout == HELD else 0.0)
        per_type = {t: {"accuracy": 0.99, "n": 10} for t in PERTURBATION_TYPES}  # other types: not read
        for t in ("reverse", HELD):
            if run.holdout in (None, t):
                per_type[t] = {"accuracy": value if run.holdout == t or run.holdout is None else 0.99, "n": 10}
        structure[run.name] = {"per_type": per_type}
    table = holdout_table(s, structure)
    assert [r["type"] for r in table["rows"]] == ["reverse", HELD]
    m = table["rows"][0]["metrics"]
    assert m["full"]["values"] == {"s0": 0.8, "s1": pytest.approx(0.9)} and m["full"]["n"] == 2
    assert m["convirt"]["mean"] == pytest.approx(0.25) and m["convirt"]["std"] == pytest.approx(0.0707107, rel=1e-5)
    assert table["rows"][1]["metrics"]["no_local"]["values"]["s0"] == pytest.approx(0.61)
    md = holdout_markdown(table)
    lines = md.splitlines()
    assert "chance 50 %" in lines[0]
    assert lines[2] == ("| held-out type T | ConVIRT-like | GLoRIA-like | Ours w/o local (trained without T) | "
                        "Ours (trained without T) |")
    assert lines[4] == "| reverse | 25.0 ± 7.1 % | 35.0 ± 7.1 % | 65.0 ± 7.1 % | 85.0 ± 7.1 % |"
    assert lines[5].startswith(f"| {HELD} | 25.0 ± 7.1 % |") and lines[5].endswith("| 86.0 ± 7.1 % |")
    paths = write_holdout_table(table, tmp_path)
    assert json.loads(paths["json"].read_text())["rows"] == table["rows"] and paths["markdown"].read_text() == md
