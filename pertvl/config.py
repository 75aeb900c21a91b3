"""Run configuration: a YAML file feeds the defaults, every field is overridable on the CLI.

A config is a nested dict with five sections::

    data:   where the shards are and how they stream (image size, workers, augmentation …)
    model:  passed to pertvl.model.create_model (image / text towers, projection, temperature)
    loss:   passed to pertvl.losses.LossConfig (preset convirt | gloria | no_local | full, α, β, τ, γ,
            global_reduction / local_reduction: mean | sum of each loss's two directions)
    train:  DeepSpeed config file, steps/epochs, the paper's SGD + warm-up/cosine, checkpoints, seed
    wandb:  W&B project / run name / tags / mode (offline by default; the API key only from the env)

`load_config(path, overrides)` merges DEFAULTS <- file <- overrides, where an override is
"section.key=value" (value parsed as YAML, so `train.max_steps=20`, `loss.preset=convirt`,
`wandb.tags=[a,b]` all work). Unknown keys fail loudly: a typo must not be silently ignored.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

import yaml

DEFAULTS: dict[str, Any] = {
    "data": {
        "shards": "shards/demo",
        "split": "train",
        "image_size": None,  # None: the size the shards were packed at
        "max_length": 128,  # word pieces per report (clean_text caps reports at 60 words)
        "num_workers": 2,
        "shuffle_buffer": 256,
        "augment": True,
        "resampled": False,
        "download_retries": 3,  # shards from a URL: retries (with back-off) before the run fails
    },
    "model": {},  # create_model's defaults (pertvl.model.DualEncoderConfig)
    # L_global's two directions averaged (the paper's "symmetric cross-entropy" as CLIP), L_local's
    # added (the paper: "Addition of the symmetrical cross-entropy loss", as GLoRIA); see
    # pertvl.losses and docs/TRAINING.md "Loss definitions". configs/demo.yaml pins local "mean".
    "loss": {"preset": "full", "global_reduction": "mean", "local_reduction": "sum"},
    "train": {
        "deepspeed_config": "ds_configs/cpu_zero1_fp32.json",
        # None: the DeepSpeed JSON's train_micro_batch_size_per_gpu / gradient_accumulation_steps /
        # gradient_clipping; a value overrides the file (pertvl.train.launch.load_ds_config).
        "micro_batch": None,
        "grad_accum": None,
        "gradient_clipping": None,
        "log_samples": True,  # RUN_DIR/samples.jsonl: the sample ids of every optimizer step, per rank
        "out": "runs/demo",
        "max_steps": None,  # None: epochs × batches per epoch
        "epochs": 1,
        "lr": 0.0015,  # the paper's SGD
        "momentum": 0.9,
        "weight_decay": 5e-4,
        "warmup_steps": 10,
        "min_lr_ratio": 0.0,
        "checkpoint_every": 50,
        "keep_last": 2,
        "log_every": 1,
        "seed": 0,
        "resume": None,
        # Failing fast (pertvl.train.watchdog; docs/TRAINING.md "What happens when something fails"):
        "failure_timeout_s": 30,  # a rank that raised is gone this long after, whatever blocks its clean-up
        "stall_timeout_s": 1800,  # no optimizer step for this long: stacks in the log, exit 70 (null: off)
        "stall_factor": 50,  # ... or for this many median step times (after 5 steps; null: off)
        "stall_min_s": 120,  # ... but never less than this
        "stop_grace_s": 300,  # SIGTERM/SIGUSR1 unanswered by a step boundary this long: exit 143 (null: wait)
    },
    "wandb": {"enabled": True, "project": "pertvl", "name": None, "tags": [], "mode": "offline"},
}

# Sections whose keys are free-form (validated by the component that consumes them).
_OPEN_SECTIONS = {"model", "loss"}


def deep_merge(base: dict[str, Any], update: dict[str, Any], *, path: str = "", strict: bool = True) -> dict:
    """Return `base` updated by `update`; with `strict`, keys absent from `base` are an error
    except inside the open sections."""
    out = copy.deepcopy(base)
    for key, value in update.items():
        where = f"{path}.{key}" if path else key
        if key not in out:
            if strict and path.split(".")[0] not in _OPEN_SECTIONS:
                known = ", ".join(sorted(out)) or "(none)"
                raise KeyError(f"unknown config key {where!r}; known keys here: {known}")
            out[key] = copy.deepcopy(value)
        elif isinstance(out[key], dict) and isinstance(value, dict):
            out[key] = deep_merge(out[key], value, path=where, strict=strict)
        else:
            out[key] = copy.deepcopy(value)
    return out


def parse_override(text: str) -> dict[str, Any]:
    """"train.max_steps=20" -> {"train": {"max_steps": 20}} (the value is parsed as YAML)."""
    if "=" not in text:
        raise ValueError(f"override {text!r} must look like section.key=value")
    dotted, raw = text.split("=", 1)
    keys = [k for k in dotted.strip().split(".") if k]
    if len(keys) < 2:
        raise ValueError(f"override {text!r} must name a section and a key (e.g. train.max_steps=20)")
    value: Any = yaml.safe_load(raw) if raw.strip() else None
    for key in reversed(keys):
        value = {key: value}
    return value


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | None = None) -> dict[str, Any]:
    """DEFAULTS <- YAML file <- overrides, validated for unknown keys."""
    cfg = copy.deepcopy(DEFAULTS)
    if path is not None:
        text = Path(path).read_text(encoding="utf-8")
        try:
            from_file = yaml.safe_load(text) or {}
        except yaml.YAMLError as e:
            raise ValueError(f"{path}: not valid YAML: {e}") from e
        if not isinstance(from_file, dict):
            raise ValueError(f"{path}: a config file must be a mapping of sections, got {type(from_file).__name__}")
        try:
            cfg = deep_merge(cfg, from_file)
        except KeyError as e:
            raise KeyError(f"{path}: {e.args[0]}") from None
    for item in overrides or []:
        cfg = deep_merge(cfg, parse_override(item))
    return cfg


def save_config(cfg: dict[str, Any], path: str | os.PathLike) -> None:
    from pertvl.files import atomic_write_text

    atomic_write_text(path, yaml.safe_dump(cfg, sort_keys=False))
