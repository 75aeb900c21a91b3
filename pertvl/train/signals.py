"""SIGTERM / SIGUSR1 -> checkpoint and a clean exit (SLURM time limits, preemption, requeue).

SLURM sends SIGUSR1 before the time limit when the job asks for it (`--signal=USR1@120`, see
slurm/README.md) and SIGTERM on preemption, `scancel` and at the time limit itself (SIGKILL follows
after KillWait, 30 s by default). The handler only sets a flag: the training loop checks it
after each optimizer step, agrees with the other ranks (`PreemptionFlag.agreed`, one tiny
all_reduce, so every rank stops after the SAME step and no collective is left waiting), writes a
checkpoint and exits with `PREEMPTED_EXIT_CODE`.

Exit code 75 is EX_TEMPFAIL of sysexits.h ("temporary failure; the user is invited to retry"):
the sbatch scripts requeue the job when srun returns it, and `--resume latest` continues.
"""

from __future__ import annotations

import signal
import threading
import time
from dataclasses import dataclass, field
from types import FrameType
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

PREEMPTED_EXIT_CODE = 75
"""Exit code of a run that stopped on SIGTERM/SIGUSR1 after writing its checkpoint (EX_TEMPFAIL)."""

DEFAULT_SIGNALS: tuple[signal.Signals, ...] = (signal.SIGTERM, signal.SIGUSR1)


@dataclass
class PreemptionFlag:
    """Set by SIGTERM/SIGUSR1; read by the training loop.

    Use as `flag = PreemptionFlag().install()` (or a `with` block, which restores the previous
    handlers on exit). Handlers can only be installed from the main thread (Python's rule).

    Attributes:
        signals: the signals that request a stop.
        requested: True once one of them arrived in this process.
        signal_name: name of the first one ("SIGUSR1"), None before.
        received_at: time.time() of the first one.
    """

    signals: tuple[signal.Signals, ...] = DEFAULT_SIGNALS
    requested: bool = False
    signal_name: str | None = None
    received_at: float | None = None
    _previous: dict[signal.Signals, Any] = field(default_factory=dict, repr=False)

    def install(self) -> PreemptionFlag:
        """Register the handlers (main thread only); returns self.

        Raises:
            RuntimeError: called from another thread.
        """
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
            self.received_at = time.time()
        self.requested = True

    def agreed(self, device: torch.device | str | None = None) -> bool:
        """Whether ANY rank was signalled: an all_reduce(MAX) of the flag across the job.

        Every rank must call it at the same point (after each optimizer step), so all ranks
        stop after the same step. Without torch.distributed initialised (or one rank) it is
        `requested`. Cost: one 1-element all_reduce.

        Args:
            device: where the collective runs (cuda:LOCAL_RANK under nccl, cpu under gloo).

        Returns:
            True when this or any other rank received a stop signal.
        """
        import torch
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return self.requested
        value = torch.tensor([1 if self.requested else 0], dtype=torch.int32, device=device or "cpu")
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
        return bool(value.item())

    def __enter__(self) -> PreemptionFlag:
        return self.install()

    def __exit__(self, *exc: object) -> None:
        self.uninstall()
