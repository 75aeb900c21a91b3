"""A run that stops making progress, or fails, ends: the progress watchdog and the failure deadline.

A rank can stay alive without training: a step that never completes (a deadlocked loader worker,
a dead peer in a collective), an exit that blocks after an error, a stop signal whose step never
ends. `Watchdog` is a daemon thread per rank: with no `beat()` for longer than the limit, or a stop
signal unanswered for `stop_grace_s`, it writes every Python stack (the loader workers' too), kills
the workers and calls `os._exit`. The limit is `stall_timeout_s`, also while in a `phase` (a
checkpoint). `exit_deadline` arms the same ending for a rank that is already failing.
"""

from __future__ import annotations

import contextlib
import faulthandler
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator

from pertvl.data.stream import WORKER_STACKS_SIGNAL  # loader workers write their stacks on it

log = logging.getLogger(__name__)

STALLED_EXIT_CODE = 70  # ended by the watchdog or the failure deadline (EX_SOFTWARE)
TERMINATED_EXIT_CODE = 143  # a stop signal not answered within the grace period (128 + SIGTERM)
FAILURE_TIMEOUT_S = 30.0  # a rank that raised is gone this long after, whatever blocks its clean-up


def dump_all_stacks(reason: str) -> None:
    """Write `reason` and every thread's Python stack of this process (and of its children that
    registered WORKER_STACKS_SIGNAL) to stderr."""
    try:
        sys.stderr.write(f"\n[pertvl] {reason}\n[pertvl] Python stacks of pid {os.getpid()}:\n")
        sys.stderr.flush()
    except Exception:  # noqa: BLE001 - a closed stderr must not stop the ending
        pass
    faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
    # Only the processes that catch it (the signal would kill a forkserver), one at a time.
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
    """This process's descendants (loader workers, a forkserver and its workers)."""
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
    """Ends this rank when training stops making progress (see the module docstring). Limits of
    None or <= 0 are off; `poll_s` defaults to a tenth of the smallest limit (0.2-5 s);
    `on_expire` replaces `end_process` (tests)."""

    def __init__(self, *, rank: int = 0, stall_timeout_s: float | None = 1800.0,
                 stop_grace_s: float | None = None, stop_requested: Callable[[], bool] | None = None,
                 poll_s: float | None = None, on_expire: Callable[[str, int], None] | None = None) -> None:
        self.rank = rank
        self.stall_timeout_s = stall_timeout_s if stall_timeout_s and stall_timeout_s > 0 else None
        self.stop_grace_s = stop_grace_s
        self.stop_requested = stop_requested or (lambda: False)
        limits = [x for x in (self.stall_timeout_s, stop_grace_s) if x]
        self.poll_s = poll_s if poll_s is not None else min(5.0, max(0.2, min(limits, default=50.0) / 10))
        self.on_expire = on_expire or end_process
        self._last = time.monotonic()
        self._phase: str | None = None
        self._stop_seen_at: float | None = None
        self._beats_at_stop = 0
        self._stopped = threading.Event()
        self._thread: threading.Thread | None = None
        self.beats = 0

    # -- the loop's side --------------------------------------------------------------------------
    def _arm_backstop(self) -> None:
        # A hang in C code holding the GIL stops this thread too: faulthandler's C timer does not.
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
        self._last = time.monotonic()
        self.beats += 1
        self._arm_backstop()

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Something other than a step (a checkpoint): named in the stall message."""
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
        limit = self.stall_timeout_s
        idle = now - self._last
        if limit is not None and idle > limit:
            what = f"the {self._phase}" if self._phase else f"optimizer step {self.beats + 1}"
            return (f"rank {self.rank}: no progress for {idle:.0f} s in {what} (limit {limit:.0f} s: "
                    "train.stall_timeout_s); the run is stalled", STALLED_EXIT_CODE)  # fmt: skip
        return None

    def _watch(self) -> None:
        while not self._stopped.wait(self.poll_s):
            verdict = self.check()
            if verdict is not None:
                reason, code = verdict
                log.error("%s", reason)
                self.on_expire(reason, code)
                return


def exit_deadline(reason: str) -> None:
    """End this process (exit 1) FAILURE_TIMEOUT_S from now unless it has exited by then (a daemon timer)."""
    message = f"{reason}; still alive {FAILURE_TIMEOUT_S:g} s later: forcing the exit"
    timer = threading.Timer(FAILURE_TIMEOUT_S, end_process, args=(message, 1))
    timer.daemon = True
    timer.start()
