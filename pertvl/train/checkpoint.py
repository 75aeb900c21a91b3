"""Crash-safe DeepSpeed checkpoints, keep-last-K, RNG capture and exact resume.

Layout (RUN_DIR/checkpoints/ is a plain DeepSpeed checkpoint folder, so DeepSpeed's own tools —
`zero_to_fp32.py` copied there by DeepSpeed, `get_fp32_state_dict_from_zero_checkpoint` — read it):

    RUN_DIR/checkpoints/latest                    tag of the newest COMPLETE checkpoint
    RUN_DIR/checkpoints/step00000040/             DeepSpeed's files (mp_rank_*, *optim_states.pt)
        pertvl_rank00000.pt ...                   per-rank RNG state + per-rank client state
        pertvl_checkpoint.json                    completion marker: step, world size, file sizes
    RUN_DIR/checkpoints/zero_to_fp32.py           DeepSpeed's recovery script (ZeRO >= 1)

Why not DeepSpeed's own `latest`: deepspeed 0.19.8 `engine.save_checkpoint(save_latest=True)`
writes `latest` on rank 0 with a plain open("w")/write (truncate, then write, no fsync, not
atomic) BEFORE its closing barrier, i.e. possibly while other ranks still write their ZeRO
shards. pertvl saves with save_latest=False; after DeepSpeed's closing barrier rank 0 fsyncs the
files, writes the marker, then replaces `latest` atomically (temp file + fsync + os.replace).
A crash at any point leaves `latest` naming the previous complete checkpoint; resume also
double-checks the marker and falls back to the newest complete checkpoint.

Why per-rank files: DeepSpeed stores client_state only in rank 0's model-states file, but every
rank has its own RNG streams, so each rank writes its own RNG state next to DeepSpeed's shards.

Loading: deepspeed 0.19.8 reads checkpoints with torch.load(weights_only=False) (its
TorchCheckpointEngine). `resume` swaps in `WeightsOnlyCheckpointEngine`, which loads with
weights_only=True and allow-lists only the four DeepSpeed classes its own files contain
(LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address). pertvl's client_state is
checked to hold only weights_only-safe types (dict/list/tuple/str/int/float/bool/None/Tensor).
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

CHECKPOINT_SUBDIR = CHECKPOINTS_NAME  # the run folder layout is pertvl.train.rundir
LATEST_FILE = "latest"
MARKER_FILE = "pertvl_checkpoint.json"
MARKER_FORMAT = "pertvl-checkpoint/1"
CLIENT_KEY = "pertvl"  # client_state lives under one key so it never collides with DeepSpeed's keys
PREVIOUS_SUFFIX = ".prev"
_TAG_RE = re.compile(r"^step(\d{8})$")


def tag_for_step(step: int) -> str:
    """Checkpoint tag of a global optimizer step: "step00000040"."""
    if step < 0:
        raise ValueError(f"checkpoint step must be >= 0, got {step}")
    return f"step{step:08d}"


def checkpoint_root(run_dir: str | Path) -> Path:
    """RUN_DIR/checkpoints, the folder DeepSpeed saves into (and `latest` lives in)."""
    return Path(run_dir) / CHECKPOINT_SUBDIR


def rank_file_name(rank: int) -> str:
    return f"pertvl_rank{rank:05d}.pt"


@dataclass(frozen=True)
class CheckpointInfo:
    """A complete checkpoint on disk.

    Attributes:
        path: the tag folder.
        tag: its name (DeepSpeed's tag).
        step: global optimizer step it was taken at.
        world_size: ranks that wrote it.
    """

    path: Path
    tag: str
    step: int
    world_size: int


# ----------------------------------------------------------------------------------- RNG state


def capture_rng_state() -> dict[str, Any]:
    """This process's RNG states as weights_only-safe plain lists and tensors.

    Returns:
        {"python": {...}, "numpy": {...}, "torch": ByteTensor, "cuda": [ByteTensor per device]}
        ("cuda" only when CUDA is available).
    """
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
    """Inverse of `capture_rng_state`.

    Raises:
        ValueError: the dict lacks a part or holds the wrong kind of value.
    """
    try:
        py = state["python"]
        random.setstate((py["version"], tuple(py["internal"]), py["gauss_next"]))
        npst = state["numpy"]
        np.random.set_state(
            (
                npst["bit_generator"],
                np.asarray(
                    npst["keys"].numpy() if torch.is_tensor(npst["keys"]) else npst["keys"], dtype=np.uint32
                ),
                int(npst["pos"]),
                int(npst["has_gauss"]),
                float(npst["cached_gaussian"]),
            )
        )
        torch.set_rng_state(state["torch"])
    except (KeyError, TypeError) as err:
        raise ValueError(f"malformed RNG state (expected capture_rng_state() output): {err!r}") from err
    if "cuda" in state and torch.cuda.is_available():
        cuda_states = state["cuda"]
        if len(cuda_states) != torch.cuda.device_count():
            log.warning(
                "checkpoint has CUDA RNG states for %d devices, %d visible: restoring the first %d",
                len(cuda_states),
                torch.cuda.device_count(),
                min(len(cuda_states), torch.cuda.device_count()),
            )
        for index, cuda_state in enumerate(cuda_states[: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(cuda_state, index)


# ------------------------------------------------------------------------- weights_only safety

_SAFE_SCALARS = (str, int, float, bool, type(None))


def check_weights_only_safe(obj: Any, where: str = "client_state") -> None:
    """Raise unless `obj` loads back with torch.load(weights_only=True).

    Scalars are checked by EXACT type: numpy.float64 subclasses float but pickles as a numpy
    object, which weights_only loading rejects.

    Raises:
        ValueError: naming the path of the first offending value and its type.
    """
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
    """The DeepSpeed classes that DeepSpeed 0.19.8's own checkpoint files pickle (ZeRO 0/1/2,
    fp32/bf16/fp16); everything else is tensors and containers."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def _weights_only_engine_class() -> type:
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    class WeightsOnlyCheckpointEngine(TorchCheckpointEngine):
        """DeepSpeed's torch checkpoint engine, loading with weights_only=True."""

        def load(self, path: str, map_location: Any = None) -> Any:
            with torch.serialization.safe_globals(deepspeed_safe_globals()):
                return torch.load(path, map_location=map_location, weights_only=True)

    return WeightsOnlyCheckpointEngine


def use_weights_only_loading(engine: Any) -> bool:
    """Make `engine.load_checkpoint` unpickle nothing but tensors, containers and DeepSpeed's
    four allow-listed classes.

    Returns:
        True when installed; False (with a warning) when the engine uses a non-default
        checkpoint engine (fast/decoupled/datastates writers), which is left alone.
    """
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    current = engine.checkpoint_engine
    weights_only_cls = _weights_only_engine_class()
    if type(current).__name__ == weights_only_cls.__name__:
        return True
    if type(current) is not TorchCheckpointEngine:
        log.warning(
            "checkpoint engine %s is not DeepSpeed's default; loading with its own rules", type(current)
        )
        return False
    engine.checkpoint_engine = weights_only_cls(engine._config)
    return True


# --------------------------------------------------------------------------- markers & listing


def _read_marker(tag_dir: Path) -> dict[str, Any] | None:
    """The completion marker when the folder holds a complete checkpoint, else None."""
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
            info = CheckpointInfo(tag_dir, tag_dir.name, int(marker["step"]), int(marker["world_size"]))
            found.append((info.step, float(marker.get("created_unix", 0.0)), info))
    return [info for _, _, info in sorted(found, key=lambda item: (item[0], item[1]))]


def list_checkpoints(run_dir: str | Path) -> list[CheckpointInfo]:
    """Complete checkpoints under RUN_DIR/checkpoints, oldest first."""
    return _complete_in(checkpoint_root(run_dir))


def _read_latest(root: Path) -> str | None:
    try:
        tag = (root / LATEST_FILE).read_text().strip()
    except OSError:
        return None
    return tag or None


def _resolve_latest(root: Path) -> CheckpointInfo | None:
    tag = _read_latest(root)
    if tag is not None:
        marker = _read_marker(root / tag)
        if marker is not None:
            return CheckpointInfo(root / tag, tag, int(marker["step"]), int(marker["world_size"]))
        log.warning(
            "%s names %r, which is not a complete checkpoint; using the newest complete one",
            root / LATEST_FILE,
            tag,
        )
    complete = _complete_in(root)
    return complete[-1] if complete else None


def resolve_checkpoint(run_dir: str | Path, which: str | Path = "latest") -> CheckpointInfo | None:
    """Find the checkpoint to resume from.

    Args:
        run_dir: the run folder (holding checkpoints/).
        which: "latest", or a path to a tag folder, a checkpoints folder or a run folder.

    Returns:
        The checkpoint, or None when which="latest" and the run has none yet.

    Raises:
        FileNotFoundError: an explicit path that holds no complete checkpoint.
    """
    if str(which) == "latest":
        return _resolve_latest(checkpoint_root(run_dir))
    path = Path(which)
    if (path / MARKER_FILE).is_file():
        marker = _read_marker(path)
        if marker is None:
            raise FileNotFoundError(f"{path}: checkpoint is incomplete (files missing or truncated)")
        return CheckpointInfo(path, path.name, int(marker["step"]), int(marker["world_size"]))
    if (path / "mp_rank_00_model_states.pt").is_file():
        # A DeepSpeed checkpoint written by other code: no marker, step unknown.
        log.warning("%s has no pertvl marker; loading it as a plain DeepSpeed checkpoint", path)
        return CheckpointInfo(path, path.name, -1, -1)
    for root in (path / CHECKPOINT_SUBDIR, path):  # a run folder, or a checkpoints folder
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
    """What `save` wrote.

    Attributes:
        path: the tag folder.
        tag: "stepNNNNNNNN".
        step: global optimizer step.
        removed: tag folders deleted by keep-last-K (rank 0 only; empty elsewhere).
    """

    path: Path
    tag: str
    step: int
    removed: tuple[str, ...]


def save(
    engine: Any,
    run_dir: str | Path,
    step: int,
    client_state: dict[str, Any],
    *,
    keep_last: int | None = 3,
    rank_state: dict[str, Any] | None = None,
) -> SavedCheckpoint:
    """Write a crash-safe checkpoint of a DeepSpeed engine. EVERY rank must call it.

    Args:
        engine: the DeepSpeedEngine.
        run_dir: the run folder; checkpoints go to RUN_DIR/checkpoints/step{step:08d}.
        step: global optimizer step.
        client_state: rank 0's training state — epoch, step within epoch, stream position,
            global step, W&B run id, resolved config. weights_only-safe types only.
        keep_last: keep the newest K complete checkpoints (None keeps all).
        rank_state: this rank's own extra state (e.g. its stream position when it differs per
            rank); saved with its RNG state in pertvl_rank{R}.pt.

    Returns:
        SavedCheckpoint.

    Raises:
        ValueError: unsafe types in client_state/rank_state, or keep_last < 1.
    """
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
                # Re-saving a step (e.g. a run resumed from an older checkpoint reaches it again):
                # keep the complete one aside until the new one is complete; resume falls back to it.
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
        log.info(
            "checkpoint %s written (%d files)%s",
            tag_dir,
            len(files),
            f", removed {removed}" if removed else "",
        )
    _barrier()
    return SavedCheckpoint(path=tag_dir, tag=tag, step=int(step), removed=tuple(removed))


def _prune(root: Path, keep: str, keep_step: int, keep_last: int | None) -> list[str]:
    """After the new checkpoint is committed: delete complete checkpoints beyond the newest
    `keep_last`, the set-aside `.prev` copy of a re-saved step, and incomplete step folders older
    than the new one (crashed saves)."""
    complete = [info for info in _complete_in(root) if not info.tag.endswith(PREVIOUS_SUFFIX)]
    kept = {info.tag for info in (complete[-keep_last:] if keep_last is not None else complete)} | {keep}
    removed = []
    for entry in sorted(root.iterdir()):
        if not entry.is_dir() or entry.name in kept:
            continue
        match = _TAG_RE.match(entry.name)
        if (
            entry.name.endswith(PREVIOUS_SUFFIX)
            or _read_marker(entry) is not None
            or (match is not None and int(match.group(1)) < keep_step)
        ):
            shutil.rmtree(entry)
            removed.append(entry.name)
    return removed


def resume(
    engine: Any,
    run_dir: str | Path,
    which: str | Path = "latest",
    *,
    load_optimizer_states: bool = True,
    restore_rng: bool = True,
) -> dict[str, Any] | None:
    """Restore a DeepSpeed engine (weights, optimizer, LR schedule) and this rank's RNG. EVERY
    rank must call it, after deepspeed.initialize and before the first step.

    Args:
        engine: the DeepSpeedEngine.
        run_dir: the run folder.
        which: "latest" (None returned when the run has no checkpoint yet: start fresh) or a
            path to a tag folder / checkpoints folder / run folder.
        load_optimizer_states: False loads weights only (warm start).
        restore_rng: restore python/numpy/torch(/cuda) RNG from this rank's file.

    Returns:
        The client_state given to `save`, plus "rank_state" (this rank's, or None when the
        checkpoint was written with fewer ranks), "checkpoint" (tag folder) and "checkpoint_step";
        None when there is nothing to resume.

    Raises:
        FileNotFoundError: an explicit `which` that holds no checkpoint.
        RuntimeError: DeepSpeed failed to load it.
    """
    info = resolve_checkpoint(run_dir, which)
    if info is None:
        return None
    rank, world_size = _world()
    use_weights_only_loading(engine)
    load_path, ds_client = engine.load_checkpoint(
        str(info.path.parent),
        tag=info.tag,
        load_optimizer_states=load_optimizer_states,
        load_lr_scheduler_states=load_optimizer_states,
    )
    if load_path is None:
        raise RuntimeError(f"DeepSpeed could not load the checkpoint {info.path}")
    client = dict((ds_client or {}).get(CLIENT_KEY) or {})
    if not client:
        log.warning(
            "%s holds no pertvl client_state (not written by pertvl.train.checkpoint.save)", info.path
        )
    rank_file = info.path / rank_file_name(rank)
    client["rank_state"] = None
    if rank_file.is_file():
        payload = torch.load(rank_file, map_location="cpu", weights_only=True)
        if restore_rng:
            restore_rng_state(payload["rng"])
        client["rank_state"] = payload.get("rank_state")
    else:
        log.warning(
            "%s has no state for rank %d (written by %d ranks, resumed with %d): RNG not restored, "
            "the run continues but is not an exact replay",
            info.path,
            rank,
            info.world_size,
            world_size,
        )
    if info.world_size not in (-1, world_size):
        log.warning("checkpoint written by %d ranks, resuming with %d", info.world_size, world_size)
    client["checkpoint"] = str(info.path)
    client["checkpoint_step"] = info.step
    return client
