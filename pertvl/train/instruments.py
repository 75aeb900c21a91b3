"""The optional instruments of a training run: FLOP/MFU accounting (rank 0), the step-time
breakdown (`train.profile_steps`) and fault injection (PERTVL_FAULT). None changes what is trained.
"""

from __future__ import annotations

import contextlib
import json
import logging
from pathlib import Path
from typing import Any

import torch

from pertvl import faults
from pertvl.files import atomic_write_text
from pertvl.train.flops import FlopCounter, device_peak
from pertvl.train.profile import StepTimer

log = logging.getLogger(__name__)

FLOPS_FILE = "flops.json"
_NO_PHASE = contextlib.nullcontext()


class Instruments:
    """What the engine measures and injects besides training, one optimizer step at a time:
    `start_step`, `phase(name)` around each part and `forward(module)` around the forward,
    `count(batch)` per micro-batch, then `end_step` -> the step's perf/* metrics. `profile_steps`:
    the first optimizer steps timed phase by phase (0: none)."""

    def __init__(self, rank: int, run_dir: Path, profile_steps: int, device: torch.device) -> None:
        self.rank, self.run_dir, self.profile_steps = rank, Path(run_dir), profile_steps
        self.flops: FlopCounter | None = None
        self.peak = None
        self.timer = StepTimer(device) if profile_steps > 0 else None
        self.faults = faults.active("rank-")
        self._reported = False
        self._flops_sum = self._flops_time = 0.0
        self._step_timer: StepTimer | None = None  # the timer while a profiled step runs
        self._step_flops = 0.0

    def count_model(self, model: torch.nn.Module, image_size: int, terms: tuple[str, ...], **model_kwargs: bool) -> None:
        """Rank 0: the FLOP counter of this model and loss preset; none (and a warning) when the
        image tower cannot be counted: accounting never stops a run."""
        if self.rank != 0:
            return
        try:
            self.flops = FlopCounter.for_model(model, image_size, terms=terms, **model_kwargs)
        except Exception as err:  # noqa: BLE001 - an exotic backbone: train without MFU
            log.warning("FLOP accounting unavailable (%s: %s); perf/mfu is not logged", type(err).__name__, err)

    def time_peak(self, device: torch.device, dtype: torch.dtype) -> None:
        """The device's peak for MFU (a CPU's is a short matmul, timed once); rank 0 only."""
        if self.flops is not None:
            self.peak = device_peak(device, dtype)

    def start_step(self, step: int) -> None:
        """Before optimizer step `step` (from 1): PERTVL_FAULT's rank faults, then the breakdown's
        timer when the step is among the profiled ones."""
        if self.faults:
            faults.at_rank_step(self.faults, rank=self.rank, step=step)
        self._step_flops = 0.0
        self._step_timer = self.timer if self.timer is not None and step <= self.profile_steps else None
        if self._step_timer is not None:
            self._step_timer.start()

    def phase(self, name: str) -> contextlib.AbstractContextManager:
        return self._step_timer.phase(name) if self._step_timer is not None else _NO_PHASE

    def forward(self, module: torch.nn.Module) -> contextlib.AbstractContextManager:
        return self._step_timer.hooks(module) if self._step_timer is not None else _NO_PHASE

    def count(self, batch: Any, monitor: Any) -> None:
        """Add the FLOPs of one micro-batch (rank 0 with a counter); the first one is reported."""
        if self.flops is None:
            return
        if not self._reported:
            self._report(batch, monitor)
        self._step_flops += self.flops.batch_flops(batch)

    def _report(self, batch: Any, monitor: Any) -> None:
        """Once per run: RUN_DIR/flops.json, a log line and the summary's flops/* keys."""
        self._reported = True
        report = self.flops.report(batch, self.peak)
        atomic_write_text(self.run_dir / FLOPS_FILE, json.dumps(report, indent=1) + "\n")
        g = report["per_pair_gflop"]
        peak = self.peak
        log.info(
            "FLOPs per pair (fwd+bwd, first batch): text %.2f G, image %.2f G, L_local %.2f G, other losses %.3f G, "
            "total %.2f GFLOP; peak %.4g TFLOP/s (%s)",
            g["text"], g["image"], g["local"], g["global+pert"], g["total"],
            peak.flops_per_s / 1e12 if peak else float("nan"), peak.source if peak else "none",
        )  # fmt: skip
        monitor.summary({f"flops/per_pair_gflop/{k}": v for k, v in g.items()}
                        | ({"flops/peak_tflop_s": peak.flops_per_s / 1e12} if peak else {}))

    def end_step(self, step_time: float) -> dict[str, float]:
        """perf/tflop_s and perf/mfu (rank 0's counted FLOPs), and the breakdown's perf/time/*."""
        out: dict[str, float] = {}
        flops, timer = self._step_flops, self._step_timer
        if self.peak is not None:
            self._flops_sum, self._flops_time = self._flops_sum + flops, self._flops_time + step_time
            out["perf/tflop_s"] = flops / step_time / 1e12
            out["perf/mfu"] = flops / step_time / self.peak.flops_per_s
        if timer is not None:
            out.update({f"perf/time/{name}_s": v for name, v in timer.finish().items()})
        return out

    def summary(self) -> dict[str, float]:
        """perf/mfu_mean over this process's steps ({} without a peak)."""
        if self.peak is None or self._flops_time <= 0:
            return {}
        return {"perf/mfu_mean": self._flops_sum / self._flops_time / self.peak.flops_per_s}
