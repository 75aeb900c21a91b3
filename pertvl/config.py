"""Run configuration: a YAML file feeds the defaults, every field is overridable on the CLI.

Sections data, train and wandb are typed dataclasses (RunConfig); `model` and `loss` stay open
mappings validated by their consumers (pertvl.model.create_model, pertvl.losses.LossConfig).
`load_config(path, overrides)` merges DEFAULTS <- file <- "section.key=value" overrides (values
parsed as YAML); unknown keys and values of the wrong type fail loudly, by their dotted name.
"""

from __future__ import annotations

import copy
import logging
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from pertvl.errors import ConfigError, NotFoundError

CONFIGS_DIR = Path(__file__).resolve().parent / "configs"  # the bundled run configs (`--config demo`)
DS_CONFIGS_DIR = Path(__file__).resolve().parent / "ds_configs"
VERIFY_MODES = ("size", "sha256", "off")
# Config fields that hold paths (read relative to the config file when they exist there).
PATH_FIELDS = (("data", "shards"), ("train", "deepspeed_config"), ("train", "out"), ("train", "resume"),
               ("model", "text_name_or_path"))


@dataclass
class DataConfig:
    """`data`: where the shards are and how they stream (pertvl.data.stream.build_train_stream)."""

    shards: str = "shards/demo"  # a shard folder, the URL of a manifest.json, or a brace pattern
    split: str = "train"
    image_size: int | None = None  # None: the size the shards were packed at
    max_length: int = 128  # word pieces per report (clean_text caps reports at 60 words)
    num_workers: int = 2  # loader workers per rank (one set for the whole run)
    shuffle_buffer: int = 256
    augment: bool = True
    resampled: bool = False
    download_retries: int = 3  # shards from a URL: retries (with back-off) before the run fails
    # Local shards checked against the manifest before training: "size", "sha256" or "off"; a
    # damaged shard stops the run unless max_damaged_shards allows it (then counted).
    verify: str = "size"
    max_damaged_shards: int = 0


@dataclass
class TrainConfig:
    """`train`: the engine (pertvl.train.engine): DeepSpeed config, steps, the paper's SGD with
    warm-up + cosine, checkpoints, seed, and how a failing or stalled run ends."""

    deepspeed_config: str = "ds_configs/cpu_zero1_fp32.json"
    # None: the DeepSpeed JSON's train_micro_batch_size_per_gpu / gradient_accumulation_steps /
    # gradient_clipping; a value overrides the file (pertvl.train.launch.load_ds_config).
    micro_batch: int | None = None
    grad_accum: int | None = None
    gradient_clipping: float | None = None
    log_samples: bool = True  # RUN_DIR/samples.jsonl: the sample ids of every optimizer step, per rank
    out: str = "runs/demo"
    max_steps: int | None = None  # None: epochs × batches per epoch
    epochs: int = 1
    lr: float = 0.0015  # the paper's SGD
    # The image tower's lr is lr × this (its own param group); 1.0: one group.
    image_lr_mult: float = 1.0
    momentum: float = 0.9
    weight_decay: float = 5e-4
    warmup_steps: int = 10
    min_lr_ratio: float = 0.0
    checkpoint_every: int = 50
    keep_last: int = 2
    log_every: int = 1
    # Step-time breakdown (pertvl.train.profile) of the first N optimizer steps, logged as
    # perf/time/<phase>_s; 0: never (the default step is not instrumented).
    profile_steps: int = 0
    # Speed levers (pertvl.train.speed, docs/PERFORMANCE.md): the same numbers up to rounding.
    compile: str = "off"  # torch.compile: off | text (the text transformer) | all (and the image tower)
    channels_last: bool = False  # the image tower's convolutions on NHWC activations
    attention_fp32: bool = False  # bf16 on a CPU: the trainable text layers' attention in fp32
    seed: int = 0
    resume: str | None = None
    # Every N optimizer steps and at the end, rank 0 runs these `pertvl eval` evaluations on
    # `eval_split` of data.shards and logs eval/KEY/metric; 0: never.
    eval_every: int = 0
    eval_tasks: list[str] = field(default_factory=lambda: ["structure", "retrieval", "zeroshot"])
    eval_split: str = "val"
    eval_limit: int | None = None  # only the split's first N samples (None: all)
    # Failing fast (pertvl.train.watchdog; docs/TRAINING.md "What happens when something fails"):
    stall_timeout_s: float | None = 1800.0  # no optimizer step for this long: stacks in the log, exit 70
    stop_grace_s: float | None = 300.0  # SIGTERM/SIGUSR1 unanswered by a step boundary this long: exit 143

    def __post_init__(self) -> None:
        if self.compile not in ("off", "text", "all"):
            raise ConfigError(f"train.compile must be off, text or all, got {self.compile!r}")
        if self.eval_every < 0:
            raise ConfigError(f"train.eval_every must be >= 0 (0: no evaluation during training), got {self.eval_every}")
        if self.eval_split not in ("train", "val", "test"):
            raise ConfigError(f"train.eval_split must be train, val or test, got {self.eval_split!r}")
        if self.eval_limit is not None and self.eval_limit < 1:
            raise ConfigError(f"train.eval_limit must be >= 1 or null, got {self.eval_limit}")


@dataclass
class WandbConfig:
    """`wandb`: pertvl.train.monitor.Monitor (offline by default; the API key only from the env)."""

    enabled: bool = True
    project: str = "pertvl"
    name: str | None = None
    tags: list[str] = field(default_factory=list)
    mode: str = "offline"  # offline | online | disabled


# The paper's: L_global's two directions averaged, L_local's added (pertvl.losses).
_LOSS_DEFAULTS = {"preset": "full", "global_reduction": "mean", "local_reduction": "sum"}


@dataclass
class RunConfig:
    """A resolved run config. `model` and `loss` stay open mappings: their keys are validated by
    the component that consumes them (pertvl.model.DualEncoderConfig, pertvl.losses.LossConfig)."""

    data: DataConfig = field(default_factory=DataConfig)
    model: dict[str, Any] = field(default_factory=dict)  # create_model's defaults when empty
    loss: dict[str, Any] = field(default_factory=lambda: dict(_LOSS_DEFAULTS))
    train: TrainConfig = field(default_factory=TrainConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)

    @classmethod
    def from_dict(cls, cfg: dict[str, Any], where: str = "config") -> RunConfig:
        """Typed sections from a merged dict (load_config's); ConfigError names a wrong key or value."""
        unknown = sorted(set(cfg) - {f.name for f in fields(cls)})
        if unknown:
            raise ConfigError(f"{where}: unknown config section(s) {unknown}")
        sections: dict[str, Any] = {}
        for f in fields(cls):
            value = cfg.get(f.name)
            kind = _SECTION_TYPES.get(f.name)
            if kind is None:  # open section
                if value is not None and not isinstance(value, dict):
                    raise ConfigError(f"{where}: {f.name} must be a mapping, got {type(value).__name__}")
                sections[f.name] = copy.deepcopy(value) if value is not None else f.default_factory()
            else:
                sections[f.name] = _typed(kind, value or {}, f"{where}: {f.name}")
        data = sections["data"]
        if data.verify not in VERIFY_MODES:
            raise ConfigError(f"{where}: data.verify must be one of {', '.join(VERIFY_MODES)}, got {data.verify!r}")
        if data.max_damaged_shards < 0:
            raise ConfigError(f"{where}: data.max_damaged_shards must be >= 0, got {data.max_damaged_shards}")
        return cls(**sections)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


_SECTION_TYPES = {"data": DataConfig, "train": TrainConfig, "wandb": WandbConfig}


# What a value of each (string) annotation of a config field may be.
_FITS = {
    "None": lambda v: v is None,
    "bool": lambda v: isinstance(v, bool),
    "int": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "float": lambda v: isinstance(v, int | float) and not isinstance(v, bool),
    "str": lambda v: isinstance(v, str),
    "list[str]": lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v),
}


def _check(value: Any, hint: str) -> bool:
    return any(_FITS.get(opt.strip(), lambda v: False)(value) for opt in hint.split("|"))


def _typed(kind: type, values: dict[str, Any], where: str) -> Any:
    hints = {f.name: str(f.type) for f in fields(kind)}
    unknown = sorted(set(values) - set(hints))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; known keys here: {', '.join(sorted(hints))}")
    out = {}
    for name, value in values.items():
        if isinstance(value, str) and hints[name].startswith("float"):
            try:  # YAML 1.1 (PyYAML) reads "1e-3" as a string
                value = float(value)
            except ValueError:
                pass
        if not _check(value, hints[name]):
            raise ConfigError(f"{where}.{name} must be {hints[name].replace(' | ', ' or ')}, got {value!r} "
                            f"({type(value).__name__})")  # fmt: skip
        out[name] = float(value) if hints[name].startswith("float") and isinstance(value, int) else value
    return kind(**out)


DEFAULTS: dict[str, Any] = RunConfig().to_dict()

# Sections whose keys are free-form (validated by the component that consumes them).
_OPEN_SECTIONS = {"model", "loss"}
# Keys that older saved run configs hold and this version no longer reads (its one stall limit is
# train.stall_timeout_s): a config file's are dropped with a warning, so `--config RUN_DIR/config.yaml`
# still loads such a run; on the command line they are unknown keys.
RETIRED_KEYS = {"train": ("stall_factor", "stall_min_s", "failure_timeout_s")}
log = logging.getLogger(__name__)


def deep_merge(base: dict[str, Any], update: dict[str, Any], *, path: str = "") -> dict:
    """Return `base` updated by `update`; keys absent from `base` are an error except inside the
    open sections."""
    out = copy.deepcopy(base)
    for key, value in update.items():
        where = f"{path}.{key}" if path else key
        if key not in out:
            if path.split(".")[0] not in _OPEN_SECTIONS:
                known = ", ".join(sorted(out)) or "(none)"
                raise ConfigError(f"unknown config key {where!r}; known keys here: {known}")
            out[key] = copy.deepcopy(value)
        elif isinstance(out[key], dict) and isinstance(value, dict):
            out[key] = deep_merge(out[key], value, path=where)
        else:
            out[key] = copy.deepcopy(value)
    return out


def parse_override(text: str) -> dict[str, Any]:
    """"train.max_steps=20" -> {"train": {"max_steps": 20}} (the value is parsed as YAML)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like section.key=value")
    dotted, raw = text.split("=", 1)
    keys = [k for k in dotted.strip().split(".") if k]
    if len(keys) < 2:
        raise ConfigError(f"override {text!r} must name a section and a key (e.g. train.max_steps=20)")
    try:
        value: Any = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as e:
        raise ConfigError(f"override {text!r}: the value is not valid YAML ({e})") from None
    for key in reversed(keys):
        value = {key: value}
    return value


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | None = None) -> dict[str, Any]:
    """DEFAULTS <- YAML file <- overrides, validated for unknown keys and types (ConfigError), where
    `path` is a file or a bundled config's name ("demo"; NotFoundError when neither). Relative paths
    of PATH_FIELDS are read from the file's folder when they exist there, else from the working
    directory.
    """
    cfg = copy.deepcopy(DEFAULTS)
    if path is not None:
        path = find_config(path)
        try:
            from_file = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {e}") from e
        if not isinstance(from_file, dict):
            raise ConfigError(f"{path}: a config file must be a mapping of sections, got {type(from_file).__name__}")
        for section, keys in RETIRED_KEYS.items():
            values = from_file.get(section)
            for key in [k for k in keys if isinstance(values, dict) and k in values]:
                log.warning("%s: %s.%s is retired (the stall limit is train.stall_timeout_s); ignored",
                            path, section, key)
                del values[key]
        try:
            cfg = deep_merge(cfg, _resolve_paths(from_file, path.parent))
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from None
    for item in overrides or []:
        cfg = deep_merge(cfg, parse_override(item))
    RunConfig.from_dict(cfg, where="config" if path is None else f"{path}{' + --set' if overrides else ''}")  # types and choices at load time, not after the model is built
    return cfg


def find_config(name: str | os.PathLike) -> Path:
    """A config file: `name` itself when it is a file, else the bundled pertvl/configs/NAME(.yaml)."""
    path = Path(name)
    if path.is_file():
        return path
    for candidate in (CONFIGS_DIR / path.name, CONFIGS_DIR / f"{path.name}.yaml"):
        if len(path.parts) == 1 and candidate.is_file():
            return candidate
    bundled = ", ".join(sorted(p.stem for p in CONFIGS_DIR.glob("*.yaml")))
    raise NotFoundError(f"config {name}: no such file (bundled configs, usable by name: {bundled})")


def _resolve_paths(from_file: dict[str, Any], folder: Path) -> dict[str, Any]:
    out = copy.deepcopy(from_file)
    for section, key in PATH_FIELDS:
        value = (out.get(section) or {}).get(key) if isinstance(out.get(section), dict) else None
        if isinstance(value, str) and value and "://" not in value and not Path(value).is_absolute():
            candidate = folder / value
            if candidate.exists():
                out[section][key] = str(candidate.resolve())
    return out


def from_mapping(cls: type, d: Any) -> Any:
    """`cls(**d)` for a config dataclass (an instance passes through, None gives the defaults);
    ValueError names unknown keys."""
    if isinstance(d, cls):
        return d
    d = dict(d or {})
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise ValueError(f"{cls.__name__}: unknown keys {unknown}; expected some of {sorted(known)}")
    return cls(**d)


def save_config(cfg: dict[str, Any], path: str | os.PathLike) -> None:
    from pertvl.files import atomic_write_text

    atomic_write_text(path, yaml.safe_dump(cfg, sort_keys=False))
