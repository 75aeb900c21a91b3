"""The model to export: a finished run (RUN_DIR/final), a save_pretrained folder, or a DeepSpeed
checkpoint consolidated to fp32 weights."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

from pertvl.errors import NotFoundError
from pertvl.export import ExportError
from pertvl.train.rundir import RunDir, find_run_config, is_pretrained_dir, read_run_config

log = logging.getLogger(__name__)


def _deepspeed_checkpoint(path: Path):
    """The CheckpointInfo (tag folder) of a DeepSpeed checkpoint at `path` (a tag folder, a
    checkpoints folder or a run folder), or None when there is none."""
    from pertvl.train.checkpoint import resolve_checkpoint

    try:
        return resolve_checkpoint(path, path)
    except FileNotFoundError:
        return None


def _consolidated_state_dict(tag_dir: Path) -> dict[str, torch.Tensor]:
    """fp32 weights of a DeepSpeed checkpoint tag folder: trainable parameters from zero_to_fp32's
    fp32 masters (its torch.load forced to weights_only=True), the rest (frozen parameters,
    buffers, everything under ZeRO 0) from mp_rank_00_model_states.pt["module"]."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from pertvl.train.checkpoint import deepspeed_safe_globals

    states = tag_dir / "mp_rank_00_model_states.pt"
    if not states.is_file():
        raise ExportError(f"{tag_dir}: no mp_rank_00_model_states.pt (not a DeepSpeed checkpoint)")
    original = torch.load

    def weights_only_load(*args, **kwargs):
        kwargs["weights_only"] = True
        return original(*args, **kwargs)

    with torch.serialization.safe_globals(deepspeed_safe_globals()):
        module = torch.load(states, map_location="cpu", weights_only=True).get("module")
        if not isinstance(module, dict):
            raise ExportError(f"{states}: holds no 'module' state dict")
        state: dict[str, torch.Tensor] = {}
        if any(tag_dir.glob("*optim_states.pt")):
            torch.load = weights_only_load  # zero_to_fp32 calls torch.load through the module attribute
            try:
                state = dict(get_fp32_state_dict_from_zero_checkpoint(os.fspath(tag_dir.parent), tag=tag_dir.name))
            finally:
                torch.load = original
    from_module = [k for k in module if k not in state]
    for k in from_module:
        v = module[k]
        state[k] = v.float() if v.is_floating_point() else v
    if state and from_module and len(from_module) < len(module):
        log.info("%s: %d tensors (frozen parameters, buffers) taken from the model states", tag_dir, len(from_module))
    return state


def load_deepspeed_checkpoint(checkpoint: Path, info, config_path: Path | None = None):
    """(DualEncoder, config) from the DeepSpeed checkpoint `info` (CheckpointInfo, any ZeRO stage)
    found at `checkpoint` and the run's config.yaml: FileNotFoundError without the config,
    ExportError when the weights do not fit."""
    from pertvl.model import create_model

    config_path = config_path or find_run_config(info.path)
    if config_path is None or not Path(config_path).is_file():
        raise FileNotFoundError(
            f"{checkpoint}: a DeepSpeed checkpoint needs the run's config.yaml (not found next to it; pass --config)"
        )
    try:
        cfg = read_run_config(config_path) or {}
    except ValueError:  # not a mapping
        cfg = None
    if not isinstance(cfg, dict) or not isinstance(cfg.get("model") or {}, dict):
        raise ExportError(f"{config_path}: expected a run config with a 'model:' mapping")
    try:
        state = _consolidated_state_dict(info.path)
    except Exception as e:
        if type(e).__name__ == "UnpicklingError":
            raise ExportError(f"{info.path}: holds objects that torch.load(weights_only=True) refuses "
                              f"({str(e).splitlines()[0][:300]})") from None
        raise
    model = create_model(cfg.get("model") or {})
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ExportError(
            f"{info.path}: weights do not fit the model of {config_path}: missing {sorted(missing)[:8]}, "
            f"unexpected {sorted(unexpected)[:8]}"
        )
    return model.eval(), cfg


def load_for_export(run: str | os.PathLike | None = None, checkpoint: str | os.PathLike | None = None,
                    config: str | os.PathLike | None = None):
    """(model, source facts, run config or None) from exactly one of `--run RUN_DIR` (RUN_DIR/final)
    or `--checkpoint PATH` (a save_pretrained folder or a DeepSpeed checkpoint folder)."""
    from pertvl.model import DualEncoder

    if run is not None:
        run_dir = RunDir(run)
        model, _ = run_dir.load_model()
        return model.eval(), {"kind": "run", "path": str(run_dir.path.resolve())}, run_dir.config()
    checkpoint = Path(checkpoint)
    if is_pretrained_dir(checkpoint):
        cfg_path = Path(config) if config else find_run_config(checkpoint)
        cfg = read_run_config(cfg_path) if cfg_path else None
        return (DualEncoder.from_pretrained(checkpoint).eval(),
                {"kind": "pretrained", "path": str(checkpoint.resolve())}, cfg)
    info = _deepspeed_checkpoint(checkpoint) if checkpoint.is_dir() else None
    if info is not None:
        model, cfg = load_deepspeed_checkpoint(checkpoint, info, Path(config) if config else None)
        return model, {"kind": "deepspeed", "path": str(info.path.resolve()), "tag": info.tag, "step": info.step}, cfg
    raise NotFoundError(
        f"{checkpoint}: neither a save_pretrained folder (config.json + model.safetensors) nor a DeepSpeed "
        "checkpoint (a tag folder with mp_rank_00_model_states.pt, or a folder with checkpoints/latest)"
    )
