"""`pertvl train`: step counting, config resolution, and real 2-rank DeepSpeed runs on tiny phantom
shards under torchrun (ZeRO-2 fp32) and the deepspeed launcher (ZeRO-1 bf16): the loss goes down,
every rank ends with the same parameters, the final encoders load with DualEncoder.from_pretrained
and AutoModel, DeepSpeed's zero_to_fp32 reads the checkpoint, and a run stopped by SIGUSR1 and
resumed with --resume latest equals the uninterrupted run (fp32: bit-identical parameters and the
same sample ids per step; bf16: within one bf16 rounding step, bit-identical as measured on CPU).

The tiny set-up (64 px phantoms, 2-layer BERT) is the session fixture `tiny_train` of conftest.py.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from pertvl.train.engine import plan_steps, resolve_config
from pertvl.train.launch import free_port
from pertvl.train.signals import PREEMPTED_EXIT_CODE

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
STEPS = 21  # 3 epochs of 7 optimizer steps (113 train samples, 2 ranks x 2 streams x 4 x accumulation 2)
TIMEOUT = 300


# ------------------------------------------------------------------------------------ helpers


def _child_env(tmp_path: Path) -> dict[str, str]:
    """No inherited launcher variables; one thread per rank (2 ranks on 2 cores), offline."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "RANK", "LOCAL_", "MASTER_"))}
    env.pop("WORLD_SIZE", None)
    env.update(
        OMP_NUM_THREADS="1",
        HF_HUB_OFFLINE="1",
        WANDB_MODE="offline",
        TOKENIZERS_PARALLELISM="false",
        PYTHONUNBUFFERED="1",
        PYTHONFAULTHANDLER="1",  # SIGABRT on a hang prints every thread's Python stack (see _wait)
        TORCH_EXTENSIONS_DIR=str(tmp_path / "torch_extensions"),
        PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
    )
    return env


def _launcher(name: str) -> list[str]:
    if name == "torchrun":
        return [str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", str(free_port()), "-m", "pertvl"]
    # On CPU `--include localhost:0,1` fails (device count = NUMA nodes); --num_gpus 2 works.
    return [str(BIN / "deepspeed"), "--num_gpus", "2", "--master_port", str(free_port()), "--module", "pertvl"]


def _train_args(setup, run: Path, ds_config: str, *extra: str) -> list[str]:
    return ["train", "--config", str(setup.config), "--out", str(run), "--max-steps", str(STEPS),
            "--deepspeed-config", str(REPO / "ds_configs" / ds_config), "--resume", "latest", *extra]  # fmt: skip


def _start(cmd: list[str], log: Path, tmp_path: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    """`cmd` (a launcher, or pertvl itself) in a process group of its own, so that a hang can be
    ended for all its processes; `env` adds to the child environment."""
    with open(log, "w") as out:
        return subprocess.Popen(cmd, env=_child_env(tmp_path) | (env or {}), stdout=out, stderr=subprocess.STDOUT,
                                cwd=REPO, start_new_session=True)  # fmt: skip


def _wait(proc: subprocess.Popen, log: Path, timeout: float = TIMEOUT) -> int:
    """The launcher's exit code; on a timeout, every process of the run gets SIGABRT (faulthandler
    writes each one's Python stacks to the log), then SIGKILL, and the test fails with the log."""
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        for sig, grace in ((signal.SIGABRT, 10), (signal.SIGKILL, 10)):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, sig)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=grace)
        pytest.fail(f"{' '.join(map(str, proc.args[:3]))}... still running after {timeout:.0f} s; "
                    f"its log, with the stacks at the timeout:\n{_tail(log, 20000)}")


def _launch(launcher: str, args: list[str], log: Path, tmp_path: Path) -> subprocess.CompletedProcess:
    proc = _start([*_launcher(launcher), *args], log, tmp_path)
    return subprocess.CompletedProcess(proc.args, _wait(proc, log))


def _tail(log: Path, n: int = 4000) -> str:
    return log.read_text(errors="replace")[-n:]


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _rank_files(run: Path) -> list[dict]:
    return [json.loads((run / "ranks" / f"rank{r}.json").read_text()) for r in range(2)]


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(folder / "model.safetensors")


def _assert_loss_went_down(run: Path) -> None:
    losses = [m["loss/total"] for m in _jsonl(run / "metrics.jsonl")]
    assert len(losses) == STEPS
    first, last = sum(losses[:4]) / 4, sum(losses[-4:]) / 4
    assert last < first - 0.05, f"loss did not go down: first 4 steps {first:.4f}, last 4 {last:.4f}: {losses}"


def _train_run(launcher: str, ds_config: str, setup, tmp_path: Path) -> Path:
    run = tmp_path / "run"
    log = tmp_path / "train.log"
    proc = _launch(launcher, _train_args(setup, run, ds_config, "--no-wandb"), log, tmp_path)
    assert proc.returncode == 0, _tail(log)
    return run


def _preempt_then_resume(launcher: str, ds_config: str, setup, tmp_path: Path) -> tuple[Path, int]:
    """Start the run, SIGUSR1 rank 1 once step 2 is logged, check the clean stop, resume."""
    run = tmp_path / "run"
    log = tmp_path / "preempted.log"
    proc = _start([*_launcher(launcher), *_train_args(setup, run, ds_config)], log, tmp_path)
    try:
        deadline = time.monotonic() + TIMEOUT
        metrics = run / "metrics.jsonl"
        while not (metrics.is_file() and any(m["step"] >= 2 for m in _jsonl(metrics))):
            assert proc.poll() is None, f"training ended before it could be signalled:\n{_tail(log)}"
            assert time.monotonic() < deadline, _tail(log)
            time.sleep(0.05)
        os.kill(_rank_files(run)[1]["pid"], signal.SIGUSR1)  # one rank: the other must stop too
        rc = _wait(proc, log)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    text = log.read_text(errors="replace")
    assert rc != 0, f"the run was not stopped by the signal:\n{_tail(log)}"
    assert "rank 1: SIGUSR1 received" in text and "rank 0: a peer's stop signal received" in text, _tail(log)
    assert text.count(f"exiting with {PREEMPTED_EXIT_CODE}") == 2, _tail(log)
    from pertvl.train.checkpoint import list_checkpoints

    stopped = list_checkpoints(run)[-1].step
    assert 2 <= stopped < STEPS
    assert [(r["global_step"], r["finished"]) for r in _rank_files(run)] == [(stopped, False)] * 2
    assert not (run / "final").exists()

    log2 = tmp_path / "resumed.log"
    proc2 = _launch(launcher, _train_args(setup, run, ds_config), log2, tmp_path)
    assert proc2.returncode == 0, _tail(log2)
    assert f"resumed {run / 'checkpoints' / f'step{stopped:08d}'}" in log2.read_text(), _tail(log2)
    return run, stopped


def _assert_same_history(a: Path, b: Path) -> None:
    """Same sample ids per step on every rank; every step logged exactly once."""
    sa, sb = _jsonl(a / "samples.jsonl"), _jsonl(b / "samples.jsonl")
    assert [s["step"] for s in sb] == list(range(1, STEPS + 1))
    assert [(s["step"], s["epoch"], s["ids"]) for s in sa] == [(s["step"], s["epoch"], s["ids"]) for s in sb]
    assert [m["step"] for m in _jsonl(b / "metrics.jsonl")] == list(range(1, STEPS + 1))


# ------------------------------------------------------------------------------ pure functions


def test_plan_steps_counts_optimizer_steps() -> None:
    plan = plan_steps(micro_batch=4, grad_accum=2, world_size=2, batches_per_epoch=15, max_steps=None,
                      epochs=3, warmup_steps=10)  # fmt: skip
    assert (plan.steps_per_epoch, plan.total_steps, plan.warmup_steps, plan.samples_per_step) == (7, 21, 10, 16)
    capped = plan_steps(micro_batch=4, grad_accum=2, world_size=2, batches_per_epoch=15, max_steps=5,
                        epochs=3, warmup_steps=10)  # fmt: skip
    assert (capped.total_steps, capped.warmup_steps) == (5, 5)  # warm-up never longer than the run
    with pytest.raises(ValueError, match="fewer than the 4"):
        plan_steps(micro_batch=4, grad_accum=4, world_size=2, batches_per_epoch=3, max_steps=None,
                   epochs=1, warmup_steps=0)  # fmt: skip
    with pytest.raises(ValueError, match="max_steps must be >= 1"):
        plan_steps(micro_batch=4, grad_accum=1, world_size=1, batches_per_epoch=3, max_steps=0,
                   epochs=1, warmup_steps=0)  # fmt: skip


def test_image_lr_mult_puts_the_image_tower_in_its_own_group_and_the_schedule_scales_both() -> None:
    from torch import nn

    from pertvl.train.optim import build_optimizer, build_scheduler, tower_param_groups

    class Dual(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.image, self.text = nn.Linear(3, 2), nn.Linear(4, 2)
            self.frozen = nn.Linear(2, 2).requires_grad_(False)

    model = Dual()
    single = tower_param_groups(model, 0.01)
    assert len(single) == 1 and single[0]["lr"] == 0.01 and len(single[0]["params"]) == 4  # frozen left out
    groups = tower_param_groups(model, 0.01, image_lr_mult=10.0)
    assert [g["lr"] for g in groups] == [0.01, pytest.approx(0.1)]
    assert [set(map(id, g["params"])) for g in groups] == [set(map(id, model.text.parameters())),
                                                           set(map(id, model.image.parameters()))]
    opt = build_optimizer(groups, lr=0.01)
    sched = build_scheduler(opt, warmup_steps=4, total_steps=10)
    opt.step()
    sched.step()
    assert opt.param_groups[1]["lr"] == pytest.approx(10 * opt.param_groups[0]["lr"]) and opt.param_groups[0]["lr"] < 0.01
    with pytest.raises(ValueError, match="image_lr_mult: expected > 0"):
        tower_param_groups(model, 0.01, image_lr_mult=0.0)
    with pytest.raises(ValueError, match="has no image tower"):
        tower_param_groups(nn.Linear(2, 2), 0.01, image_lr_mult=2.0)


def test_resolve_config_file_then_set_then_flags(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  max_steps: 5\n  seed: 3\nloss:\n  preset: convirt\n")
    cfg = resolve_config(path, ["train.max_steps=7", "train.micro_batch=2", "data.num_workers=1"],
                         max_steps=9, shards="S", out="R", resume="latest", no_wandb=True)  # fmt: skip
    assert cfg["train"]["max_steps"] == 9  # the flag wins over --set and the file
    assert cfg["train"]["seed"] == 3 and cfg["train"]["micro_batch"] == 2 and cfg["data"]["num_workers"] == 1
    assert (cfg["data"]["shards"], cfg["train"]["out"], cfg["train"]["resume"]) == ("S", "R", "latest")
    assert cfg["wandb"]["enabled"] is False and cfg["loss"]["preset"] == "convirt"
    with pytest.raises(KeyError, match="train.max_step"):
        resolve_config(path, ["train.max_step=3"])


def test_cli_accepts_every_flag_and_the_deepspeed_local_rank() -> None:
    from pertvl.cli import build_parser

    parser = build_parser()
    args = parser.parse_args(["--local_rank=1", "train", "--config", "c.yaml", "--shards", "s", "--out", "o",
                              "--deepspeed-config", "d.json", "--max-steps", "3", "--seed", "4", "--resume",
                              "latest", "--no-wandb", "--set", "a.b=1", "--set", "c.d=2"])  # fmt: skip
    assert (args.local_rank, args.max_steps, args.seed, args.resume, args.overrides) == (
        1, 3, 4, "latest", ["a.b=1", "c.d=2"])  # fmt: skip
    assert parser.parse_args(["train", "--local_rank", "0"]).train_local_rank == 0
    with pytest.raises(SystemExit):
        parser.parse_args(["train", "--max-steps", "0"])


def test_a_hung_run_is_ended_with_every_process_stack(tmp_path: Path) -> None:
    """The harness of the launcher tests: a run that outlives the timeout is ended for all of its
    processes (launcher and ranks), and the failure carries each one's Python stack."""
    script = ("import subprocess, sys, time; "
              "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)']); time.sleep(600)")
    log = tmp_path / "hung.log"
    proc = _start([sys.executable, "-c", script], log, tmp_path)
    time.sleep(1.0)  # both processes are up
    with pytest.raises(pytest.fail.Exception, match="still running after 2 s") as failed:
        _wait(proc, log, timeout=2)
    # faulthandler's report (the two processes write to the log at once, so their lines interleave)
    assert "Fatal Python error: Aborted" in failed.value.msg and "most recent call first" in failed.value.msg
    assert _live_processes_in_group(proc.pid) == []  # nothing of the run is left (zombies aside)


def _live_processes_in_group(pgid: int) -> list[int]:
    """pids in process group `pgid` that are not zombies (Linux /proc)."""
    live = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError):
            fields = stat.read_text().rsplit(")", 1)[1].split()  # after "pid (comm)": state ppid pgrp ...
            if int(fields[2]) == pgid and fields[0] not in "ZX":
                live.append(int(stat.parent.name))
    return live


@pytest.mark.slow
def test_refuses_a_fresh_start_over_existing_checkpoints(fp32_run: Path, tiny_train, tmp_path: Path) -> None:
    log = tmp_path / "refused.log"
    proc = _start([sys.executable, "-m", "pertvl", "train", "--config", str(tiny_train.config),
                   "--out", str(fp32_run), "--no-wandb"], log, tmp_path)  # fmt: skip
    assert _wait(proc, log) != 0
    assert "already holds checkpoints; pass --resume latest" in log.read_text()


def test_sigterm_to_every_process_of_the_job_checkpoints_and_exits_75(tiny_train, tmp_path: Path) -> None:
    """What SLURM does on scancel, preemption or the time limit: SIGTERM to the rank AND its loader
    workers (one process group here). The rank finishes its step, checkpoints, exits with 75."""
    from pertvl.train.checkpoint import list_checkpoints

    run, log = tmp_path / "run", tmp_path / "sigterm.log"
    proc = _start([sys.executable, "-m", "pertvl", "train", "--config", str(tiny_train.config), "--out", str(run),
                   "--max-steps", "500", "--no-wandb", "--set", "train.checkpoint_every=0"], log, tmp_path)  # fmt: skip
    try:
        deadline = time.monotonic() + TIMEOUT
        while not ((run / "metrics.jsonl").is_file() and _jsonl(run / "metrics.jsonl")):
            assert proc.poll() is None and time.monotonic() < deadline, _tail(log)
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGTERM)
        rc = _wait(proc, log)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert rc == PREEMPTED_EXIT_CODE, _tail(log)
    assert "rank 0: SIGTERM received" in log.read_text()
    assert "(exit 75, preempted); re-run with --resume latest to continue" in log.read_text()
    stopped = [c.step for c in list_checkpoints(run)]
    assert len(stopped) == 1 and 1 <= stopped[0] < 500
    assert json.loads((run / "ranks" / "rank0.json").read_text())["global_step"] == stopped[0]


# -------------------------------------------------------------------- torchrun, ZeRO-2, fp32


@pytest.fixture(scope="module")
def fp32_run(tiny_train, tmp_path_factory) -> Path:
    return _train_run("torchrun", "cpu_zero2_fp32.json", tiny_train, tmp_path_factory.mktemp("fp32"))


@pytest.mark.slow
def test_torchrun_zero2_fp32_trains_two_ranks(fp32_run: Path, tiny_train) -> None:
    from pertvl.config import load_config
    from pertvl.data.shards import iter_samples
    from pertvl.train.checkpoint import list_checkpoints
    from pertvl.train.optim import WarmupCosine

    ranks = _rank_files(fp32_run)
    assert [(r["rank"], r["world_size"], r["launcher"], r["global_step"], r["finished"]) for r in ranks] == [
        (0, 2, "torchrun", STEPS, True), (1, 2, "torchrun", STEPS, True)]  # fmt: skip
    assert ranks[0]["param_sha256"] == ranks[1]["param_sha256"]  # identical parameters and buffers

    metrics = _jsonl(fp32_run / "metrics.jsonl")
    assert [m["step"] for m in metrics] == list(range(1, STEPS + 1))
    for key in ("loss/total", "loss/global", "loss/local", "loss/pert", "lr", "perf/samples_per_s",
                "perf/step_time_s", "perf/data_wait_s", "mem/rss_mib"):  # fmt: skip
        assert all(isinstance(m[key], float) for m in metrics), key
    # total = global + 0.1 local + 0.1 pert (paper Eq. 1), averaged over micro-batches and ranks
    for m in metrics:
        assert m["loss/total"] == pytest.approx(m["loss/global"] + 0.1 * (m["loss/local"] + m["loss/pert"]), rel=1e-5)
    # the schedule counts optimizer steps: warm-up 3, cosine to step 21, at lr 0.05
    schedule = WarmupCosine(3, STEPS)
    assert [m["lr"] for m in metrics] == pytest.approx([0.05 * schedule(s) for s in range(STEPS)])
    assert [m["epoch"] for m in metrics] == [s // 7 for s in range(STEPS)]
    assert metrics[-1]["data/skipped"] == 0 and "data/masked/identical_perturbations" in metrics[-1]
    _assert_loss_went_down(fp32_run)

    # every step: 2 ranks x 2 micro-batches x 4 samples, all from the train split
    train_ids = {s.meta["id"] for s in iter_samples(tiny_train.shards, "train")}
    samples = _jsonl(fp32_run / "samples.jsonl")
    assert [s["step"] for s in samples] == list(range(1, STEPS + 1))
    assert all(len(s["ids"]) == 2 and all(len(r) == 8 for r in s["ids"]) for s in samples)
    assert {i for s in samples for r in s["ids"] for i in r} <= train_ids

    cfg = load_config(fp32_run / "config.yaml")
    assert cfg["train"]["max_steps"] == STEPS and cfg["data"]["image_size"] == 64
    assert [c.step for c in list_checkpoints(fp32_run)] == [20, 21]  # every 5 steps + the end, keep 2


@pytest.mark.slow
def test_final_encoders_load_and_match_the_checkpoint(fp32_run: Path) -> None:
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from transformers import AutoModel

    from pertvl.model import DualEncoder

    final = fp32_run / "final"
    model = DualEncoder.from_pretrained(final)
    saved = _weights(final)
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in saved.items())
    # DeepSpeed's own tool reads the run's checkpoint; fp32 masters == the final weights
    fp32 = get_fp32_state_dict_from_zero_checkpoint(str(fp32_run / "checkpoints"))
    trained = [k for k, p in model.named_parameters() if p.requires_grad]
    assert trained and all(torch.equal(fp32[k], saved[k]) for k in trained)
    # the text tower alone, for plain transformers users
    bert = AutoModel.from_pretrained(final / "text_encoder")
    prefix = "text.backbone."
    for name, value in bert.state_dict().items():
        if prefix + name in saved:
            assert torch.equal(value, saved[prefix + name]), name


@pytest.mark.slow
def test_preempted_and_resumed_fp32_run_is_bit_identical(fp32_run: Path, tiny_train, tmp_path: Path) -> None:
    run, stopped = _preempt_then_resume("torchrun", "cpu_zero2_fp32.json", tiny_train, tmp_path)
    _assert_same_history(fp32_run, run)
    ref, got = _weights(fp32_run / "final"), _weights(run / "final")
    assert ref.keys() == got.keys()
    different = [k for k in ref if not torch.equal(ref[k], got[k])]
    assert not different, f"stopped at step {stopped}; differ: {different[:5]}"
    assert {r["param_sha256"] for r in _rank_files(run)} == {_rank_files(fp32_run)[0]["param_sha256"]}
    # the resumed job continued the same (offline) W&B run
    wandb_runs = sorted(p.name for p in (run / "wandb").glob("offline-run-*"))
    assert len(wandb_runs) == 2 and len({name.rsplit("-", 1)[1] for name in wandb_runs}) == 1, wandb_runs


# ------------------------------------------------------------- deepspeed launcher, ZeRO-1, bf16


@pytest.fixture(scope="module")
def bf16_run(tiny_train, tmp_path_factory) -> Path:
    return _train_run("deepspeed", "cpu_zero1_bf16.json", tiny_train, tmp_path_factory.mktemp("bf16"))


@pytest.mark.slow
def test_deepspeed_launcher_zero1_bf16_trains_two_ranks(bf16_run: Path) -> None:
    from pertvl.model import DualEncoder

    ranks = _rank_files(bf16_run)
    assert [(r["rank"], r["launcher"], r["global_step"], r["finished"]) for r in ranks] == [
        (0, "deepspeed", STEPS, True), (1, "deepspeed", STEPS, True)]  # fmt: skip
    assert ranks[0]["param_sha256"] == ranks[1]["param_sha256"]
    _assert_loss_went_down(bf16_run)
    # the final encoders are the fp32 masters (zero_to_fp32), not the 16-bit working copies
    saved = _weights(bf16_run / "final")
    assert {v.dtype for v in saved.values() if v.is_floating_point()} == {torch.float32}
    model = DualEncoder.from_pretrained(bf16_run / "final")
    assert next(model.parameters()).dtype == torch.float32
    widened = [k for k, v in saved.items() if k.endswith(".weight") and v.numel() > 64
               and torch.equal(v, v.to(torch.bfloat16).float())]  # fmt: skip
    big = [k for k, v in saved.items() if k.endswith(".weight") and v.numel() > 64]
    assert len(widened) < len(big) // 4, f"final weights look like bf16 values widened to fp32: {widened}"


@pytest.mark.slow
def test_preempted_and_resumed_bf16_run_matches_within_bf16_rounding(
    bf16_run: Path, tiny_train, tmp_path: Path
) -> None:
    run, stopped = _preempt_then_resume("deepspeed", "cpu_zero1_bf16.json", tiny_train, tmp_path)
    _assert_same_history(bf16_run, run)
    ref, got = _weights(bf16_run / "final"), _weights(run / "final")
    # Tolerance: one bf16 rounding step of each weight (2^-8 relative). Measured on CPU: 0 (identical).
    for key in ref:
        tol = ref[key].abs().max().item() * 2**-8 + 1e-12
        assert (ref[key] - got[key]).abs().max().item() <= tol, (key, stopped)


def test_torchrun_trains_from_shards_served_over_http(tiny_train, tmp_path: Path) -> None:
    """data.shards = the URL of a manifest: 2 ranks stream their shards from a local HTTP server
    (nothing copied), train, and see the same samples as from the folder."""
    from test_stream import _ShardServer

    server = _ShardServer(tiny_train.shards)
    try:
        run, log = tmp_path / "run", tmp_path / "http.log"
        args = ["train", "--config", str(tiny_train.config), "--out", str(run), "--max-steps", "3", "--no-wandb",
                "--deepspeed-config", str(REPO / "ds_configs" / "cpu_zero1_fp32.json"),
                "--shards", f"{server.url}/manifest.json"]  # fmt: skip
        proc = _launch("torchrun", args, log, tmp_path)
        assert proc.returncode == 0, _tail(log)
    finally:
        server.close()
    from pertvl.data.shards import iter_samples

    train_ids = {s.meta["id"] for s in iter_samples(tiny_train.shards, "train")}
    samples = _jsonl(run / "samples.jsonl")
    assert [s["step"] for s in samples] == [1, 2, 3]
    assert {i for s in samples for r in s["ids"] for i in r} <= train_ids
    assert any(p.endswith(".tar") for p in server.requests) and "/manifest.json" in server.requests
