"""A run that stops making progress, or fails, ends: the progress watchdog and the failure deadline.

Three ways a rank can stay alive without training, each seen on real runs:

- a step never completes (a data-loader worker deadlocked right after fork, a peer that died while
  this rank waits in a collective, a filesystem that stopped answering);
- the rank raised, but exiting blocks (joining a worker that ignores SIGTERM, a collective in a
  destructor, W&B flushing);
- a stop signal arrived, but the step it waits for never ends, so the checkpoint never comes.

`Watchdog` is a daemon thread per rank. The loop calls `beat()` after every optimizer step. With
no beat for longer than the limit, or a stop signal unanswered for `stop_grace_s`, the watchdog
writes every thread's Python stack (and asks the rank's loader workers to write theirs), kills the
workers and ends the process with `os._exit` — no cleanup that could block again. The limit is
`stall_timeout_s` (absolute), tightened to `stall_factor` × the median step time (but never under
`min_stall_s`) once `warmup_beats` steps have been timed. `phase("checkpoint")` lifts the relative
rule while something known to be slow runs.

`exit_deadline(seconds)` arms the same ending for a rank that is already failing: whatever the
clean-up does, the process is gone `seconds` later, with its stacks in the log.
"""

from __future__ import annotations

import contextlib
import faulthandler
import logging
import os
import signal
import statistics
import sys
import threading
import time
from collections.abc import Callable, Iterator

from pertvl.data.stream import WORKER_STACKS_SIGNAL  # loader workers write their stacks on it

log = logging.getLogger(__name__)

STALLED_EXIT_CODE = 70
"""Exit code of a rank ended by the watchdog or the failure deadline (EX_SOFTWARE of sysexits.h)."""
TERMINATED_EXIT_CODE = 143
"""Exit code of a rank whose stop signal was not answered by a step boundary within the grace period
(128 + SIGTERM, as if the signal had killed it: the run did not checkpoint)."""



def dump_all_stacks(reason: str) -> None:
    """Write `reason` and every thread's Python stack of this process (and of its child processes
    that registered WORKER_STACKS_SIGNAL) to stderr. Async-safe enough for a dying process: no
    locks beyond stderr's."""
    try:
        sys.stderr.write(f"\n[pertvl] {reason}\n[pertvl] Python stacks of pid {os.getpid()}:\n")
        sys.stderr.flush()
    except Exception:  # noqa: BLE001 - a closed stderr must not stop the ending
        pass
    faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
    # Only the processes that asked for it (the loader workers): the signal would kill the others,
    # e.g. the forkserver, whose workers die with it. One at a time, so the reports do not interleave.
    for pid in _child_pids():
        if _catches(pid, WORKER_STACKS_SIGNAL):
            with contextlib.suppress(OSError):
                os.kill(pid, WORKER_STACKS_SIGNAL)
                time.sleep(0.3)


def _catches(pid: int, sig: int) -> bool:
    """Whether process `pid` has a handler for `sig` (Linux: SigCgt of /proc/PID/status)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("SigCgt:"):
                    return bool(int(line.split()[1], 16) >> (sig - 1) & 1)
    except (OSError, ValueError, IndexError):
        pass
    return False


def _child_pids() -> list[int]:
    """This process's descendants: its loader workers, and the workers a forkserver started for it
    (children of that server, which is a child of this process)."""
    me = os.getpid()
    parents: dict[int, list[int]] = {}
    try:
        entries = [e for e in os.listdir("/proc") if e.isdigit()]
    except OSError:  # no /proc (not Linux): multiprocessing's own children
        import multiprocessing

        return [p.pid for p in multiprocessing.active_children() if p.pid]
    for entry in entries:
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                ppid = int(f.read().rsplit(b")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        parents.setdefault(ppid, []).append(int(entry))
    out, todo = [], list(parents.get(me, []))
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(parents.get(pid, []))
    return out


def end_process(reason: str, code: int) -> None:
    """Dump stacks, kill the child processes and `os._exit(code)`: nothing can block it."""
    dump_all_stacks(reason)
    for pid in _child_pids():
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)
    with contextlib.suppress(Exception):
        hint = "; re-run with --resume latest to continue from the last checkpoint" if code == STALLED_EXIT_CODE else ""
        sys.stderr.write(f"[pertvl] exiting with {code}: {reason}{hint}\n")
        sys.stderr.flush()
        sys.stdout.flush()
    os._exit(code)


class Watchdog:
    """Ends this rank when training stops making progress (see the module docstring).

    Args:
        rank: for the messages.
        stall_timeout_s: the absolute limit between two beats (None or <= 0: no absolute limit).
        stall_factor: the relative limit, × the median step time (None or <= 0: none).
        min_stall_s: the relative limit is never below this.
        warmup_beats: steps timed before the relative limit applies (first steps are slow).
        stop_grace_s: after `stop_requested()` turns true, the time allowed to reach the next step
            boundary (None: unlimited).
        stop_requested: returns True once a stop signal arrived (PreemptionFlag.requested).
        poll_s: how often the thread looks (None: a tenth of the smallest limit, 0.2-5 s).
        on_expire: called instead of `end_process` (tests).
    """

    def __init__(
        self,
        *,
        rank: int = 0,
        stall_timeout_s: float | None = 1800.0,
        stall_factor: float | None = 50.0,
        min_stall_s: float = 120.0,
        warmup_beats: int = 5,
        stop_grace_s: float | None = None,
        stop_requested: Callable[[], bool] | None = None,
        poll_s: float | None = None,
        on_expire: Callable[[str, int], None] | None = None,
    ) -> None:
        self.rank = rank
        self.stall_timeout_s = stall_timeout_s if stall_timeout_s and stall_timeout_s > 0 else None
        self.stall_factor = stall_factor if stall_factor and stall_factor > 0 else None
        self.min_stall_s = float(min_stall_s)
        self.warmup_beats = int(warmup_beats)
        self.stop_grace_s = stop_grace_s
        self.stop_requested = stop_requested or (lambda: False)
        limits = [x for x in (self.stall_timeout_s, self.min_stall_s if self.stall_factor else None,
                              stop_grace_s) if x]  # fmt: skip
        self.poll_s = poll_s if poll_s is not None else min(5.0, max(0.2, min(limits, default=50.0) / 10))
        self.on_expire = on_expire or end_process
        self._last = time.monotonic()
        self._durations: list[float] = []
        self._phase: str | None = None
        self._stop_seen_at: float | None = None
        self._beats_at_stop = 0
        self._stopped = threading.Event()
        self._thread: threading.Thread | None = None
        self.beats = 0

    # -- the loop's side --------------------------------------------------------------------------
    def _arm_backstop(self) -> None:
        # A hang inside C code that holds the GIL would stop this thread too; faulthandler's timer is
        # a C thread: it writes every stack and exits (code 1) a minute after the absolute limit.
        if self.stall_timeout_s is not None:
            faulthandler.dump_traceback_later(self.stall_timeout_s + 60, exit=True)

    def start(self) -> Watchdog:
        self._last = time.monotonic()
        self._arm_backstop()
        self._thread = threading.Thread(target=self._watch, name="pertvl-watchdog", daemon=True)
        self._thread.start()
        return self

    def beat(self) -> None:
        """One optimizer step completed."""
        now = time.monotonic()
        if self._phase is None:
            self._durations.append(now - self._last)
            del self._durations[:-200]  # the median of recent steps
        self._last = now
        self.beats += 1
        self._arm_backstop()

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Something known to take longer than a step (a checkpoint): only the absolute limit applies,
        counted from the phase's start; the step clock restarts after it. Phases nest."""
        outer, self._phase, self._last = self._phase, name, time.monotonic()
        self._arm_backstop()
        try:
            yield
        finally:
            self._phase, self._last = outer, time.monotonic()
            self._arm_backstop()

    def stop(self) -> None:
        self._stopped.set()
        if self.stall_timeout_s is not None:
            faulthandler.cancel_dump_traceback_later()
        if self._thread is not None:
            self._thread.join(timeout=self.poll_s * 2 + 1)

    # -- the thread -------------------------------------------------------------------------------
    def limit(self) -> tuple[float | None, str]:
        """The current limit between beats and how it was set."""
        if self._phase is None and self.stall_factor and len(self._durations) >= self.warmup_beats:
            median = statistics.median(self._durations[1:] or self._durations)  # the first step is slow
            relative = max(self.min_stall_s, self.stall_factor * median)
            if self.stall_timeout_s is None or relative < self.stall_timeout_s:
                return relative, f"{self.stall_factor:g} x the median step time {median:.2f} s (at least {self.min_stall_s:g} s)"
        if self.stall_timeout_s is None:
            return None, "no limit"
        return self.stall_timeout_s, "train.stall_timeout_s"

    def check(self, now: float | None = None) -> tuple[str, int] | None:
        """(reason, exit code) when the rank must end now, else None."""
        now = time.monotonic() if now is None else now
        if self.stop_requested() and self._stop_seen_at is None:
            self._stop_seen_at, self._beats_at_stop = now, self.beats
        # The grace covers reaching the next step boundary; the checkpoint after it is a phase.
        if (self._stop_seen_at is not None and self.beats == self._beats_at_stop
                and self.stop_grace_s is not None and now - self._stop_seen_at > self.stop_grace_s):
            return (f"rank {self.rank}: a stop signal arrived {now - self._stop_seen_at:.0f} s ago and no step "
                    f"boundary was reached within train.stop_grace_s = {self.stop_grace_s:g} s; ending without "
                    "a checkpoint (the last one stays)", TERMINATED_EXIT_CODE)  # fmt: skip
        limit, why = self.limit()
        idle = now - self._last
        if limit is not None and idle > limit:
            what = f"the {self._phase}" if self._phase else f"optimizer step {self.beats + 1}"
            return (f"rank {self.rank}: no progress for {idle:.0f} s in {what} (limit {limit:.0f} s: {why}); "
                    "the run is stalled", STALLED_EXIT_CODE)  # fmt: skip
        return None

    def _watch(self) -> None:
        while not self._stopped.wait(self.poll_s):
            verdict = self.check()
            if verdict is not None:
                reason, code = verdict
                log.error("%s", reason)
                self.on_expire(reason, code)
                return


def exit_deadline(seconds: float, reason: str, code: int = 1) -> threading.Timer:
    """End this process `seconds` from now unless it has exited by then (a daemon timer)."""
    timer = threading.Timer(
        seconds, end_process,
        args=(f"{reason}; still alive {seconds:g} s later (train.failure_timeout_s): forcing the exit", code),
    )  # fmt: skip
    timer.daemon = True
    timer.start()
    return timer
