"""A small stage runner shared by `pertvl demo` and `pertvl ablate`: a stage whose outputs all exist
and whose stamp (its parameters) matches is skipped, so an interrupted job picks up where it stopped;
a failing stage raises StageError naming it. Stages call the `pertvl` CLI in-process, except training,
which runs under torchrun in a subprocess to get real ranks.
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pertvl.files import write_json

log = logging.getLogger(__name__)


class StageError(RuntimeError):
    """A stage of the pipeline failed; the message names the stage and why."""


@dataclass
class Stage:
    name: str
    outputs: Sequence[Path]  # every one must exist for the stage to count as complete
    run: Callable[[], None]
    params: dict[str, Any] = field(default_factory=dict)


class StageRunner:
    """Runs stages in order, skipping the ones whose outputs are complete and whose stamps match."""

    def __init__(self, state_dir: str | os.PathLike, *, force: bool = False):
        self.state_dir = Path(state_dir)
        self.force = force
        self.timings: dict[str, float] = {}
        self.skipped: list[str] = []

    def _stamp(self, stage: Stage) -> Path:
        return self.state_dir / f"{stage.name}.json"

    def is_complete(self, stage: Stage) -> bool:
        stamp = self._stamp(stage)
        if self.force or not stamp.is_file():
            return False
        try:
            recorded = json.loads(stamp.read_text())
        except (OSError, json.JSONDecodeError):
            return False
        return recorded.get("params") == _jsonable(stage.params) and all(Path(p).exists() for p in stage.outputs)

    def run(self, stage: Stage, index: int, total: int) -> None:
        head = f"[{index}/{total}] {stage.name}"
        if self.is_complete(stage):
            print(f"{head}: complete, skipped (outputs {', '.join(str(p) for p in stage.outputs)})", flush=True)
            self.skipped.append(stage.name)
            return
        print(f"{head} ...", flush=True)
        self._stamp(stage).unlink(missing_ok=True)
        t0 = time.perf_counter()
        try:
            stage.run()
        except StageError:
            raise
        except Exception as e:  # any failure becomes "which stage, and why"
            raise StageError(f"stage {stage.name!r} failed: {type(e).__name__}: {e}") from e
        missing = [str(p) for p in stage.outputs if not Path(p).exists()]
        if missing:
            raise StageError(f"stage {stage.name!r} finished but did not write {', '.join(missing)}")
        self.timings[stage.name] = time.perf_counter() - t0
        write_json(self._stamp(stage), {"params": _jsonable(stage.params), "seconds": self.timings[stage.name]})
        print(f"{head}: done in {self.timings[stage.name]:.1f} s", flush=True)

    def run_all(self, stages: Sequence[Stage]) -> None:
        for i, stage in enumerate(stages, 1):
            self.run(stage, i, len(stages))


def _jsonable(obj: Any) -> Any:
    return json.loads(json.dumps(obj, default=str))


def cli(argv: Sequence[str], what: str) -> None:
    """Run `pertvl ARGV…` in-process; a non-zero exit becomes a StageError."""
    from pertvl.cli import main

    log.debug("pertvl %s", shlex.join(argv))
    code = main(list(argv))
    if code:
        raise StageError(f"{what}: `pertvl {shlex.join(argv)}` exited with {code}")


def launch_train(args: Sequence[str], *, nproc: int = 2) -> None:
    """`pertvl train ARGS…` on `nproc` local ranks under torchrun (1 rank: plain python)."""
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "-m", "pertvl", "train", *args]
    else:
        cmd = [sys.executable, "-m", "pertvl", "train", *args]
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // max(nproc, 1))))
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    print(f"  $ {shlex.join(cmd)}", flush=True)
    proc = subprocess.run(cmd, env=env)
    if proc.returncode != 0:
        raise StageError(f"training exited with {proc.returncode}")
