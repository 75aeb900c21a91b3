"""Which rank this process is, and joining the job: torchrun, the deepspeed launcher, srun, or alone.

The launcher's environment becomes a `DistEnv`; `init_distributed` joins the process group
through DeepSpeed (gloo on CPU, nccl on CUDA). DeepSpeed's first init JIT-compiles a
shared-memory op (~30 s) that only DeepSpeed-Inference uses; it is switched off unless asked for.

`python -m pertvl.train.launch --selftest` initialises, all-reduces the rank and prints one line per
rank: "rank R/W local L device D sum S" (S = W(W-1)/2) — the smoke test of a launch.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import socket
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pertvl.errors import ConfigError, NotFoundError

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

Launcher = Literal["single", "torchrun", "deepspeed", "slurm"]

# MASTER_PORT derived from SLURM_JOB_ID falls in [15000, 30000): below Linux's ephemeral range
# (32768-60999) so an outgoing connection never holds it, and away from the well-known ports.
SLURM_PORT_BASE = 15000
SLURM_PORT_SPAN = 15000


@dataclass(frozen=True)
class DistEnv:
    """This process's place in the job; master_port 0: a free port is picked at init (alone only)."""

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    master_addr: str
    master_port: int
    launcher: Launcher


def expand_hostlist(spec: str) -> list[str]:
    """Expand a SLURM hostlist ("gpu[01-03,07],cpu5", "rack[1-2]-node[01-02]") into host names in
    scontrol's order (the last group varies fastest), keeping zero padding; ValueError when
    malformed. Hand-written: `scontrol show hostnames` may be missing where the job runs."""
    hosts: list[str] = []
    for item in re.split(r",(?![^\[]*\])", spec.strip()):  # the commas outside brackets
        item = item.strip()
        if not item or not re.fullmatch(r"[^\[\]]*(\[[^\[\]]*\][^\[\]]*)*", item):
            raise ValueError(f"empty item, unbalanced or nested brackets in SLURM hostlist {spec!r}")
        hosts.extend(_expand_item(item, spec))
    return hosts


def _expand_item(item: str, spec: str) -> list[str]:
    match = re.search(r"\[([^\]]*)\]", item)
    if match is None:
        return [item]
    prefix, body, rest = item[: match.start()], match.group(1), item[match.end() :]
    tails = _expand_item(rest, spec)
    out: list[str] = []
    for part in body.split(","):
        lo, sep, hi = part.partition("-")
        if not lo.isdigit() or (sep and not hi.isdigit()):
            raise ValueError(f"range {part!r} in SLURM hostlist {spec!r} is not numeric")
        first, last = int(lo), int(hi) if sep else int(lo)
        if last < first:
            raise ValueError(f"decreasing range {part!r} in SLURM hostlist {spec!r}")
        width = len(lo)
        for n in range(first, last + 1):
            out.extend(f"{prefix}{n:0{width}d}{tail}" for tail in tails)
    return out


def parse_tasks_per_node(spec: str) -> list[int]:
    """Expand SLURM_TASKS_PER_NODE ("2(x3),1") into one count per node ([2, 2, 2, 1])."""
    counts: list[int] = []
    for item in spec.split(","):
        match = re.fullmatch(r"\s*(\d+)(?:\(x(\d+)\))?\s*", item)
        if match is None:
            raise ValueError(f"cannot parse tasks-per-node item {item!r} in {spec!r}")
        counts.extend([int(match.group(1))] * int(match.group(2) or 1))
    return counts


def slurm_master_port(job_id: int | str) -> int:
    """Rendezvous port derived from the job id, so all ranks of a job agree without talking."""
    return SLURM_PORT_BASE + int(job_id) % SLURM_PORT_SPAN


def _int_var(environ: Mapping[str, str], name: str) -> int:
    value = environ.get(name)
    if value is None:
        raise ValueError(f"environment variable {name} is missing")
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} is not an integer") from None


def detect_dist_env(environ: Mapping[str, str] = os.environ, argv_local_rank: int | None = None) -> DistEnv:
    """This process's rank from the launcher's environment: torchrun's / the deepspeed launcher's
    variables win over SLURM's (torchrun inside an allocation), then an srun step, else alone.
    `argv_local_rank`: the deepspeed launcher's --local_rank. ValueError when inconsistent.
    """
    if "RANK" in environ and "WORLD_SIZE" in environ:
        env = _from_torch_env(environ, argv_local_rank)
    elif "SLURM_PROCID" in environ and ("SLURM_STEP_ID" in environ or "SLURM_STEPID" in environ):
        env = _from_slurm_env(environ)
    else:
        if int(environ.get("SLURM_NTASKS", "1") or 1) > 1:
            log.warning("SLURM_NTASKS=%s but this is not an srun step: running as ONE process. Start the "
                        "ranks with `srun python -m pertvl ...`.", environ["SLURM_NTASKS"])
        local_rank = 0 if argv_local_rank is None else argv_local_rank
        env = DistEnv(0, 1, local_rank, 1, environ.get("MASTER_ADDR", "127.0.0.1"),
                      int(environ.get("MASTER_PORT", "0") or 0), "single")
    if not (0 <= env.rank < env.world_size):
        raise ValueError(f"rank {env.rank} outside world size {env.world_size} ({env.launcher})")
    if not (0 <= env.local_rank < env.local_world_size):
        raise ValueError(f"local rank {env.local_rank} outside local world size {env.local_world_size} "
                         f"({env.launcher})")
    return env


def _from_torch_env(environ: Mapping[str, str], argv_local_rank: int | None) -> DistEnv:
    # The deepspeed launcher sets LOCAL_SIZE/CROSS_RANK and passes --local_rank; torchrun sets
    # LOCAL_WORLD_SIZE and TORCHELASTIC_RUN_ID.
    is_deepspeed = argv_local_rank is not None or ("LOCAL_SIZE" in environ and "CROSS_RANK" in environ)
    rank = _int_var(environ, "RANK")
    world_size = _int_var(environ, "WORLD_SIZE")
    if "LOCAL_RANK" in environ:
        local_rank = _int_var(environ, "LOCAL_RANK")
        if argv_local_rank is not None and argv_local_rank != local_rank:
            raise ValueError(f"--local_rank={argv_local_rank} disagrees with LOCAL_RANK={local_rank}")
    elif argv_local_rank is not None:
        local_rank = argv_local_rank
    else:
        raise ValueError("RANK/WORLD_SIZE are set but LOCAL_RANK is missing (and no --local_rank)")
    if "LOCAL_WORLD_SIZE" in environ:
        local_world_size = _int_var(environ, "LOCAL_WORLD_SIZE")
    elif "LOCAL_SIZE" in environ:
        local_world_size = _int_var(environ, "LOCAL_SIZE")
    else:
        # Unknown launcher: assume one node. Only used to share CPU cores between ranks.
        local_world_size = world_size
    for name in ("MASTER_ADDR", "MASTER_PORT"):
        if not environ.get(name):
            raise ValueError(f"RANK/WORLD_SIZE are set but {name} is missing")
    return DistEnv(rank, world_size, local_rank, local_world_size, environ["MASTER_ADDR"],
                   _int_var(environ, "MASTER_PORT"), "deepspeed" if is_deepspeed else "torchrun")


def _first_var(environ: Mapping[str, str], names: tuple[str, ...], missing: str) -> str:
    """The first of `names` set in `environ`; ValueError(missing) when none is."""
    name = next((v for v in names if environ.get(v)), None)
    if name is None:
        raise ValueError(missing)
    return name


def _from_slurm_env(environ: Mapping[str, str]) -> DistEnv:
    rank = _int_var(environ, "SLURM_PROCID")
    world_var = _first_var(environ, ("SLURM_STEP_NUM_TASKS", "SLURM_NTASKS", "SLURM_NPROCS"),
                           "srun step without SLURM_STEP_NUM_TASKS / SLURM_NTASKS")
    world_size = _int_var(environ, world_var)
    local_rank = _int_var(environ, "SLURM_LOCALID")
    node_id = int(environ.get("SLURM_NODEID", "0"))
    per_node_var = _first_var(
        environ, ("SLURM_STEP_TASKS_PER_NODE", "SLURM_TASKS_PER_NODE", "SLURM_NTASKS_PER_NODE"),
        "srun step without SLURM_STEP_TASKS_PER_NODE / SLURM_TASKS_PER_NODE")
    per_node = parse_tasks_per_node(environ[per_node_var])
    # A single count (SLURM_NTASKS_PER_NODE) applies to every node.
    local_world_size = per_node[node_id] if node_id < len(per_node) else per_node[-1]
    if environ.get("MASTER_ADDR"):
        master_addr = environ["MASTER_ADDR"]
    else:
        nodelist_var = _first_var(environ, ("SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST", "SLURM_NODELIST"),
                                  "srun step without SLURM_JOB_NODELIST and no MASTER_ADDR")
        master_addr = expand_hostlist(environ[nodelist_var])[0]
    if environ.get("MASTER_PORT"):
        master_port = _int_var(environ, "MASTER_PORT")
    else:
        master_port = slurm_master_port(_int_var(environ, "SLURM_JOB_ID"))
    return DistEnv(rank, world_size, local_rank, local_world_size, master_addr, master_port, "slurm")


def default_num_threads(env: DistEnv, environ: Mapping[str, str] = os.environ) -> int:
    """CPU threads for one rank: SLURM's --cpus-per-task when given, else this process's usable
    cores divided by the ranks on the node (2 ranks on 2 cores -> 1 thread each, no oversubscription)."""
    if environ.get("SLURM_CPUS_PER_TASK", "").isdigit():
        return max(1, int(environ["SLURM_CPUS_PER_TASK"]))
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // max(1, env.local_world_size))


def free_port() -> int:
    """A TCP port nothing listens on right now, for a rendezvous that only this machine uses (a
    single-process run, local multi-rank runs); other hosts cannot agree on it."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("", 0))
        return int(sock.getsockname()[1])


def _disable_deepspeed_shm_comm() -> None:
    import deepspeed.ops
    from deepspeed.accelerator import get_accelerator

    builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
    if builder is not None:
        deepspeed.ops.__compatible_ops__[builder.NAME] = False


def init_distributed(env: DistEnv, backend: str | None = None, timeout_s: float = 1800.0) -> torch.device:
    """Join the job: pick the device (cuda:LOCAL_RANK, else cpu) and return it, export the
    rendezvous variables, init DeepSpeed's comm (backend nccl on CUDA, else gloo)."""
    import torch

    if torch.cuda.is_available():
        if env.local_rank >= torch.cuda.device_count():
            raise ValueError(f"local rank {env.local_rank} but only {torch.cuda.device_count()} CUDA devices "
                             f"visible (launcher {env.launcher}); start one rank per GPU")
        device = torch.device("cuda", env.local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    backend = backend or ("nccl" if device.type == "cuda" else "gloo")
    port = env.master_port or free_port()
    # deepspeed.init_distributed (env:// rendezvous) reads exactly these.
    os.environ.update(RANK=str(env.rank), WORLD_SIZE=str(env.world_size), LOCAL_RANK=str(env.local_rank),
                      LOCAL_WORLD_SIZE=str(env.local_world_size), MASTER_ADDR=env.master_addr,
                      MASTER_PORT=str(port))
    if "OMP_NUM_THREADS" not in os.environ:
        threads = default_num_threads(env)
        os.environ["OMP_NUM_THREADS"] = str(threads)
        # torch read the variable at import; tell it directly as well.
        torch.set_num_threads(threads)
    import deepspeed

    _disable_deepspeed_shm_comm()
    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False,
                               timeout=timedelta(seconds=timeout_s), verbose=False)
    log.info("rank %d/%d (local %d/%d, %s) on %s, backend %s, rendezvous %s:%d, %s threads", env.rank,
             env.world_size, env.local_rank, env.local_world_size, env.launcher, device, backend,
             env.master_addr, port, os.environ["OMP_NUM_THREADS"])
    return device


def shutdown_distributed() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def config_precision(config: dict[str, Any]) -> str:
    """"fp16", "bf16" or "fp32": what a DeepSpeed config trains in."""
    if config.get("fp16", {}).get("enabled"):
        return "fp16"
    return "bf16" if config.get("bf16", {}).get("enabled") else "fp32"


def unsupported_precision(config: dict[str, Any]) -> str | None:
    """Why this machine cannot train in the config's precision (DeepSpeed's accelerator says: on
    CPU fp16 needs AVX-512 FP16 or AMX-FP16), or None when it can."""
    precision = config_precision(config)
    if precision == "fp32":
        return None
    from deepspeed.accelerator import get_accelerator

    acc = get_accelerator()
    supported = acc.is_fp16_supported() if precision == "fp16" else acc.is_bf16_supported()
    if supported:
        return None
    name = acc.device_name()
    why = (" (oneDNN has no fp16 kernels for this CPU: it needs AVX-512 FP16 or AMX-FP16)"
           if name == "cpu" and precision == "fp16" else "")  # fmt: skip
    return f"DeepSpeed's {name} accelerator does not support {precision} on this machine{why}"


def check_precision(config: dict[str, Any], source: str | Path) -> None:
    """ConfigError before anything is built when the machine cannot train in the config's precision."""
    reason = unsupported_precision(config)
    if reason:
        raise ConfigError(
            f"{source}: trains in {config_precision(config)}, but {reason}; use an fp32 or bf16 config "
            "(ds_configs/cpu_zero1_fp32.json, ds_configs/cpu_zero1_bf16.json, or --set train.deepspeed_config=...)"
        )


REQUIRED_DS_KEYS = ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "gradient_clipping")


def find_ds_config(path: str | Path) -> Path:
    """`path` when it is a file, else the bundled DeepSpeed JSON of that name (pertvl/ds_configs:
    "cpu_zero1_bf16", "cpu_zero1_bf16.json" or "ds_configs/cpu_zero1_bf16.json")."""
    from pertvl.config import DS_CONFIGS_DIR

    path = Path(path)
    if path.is_file():
        return path
    name = path.name if path.suffix == ".json" else f"{path.name}.json"
    if (DS_CONFIGS_DIR / name).is_file() and path.parent.name in ("", "ds_configs"):
        return DS_CONFIGS_DIR / name
    bundled = ", ".join(sorted(p.name for p in DS_CONFIGS_DIR.glob("*.json")))
    raise NotFoundError(f"DeepSpeed config {path}: no such file (bundled, usable by name: {bundled})")


def load_ds_config(path: str | Path, *, micro_batch: int | None = None, grad_accum: int | None = None,
                   gradient_clipping: float | None = None, world_size: int | None = None) -> dict[str, Any]:
    """Read a DeepSpeed JSON config and apply the overrides (None keeps the file's value).

    pertvl passes its own optimizer and schedule, so the file must hold no "optimizer"/"scheduler"
    block, and must set micro-batch, accumulation and clipping (DeepSpeed silently defaults clipping
    to 1.0). A train_batch_size must agree with micro x accumulation x `world_size`. ConfigError
    otherwise.
    """
    path = find_ds_config(path)
    try:
        config = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ConfigError(f"{path}: not a readable DeepSpeed JSON config ({err})") from err
    if not isinstance(config, dict):
        raise ConfigError(f"{path}: expected a JSON object")
    for block in ("optimizer", "scheduler"):
        if block in config:
            raise ConfigError(f"{path}: remove the {block!r} block; pertvl passes its SGD and warm-up+cosine "
                              "schedule itself")
    missing = [k for k in REQUIRED_DS_KEYS if k not in config]
    if missing:
        raise ConfigError(f"{path}: missing {', '.join(missing)} (pertvl needs them set explicitly)")
    if micro_batch is not None:
        config["train_micro_batch_size_per_gpu"] = int(micro_batch)
    if grad_accum is not None:
        config["gradient_accumulation_steps"] = int(grad_accum)
    if gradient_clipping is not None:
        config["gradient_clipping"] = float(gradient_clipping)
    if (micro_batch is not None or grad_accum is not None) and "train_batch_size" in config:
        del config["train_batch_size"]  # re-derived by DeepSpeed from the overrides
    for key in ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps"):
        if not isinstance(config[key], int) or config[key] < 1:
            raise ConfigError(f"{path}: {key} must be a positive integer, got {config[key]!r}")
    if config.get("fp16", {}).get("enabled") and config.get("bf16", {}).get("enabled"):
        raise ConfigError(f"{path}: fp16 and bf16 are both enabled; pick one")
    if world_size is not None and "train_batch_size" in config:
        derived = (config["train_micro_batch_size_per_gpu"] * config["gradient_accumulation_steps"]
                   * world_size)
        if config["train_batch_size"] != derived:
            raise ConfigError(
                f"{path}: train_batch_size={config['train_batch_size']} but micro-batch x accumulation x "
                f"world size = {derived}; drop train_batch_size and let DeepSpeed derive it"
            )
    return config


def _say(line: str) -> None:
    """One write per line, so that the lines of ranks sharing a stdout never run together."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def _selftest(env: DistEnv, device: torch.device, wait_signal_s: float) -> int:
    import torch
    import torch.distributed as dist

    from pertvl.train.signals import PREEMPTED_EXIT_CODE, PreemptionFlag

    total = torch.tensor([float(env.rank)], device=device)
    dist.all_reduce(total)
    _say(f"rank {env.rank}/{env.world_size} local {env.local_rank} device {device} sum {int(total.item())}")
    if wait_signal_s <= 0:
        return 0
    # Stand-in for a training loop: iterate in lockstep until any rank is signalled.
    flag = PreemptionFlag().install()
    _say(f"rank {env.rank} waiting for SIGTERM/SIGUSR1 (pid {os.getpid()})")
    deadline = time.monotonic() + wait_signal_s
    iteration = 0
    while time.monotonic() < deadline:
        time.sleep(0.2)
        iteration += 1
        if flag.agreed(device):
            _say(f"rank {env.rank} stopping at iteration {iteration} on {flag.signal_name or 'a peer signal'}")
            return PREEMPTED_EXIT_CODE
    _say(f"rank {env.rank}: no signal within {wait_signal_s:g} s")
    return 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pertvl.train.launch",
                                     description="Launch smoke test: init + all_reduce of the rank.")
    parser.add_argument("--selftest", action="store_true", help="initialise, all_reduce the rank, print")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None,
                        help="set by the deepspeed launcher")
    parser.add_argument("--backend", default=None, help="torch.distributed backend (default nccl/gloo)")
    parser.add_argument("--wait-signal", type=float, default=0.0, metavar="SECONDS",
                        help="after the all_reduce, wait up to SECONDS for SIGTERM/SIGUSR1 and exit with the "
                        "preemption code")
    args = parser.parse_args(argv)
    if not args.selftest:
        parser.error("nothing to do: pass --selftest")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    env = detect_dist_env(argv_local_rank=args.local_rank)
    device = init_distributed(env, backend=args.backend, timeout_s=120.0)
    try:
        return _selftest(env, device, args.wait_signal)
    finally:
        shutdown_distributed()


if __name__ == "__main__":
    raise SystemExit(main())
