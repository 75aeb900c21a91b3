"""A failure anywhere ends the run, and nothing hangs: fault injection (`PERTVL_FAULT`, pertvl.faults)
in a data-loader worker, in a rank's loop, and by SIGKILL, under plain python, torchrun and the
deepspeed launcher (the srun case is in test_slurm.py); the progress watchdog and the stop-signal
grace period; and a soak over many epochs on 2 ranks with one set of loader workers per rank.

Each faulty run must exit non-zero within FAIL_WITHIN seconds of its start, with the error named in
its log. The tiny set-up is conftest.py's `tiny_train` (64 px phantoms, a 2-layer BERT).
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

import pytest
from test_train import _jsonl, _launcher, _start, _tail, _wait

from pertvl import faults
from pertvl.train.watchdog import STALLED_EXIT_CODE, TERMINATED_EXIT_CODE, Watchdog

FAIL_WITHIN = 60.0


def _train_cmd(tiny_train, run: Path, *extra: str) -> list[str]:
    return ["train", "--config", str(tiny_train.config), "--out", str(run), "--max-steps", "200", "--no-wandb",
            "--deepspeed-config", "ds_configs/cpu_zero1_fp32.json", *extra]  # fmt: skip


def _run_faulty(cmd: list[str], fault: str, tmp_path: Path, name: str) -> tuple[int, float, str]:
    """(exit code, seconds, log) of `cmd` with PERTVL_FAULT=fault."""
    log = tmp_path / f"{name}.log"
    t0 = time.monotonic()
    proc = _start(cmd, log, tmp_path, env={faults.ENV_VAR: fault})
    rc = _wait(proc, log, timeout=FAIL_WITHIN + 30)  # beyond FAIL_WITHIN: stacks, kill, fail
    return rc, time.monotonic() - t0, log.read_text(errors="replace")


# ------------------------------------------------------------------------------- unit level


def test_fault_specs_parse_and_refuse_typos() -> None:
    parsed = faults.parse("worker-raise:sample=5; rank-kill:rank=1,step=3")
    assert [(f.kind, f.params) for f in parsed] == [
        ("worker-raise", {"sample": "5"}), ("rank-kill", {"rank": "1", "step": "3"})]  # fmt: skip
    assert parsed[1].applies(rank=1) and not parsed[1].applies(rank=0) and parsed[0].applies(rank=7, worker=1)
    with pytest.raises(ValueError, match="unknown fault 'rank-explode'"):
        faults.parse("rank-explode:step=1")
    with pytest.raises(ValueError, match="'step' in 'rank-raise:step' must look like key=value"):
        faults.parse("rank-raise:step")
    with pytest.raises(faults.InjectedFault, match="rank 0 before step 2"):
        faults.at_rank_step(faults.parse("rank-raise:step=2"), rank=0, step=2)
    faults.at_rank_step(faults.parse("rank-raise:step=2,rank=1"), rank=0, step=2)  # another rank's fault


def _expired(wd: Watchdog, at: float) -> tuple[str, int] | None:
    return wd.check(now=wd._last + at)


def test_watchdog_limits_phase_and_stop_grace() -> None:
    wd = Watchdog(stall_timeout_s=100, stop_grace_s=5)
    assert _expired(wd, 99) is None
    reason, code = _expired(wd, 101)
    assert code == STALLED_EXIT_CODE and "no progress for 101 s in optimizer step 1 (limit 100 s" in reason
    with wd.phase("checkpoint"):
        assert "in the checkpoint" in _expired(wd, 101)[0]
    assert wd._phase is None
    # A stop signal: the next step boundary must come within the grace period...
    stopping = {"now": False}
    wd = Watchdog(stall_timeout_s=None, stop_grace_s=5, stop_requested=lambda: stopping["now"])
    assert _expired(wd, 1e6) is None
    stopping["now"] = True
    assert _expired(wd, 0) is None
    reason, code = _expired(wd, 6)
    assert code == TERMINATED_EXIT_CODE and "train.stop_grace_s = 5 s" in reason
    # ... and once it came, the checkpoint after it is not held to the grace period.
    wd = Watchdog(stall_timeout_s=None, stop_grace_s=5, stop_requested=lambda: True)
    assert _expired(wd, 0) is None
    wd.beat()
    assert _expired(wd, 60) is None


def test_watchdog_thread_ends_a_stalled_loop() -> None:
    ended: list[tuple[str, int]] = []
    wd = Watchdog(stall_timeout_s=0.5, poll_s=0.05, on_expire=lambda r, c: ended.append((r, c)))
    wd.start()
    for _ in range(5):  # beats keep it quiet
        time.sleep(0.1)
        wd.beat()
    assert not ended
    deadline = time.monotonic() + 10
    while not ended and time.monotonic() < deadline:
        time.sleep(0.05)
    wd.stop()
    assert len(ended) == 1 and ended[0][1] == STALLED_EXIT_CODE and "optimizer step 6" in ended[0][0]


# --------------------------------------------------------------------- real runs, one process


def test_a_worker_that_raises_ends_a_single_process_run(tiny_train, tmp_path: Path) -> None:
    """The hang seen on an H200 and on CPU: a worker's exception was printed, and the process then
    waited forever for the other worker (which ignores SIGTERM) at interpreter exit."""
    rc, took, log = _run_faulty([sys.executable, "-m", "pertvl", *_train_cmd(tiny_train, tmp_path / "run")],
                                "worker-raise:sample=6", tmp_path, "worker_raise")  # fmt: skip
    assert rc == 1 and took < FAIL_WITHIN, log[-3000:]
    assert "injected failure in rank 0 worker 0 sample 6" in log and "rank 0 failed" in log


def test_a_worker_that_cannot_import_a_module_ends_the_run(tiny_train, tmp_path: Path) -> None:
    rc, took, log = _run_faulty([sys.executable, "-m", "pertvl", *_train_cmd(tiny_train, tmp_path / "run")],
                                "worker-import:module=pertvl_no_such_module", tmp_path, "worker_import")  # fmt: skip
    assert rc == 1 and took < FAIL_WITHIN, log[-3000:]
    assert "No module named 'pertvl_no_such_module'" in log


def test_a_stalled_worker_trips_the_watchdog_with_every_stack(tiny_train, tmp_path: Path) -> None:
    """A worker that never returns: after `train.stall_timeout_s` without a step the rank writes its
    threads' stacks and its workers' (faulthandler, SIGUSR2), kills them and exits 70."""
    cmd = [sys.executable, "-m", "pertvl", *_train_cmd(tiny_train, tmp_path / "run", "--set", "train.stall_timeout_s=25")]
    rc, took, log = _run_faulty(cmd, "worker-hang:sample=20,worker=1", tmp_path, "stall")
    assert rc == STALLED_EXIT_CODE and took < FAIL_WITHIN, log[-3000:]
    assert "the run is stalled" in log and "limit 25 s: train.stall_timeout_s" in log
    assert "in _train_step" in log  # the rank's main thread, waiting for its batch
    assert "in _hang" in log and "in _worker_loop" in log  # the stalled worker's own stack
    assert f"exiting with {STALLED_EXIT_CODE}" in log


def test_sigterm_ends_a_run_whose_step_never_completes(tiny_train, tmp_path: Path) -> None:
    """SIGTERM normally means: finish the step, checkpoint, exit 75. When the step never ends, the
    rank ends after `train.stop_grace_s` with 143 (the last checkpoint stays)."""
    run, log = tmp_path / "run", tmp_path / "term.log"
    cmd = [sys.executable, "-m", "pertvl", *_train_cmd(tiny_train, run, "--set", "train.stop_grace_s=3")]
    proc = _start(cmd, log, tmp_path, env={faults.ENV_VAR: "rank-hang:step=3"})
    deadline = time.monotonic() + FAIL_WITHIN
    while not ((run / "metrics.jsonl").is_file() and len(_jsonl(run / "metrics.jsonl")) >= 2):
        assert proc.poll() is None and time.monotonic() < deadline, _tail(log)
        time.sleep(0.05)
    time.sleep(0.5)  # inside the hung step
    t0 = time.monotonic()
    os.killpg(proc.pid, signal.SIGTERM)
    rc = _wait(proc, log, timeout=30)
    text = log.read_text()
    assert rc == TERMINATED_EXIT_CODE and time.monotonic() - t0 < 15, text[-3000:]
    assert "no step boundary was reached within train.stop_grace_s = 3 s" in text and "in _hang" in text


# ------------------------------------------------------------------------------ real runs, 2 ranks


@pytest.mark.parametrize(
    ("fault", "expect"),
    [
        ("rank-raise:rank=1,step=3", "injected failure in rank 1 before step 3"),
        ("rank-kill:rank=1,step=3", "exitcode: -9"),  # torchrun names the killed rank
        ("worker-raise:rank=1,sample=10", "injected failure in rank 1 worker 0 sample 10"),
    ],
    ids=["raise", "sigkill", "worker"],
)
def test_torchrun_a_failure_in_one_rank_ends_both(tiny_train, tmp_path: Path, fault: str, expect: str) -> None:
    cmd = [*_launcher("torchrun"), *_train_cmd(tiny_train, tmp_path / "run")]
    rc, took, log = _run_faulty(cmd, fault, tmp_path, "torchrun")
    assert rc != 0 and took < FAIL_WITHIN, log[-4000:]
    assert expect in log, log[-4000:]


def test_deepspeed_launcher_a_failure_in_one_rank_ends_both(tiny_train, tmp_path: Path) -> None:
    cmd = [*_launcher("deepspeed"), *_train_cmd(tiny_train, tmp_path / "run")]
    rc, took, log = _run_faulty(cmd, "rank-raise:rank=1,step=2", tmp_path, "deepspeed")
    assert rc != 0 and took < FAIL_WITHIN, log[-4000:]
    assert "injected failure in rank 1 before step 2" in log and "rank 1 failed" in log


@pytest.mark.slow
def test_soak_many_epochs_two_ranks_one_set_of_workers(tiny_train, tmp_path: Path) -> None:
    """30 epochs (2 optimizer steps each) on 2 ranks under torchrun: no hang at any epoch boundary,
    and each rank started its loader workers once (they serve every epoch, from a forkserver)."""
    run, log = tmp_path / "run", tmp_path / "soak.log"
    epochs = 30
    # 113 train samples, micro-batch 8, 2 ranks x 2 workers: 6 micro-batches per epoch = 2 steps of 3
    cmd = [*_launcher("torchrun"), "train", "--config", str(tiny_train.config), "--out", str(run), "--no-wandb",
           "--max-steps", str(2 * epochs), "--set", "train.micro_batch=8", "--set", "train.grad_accum=3",
           "--set", "train.checkpoint_every=0", "--set", "train.stall_timeout_s=60"]  # fmt: skip
    rc = _wait(_start(cmd, log, tmp_path), log, timeout=600)
    assert rc == 0, _tail(log)
    metrics = _jsonl(run / "metrics.jsonl")
    assert [m["epoch"] for m in metrics] == [s // 2 for s in range(2 * epochs)]
    ranks = [json.loads((run / "ranks" / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["loader_starts"] for r in ranks] == [1, 1] and ranks[0]["param_sha256"] == ranks[1]["param_sha256"]
