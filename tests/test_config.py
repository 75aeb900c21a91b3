"""Config file feeds defaults; every field overridable; typos fail."""

from __future__ import annotations

import pytest
import yaml

from pertvl.config import DEFAULTS, load_config, parse_override, save_config


def test_file_then_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  max_steps: 5\nloss:\n  preset: convirt\nmodel:\n  embed_dim: 64\n")
    cfg = load_config(path, ["train.max_steps=7", "wandb.tags=[a, b]", "loss.alpha=0.5"])
    assert cfg["train"]["max_steps"] == 7
    assert cfg["train"]["lr"] == DEFAULTS["train"]["lr"]
    assert cfg["loss"] == {"preset": "convirt", "alpha": 0.5, "global_reduction": "mean", "local_reduction": "sum"}
    assert cfg["model"] == {"embed_dim": 64}
    assert cfg["wandb"]["tags"] == ["a", "b"]
    save_config(cfg, tmp_path / "resolved.yaml")
    assert yaml.safe_load((tmp_path / "resolved.yaml").read_text()) == cfg


def test_typos_fail_loudly(tmp_path):
    with pytest.raises(KeyError, match="train.max_step"):
        load_config(None, ["train.max_step=3"])
    path = tmp_path / "bad.yaml"
    path.write_text("trian:\n  x: 1\n")
    with pytest.raises(KeyError, match="bad.yaml"):
        load_config(path)
    with pytest.raises(ValueError, match="section.key=value"):
        parse_override("max_steps")
    with pytest.raises(ValueError, match="name a section"):
        parse_override("max_steps=3")


def test_a_saved_run_config_with_retired_keys_loads_with_a_warning(tmp_path, caplog):
    cfg = load_config(None)
    cfg["train"].update(stall_factor=50.0, stall_min_s=120.0, failure_timeout_s=30.0, stall_timeout_s=99.0)
    save_config(cfg, tmp_path / "config.yaml")
    with caplog.at_level("WARNING", logger="pertvl.config"):
        loaded = load_config(tmp_path / "config.yaml")
    assert loaded == load_config(None, ["train.stall_timeout_s=99.0"])
    assert sum("is retired" in r.getMessage() for r in caplog.records) == 3
    with pytest.raises(KeyError, match="train.stall_factor"):  # on the command line it is a typo
        load_config(None, ["train.stall_factor=2"])


def test_shipped_configs_load():
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "configs"
    for path in sorted(root.glob("*.yaml")):
        cfg = load_config(path)
        assert cfg["loss"]["preset"] in {"convirt", "gloria", "no_local", "full"}, path


def test_every_shipped_config_states_the_reductions_and_word_features():
    """The loss reductions and the word features are written in every shipped config (not left to a
    default); the paper's configs add L_local's directions, the demo keeps its tuned mean."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "configs"
    assert DEFAULTS["loss"]["local_reduction"] == "sum" and DEFAULTS["loss"]["global_reduction"] == "mean"
    seen = {}
    for path in sorted(root.glob("*.yaml")):
        raw = yaml.safe_load(path.read_text())
        assert {"global_reduction", "local_reduction"} <= set(raw["loss"]), path
        assert raw["model"].get("word_features") in ("paper", "gloria"), path
        seen[path.name] = (raw["loss"]["global_reduction"], raw["loss"]["local_reduction"])
    assert seen["demo.yaml"] == ("mean", "mean")
    assert seen["openi_paper.yaml"] == ("mean", "sum") and seen["cxr_bert.yaml"] == ("mean", "sum")


def test_typed_sections_follow_a_field_and_refuse_wrong_types(tmp_path):
    """RunConfig: typed data/train/wandb sections (model and loss stay open mappings); every shipped
    config converts, a wrong type is refused by its dotted name, and YAML 1.1's "1e-3" string
    is read as the float it means."""
    from pathlib import Path

    from pertvl.config import DataConfig, RunConfig, TrainConfig

    root = Path(__file__).resolve().parents[1] / "configs"
    for path in sorted(root.glob("*.yaml")):
        typed = RunConfig.from_dict(load_config(path), str(path))
        assert isinstance(typed.train, TrainConfig) and isinstance(typed.data, DataConfig)
        assert typed.to_dict() == load_config(path) | {"train": typed.to_dict()["train"]}  # floats widened only
    demo = RunConfig.from_dict(load_config(root / "demo.yaml"))
    raw = yaml.safe_load((root / "demo.yaml").read_text())
    assert demo.train.micro_batch == raw["train"]["micro_batch"] and demo.loss["local_reduction"] == "mean"
    assert RunConfig().to_dict() == DEFAULTS
    with pytest.raises(TypeError, match=r"config: train\.max_steps must be int or None, got 'ten' \(str\)"):
        RunConfig.from_dict(load_config(None, ["train.max_steps=ten"]))
    with pytest.raises(TypeError, match=r"config: data\.augment must be bool, got 1 \(int\)"):
        RunConfig.from_dict(load_config(None, ["data.augment=1"]))
    with pytest.raises(TypeError, match=r"config: wandb\.tags must be list\[str\]"):
        RunConfig.from_dict(load_config(None, ["wandb.tags=x"]))
    assert RunConfig.from_dict(load_config(None, ["train.lr=1e-3"])).train.lr == 0.001
    assert RunConfig.from_dict(load_config(None, ["train.epochs=3"])).train.epochs == 3
    with pytest.raises(KeyError, match=r"unknown key\(s\) \['lr'\]"):
        RunConfig.from_dict({"data": {"lr": 1}})
