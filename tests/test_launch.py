"""pertvl.train.launch (ranks from torchrun / deepspeed / srun), ds_configs loading, signals."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pertvl.train.launch import (
    SLURM_PORT_BASE,
    SLURM_PORT_SPAN,
    DistEnv,
    default_num_threads,
    detect_dist_env,
    expand_hostlist,
    free_port,
    load_ds_config,
    parse_tasks_per_node,
    slurm_master_port,
)
from pertvl.train.signals import PREEMPTED_EXIT_CODE, PreemptionFlag

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable
SELFTEST_RE = re.compile(r"^rank (\d+)/(\d+) local (\d+) device (\S+) sum (\d+)$", re.MULTILINE)


def _child_env(tmp_path: Path) -> dict[str, str]:
    """Environment for launched ranks: no inherited launcher variables, a private torch
    extensions folder (to prove DeepSpeed compiles nothing), the venv's bin first on PATH."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "RANK", "LOCAL_", "MASTER_"))}
    env.pop("WORLD_SIZE", None)
    env["TORCH_EXTENSIONS_DIR"] = str(tmp_path / "torch_extensions")
    env["PATH"] = f"{Path(PY).parent}{os.pathsep}{env.get('PATH', '')}"
    env.pop("OMP_NUM_THREADS", None)
    return env


# ----------------------------------------------------------------------------- hostlists


@pytest.mark.parametrize(
    "spec, hosts",
    [
        ("gpu[01-03,07],cpu5", ["gpu01", "gpu02", "gpu03", "gpu07", "cpu5"]),
        ("rack[1-2]-node[01-02]", ["rack1-node01", "rack1-node02", "rack2-node01", "rack2-node02"]),
        ("a,b-c[9-11]", ["a", "b-c9", "b-c10", "b-c11"]),
        ("node-[1,3-4]", ["node-1", "node-3", "node-4"]),
        ("h[7-10]", ["h7", "h8", "h9", "h10"]),
        ("gpu[1-2,04]", ["gpu1", "gpu2", "gpu04"]),
        ("n[098-101]", ["n098", "n099", "n100", "n101"]),
        ("vm", ["vm"]),
    ],
)
def test_expand_hostlist(spec: str, hosts: list[str]) -> None:
    assert expand_hostlist(spec) == hosts


@pytest.mark.parametrize("spec", ["gpu[01-03", "gpu]1[", "gpu[a-b]", "gpu[5-3]", "a,,b", "x[[1]]", ""])
def test_expand_hostlist_rejects_malformed(spec: str) -> None:
    with pytest.raises(ValueError):
        expand_hostlist(spec)


@pytest.mark.skipif(shutil.which("scontrol") is None, reason="scontrol (slurm-client) not installed")
def test_expand_hostlist_agrees_with_scontrol(tmp_path: Path) -> None:
    conf = tmp_path / "slurm.conf"
    conf.write_text("ClusterName=hostlist-test\nSlurmctldHost=localhost\n")
    specs = [
        "gpu[01-03,07],cpu5",
        "rack[1-2]-node[01-02]",
        "a,b-c[9-11]",
        "node-[1,3-4]",
        "h[7-10]",
        "n[098-101]",
    ]
    for spec in specs:
        out = subprocess.run(
            ["scontrol", "show", "hostnames", spec],
            env={**os.environ, "SLURM_CONF": str(conf)},
            capture_output=True,
            text=True,
            check=True,
        ).stdout.split()
        assert expand_hostlist(spec) == out, spec


def test_parse_tasks_per_node() -> None:
    assert parse_tasks_per_node("2(x3),1") == [2, 2, 2, 1]
    assert parse_tasks_per_node("4") == [4]
    assert parse_tasks_per_node("1,3(x2)") == [1, 3, 3]
    with pytest.raises(ValueError):
        parse_tasks_per_node("2(3)")


# ------------------------------------------------------------------------------ detection


def test_detect_single_process() -> None:
    env = detect_dist_env({})
    assert env == DistEnv(0, 1, 0, 1, "127.0.0.1", 0, "single")


def test_detect_torchrun() -> None:
    environ = {
        "RANK": "3",
        "WORLD_SIZE": "4",
        "LOCAL_RANK": "1",
        "LOCAL_WORLD_SIZE": "2",
        "MASTER_ADDR": "node0",
        "MASTER_PORT": "29400",
        "TORCHELASTIC_RUN_ID": "x",
    }
    assert detect_dist_env(environ) == DistEnv(3, 4, 1, 2, "node0", 29400, "torchrun")


def test_detect_deepspeed_launcher() -> None:
    environ = {
        "RANK": "1",
        "WORLD_SIZE": "2",
        "LOCAL_RANK": "1",
        "LOCAL_SIZE": "2",
        "CROSS_RANK": "0",
        "CROSS_SIZE": "1",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": "29500",
    }
    assert detect_dist_env(environ, argv_local_rank=1) == DistEnv(1, 2, 1, 2, "127.0.0.1", 29500, "deepspeed")
    # --local_rank alone also identifies the deepspeed launcher
    no_local = {k: v for k, v in environ.items() if k not in ("LOCAL_RANK", "CROSS_RANK")}
    assert detect_dist_env(no_local, argv_local_rank=1).launcher == "deepspeed"
    with pytest.raises(ValueError, match="disagrees"):
        detect_dist_env(environ, argv_local_rank=0)


def _srun_environ(**extra: str) -> dict[str, str]:
    environ = {
        "SLURM_JOB_ID": "123457",
        "SLURM_STEP_ID": "0",
        "SLURM_PROCID": "7",
        "SLURM_NTASKS": "8",
        "SLURM_STEP_NUM_TASKS": "7",
        "SLURM_LOCALID": "0",
        "SLURM_NODEID": "3",
        "SLURM_TASKS_PER_NODE": "2(x3),1",
        "SLURM_JOB_NODELIST": "gpu[01-03,07]",
    }
    environ.pop("SLURM_STEP_NUM_TASKS")
    environ.update(extra)
    return environ


def test_detect_srun() -> None:
    env = detect_dist_env(_srun_environ())
    port = SLURM_PORT_BASE + 123457 % SLURM_PORT_SPAN
    assert env == DistEnv(7, 8, 0, 1, "gpu01", port, "slurm")
    assert 15000 <= slurm_master_port(123457) < 30000
    # node 1 of "2(x3),1" runs 2 tasks; the step's own variables win over the job's
    env = detect_dist_env(
        _srun_environ(
            SLURM_PROCID="3",
            SLURM_LOCALID="1",
            SLURM_NODEID="1",
            SLURM_STEP_TASKS_PER_NODE="2(x2)",
            SLURM_STEP_NUM_TASKS="4",
            SLURM_STEP_NODELIST="gpu[02-03]",
        )
    )
    assert (env.rank, env.world_size, env.local_rank, env.local_world_size, env.master_addr) == (
        3,
        4,
        1,
        2,
        "gpu02",
    )
    # a single SLURM_NTASKS_PER_NODE applies to every node; MASTER_* set by the user win
    environ = _srun_environ(MASTER_ADDR="10.0.0.1", MASTER_PORT="23456", SLURM_NTASKS_PER_NODE="2")
    del environ["SLURM_TASKS_PER_NODE"]
    environ.update(SLURM_PROCID="5", SLURM_LOCALID="1", SLURM_NODEID="2")
    env = detect_dist_env(environ)
    assert (env.local_world_size, env.master_addr, env.master_port) == (2, "10.0.0.1", 23456)


def test_torchrun_inside_allocation_wins_over_slurm() -> None:
    environ = _srun_environ(
        RANK="1", WORLD_SIZE="2", LOCAL_RANK="1", LOCAL_WORLD_SIZE="2", MASTER_ADDR="h", MASTER_PORT="29501"
    )
    assert detect_dist_env(environ) == DistEnv(1, 2, 1, 2, "h", 29501, "torchrun")


def test_batch_shell_is_not_a_rank(caplog: pytest.LogCaptureFixture) -> None:
    # sbatch's shell has SLURM_PROCID=0 and SLURM_NTASKS=2 but no step: one process, and a warning
    environ = {"SLURM_JOB_ID": "5", "SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_LOCALID": "0"}
    env = detect_dist_env(environ)
    assert (env.launcher, env.world_size) == ("single", 1)
    assert "not an srun step" in caplog.text


@pytest.mark.parametrize(
    "environ, message",
    [
        ({"RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "h", "MASTER_PORT": "1"}, "LOCAL_RANK"),
        ({"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_PORT": "1"}, "MASTER_ADDR"),
        ({"RANK": "x", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "h", "MASTER_PORT": "1"}, "RANK"),
        (
            {"RANK": "2", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "h", "MASTER_PORT": "1"},
            "outside",
        ),
    ],
)
def test_detect_rejects_broken_environments(environ: dict[str, str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        detect_dist_env(environ)


def test_default_num_threads() -> None:
    env = DistEnv(0, 2, 0, 2, "h", 1, "torchrun")
    assert default_num_threads(env, {"SLURM_CPUS_PER_TASK": "6"}) == 6
    cores = len(os.sched_getaffinity(0))
    assert default_num_threads(env, {}) == max(1, cores // 2)
    assert default_num_threads(DistEnv(0, 64, 0, 64, "h", 1, "torchrun"), {}) == 1


# ------------------------------------------------------------------------------ ds_configs


def test_every_ds_config_is_explicit() -> None:
    configs = sorted((REPO / "ds_configs").glob("*.json"))
    names = {p.stem for p in configs}
    assert {
        "cpu_zero0_fp32",
        "cpu_zero1_fp32",
        "cpu_zero1_bf16",
        "cpu_zero2_fp32",
        "cpu_zero2_bf16",
        "gpu_zero1_bf16",
        "gpu_zero2_bf16",
        "gpu_zero2_fp16",
    } <= names
    for path in configs:
        raw = json.loads(path.read_text())
        config = load_ds_config(path, world_size=2)
        assert config == raw, path
        assert "optimizer" not in raw and "scheduler" not in raw and "train_batch_size" not in raw
        assert raw["zero_allow_untested_optimizer"] is True
        assert raw["wall_clock_breakdown"] is False and raw["steps_per_print"] >= 10**6
        stage = int(path.stem.split("_zero")[1][0])
        assert raw["zero_optimization"]["stage"] == stage
        precision = path.stem.rsplit("_", 1)[1]
        assert raw["bf16"]["enabled"] is (precision == "bf16")
        assert raw["fp16"]["enabled"] is (precision == "fp16")
        if precision != "fp32":
            assert raw["data_types"]["buffer_dtype"] == precision  # BatchNorm buffers follow the params
        if precision == "fp16":
            assert raw["fp16"]["loss_scale"] == 0  # dynamic loss scaling


def test_load_ds_config_overrides_and_errors(tmp_path: Path) -> None:
    config = load_ds_config(
        REPO / "ds_configs/cpu_zero1_fp32.json", micro_batch=4, grad_accum=3, gradient_clipping=1.0
    )
    assert (config["train_micro_batch_size_per_gpu"], config["gradient_accumulation_steps"]) == (4, 3)
    assert config["gradient_clipping"] == 1.0
    base = json.loads((REPO / "ds_configs/cpu_zero1_fp32.json").read_text())

    def write(**changes: object) -> Path:
        data = {**base, **changes}
        for key, value in changes.items():
            if value is None:
                del data[key]
        path = tmp_path / "c.json"
        path.write_text(json.dumps(data))
        return path

    with pytest.raises(ValueError, match="optimizer"):
        load_ds_config(write(optimizer={"type": "Adam"}))
    with pytest.raises(ValueError, match="gradient_clipping"):
        load_ds_config(write(gradient_clipping=None))
    with pytest.raises(ValueError, match="train_batch_size=64"):
        load_ds_config(write(train_batch_size=64), world_size=2)
    assert load_ds_config(write(train_batch_size=32), world_size=2)["train_batch_size"] == 32
    assert "train_batch_size" not in load_ds_config(write(train_batch_size=32), micro_batch=2)
    with pytest.raises(ValueError, match="both enabled"):
        load_ds_config(write(bf16={"enabled": True}, fp16={"enabled": True}))
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="bad.json"):
        load_ds_config(tmp_path / "bad.json")


# -------------------------------------------------------------------------------- signals


@pytest.mark.parametrize("sig", [signal.SIGUSR1, signal.SIGTERM])
def test_preemption_flag_catches_own_signal(sig: signal.Signals) -> None:
    before = signal.getsignal(sig)
    flag = PreemptionFlag().install()
    try:
        assert not flag.requested and flag.signal_name is None
        os.kill(os.getpid(), sig)
        deadline = time.monotonic() + 5
        while not flag.requested and time.monotonic() < deadline:
            time.sleep(0.01)
        assert flag.requested and flag.signal_name == sig.name
        assert flag.agreed()  # no process group of size > 1: its own flag
        os.kill(os.getpid(), signal.SIGUSR1)  # a second signal keeps the first name
        time.sleep(0.05)
        assert flag.signal_name == sig.name
    finally:
        flag.uninstall()
    assert signal.getsignal(sig) == before
    assert PREEMPTED_EXIT_CODE == 75


def test_signal_to_one_rank_stops_all_ranks_at_the_same_iteration(tmp_path: Path) -> None:
    """Two gloo ranks loop in lockstep; SIGUSR1 reaches rank 1 only; both stop after the same
    iteration (the flag is all-reduced) and exit with the preemption code."""
    port = free_port()
    procs = []
    for rank in range(2):
        env = _child_env(tmp_path) | {
            "RANK": str(rank),
            "WORLD_SIZE": "2",
            "LOCAL_RANK": str(rank),
            "LOCAL_WORLD_SIZE": "2",
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
        }
        procs.append(
            subprocess.Popen(
                [PY, "-m", "pertvl.train.launch", "--selftest", "--wait-signal", "60"],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
                text=True,
                cwd=REPO,
            )
        )
    try:
        lines: dict[int, list[str]] = {0: [], 1: []}
        for rank, proc in enumerate(procs):
            while True:
                line = proc.stdout.readline()
                assert line, f"rank {rank} ended before waiting: {lines[rank]}"
                lines[rank].append(line.strip())
                if "waiting for SIGTERM/SIGUSR1" in line:
                    break
        rank1_pid = int(re.search(r"pid (\d+)", lines[1][-1]).group(1))
        assert rank1_pid == procs[1].pid
        os.kill(rank1_pid, signal.SIGUSR1)
        outs = [proc.communicate(timeout=60)[0] for proc in procs]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    assert [proc.returncode for proc in procs] == [PREEMPTED_EXIT_CODE, PREEMPTED_EXIT_CODE]
    stops = [re.search(r"rank (\d) stopping at iteration (\d+) on (.+)", out) for out in outs]
    assert stops[0] and stops[1], outs
    assert stops[0].group(2) == stops[1].group(2)
    assert stops[1].group(3) == "SIGUSR1" and stops[0].group(3) == "a peer signal"


# ------------------------------------------------------------------------ real launchers


def _check_selftest(stdout: str, world_size: int, launcher_dir: Path) -> None:
    import torch

    found = sorted((int(m[0]), int(m[1]), int(m[2]), m[3], int(m[4])) for m in SELFTEST_RE.findall(stdout))
    expected_sum = world_size * (world_size - 1) // 2
    devices = [f"cuda:{r}" if torch.cuda.is_available() else "cpu" for r in range(world_size)]
    assert found == [(r, world_size, r, devices[r], expected_sum) for r in range(world_size)], stdout
    # DeepSpeed's shared-memory op was not JIT-compiled (it would appear here)
    assert not (launcher_dir / "deepspeed_shm_comm").exists()


@pytest.mark.skipif(shutil.which("torchrun", path=str(Path(PY).parent)) is None, reason="torchrun missing")
def test_torchrun_two_ranks(tmp_path: Path) -> None:
    proc = subprocess.run(
        [
            str(Path(PY).parent / "torchrun"),
            "--nproc_per_node",
            "2",
            "--master_port",
            str(free_port()),
            "-m",
            "pertvl.train.launch",
            "--selftest",
        ],
        env=_child_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    _check_selftest(proc.stdout, 2, tmp_path / "torch_extensions")


def test_deepspeed_launcher_two_ranks(tmp_path: Path) -> None:
    # On CPU `--include localhost:0,1` fails (device count = NUMA nodes); --num_gpus 2 works.
    proc = subprocess.run(
        [
            str(Path(PY).parent / "deepspeed"),
            "--num_gpus",
            "2",
            "--master_port",
            str(free_port()),
            "--module",
            "pertvl.train.launch",
            "--selftest",
        ],
        env=_child_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    _check_selftest(proc.stdout, 2, tmp_path / "torch_extensions")
