"""Crash-safe DeepSpeed checkpoints, keep-last-K, RNG capture and exact resume.

    RUN_DIR/checkpoints/latest                    tag of the newest COMPLETE checkpoint
    RUN_DIR/checkpoints/step00000040/             DeepSpeed's files (mp_rank_*, *optim_states.pt)
        pertvl_rank00000.pt ...                   per-rank RNG state
        pertvl_checkpoint.json                    completion marker: step, world size, file sizes

DeepSpeed writes its own `latest` before its closing barrier and not atomically, so pertvl saves
with save_latest=False; after the barrier rank 0 fsyncs the files, writes the marker and replaces
`latest` atomically: a crash leaves `latest` naming the previous complete checkpoint. DeepSpeed
keeps client_state on rank 0 only, hence a file per rank for its RNG streams. Loading swaps
DeepSpeed's torch.load(weights_only=False) for weights_only=True with its four classes allowed.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from pertvl.files import atomic_write_text, fsync_path
from pertvl.train.rundir import CHECKPOINTS_NAME

log = logging.getLogger(__name__)

LATEST_FILE = "latest"
MARKER_FILE = "pertvl_checkpoint.json"
MARKER_FORMAT = "pertvl-checkpoint/1"
CLIENT_KEY = "pertvl"  # client_state lives under one key so it never collides with DeepSpeed's keys
PREVIOUS_SUFFIX = ".prev"
_TAG_RE = re.compile(r"^step(\d{8})$")


def tag_for_step(step: int) -> str:
    if step < 0:
        raise ValueError(f"checkpoint step must be >= 0, got {step}")
    return f"step{step:08d}"


def checkpoint_root(run_dir: str | Path) -> Path:
    return Path(run_dir) / CHECKPOINTS_NAME


def rank_file_name(rank: int) -> str:
    return f"pertvl_rank{rank:05d}.pt"


@dataclass(frozen=True)
class CheckpointInfo:
    """A complete checkpoint: its tag folder, tag, global step and the ranks that wrote it."""

    path: Path
    tag: str
    step: int
    world_size: int


# ----------------------------------------------------------------------------------- RNG state


def capture_rng_state() -> dict[str, Any]:
    """This process's python/numpy/torch(/cuda) RNG states as weights_only-safe lists and tensors."""
    version, internal, gauss_next = random.getstate()
    name, keys, pos, has_gauss, cached_gaussian = np.random.get_state(legacy=True)
    state: dict[str, Any] = {
        "python": {"version": int(version), "internal": [int(v) for v in internal], "gauss_next": gauss_next},
        "numpy": {
            "bit_generator": str(name),
            "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached_gaussian),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = list(torch.cuda.get_rng_state_all())
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Inverse of `capture_rng_state` (ValueError when a part is missing or malformed)."""
    try:
        py = state["python"]
        random.setstate((py["version"], tuple(py["internal"]), py["gauss_next"]))
        npst = state["numpy"]
        keys = npst["keys"].numpy() if torch.is_tensor(npst["keys"]) else npst["keys"]
        keys = np.asarray(keys, dtype=np.uint32)
        np.random.set_state((npst["bit_generator"], keys, int(npst["pos"]), int(npst["has_gauss"]),
                             float(npst["cached_gaussian"])))
        torch.set_rng_state(state["torch"])
    except (KeyError, TypeError) as err:
        raise ValueError(f"malformed RNG state (expected capture_rng_state() output): {err!r}") from err
    if "cuda" in state and torch.cuda.is_available():
        cuda_states = state["cuda"]
        if len(cuda_states) != torch.cuda.device_count():
            visible = torch.cuda.device_count()
            log.warning("checkpoint has CUDA RNG states for %d devices, %d visible: restoring the first %d",
                        len(cuda_states), visible, min(len(cuda_states), visible))
        for index, cuda_state in enumerate(cuda_states[: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(cuda_state, index)


# ------------------------------------------------------------------------- weights_only safety

_SAFE_SCALARS = (str, int, float, bool, type(None))


def check_weights_only_safe(obj: Any, where: str = "client_state") -> None:
    """ValueError (naming the offending value) unless `obj` loads with torch.load(weights_only=True).
    Scalars are checked by exact type: numpy.float64 subclasses float but is rejected there."""
    if type(obj) in _SAFE_SCALARS or isinstance(obj, torch.Tensor):
        return
    if type(obj) in (dict, OrderedDict):
        for key, value in obj.items():
            if type(key) not in (str, int):
                raise ValueError(f"{where}: key {key!r} has type {type(key).__name__}; use str or int keys")
            check_weights_only_safe(value, f"{where}[{key!r}]")
        return
    if type(obj) in (list, tuple):
        for index, value in enumerate(obj):
            check_weights_only_safe(value, f"{where}[{index}]")
        return
    raise ValueError(
        f"{where} has type {type(obj).__module__}.{type(obj).__qualname__}, which torch.load(weights_only=True) "
        "cannot read back; convert it to dict/list/str/int/float/bool/None or a torch.Tensor"
    )


def deepspeed_safe_globals() -> list[type]:
    """The DeepSpeed classes its own checkpoint files pickle (0.19.8, ZeRO 0-2, any precision)."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def _weights_only_engine_class() -> type:
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    class WeightsOnlyCheckpointEngine(TorchCheckpointEngine):
        def load(self, path: str, map_location: Any = None) -> Any:
            with torch.serialization.safe_globals(deepspeed_safe_globals()):
                return torch.load(path, map_location=map_location, weights_only=True)

    return WeightsOnlyCheckpointEngine


def use_weights_only_loading(engine: Any) -> None:
    """Make `engine.load_checkpoint` load with weights_only=True; a non-default checkpoint engine is
    left alone (warned)."""
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    current = engine.checkpoint_engine
    if type(current) is TorchCheckpointEngine:
        engine.checkpoint_engine = _weights_only_engine_class()(engine._config)
    elif type(current).__name__ != "WeightsOnlyCheckpointEngine":
        log.warning("checkpoint engine %s is not DeepSpeed's default; loading with its own rules",
                    type(current))


# --------------------------------------------------------------------------- markers & listing


def _from_marker(tag_dir: Path, marker: dict[str, Any]) -> CheckpointInfo:
    return CheckpointInfo(tag_dir, tag_dir.name, int(marker["step"]), int(marker["world_size"]))


def _read_marker(tag_dir: Path) -> dict[str, Any] | None:
    try:
        marker = json.loads((tag_dir / MARKER_FILE).read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if not isinstance(marker, dict) or marker.get("format") != MARKER_FORMAT:
        return None
    for name, size in marker.get("files", {}).items():
        file = tag_dir / name
        if not file.is_file() or file.stat().st_size != size:
            log.warning("checkpoint %s is incomplete: %s missing or truncated", tag_dir, name)
            return None
    return marker


def _complete_in(root: Path) -> list[CheckpointInfo]:
    """Complete checkpoints in a checkpoints folder, oldest first (by step, then write time)."""
    found = []
    for tag_dir in root.iterdir() if root.is_dir() else ():
        marker = _read_marker(tag_dir) if tag_dir.is_dir() else None
        if marker is not None:
            info = _from_marker(tag_dir, marker)
            found.append((info.step, float(marker.get("created_unix", 0.0)), info))
    return [info for _, _, info in sorted(found, key=lambda item: (item[0], item[1]))]


def list_checkpoints(run_dir: str | Path) -> list[CheckpointInfo]:
    return _complete_in(checkpoint_root(run_dir))


def _resolve_latest(root: Path) -> CheckpointInfo | None:
    try:
        tag = (root / LATEST_FILE).read_text().strip()
    except OSError:
        tag = ""
    if tag:
        marker = _read_marker(root / tag)
        if marker is not None:
            return _from_marker(root / tag, marker)
        log.warning("%s names %r, which is not a complete checkpoint; using the newest complete one",
                    root / LATEST_FILE, tag)
    complete = _complete_in(root)
    return complete[-1] if complete else None


def resolve_checkpoint(run_dir: str | Path, which: str | Path = "latest") -> CheckpointInfo | None:
    """The checkpoint `which` names: "latest" of the run (None when it has none yet), or a path to a
    tag folder, a checkpoints folder or a run folder (FileNotFoundError when it holds none)."""
    if str(which) == "latest":
        return _resolve_latest(checkpoint_root(run_dir))
    path = Path(which)
    if (path / MARKER_FILE).is_file():
        marker = _read_marker(path)
        if marker is None:
            raise FileNotFoundError(f"{path}: checkpoint is incomplete (files missing or truncated)")
        return _from_marker(path, marker)
    if (path / "mp_rank_00_model_states.pt").is_file():
        # A DeepSpeed checkpoint written by other code: no marker, step unknown.
        log.warning("%s has no pertvl marker; loading it as a plain DeepSpeed checkpoint", path)
        return CheckpointInfo(path, path.name, -1, -1)
    for root in (path / CHECKPOINTS_NAME, path):  # a run folder, or a checkpoints folder
        info = _resolve_latest(root) if root.is_dir() else None
        if info is not None:
            return info
    raise FileNotFoundError(f"{path}: no complete pertvl/DeepSpeed checkpoint there")


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


# ---------------------------------------------------------------------------------- save / resume


@dataclass(frozen=True)
class SavedCheckpoint:
    """What `save` wrote; `removed`: tag folders keep-last-K deleted (rank 0 only)."""

    path: Path
    tag: str
    step: int
    removed: tuple[str, ...]


def save(engine: Any, run_dir: str | Path, step: int, client_state: dict[str, Any], *,
         keep_last: int | None = 3, rank_state: dict[str, Any] | None = None) -> SavedCheckpoint:
    """Write a crash-safe checkpoint to RUN_DIR/checkpoints/step{step:08d} (EVERY rank calls it):
    rank 0's `client_state` and each rank's `rank_state` (weights_only-safe types, else ValueError)
    and RNG; `keep_last` complete checkpoints are kept (None: all)."""
    if keep_last is not None and keep_last < 1:
        raise ValueError(f"keep_last must be >= 1 or None, got {keep_last}")
    check_weights_only_safe(client_state, "client_state")
    check_weights_only_safe(rank_state or {}, "rank_state")
    rank, world_size = _world()
    root = checkpoint_root(run_dir)
    tag = tag_for_step(step)
    tag_dir = root / tag

    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        if tag_dir.exists():
            if _read_marker(tag_dir) is not None:
                # A step saved again: the complete one stays aside until the new one is complete.
                previous = root / f"{tag}{PREVIOUS_SUFFIX}"
                shutil.rmtree(previous, ignore_errors=True)
                tag_dir.rename(previous)
            else:
                shutil.rmtree(tag_dir)  # leftover of a crashed save
    _barrier()

    tag_dir.mkdir(parents=True, exist_ok=True)
    rank_payload = {
        "rank": rank,
        "world_size": world_size,
        "rng": capture_rng_state(),
        "rank_state": rank_state or {},
    }
    rank_file = tag_dir / rank_file_name(rank)
    tmp = rank_file.with_name(f".{rank_file.name}.tmp")
    torch.save(rank_payload, tmp)
    os.replace(tmp, rank_file)

    # DeepSpeed writes its files on every rank and ends with a barrier.
    engine.save_checkpoint(str(root), tag=tag, client_state={CLIENT_KEY: client_state}, save_latest=False)

    removed: list[str] = []
    if rank == 0:
        files = {}
        for file in sorted(tag_dir.iterdir()):
            if file.is_file() and not file.name.startswith("."):
                fsync_path(file)
                files[file.name] = file.stat().st_size
        missing = [rank_file_name(r) for r in range(world_size) if rank_file_name(r) not in files]
        if missing:
            raise RuntimeError(f"{tag_dir}: rank files {missing} missing after DeepSpeed's barrier")
        marker = {
            "format": MARKER_FORMAT,
            "tag": tag,
            "step": int(step),
            "world_size": world_size,
            "zero_stage": int(engine.zero_optimization_stage()),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "created_unix": time.time(),
            "files": files,
        }
        atomic_write_text(tag_dir / MARKER_FILE, json.dumps(marker, indent=1) + "\n", durable=True)
        atomic_write_text(root / LATEST_FILE, tag, durable=True)  # the commit point
        removed = _prune(root, keep=tag, keep_step=int(step), keep_last=keep_last)
        log.info("checkpoint %s written (%d files)%s", tag_dir, len(files),
                 f", removed {removed}" if removed else "")
    _barrier()
    return SavedCheckpoint(path=tag_dir, tag=tag, step=int(step), removed=tuple(removed))


def _prune(root: Path, keep: str, keep_step: int, keep_last: int | None) -> list[str]:
    """After a commit: delete complete checkpoints beyond the newest `keep_last`, the `.prev` copy
    of a re-saved step, and incomplete step folders older than the new one (crashed saves)."""
    complete = [info for info in _complete_in(root) if not info.tag.endswith(PREVIOUS_SUFFIX)]
    kept = {info.tag for info in (complete[-keep_last:] if keep_last is not None else complete)} | {keep}
    removed = []
    for entry in sorted(root.iterdir()):
        if not entry.is_dir() or entry.name in kept:
            continue
        match = _TAG_RE.match(entry.name)
        crashed = match is not None and int(match.group(1)) < keep_step
        if entry.name.endswith(PREVIOUS_SUFFIX) or _read_marker(entry) is not None or crashed:
            shutil.rmtree(entry)
            removed.append(entry.name)
    return removed


def resume(engine: Any, run_dir: str | Path, which: str | Path = "latest") -> dict[str, Any] | None:
    """Restore the engine (weights, optimizer, LR schedule) and this rank's RNG from the checkpoint
    `which` names (EVERY rank calls it) -> `save`'s client_state plus "rank_state" (None when this
    rank wrote none), "checkpoint" and "checkpoint_step"; None when there is nothing to resume."""
    info = resolve_checkpoint(run_dir, which)
    if info is None:
        return None
    rank, world_size = _world()
    use_weights_only_loading(engine)
    load_path, ds_client = engine.load_checkpoint(str(info.path.parent), tag=info.tag,
                                                  load_optimizer_states=True, load_lr_scheduler_states=True)
    if load_path is None:
        raise RuntimeError(f"DeepSpeed could not load the checkpoint {info.path}")
    client = dict((ds_client or {}).get(CLIENT_KEY) or {})
    if not client:
        log.warning("%s holds no pertvl client_state (not written by pertvl.train.checkpoint.save)",
                    info.path)
    rank_file = info.path / rank_file_name(rank)
    client["rank_state"] = None
    if rank_file.is_file():
        payload = torch.load(rank_file, map_location="cpu", weights_only=True)
        restore_rng_state(payload["rng"])
        client["rank_state"] = payload.get("rank_state")
    else:
        log.warning("%s has no state for rank %d (written by %d ranks, resumed with %d): RNG not restored, "
                    "the run continues but is not an exact replay", info.path, rank, info.world_size,
                    world_size)
    if info.world_size not in (-1, world_size):
        log.warning("checkpoint written by %d ranks, resuming with %d", info.world_size, world_size)
    client["checkpoint"] = str(info.path)
    client["checkpoint_step"] = info.step
    return client
