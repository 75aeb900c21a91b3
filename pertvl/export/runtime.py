"""onnxruntime sessions with pertvl's options: the one place an export's ONNX files are opened
(torch-free; onnxruntime is imported when a session is made).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor


def physical_cores() -> int:
    """Physical CPU cores (hyper-threads do not help GEMM-bound inference); os.cpu_count() as fallback."""
    try:
        import psutil

        n = psutil.cpu_count(logical=False)
    except ImportError:  # psutil is optional: it only refines the thread count
        n = None
    return max(1, int(n or os.cpu_count() or 1))


def session_options(threads: int | None = None):
    """SessionOptions of every tower: all graph optimizations, intra-op threads = physical cores
    (`threads` overrides), one inter-op thread."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.intra_op_num_threads = int(threads) if threads else physical_cores()
    so.inter_op_num_threads = 1
    so.log_severity_level = 3  # errors only: ORT warns about every unused initializer otherwise
    return so


def default_providers() -> list[str]:
    """CUDA first when this onnxruntime build has it, then CPU (Azure and friends are skipped)."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]


# Sessions flush denormals to zero (the text tower's masked softmax makes them: faster, same
# outputs). onnxruntime sets that flag on the thread that creates the session or calls run(), so
# both happen on one private thread: the caller's floating-point mode stays as it was.
_RUNNER: ThreadPoolExecutor | None = None
_RUNNER_LOCK = threading.Lock()


def _runner() -> ThreadPoolExecutor:
    global _RUNNER
    with _RUNNER_LOCK:
        if _RUNNER is None:
            _RUNNER = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pertvl-onnxruntime")
        return _RUNNER


def _forget_runner_in_child() -> None:
    """A forked child has no copy of the runner's thread: give it a fresh executor (and lock)."""
    global _RUNNER, _RUNNER_LOCK
    _RUNNER, _RUNNER_LOCK = None, threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_runner_in_child)


class IsolatedSession:
    """An onnxruntime InferenceSession whose run() executes on pertvl's onnxruntime thread (see
    above); every other attribute is the session's own. Calls from several threads queue."""

    def __init__(self, session):
        self.session = session

    def run(self, output_names, input_feed, run_options=None):
        return _runner().submit(self.session.run, output_names, input_feed, run_options).result()

    def __getattr__(self, name: str):
        return getattr(self.session, name)


def open_session(path: str | os.PathLike, providers: Sequence[str] | None = None,
                 threads: int | None = None) -> IsolatedSession:
    """An onnxruntime session of `path` with pertvl's options (session_options, denormals as zero)."""
    import onnxruntime as ort

    options = session_options(threads)
    options.add_session_config_entry("session.set_denormal_as_zero", "1")
    create = _runner().submit(ort.InferenceSession, os.fspath(path), sess_options=options,
                              providers=list(providers or default_providers()))
    return IsolatedSession(create.result())
