"""SIGTERM / SIGUSR1 -> checkpoint and a clean exit (SLURM time limits, preemption, requeue).

The handler only sets a flag; after each optimizer step the ranks agree on it (one all_reduce, so
all stop after the same step), write a checkpoint and exit with 75 (EX_TEMPFAIL), which the
sbatch scripts requeue; `--resume latest` continues.
"""

from __future__ import annotations

import signal
import threading
from dataclasses import dataclass, field
from types import FrameType
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

PREEMPTED_EXIT_CODE = 75  # stopped on SIGTERM/SIGUSR1 after writing its checkpoint (EX_TEMPFAIL)


@dataclass
class PreemptionFlag:
    """Set by SIGTERM/SIGUSR1, read by the training loop: `PreemptionFlag().install()` (main thread
    only); `signal_name`: the first signal that arrived."""

    signals: tuple[signal.Signals, ...] = (signal.SIGTERM, signal.SIGUSR1)
    requested: bool = False
    signal_name: str | None = None
    _previous: dict[signal.Signals, Any] = field(default_factory=dict, repr=False)

    def install(self) -> PreemptionFlag:
        """Register the handlers (main thread only); returns self."""
        if threading.current_thread() is not threading.main_thread():
            raise RuntimeError("PreemptionFlag.install() must run in the main thread (signal handlers)")
        for sig in self.signals:
            if sig not in self._previous:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def uninstall(self) -> None:
        """Restore the handlers that were active before `install`."""
        for sig, previous in self._previous.items():
            signal.signal(sig, previous if previous is not None else signal.SIG_DFL)
        self._previous.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        # Async-signal context: set plain attributes only (no logging, no I/O, no locks).
        if not self.requested:
            self.signal_name = signal.Signals(signum).name
        self.requested = True

    def agreed(self, device: torch.device | str | None = None) -> bool:
        """Whether ANY rank was signalled (an all_reduce(MAX) on `device`); every rank calls it at
        the same point."""
        import torch
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return self.requested
        value = torch.tensor([1 if self.requested else 0], dtype=torch.int32, device=device or "cpu")
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
        return bool(value.item())
