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
    assert cfg["loss"] == {"preset": "convirt", "alpha": 0.5}
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


def test_shipped_configs_load():
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "configs"
    for path in sorted(root.glob("*.yaml")):
        cfg = load_config(path)
        assert cfg["loss"]["preset"] in {"convirt", "gloria", "no_local", "full"}, path
