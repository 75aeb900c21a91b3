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


def test_default_is_all_nine_types_and_l_pert_is_the_plain_loss():
    assert LossConfig().pert_types == list(PERTURBATION_TYPES)
    out = _output()
    ref = perturbation_loss(out.image.global_emb, out.text.global_emb, out.pert_emb, out.pert_valid, 0.07)
    assert torch.equal(PretrainLoss({"preset": "no_local"})(out).terms["pert"], ref)


def test_pert_types_validation():
    with pytest.raises(ValueError, match=r"unknown pert_types \['antonyms'\]; the training batch carries \['shuffle_all'"):
        LossConfig(pert_types=["antonyms"])
    with pytest.raises(ValueError, match=r"unknown pert_types \['cf_colour'\].*counterfactual types \['cf_laterality'"):
        LossConfig(pert_types=["reverse", "cf_colour"])
    with pytest.raises(ValueError, match="pert_types is empty"):
        LossConfig(pert_types=[])
    with pytest.raises(ValueError, match="repeats a type"):
        LossConfig(pert_types=["reverse", "reverse"])
    assert LossConfig.from_dict({"pert_types": ["reverse", "shuffle_all"]}).pert_types == ["shuffle_all", "reverse"]


def test_pert_types_are_put_in_column_order():
    cfg = LossConfig(preset="no_local", pert_types=["cf_negation", "reverse", *PERTURBATION_TYPES[:2], "cf_laterality"])
    assert cfg.pert_types == [*PERTURBATION_TYPES[:2], "reverse", "cf_laterality", "cf_negation"]


def _fabricated_samples():
    import numpy as np

    from pertvl.data.shards.reading import Sample

    base = "the heart is normal in size. there is a small left pleural effusion."
    perts = {t: f"{base} {t.replace('_', ' ')}" for t in PERTURBATION_TYPES}
    metas = [
        {"id": "a", "text": base, "perturbations": perts, "unavailable": {},
         "counterfactuals": {"cf_laterality": base.replace("left", "right"), "cf_negation": base.replace("a small", "no")},
         "cf_unavailable": {}},
        {"id": "b", "text": base, "perturbations": perts, "unavailable": {},  # cf_laterality unavailable
         "counterfactuals": {"cf_negation": base.replace("a small", "no")},
         "cf_unavailable": {"cf_laterality": "no_lateralized_finding"}},
        {"id": "c", "text": base, "perturbations": perts, "unavailable": {}},  # packed without counterfactuals
        {"id": "d", "text": base, "perturbations": perts, "unavailable": {},  # a cf identical to the report
         "counterfactuals": {"cf_laterality": base, "cf_negation": base.replace("a small", "no")}},
    ]
    return [Sample(key=m["id"], image=np.full((16, 16), 7 * i, dtype=np.uint8), meta=m) for i, m in enumerate(metas)]


def test_collate_emits_exactly_the_requested_columns_and_masks_missing_ones(minilm_path):
    from tokenizers import Tokenizer

    from pertvl.data.stream import collate_samples

    tok = Tokenizer.from_file(str(Path(minilm_path) / "tokenizer.json"))
    samples = _fabricated_samples()
    plain, plain_counts = collate_samples(samples, tok, max_length=48)
    assert plain.pert_types == PERTURBATION_TYPES and plain.pert_valid.shape == (4, K)
    types = ("cf_laterality", "cf_negation")
    batch, counts = collate_samples(samples, tok, max_length=48, pert_types=(*PERTURBATION_TYPES, *types))
    assert batch.pert_types == (*PERTURBATION_TYPES, *types)
    assert batch.pert_input_ids.shape[:2] == (4, K + 2) and batch.pert_valid.shape == (4, K + 2)
    # the nine columns are exactly the default batch's (same width: the cf texts are no longer)
    lp = plain.pert_input_ids.shape[2]
    assert torch.equal(batch.pert_input_ids[:, :K, :lp], plain.pert_input_ids)
    assert torch.equal(batch.pert_valid[:, :K], plain.pert_valid) and plain.pert_valid.all()
    assert batch.pert_valid[:, K:].tolist() == [[True, True], [False, True], [False, False], [False, True]]
    # missing ones count as unavailable, the identical one as identical
    assert counts["unavailable_perturbations"] == plain_counts["unavailable_perturbations"] + 3
    assert counts["identical_perturbations"] == plain_counts["identical_perturbations"] + 1
    # each column holds its own type's text
    enc = tok.encode(samples[0].meta["counterfactuals"]["cf_laterality"])
    n = len(enc.ids)
    assert batch.pert_input_ids[0, K, :n].tolist() == enc.ids[:n]
    enc = tok.encode(samples[1].meta["counterfactuals"]["cf_negation"])
    assert batch.pert_input_ids[1, K + 1, :len(enc.ids)].tolist() == enc.ids
    # a held-out type is no column at all; the others are the full batch's
    cfg = LossConfig(preset="no_local", pert_types=[*(t for t in PERTURBATION_TYPES if t != HELD), *types])
    held, _ = collate_samples(samples, tok, max_length=48, pert_types=cfg.pert_types)
    keep = [j for j, t in enumerate(batch.pert_types) if t != HELD]
    assert held.pert_types == tuple(cfg.pert_types) and held.pert_valid.shape == (4, K + 1)
    assert torch.equal(held.pert_valid, batch.pert_valid[:, keep])
    width = held.pert_input_ids.shape[2]
    assert torch.equal(held.pert_input_ids, batch.pert_input_ids[:, keep, :width])


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
        assert f"data/pert_negatives/{HELD}" not in b and a[f"data/pert_negatives/{HELD}"] > 0
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
        "convirt-s0", "gloria-s0", "no_local-s0", "full-s0",
        "no_local-without_reverse-s0", "full-without_reverse-s0",
        f"no_local-without_{HELD}-s0", f"full-without_{HELD}-s0",
        "convirt-s1", "gloria-s1", "no_local-s1", "full-s1",
        "no_local-without_reverse-s1", "full-without_reverse-s1",
        f"no_local-without_{HELD}-s1", f"full-without_{HELD}-s1",
    ]  # fmt: skip
    for run in s.runs():
        args = _train_stage(run, s, "cfg", "sha").params["args"]
        sets = [args[i + 1] for i, a in enumerate(args) if a == "--set"]
        assert f"loss.preset={run.preset}" in sets and f"train.seed={run.seed}" in sets
        pert = [x for x in sets if x.startswith("loss.pert_types=")]
        if run.holdout is None:
            assert pert == []
        else:
            types = pert[0].removeprefix("loss.pert_types=[").removesuffix("]").split(",")
            assert run.holdout not in types and len(types) == len(PERTURBATION_TYPES) - 1
            assert set(PERTURBATION_TYPES) - set(LossConfig(pert_types=types).pert_types) == {run.holdout}
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


# ------------------------------------------------------------------------- counterfactual negatives


@pytest.fixture(scope="module")
def cf_train(tiny_train, tmp_path_factory):
    """tiny_train's phantoms packed again, with their counterfactuals (`pack --counterfactuals`)."""
    from pertvl.data.counterfactual import write_counterfactuals
    from pertvl.data.shards import pack

    root = tmp_path_factory.mktemp("cf_train")
    corpus = tiny_train.root / "corpus"
    write_counterfactuals(corpus / "pairs.jsonl", root / "counterfactuals.jsonl", seed=0)
    shards = root / "shards"
    pack(corpus / "pairs.jsonl", corpus / "perturbations.jsonl", shards, image_size=64, maxcount=8, workers=1,
         counterfactuals_path=root / "counterfactuals.jsonl")
    config = root / "tiny_cf.yaml"
    config.write_text(tiny_train.config.read_text().replace(f"shards: {tiny_train.shards}", f"shards: {shards}"))
    assert f"shards: {shards}" in config.read_text()
    return SimpleNamespace(root=root, shards=shards, config=config)


def test_counterfactuals_requested_from_shards_without_them_are_refused(tiny_train, cf_train):
    from pertvl.data.stream import build_train_stream

    with pytest.raises(ValueError, match=rf"shards in {tiny_train.shards} carry no counterfactuals.*--counterfactuals"):
        build_train_stream(tiny_train.shards, tokenizer=None, batch_size=4, num_workers=0,
                           pert_types=(*PERTURBATION_TYPES, "cf_laterality"))
    manifest = json.loads((cf_train.shards / "manifest.json").read_text())
    assert "cf_laterality" in manifest["counterfactual_types"]
    fake = dict(manifest, counterfactual_types=["cf_negation"])
    with pytest.raises(ValueError, match=r"asks for counterfactual negatives \['cf_laterality'\].*only the "
                                         r"counterfactual types \['cf_negation'\]"):
        build_train_stream(cf_train.shards / "train-{000000..000001}.tar", tokenizer=None, batch_size=4,
                           num_workers=0, manifest=fake, pert_types=(*PERTURBATION_TYPES, "cf_laterality"))


def test_training_with_counterfactual_negatives_logs_them(tiny_train, cf_train, tmp_path: Path) -> None:
    types = [*PERTURBATION_TYPES, "cf_laterality"]
    with_cf = _train(cf_train, tmp_path / "cf", tmp_path, "--set", f"loss.pert_types=[{','.join(types)}]")
    assert [m["step"] for m in with_cf] == [1, 2]
    for m in with_cf:
        assert m["data/pert_negatives/cf_laterality"] > 0
        assert m["data/pert_negatives"] == sum(m[f"data/pert_negatives/{t}"] for t in types)
    assert "  - cf_laterality" in (tmp_path / "cf" / "config.yaml").read_text()  # the run's recorded config
    # the default on the same shards: the nine types only, no counterfactual column
    default = _train(cf_train, tmp_path / "default", tmp_path)
    for a, b in zip(default, with_cf, strict=True):
        assert not any(k.startswith("data/pert_negatives/cf_") for k in a)
        assert a["data/pert_negatives"] == b["data/pert_negatives"] - b["data/pert_negatives/cf_laterality"]
    # ... and bit for bit the run on the shards packed without counterfactuals
    plain = _train(tiny_train, tmp_path / "plain", tmp_path)
    assert [m["loss/total"] for m in plain] == [m["loss/total"] for m in default]

    def checksum(run):
        return json.loads((tmp_path / run / "ranks" / "rank0.json").read_text())["param_sha256"]

    assert checksum("plain") == checksum("default") != checksum("cf")
