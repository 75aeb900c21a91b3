"""Child processes that end with their parent (loader workers, their forkserver, pack's pool), even
a parent killed by SIGKILL: prctl(PR_SET_PDEATHSIG) on Linux, elsewhere a thread polling the ppid.
"""

from __future__ import annotations

import os
import signal
import threading
import time

_PR_SET_PDEATHSIG = 1


def die_with_parent(sig: int = signal.SIGKILL, poll_s: float = 1.0, parent: int | None = None) -> None:
    """End this process with `sig` when its parent ends. Call it first thing in a child; `parent`:
    the pid it was forked from, when known (a parent that ended before this call is then noticed)."""
    parent = os.getppid() if parent is None else parent
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    except (OSError, AttributeError):  # no prctl (macOS, Windows): watch the parent instead
        threading.Thread(target=_watch_parent, args=(parent, sig, poll_s), daemon=True,
                         name="pertvl-parent-watch").start()  # fmt: skip
        return
    if os.getppid() != parent:  # the parent ended before prctl took effect
        os.kill(os.getpid(), sig)


def _watch_parent(parent: int, sig: int, poll_s: float) -> None:
    while os.getppid() == parent:
        time.sleep(poll_s)
    os.kill(os.getpid(), sig)
