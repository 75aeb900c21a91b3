"""The run folder: RUN_DIR/config.yaml (the resolved run config), RUN_DIR/checkpoints/ (DeepSpeed
checkpoints + `latest`) and RUN_DIR/final/ (the trained DualEncoder, save_pretrained). Export and
evaluation read runs through `RunDir` only. No torch until a model is loaded.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CONFIG_NAME = "config.yaml"
CHECKPOINTS_NAME = "checkpoints"
FINAL_NAME = "final"
# The files of a save_pretrained folder (pertvl.model.dual: CONFIG_NAME, WEIGHTS_NAME).
PRETRAINED_FILES = ("config.json", "model.safetensors")


def is_pretrained_dir(path: str | os.PathLike) -> bool:
    """Whether `path` is a save_pretrained folder (config.json + model.safetensors)."""
    return all((Path(path) / name).is_file() for name in PRETRAINED_FILES)


def read_run_config(path: str | os.PathLike) -> dict[str, Any] | None:
    """A run's config.yaml as a dict; None when missing or empty, ValueError when not a mapping."""
    import yaml

    path = Path(path)
    if not path.is_file():
        return None
    cfg = yaml.safe_load(path.read_text(encoding="utf-8"))
    if cfg is None:
        return None
    if not isinstance(cfg, dict):
        raise ValueError(f"{path}: expected a run config (a mapping), got {type(cfg).__name__}")
    return cfg


def trained_image_size(cfg: dict[str, Any] | None) -> int | None:
    """The image size a run trained at: data.image_size of its config, else the image_size of the
    shards it trained on (their manifest.json), else None."""
    data = (cfg or {}).get("data") or {}
    if not isinstance(data, dict):
        return None
    if data.get("image_size"):
        return int(data["image_size"])
    shards = data.get("shards")
    manifest = Path(str(shards or "")) / "manifest.json"
    if shards and manifest.is_file():
        size = json.loads(manifest.read_text(encoding="utf-8")).get("image_size")
        return int(size) if size else None
    return None


def find_run_config(folder: str | os.PathLike, levels: int = 3) -> Path | None:
    """config.yaml of the run a folder belongs to (a checkpoint tag folder, a checkpoints folder,
    a final folder): the folder itself or up to `levels` parents."""
    folder = Path(folder)
    for candidate in [folder, *list(folder.parents)[:levels]]:
        if (candidate / CONFIG_NAME).is_file():
            return candidate / CONFIG_NAME
    return None


@dataclass(frozen=True)
class RunDir:
    """A training run folder (see the module docstring)."""

    path: Path

    def __init__(self, path: str | os.PathLike):
        object.__setattr__(self, "path", Path(path))

    @property
    def config_path(self) -> Path:
        return self.path / CONFIG_NAME

    @property
    def checkpoints(self) -> Path:
        return self.path / CHECKPOINTS_NAME

    @property
    def final(self) -> Path:
        return self.path / FINAL_NAME

    def config(self) -> dict[str, Any] | None:
        return read_run_config(self.config_path)

    def image_size(self) -> int | None:
        return trained_image_size(self.config())

    def model_dir(self) -> Path:
        """The trained model: RUN_DIR/final, or RUN_DIR itself when it is a save_pretrained folder."""
        from pertvl.errors import NotFoundError

        if not self.path.is_dir():
            raise NotFoundError(f"run folder {self.path} does not exist (a folder written by `pertvl train --out`)")
        for candidate in (self.final, self.path):
            if is_pretrained_dir(candidate):
                return candidate
        raise NotFoundError(
            f"{self.path}: no trained model (expected {self.final} with {' + '.join(PRETRAINED_FILES)}, "
            "written by save_pretrained at the end of `pertvl train`); for an unfinished run use one "
            f"of its checkpoints under {self.checkpoints}"
        )

    def load_model(self):
        """(DualEncoder as from_pretrained gives it, the folder it came from); needs torch."""
        from pertvl.model import DualEncoder

        folder = self.model_dir()
        return DualEncoder.from_pretrained(folder), folder
