"""Step-time breakdown of a training step (`train.profile_steps`), for benchmarks.

Phases of one optimizer step, summed over its micro-batches:

    data_wait      next(batch): the host blocked on the loader
    to_device      Batch.to(device) (host → device copies, the bf16 cast of the images)
    image_fwd      the image tower's forward (a hook on DualEncoder.image)
    text_fwd       the text transformer's forward (a hook on DualEncoder.text.backbone: THE text pass)
    forward_other  the rest of DualEncoder.forward (gathering perturbations, word features, heads)
    losses         PretrainLoss (every term)
    backward       engine.backward (with DeepSpeed's gradient hooks: reduction for ZeRO-2 on > 1 rank)
    optimizer      engine.step (ZeRO's reductions on ZeRO-1, the SGD step, the LR schedule)
    other          the step's remaining time (loss values to the host, BatchNorm buffer averaging)

Boundaries are CUDA events (read at the step's end) on CUDA, the host clock on a CPU. Only the
steps asked for are timed: the default step creates no event and installs no hook.
"""

from __future__ import annotations

import contextlib
import time
from collections import defaultdict
from collections.abc import Iterator
from typing import Any

import torch

PHASES = ("data_wait", "to_device", "image_fwd", "text_fwd", "forward_other", "losses", "backward", "optimizer",
          "other")


class _Mark:
    """A point on the device timeline: a CUDA event, or the host clock on a CPU."""

    __slots__ = ("event", "t")

    def __init__(self, cuda: bool) -> None:
        self.event = None
        self.t = 0.0
        if cuda:
            self.event = torch.cuda.Event(enable_timing=True)
            self.event.record()
        else:
            self.t = time.perf_counter()

    def seconds_to(self, other: _Mark) -> float:
        if self.event is not None:
            return self.event.elapsed_time(other.event) / 1e3
        return other.t - self.t


class StepTimer:
    """`start()`, `with phase(name)` around each phase, `hooks(model)` around the forward, then
    `finish()` → {phase: seconds}."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self._intervals: list[tuple[str, _Mark, _Mark]] = []
        self._start: _Mark | None = None

    def start(self) -> None:
        self._intervals = []
        self._start = _Mark(self.cuda)

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        begin = _Mark(self.cuda)
        try:
            yield
        finally:
            self._intervals.append((name, begin, _Mark(self.cuda)))

    @contextlib.contextmanager
    def hooks(self, model: Any) -> Iterator[None]:
        """Time the image tower and the text transformer inside the forward of `model` (a DualEncoder)."""
        handles = []
        for name, module in (("image_fwd", model.image), ("text_fwd", model.text.backbone)):
            begin: list[_Mark] = []

            def pre(_m, _a, _begin=begin):
                _begin.append(_Mark(self.cuda))

            def post(_m, _a, _o, _begin=begin, _name=name):
                self._intervals.append((_name, _begin.pop(), _Mark(self.cuda)))

            handles += [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]
        try:
            yield
        finally:
            for h in handles:
                h.remove()

    def finish(self) -> dict[str, float]:
        """{phase: seconds} of the step (waits for the device on CUDA)."""
        end = _Mark(self.cuda)
        if self.cuda:
            end.event.synchronize()
        sums: dict[str, float] = defaultdict(float)
        for name, begin, stop in self._intervals:
            sums[name] += begin.seconds_to(stop)
        total = self._start.seconds_to(end) if self._start is not None else sum(sums.values())
        # The forward phase contains the two towers: what is left of it is "forward_other".
        sums["forward_other"] = max(0.0, sums.pop("forward", 0.0) - sums["image_fwd"] - sums["text_fwd"])
        accounted = sum(sums[p] for p in PHASES if p != "other")
        sums["other"] = max(0.0, total - accounted)
        return {p: sums[p] for p in PHASES}
