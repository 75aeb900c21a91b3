"""Training monitor: Weights & Biases (offline by default), RUN_DIR/metrics.jsonl, console.

Only rank 0 logs. The W&B mode is the config's, else WANDB_MODE, else "offline" (no network, no
account; `wandb sync` uploads later). An API key comes from the environment only: a config holding
one is refused. The run id is kept in the checkpoint, so a resumed run continues the same W&B run.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import resource
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pertvl.files import atomic_write_text

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
_API_KEY_RE = re.compile(r"api[_-]?key", re.IGNORECASE)
WANDB_MODES = ("online", "offline", "disabled")


def _find_api_keys(config: Any, path: str = "config") -> list[str]:
    found = []
    if isinstance(config, Mapping):
        for key, value in config.items():
            if _API_KEY_RE.search(str(key)):
                found.append(f"{path}.{key}")
            found.extend(_find_api_keys(value, f"{path}.{key}"))
    elif isinstance(config, list | tuple):
        for index, value in enumerate(config):
            found.extend(_find_api_keys(value, f"{path}[{index}]"))
    return found


def _scalar(value: Any) -> float | int | str | bool | None:
    """A JSON-ready scalar from floats, ints, numpy scalars and 0-d/1-element tensors."""
    if isinstance(value, bool | int | str) or value is None:
        return value
    if hasattr(value, "item"):
        value = value.item()
    value = float(value)
    return value if math.isfinite(value) else str(value)


def resolve_wandb_mode(mode: str | None = None, environ: Mapping[str, str] = os.environ) -> str:
    """W&B mode: the explicit/config value, else WANDB_MODE, else offline (ValueError if unknown)."""
    chosen = mode or environ.get("WANDB_MODE") or "offline"
    if chosen == "dryrun":  # wandb's old name for offline
        chosen = "offline"
    if chosen not in WANDB_MODES:
        raise ValueError(f"W&B mode must be one of {WANDB_MODES}, got {chosen!r}")
    return chosen


def memory_metrics(device: Any = None) -> dict[str, float]:
    """Memory use of this process in MiB: resident set (now and peak) and, on CUDA, torch's max
    allocated / reserved."""
    metrics: dict[str, float] = {}
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(("VmRSS:", "VmHWM:")):
                    name, kib = line.split()[:2]
                    metrics["mem/rss_mib" if name == "VmRSS:" else "mem/rss_peak_mib"] = int(kib) / 1024
    except OSError:  # not Linux: peak RSS from getrusage (KiB on Linux, bytes on macOS)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        metrics["mem/rss_peak_mib"] = peak / (1024 * 1024 if os.uname().sysname == "Darwin" else 1024)
    if device is not None and getattr(device, "type", str(device).split(":")[0]) == "cuda":
        import torch

        metrics["mem/cuda_max_allocated_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
        metrics["mem/cuda_max_reserved_mib"] = torch.cuda.max_memory_reserved(device) / 2**20
    return metrics


_FORK_HOOK_INSTALLED = False


def _forget_wandb_import_hooks_in_forked_children() -> None:
    """Clear wandb's post-import hooks in forked children: a DataLoader worker importing a hooked
    module (kornia) would fire them and die with wandb's ForkedError. The lock is replaced first
    (another parent thread may have held it)."""
    global _FORK_HOOK_INSTALLED
    if _FORK_HOOK_INSTALLED:
        return

    def _clear() -> None:
        import threading

        from wandb.sdk.lib import import_hooks

        import_hooks._post_import_hooks_lock = threading.RLock()
        import_hooks.unregister_all_post_import_hooks()

    os.register_at_fork(after_in_child=_clear)
    _FORK_HOOK_INSTALLED = True


class Monitor:
    """Logs training metrics to W&B, RUN_DIR/metrics.jsonl and the console (rank 0 only).

    `resume_run_id` continues that W&B run; `resume_step` drops the metrics.jsonl lines of later
    steps (logged by the run that died after its checkpoint), so the file holds each step once.
    ValueError when the config holds an API key or the W&B mode is unknown.
    """

    def __init__(self, run_dir: str | Path, config: dict[str, Any], enabled_wandb: bool, project: str | None,
                 run_name: str | None, tags: list[str] | tuple[str, ...] | None, rank: int,
                 resume_run_id: str | None = None, *, mode: str | None = None, resume_step: int | None = None) -> None:
        keys = _find_api_keys(config)
        if keys:
            raise ValueError(f"the config holds an API key ({', '.join(keys)}); remove it and export "
                             "WANDB_API_KEY in the environment instead (keys never go into config files)")
        self.run_dir = Path(run_dir)
        self.rank = rank
        self.active = rank == 0
        self.run_id: str | None = None
        self.wandb_mode: str | None = None
        self._run: Any = None
        self._bar: Any = None
        self._jsonl = None
        if not self.active:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        metrics_path = self.run_dir / METRICS_FILE
        if resume_step is not None and metrics_path.is_file():
            self._truncate_after(metrics_path, resume_step)
        self._jsonl = open(metrics_path, "a", buffering=1)  # line-buffered: survives a kill
        if enabled_wandb:
            self.wandb_mode = resolve_wandb_mode(mode)
            if self.wandb_mode != "disabled":
                import wandb

                self._run = wandb.init(project=project or "pertvl", name=run_name,
                                       tags=list(tags) if tags else None, config=config,
                                       dir=str(self.run_dir), id=resume_run_id,
                                       resume="allow" if resume_run_id else None, mode=self.wandb_mode)
                self.run_id = self._run.id
                _forget_wandb_import_hooks_in_forked_children()
                log.info("W&B %s run %s in %s", self.wandb_mode, self.run_id, self.run_dir / "wandb")

    @staticmethod
    def _truncate_after(path: Path, step: int) -> None:
        kept, dropped = [], 0
        for line in path.read_text().splitlines():
            try:
                record_step = json.loads(line).get("step")
            except json.JSONDecodeError:
                dropped += 1  # a line cut by the crash
                continue
            if isinstance(record_step, int) and record_step > step:
                dropped += 1
            else:
                kept.append(line)
        if dropped:
            atomic_write_text(path, "".join(f"{line}\n" for line in kept))
            log.info("%s: dropped %d lines after resumed step %d", path, dropped, step)

    def progress(self, total: int, initial: int = 0) -> Any:
        """A tqdm progress bar over optimizer steps; `log` shows the latest metrics in its postfix."""
        from tqdm.auto import tqdm

        self._bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True,
                         disable=not self.active)
        return self._bar

    def log(self, metrics: Mapping[str, Any], step: int) -> None:
        """Record the metrics (numbers, numpy scalars, 1-element tensors) of one optimizer step."""
        if not self.active:
            return
        values = {name: _scalar(value) for name, value in metrics.items()}
        record = {"step": int(step), "time": round(time.time(), 3), **values}
        self._jsonl.write(json.dumps(record) + "\n")
        if self._run is not None:
            self._run.log(values, step=int(step))
        short = {k.split("/")[-1]: v for k, v in values.items() if isinstance(v, float | int)}
        if self._bar is not None and not self._bar.disable:
            self._bar.set_postfix({k: f"{v:.4g}" for k, v in list(short.items())[:6]}, refresh=True)
        else:
            line = " ".join(f"{k}={v:.4g}" for k, v in values.items() if isinstance(v, float | int))
            print(f"step {step}: {line}", flush=True)

    def summary(self, values: Mapping[str, Any]) -> None:
        """Final/best numbers: W&B run summary and RUN_DIR/summary.json (merged with earlier calls)."""
        if not self.active:
            return
        clean = {name: _scalar(value) for name, value in values.items()}
        path = self.run_dir / SUMMARY_FILE
        merged = json.loads(path.read_text()) if path.is_file() else {}
        merged.update(clean)
        atomic_write_text(path, json.dumps(merged, indent=1) + "\n")
        if self._run is not None:
            self._run.summary.update(clean)

    def finish(self, exit_code: int = 0) -> None:
        """Close the progress bar, the JSONL file and the W&B run (exit_code != 0 marks it failed)."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None
        if self._run is not None:
            self._run.finish(exit_code=exit_code)
            self._run = None
