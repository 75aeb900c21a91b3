"""Imported by the loader workers' forkserver process only (pertvl.data.stream.default_worker_context).

SLURM's SIGTERM to the job reaches the forkserver too; dying, it would take its workers along and fail
the rank before it could checkpoint. Like the workers, the server ignores SIGTERM (the rank decides
when to stop). A SIGKILLed rank leaves the server's pipe open (every worker holds its write end), so
the server also ends with the rank (die_with_parent), and each worker with the server from the moment
it is forked (multiprocessing's after-fork hook).
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
