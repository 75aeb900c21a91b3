"""Imported by the loader workers' forkserver process only (pertvl.data.stream.default_worker_context).

The forkserver lives in the rank's process group, so SLURM's SIGTERM to the job (scancel, preemption,
the time limit) reaches it too. Its default action would kill it, its workers would then see their
parent gone and exit, and the rank would fail with "DataLoader worker exited unexpectedly" before
it could checkpoint. Like the workers, the server ignores SIGTERM: the rank decides when to stop,
and the server exits by itself when the rank closes its end of the server's pipe.

That pipe does not close when the rank is SIGKILLed: every worker holds a copy of its write end
(multiprocessing hands it to each child of the server). So the server also ends with the rank
(pertvl.process.die_with_parent), and each worker ends with the server from the moment it is
forked (multiprocessing's after-fork hook, before any of torch's or pertvl's worker code runs).
"""

from __future__ import annotations

import signal
import sys

# Only inside the server: a fresh `python -c "from multiprocessing.forkserver import main; ..."`.
if sys.argv[:1] == ["-c"] and "multiprocessing.forkserver" in sys.modules:
    import os
    from multiprocessing import util

    from pertvl.process import die_with_parent

    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    die_with_parent()

    class _Server:  # register_after_fork keeps a weak reference to an object: this module's
        pid = os.getpid()

        @staticmethod
        def after_fork(server: _Server) -> None:
            die_with_parent(parent=server.pid)

    _SERVER = _Server()
    util.register_after_fork(_SERVER, _Server.after_fork)
