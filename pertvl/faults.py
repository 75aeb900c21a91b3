"""Fault injection for testing that a failure anywhere ends a run: `PERTVL_FAULT` in the environment.

The tests (and a user checking a cluster set-up) make one process of a run fail on purpose and
check that every rank exits non-zero, promptly, with the error named. Nothing happens unless the
variable is set. Format: `KIND:key=value,key=value`, several faults separated by `;`:

    worker-raise:sample=N          a data-loader worker raises RuntimeError at its N-th sample
    worker-import:module=NAME      a data-loader worker imports NAME at its first sample
    worker-hang:sample=N           a data-loader worker sleeps forever at its N-th sample
    rank-raise:rank=R,step=N       rank R raises RuntimeError before optimizer step N
    rank-kill:rank=R,step=N        rank R SIGKILLs itself before optimizer step N (an OOM kill)
    rank-hang:rank=R,step=N        rank R sleeps forever before optimizer step N

`rank` defaults to every rank; worker faults apply in every worker of every rank unless `rank=`
or `worker=` narrows them. Steps count from 1 (the step about to run); samples count from 1 per
worker and epoch pass.
"""

from __future__ import annotations

import importlib
import os
import signal
import time
from dataclasses import dataclass, field

ENV_VAR = "PERTVL_FAULT"
KINDS = ("worker-raise", "worker-import", "worker-hang", "rank-raise", "rank-kill", "rank-hang")


class InjectedFault(RuntimeError):
    """The error an injected `*-raise` fault raises (its message names the fault)."""


@dataclass(frozen=True)
class Fault:
    kind: str
    params: dict[str, str] = field(default_factory=dict)

    def _int(self, key: str) -> int | None:
        return int(self.params[key]) if key in self.params else None

    def applies(self, *, rank: int, worker: int | None = None) -> bool:
        r, w = self._int("rank"), self._int("worker")
        return (r is None or r == rank) and (w is None or worker is None or w == worker)


def parse(spec: str) -> list[Fault]:
    """Parse a `PERTVL_FAULT` value.

    Raises:
        ValueError: an unknown kind or a malformed `key=value`, with the offending part named.
    """
    faults = []
    for part in filter(None, (p.strip() for p in spec.split(";"))):
        kind, _, rest = part.partition(":")
        if kind not in KINDS:
            raise ValueError(f"{ENV_VAR}: unknown fault {kind!r} in {part!r}; known: {', '.join(KINDS)}")
        params = {}
        for item in filter(None, (i.strip() for i in rest.split(","))):
            key, eq, value = item.partition("=")
            if not eq or not value:
                raise ValueError(f"{ENV_VAR}: {item!r} in {part!r} must look like key=value")
            params[key] = value
        faults.append(Fault(kind, params))
    return faults


def active(prefix: str) -> list[Fault]:
    """The faults of this process's environment whose kind starts with `prefix`."""
    spec = os.environ.get(ENV_VAR, "")
    return [f for f in parse(spec) if f.kind.startswith(prefix)] if spec else []


def _hang() -> None:
    while True:  # a stall the watchdog must find (time.sleep is interruptible by signals)
        time.sleep(3600)


def at_worker_sample(faults: list[Fault], *, rank: int, worker: int, sample: int) -> None:
    """Called by a loader worker before its `sample`-th sample (1-based) when faults are set."""
    for f in faults:
        if not f.applies(rank=rank, worker=worker):
            continue
        if f.kind == "worker-import" and sample == 1:
            importlib.import_module(f.params["module"])
        elif f._int("sample") == sample:
            if f.kind == "worker-raise":
                raise InjectedFault(f"{ENV_VAR}={f.kind}: injected failure in rank {rank} worker {worker} "
                                    f"sample {sample}")
            if f.kind == "worker-hang":
                _hang()


def at_rank_step(faults: list[Fault], *, rank: int, step: int) -> None:
    """Called by the training loop before optimizer step `step` (1-based) when faults are set."""
    for f in faults:
        if not f.applies(rank=rank) or f._int("step") != step:
            continue
        if f.kind == "rank-raise":
            raise InjectedFault(f"{ENV_VAR}={f.kind}: injected failure in rank {rank} before step {step}")
        if f.kind == "rank-kill":
            os.kill(os.getpid(), signal.SIGKILL)
        if f.kind == "rank-hang":
            _hang()
