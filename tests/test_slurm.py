"""A real single-host SLURM cluster (slurm/local_cluster.sh) runs the sbatch scripts.

Needs Debian's slurmctld/slurmd/slurm-client/munge and root. With PERTVL_INSTALL_SLURM=1 (CI)
the test installs them through `local_cluster.sh install`; otherwise it skips with the reason.
The per-rank command is the launch self-test (PERTVL_CMD), which the scripts run exactly as
they run `python -m pertvl train`; and, with the script's default command, the real 2-rank
training on tiny phantom shards (conftest.py's `tiny_train`).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pertvl.train.launch import free_port
from pertvl.train.signals import PREEMPTED_EXIT_CODE

pytestmark = pytest.mark.slurm

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "slurm" / "local_cluster.sh"
SELFTEST_RE = re.compile(r"^rank (\d+)/(\d+) local (\d+) device (\S+) sum (\d+)$", re.MULTILINE)
_LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def _have_packages() -> bool:
    return all(shutil.which(tool) for tool in ("slurmctld", "slurmd", "sbatch", "munged", "mungekey"))


class Cluster:
    def __init__(self, state: Path) -> None:
        self.state = state
        self.env = {
            k: v for k, v in os.environ.items() if not k.startswith("SLURM_") and k not in _LAUNCH_VARS
        }
        self.env.update(
            SLURM_CONF=str(state / "slurm.conf"),
            PERTVL_SLURMCTLD_PORT=str(free_port()),
            PERTVL_SLURMD_PORT=str(free_port()),
            PERTVL_REPO=str(REPO),
            PERTVL_PYTHON=sys.executable,
            TORCH_EXTENSIONS_DIR=str(state / "torch_extensions"),
        )

    def run(self, *args: str, **kwargs) -> subprocess.CompletedProcess:
        return subprocess.run(args, env=self.env, capture_output=True, text=True, timeout=120, **kwargs)

    def cluster(self, command: str) -> subprocess.CompletedProcess:
        return self.run("bash", str(SCRIPT), command, str(self.state))

    def submit(self, script: str, out: Path, extra_env: dict[str, str], *options: str) -> int:
        proc = subprocess.run(
            ["sbatch", "--parsable", f"--output={out}", *options, str(REPO / "slurm" / script)],
            env=self.env | extra_env,
            capture_output=True,
            text=True,
            timeout=60,
            cwd=REPO,
        )
        assert proc.returncode == 0, proc.stderr
        return int(proc.stdout.strip().split(";")[0])

    def job_field(self, job_id: int, field: str) -> str:
        text = self.run("scontrol", "show", "job", str(job_id)).stdout
        match = re.search(rf"\b{field}=(\S+)", text)
        return match.group(1) if match else ""

    def wait_done(self, job_id: int, timeout: float = 150) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.run("squeue", "-h", "-j", str(job_id), "-o", "%T").stdout.strip():
                return
            time.sleep(0.25)
        raise AssertionError(f"job {job_id} still queued/running after {timeout} s")


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    if os.geteuid() != 0:
        pytest.skip("the local SLURM cluster runs as root (SlurmUser=root); not root here")
    if not _have_packages():
        if os.environ.get("PERTVL_INSTALL_SLURM") != "1":
            pytest.skip(
                "SLURM/munge packages not installed; run `slurm/local_cluster.sh install` "
                "or set PERTVL_INSTALL_SLURM=1 to let the test install them"
            )
        proc = subprocess.run(["bash", str(SCRIPT), "install"], capture_output=True, text=True, timeout=600)
        if proc.returncode != 0 or not _have_packages():
            pytest.skip(f"could not install the SLURM packages: {proc.stderr[-500:]}")
    # Not under pytest's tmp folder: munged needs o+x on every parent of its socket (pytest's is 0700).
    cl = Cluster(Path(tempfile.mkdtemp(prefix="pertvl-slurm-test-", dir="/tmp")))
    try:
        started = cl.cluster("start")
        assert started.returncode == 0, started.stdout + started.stderr + _logs(cl.state)
        yield cl
    finally:
        stopped = cl.cluster("stop")
        leftovers = [n for n in ("munged", "slurmctld", "slurmd") if (cl.state / "run" / f"{n}.pid").exists()]
        shutil.rmtree(cl.state, ignore_errors=True)
        assert not leftovers, stopped.stdout + stopped.stderr


def _logs(state: Path) -> str:
    return "".join(f"\n--- {p.name}\n{p.read_text()[-1500:]}" for p in sorted((state / "log").glob("*.log")))


def _ranks(output: str) -> list[tuple[int, int, int, str, int]]:
    return sorted((int(m[0]), int(m[1]), int(m[2]), m[3], int(m[4])) for m in SELFTEST_RE.findall(output))


def test_cpu_sbatch_runs_two_ranks(cluster: Cluster, tmp_path: Path) -> None:
    status = cluster.cluster("status")
    assert status.returncode == 0 and "idle" in status.stdout, status.stdout
    out = tmp_path / "cpu.out"
    job = cluster.submit(
        "pretrain_cpu.sbatch", out, {"PERTVL_CMD": "python -m pertvl.train.launch --selftest"}
    )
    cluster.wait_done(job)
    output = out.read_text()
    assert cluster.job_field(job, "JobState") == "COMPLETED", output
    assert cluster.job_field(job, "ExitCode") == "0:0"
    jobcomp = (cluster.state / "log" / "jobcomp.txt").read_text()
    assert re.search(rf"JobId={job} .*JobState=COMPLETED", jobcomp), jobcomp
    assert _ranks(output) == [(0, 2, 0, "cpu", 1), (1, 2, 1, "cpu", 1)], output
    assert "srun exited with 0" in output
    assert not (cluster.state / "torch_extensions" / "deepspeed_shm_comm").exists()


def test_cpu_sbatch_trains_two_ranks_and_checkpoints(cluster: Cluster, tiny_train, tmp_path: Path) -> None:
    """The script's own command (`python -m pertvl train ... --resume latest`) on 2 srun ranks."""
    from pertvl.train.checkpoint import list_checkpoints

    run, out = tmp_path / "run", tmp_path / "train.out"
    job = cluster.submit(
        "pretrain_cpu.sbatch",
        out,
        {
            "PERTVL_CONFIG": str(tiny_train.config),
            "PERTVL_RUN_DIR": str(run),
            "PERTVL_MAX_STEPS": "4",
            "PERTVL_DS_CONFIG": "ds_configs/cpu_zero1_fp32.json",
            "PERTVL_EXTRA_ARGS": "--no-wandb",
        },
    )
    cluster.wait_done(job, timeout=300)
    output = out.read_text()
    assert cluster.job_field(job, "JobState") == "COMPLETED", output[-3000:]
    assert cluster.job_field(job, "ExitCode") == "0:0"
    assert re.search(r"\[pertvl\] job \d+ restart 0 on \S+: \S+python\S* -m pertvl train --config ", output), output[:2000]
    assert "srun exited with 0" in output
    ranks = [json.loads((run / "ranks" / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [(r["rank"], r["world_size"], r["launcher"], r["global_step"], r["finished"]) for r in ranks] == [
        (0, 2, "slurm", 4, True),
        (1, 2, "slurm", 4, True),
    ]
    assert ranks[0]["param_sha256"] == ranks[1]["param_sha256"]
    assert [c.step for c in list_checkpoints(run)] == [4]
    assert (run / "final" / "model.safetensors").is_file()


def test_cpu_sbatch_a_failing_rank_ends_the_job(cluster: Cluster, tiny_train, tmp_path: Path) -> None:
    """Fail fast under srun: rank 1 raises before step 2 (PERTVL_FAULT); both ranks are gone and the
    job FAILED within a minute of its start, with the error in the job's output."""
    run, out = tmp_path / "run", tmp_path / "fail.out"
    t0 = time.monotonic()
    job = cluster.submit(
        "pretrain_cpu.sbatch",
        out,
        {
            "PERTVL_CONFIG": str(tiny_train.config),
            "PERTVL_RUN_DIR": str(run),
            "PERTVL_MAX_STEPS": "50",
            "PERTVL_DS_CONFIG": "ds_configs/cpu_zero1_fp32.json",
            "PERTVL_EXTRA_ARGS": "--no-wandb",
            "PERTVL_FAULT": "rank-raise:rank=1,step=2",
        },
    )
    cluster.wait_done(job, timeout=90)
    took = time.monotonic() - t0
    output = out.read_text()
    assert cluster.job_field(job, "JobState") == "FAILED", output[-3000:]
    assert took < 60 + 15, f"{took:.0f} s\n{output[-3000:]}"  # + the cluster's scheduling latency
    assert "injected failure in rank 1 before step 2" in output and "rank 1 failed" in output, output[-3000:]
    assert "srun exited with 0" not in output


def test_pack_array_job_packs_in_parts_and_merges(cluster: Cluster, tiny_train, tmp_path: Path) -> None:
    """slurm/pack_array.sbatch as a 3-task array on the local cluster: each task packs its part into
    one folder, the last one merges; the shards equal one `pertvl pack` byte for byte."""
    corpus = tiny_train.root / "corpus"
    out = tmp_path / "shards"
    job = cluster.submit(
        "pack_array.sbatch",
        tmp_path / "pack-%a.out",
        {"PERTVL_PAIRS": str(corpus / "pairs.jsonl"), "PERTVL_PERTURBATIONS": str(corpus / "perturbations.jsonl"),
         "PERTVL_SHARDS_OUT": str(out), "PERTVL_IMAGE_SIZE": "64", "PERTVL_MAXCOUNT": "8",
         "PERTVL_PACK_WORKERS": "1"},
        "--array=0-2", "--cpus-per-task=1",
    )  # fmt: skip
    cluster.wait_done(job, timeout=150)
    logs = "".join(p.read_text() for p in sorted(tmp_path.glob("pack-*.out")))
    assert (out / "manifest.json").is_file(), logs[-3000:]
    merged = json.loads((out / "manifest.json").read_text())
    single = json.loads((tiny_train.shards / "manifest.json").read_text())
    assert merged["parts"] == 3 and merged["splits"] == single["splits"], logs[-3000:]
    assert sorted(re.findall(r"task \d+: part (\d)/3", logs)) == ["0", "1", "2"]
    assert logs.count("merged 3 part(s) into") == 1  # one task merged


def test_multinode_sbatch_checkpoints_and_requeues_on_the_time_limit_signal(
    cluster: Cluster, tmp_path: Path
) -> None:
    """The GPU script on this CPU node (1 node x 2 tasks, no GPUs): SIGUSR1 — what
    --signal=USR1@120 delivers before the time limit — reaches both ranks, they stop after the
    same iteration with exit code 75, and the script requeues the job."""
    out = tmp_path / "gpu.out"
    job = cluster.submit(
        "pretrain_multinode.sbatch",
        out,
        {"PERTVL_CMD": "python -m pertvl.train.launch --selftest --wait-signal 120"},
        "--nodes=1",
        "--ntasks-per-node=2",
        "--cpus-per-task=1",
        "--gpus-per-node=0",
        "--time=10",
    )
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            text = out.read_text() if out.exists() else ""
            if text.count("waiting for SIGTERM/SIGUSR1") == 2:
                break
            assert cluster.job_field(job, "JobState") in ("PENDING", "RUNNING", "CONFIGURING"), text
            time.sleep(0.25)
        else:
            raise AssertionError(f"ranks never started waiting:\n{out.read_text() if out.exists() else ''}")
        # scancel --signal reaches the job steps (the ranks), as the time-limit warning does
        sent = cluster.run("scancel", f"--signal={signal.SIGUSR1.name[3:]}", str(job))
        assert sent.returncode == 0, sent.stderr
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and cluster.job_field(job, "Restarts") != "1":
            time.sleep(0.25)
        output = out.read_text()
        assert cluster.job_field(job, "Restarts") == "1", output
        # COMPLETING: the first run's steps are still being cleaned up while the requeue is recorded
        assert cluster.job_field(job, "JobState") in ("PENDING", "REQUEUED", "CONFIGURING", "RUNNING", "COMPLETING")
        assert _ranks(output) == [(0, 2, 0, "cpu", 1), (1, 2, 1, "cpu", 1)], output
        stops = re.findall(r"rank (\d) stopping at iteration (\d+) on (\S+)", output)
        assert sorted(r for r, _, _ in stops) == ["0", "1"] and len({it for _, it, _ in stops}) == 1, output
        assert f"exit code {PREEMPTED_EXIT_CODE}" in output
        assert f"requeueing job {job}" in output
    finally:
        cluster.run("scancel", str(job))
