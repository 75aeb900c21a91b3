"""pertvl.train.rundir: the one rule for where a run keeps its config, checkpoints and final model."""

from __future__ import annotations

import json

import pytest

from pertvl.train.rundir import RunDir, find_run_config, is_pretrained_dir, trained_image_size


def _pretrained(folder):
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    (folder / "model.safetensors").write_bytes(b"")
    return folder


def test_model_dir_is_final_else_the_folder_itself(tmp_path):
    run = RunDir(tmp_path / "run")
    with pytest.raises(FileNotFoundError, match=r"run folder .*run does not exist"):
        run.model_dir()
    run.path.mkdir()
    with pytest.raises(FileNotFoundError, match=r"run: no trained model \(expected .*final with config\.json"):
        run.model_dir()
    _pretrained(run.final)
    assert run.model_dir() == run.final and is_pretrained_dir(run.final)
    bare = RunDir(_pretrained(tmp_path / "saved"))  # a save_pretrained folder given as the run
    assert bare.model_dir() == bare.path
    assert run.checkpoints == run.path / "checkpoints" and run.config_path == run.path / "config.yaml"


def test_image_size_from_config_else_from_the_shards(tmp_path):
    run = RunDir(tmp_path)
    assert run.config() is None and run.image_size() is None
    shards = tmp_path / "shards"
    shards.mkdir()
    (shards / "manifest.json").write_text(json.dumps({"image_size": 96}))
    run.config_path.write_text(f"data:\n  shards: {shards}\n")
    assert run.image_size() == 96
    assert trained_image_size({"data": {"image_size": 64, "shards": str(shards)}}) == 64
    run.config_path.write_text("- not a mapping\n")
    with pytest.raises(ValueError, match=r"config\.yaml: expected a run config"):
        run.config()


def test_find_run_config_walks_up_from_a_checkpoint(tmp_path):
    (tmp_path / "config.yaml").write_text("model: {}\n")
    tag = tmp_path / "checkpoints" / "step00000004"
    tag.mkdir(parents=True)
    assert find_run_config(tag) == tmp_path / "config.yaml"
    assert find_run_config(tmp_path / "checkpoints" / "step00000004", levels=1) is None
