"""pertvl.train.checkpoint on a real DeepSpeed engine (1 CPU rank, gloo): crash-safe save,
keep-last-K, exact resume, RNG round trip, weights_only loading, DeepSpeed's zero_to_fp32;
every ds_configs/*.json trains, saves and resumes."""

from __future__ import annotations

import json
import os
import pickle
import random
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from pertvl.train import checkpoint as ck
from pertvl.train.launch import (
    check_precision,
    detect_dist_env,
    free_port,
    init_distributed,
    load_ds_config,
    shutdown_distributed,
    unsupported_precision,
)
from pertvl.train.optim import build_optimizer, build_scheduler

deepspeed = pytest.importorskip("deepspeed")

REPO = Path(__file__).resolve().parents[1]
DS_CONFIGS = sorted((REPO / "ds_configs").glob("*.json"))
_ENV_KEYS = (
    "RANK",
    "WORLD_SIZE",
    "LOCAL_RANK",
    "LOCAL_WORLD_SIZE",
    "MASTER_ADDR",
    "MASTER_PORT",
    "OMP_NUM_THREADS",
)


@pytest.fixture(scope="module", autouse=True)
def process_group() -> Iterator[None]:
    """One gloo rank for the whole module (DeepSpeed needs a process group); environment restored."""
    saved = {k: os.environ.get(k) for k in _ENV_KEYS}
    if not torch.distributed.is_initialized():
        init_distributed(detect_dist_env({}))
    yield
    # Collected and destroyed here, not at interpreter teardown, where freeing gloo objects can
    # abort the process after the tests passed (as the engine does at the end of a run).
    import gc

    gc.collect()
    shutdown_distributed()
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(4, 8)
        self.norm = nn.BatchNorm1d(8)
        self.fc2 = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.norm(self.fc1(x))))


def make_engine(config_name: str = "cpu_zero2_fp32", init_seed: int = 0, total_steps: int = 20):
    torch.manual_seed(init_seed)
    model = Tiny()
    optimizer = build_optimizer(model.parameters(), lr=0.05)
    scheduler = build_scheduler(optimizer, warmup_steps=2, total_steps=total_steps, min_lr_ratio=0.1)
    config = load_ds_config(REPO / "ds_configs" / f"{config_name}.json", micro_batch=4)
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler, config=config
    )
    return engine


def _input_dtype(engine) -> torch.dtype:
    return (
        torch.bfloat16
        if engine.bfloat16_enabled()
        else torch.float16
        if engine.fp16_enabled()
        else torch.float32
    )


def train(engine, optimizer_steps: int) -> None:
    """Batches drawn from the torch RNG, so a resumed run sees the same data only if RNG is restored."""
    for _ in range(optimizer_steps * engine.gradient_accumulation_steps()):
        x = torch.randn(4, 4).to(engine.device, _input_dtype(engine))
        target = torch.randint(0, 3, (4,)).to(engine.device)
        loss = nn.functional.cross_entropy(engine(x).float(), target)
        engine.backward(loss)
        engine.step()


def params(engine) -> dict[str, torch.Tensor]:
    return {name: p.detach().float().cpu().clone() for name, p in engine.module.named_parameters()}


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def client(step: int) -> dict:
    return {
        "epoch": 1,
        "step_in_epoch": step % 7,
        "global_step": step,
        "stream": {"epoch": 1, "batches_consumed": step * 2, "shards": ["train-000000.tar"]},
        "wandb_run_id": "abc123",
        "config": {"model": {"embed_dim": 128}, "lr": 0.0015, "tags": ["demo"], "seed": None},
    }


# ----------------------------------------------------------------------------------- tests


def test_save_keeps_last_k_and_writes_latest_atomically(tmp_path: Path) -> None:
    engine = make_engine()
    for step in (1, 2, 3, 4):
        train(engine, 1)
        saved = ck.save(engine, tmp_path, engine.global_steps, client(step), keep_last=2)
        assert saved.tag == f"step{step:08d}" and saved.step == step
    root = tmp_path / "checkpoints"
    assert sorted(p.name for p in root.iterdir() if p.is_dir()) == ["step00000003", "step00000004"]
    assert saved.removed == ("step00000002",)
    assert (root / "latest").read_text() == "step00000004"
    assert not [p for p in root.iterdir() if p.name.startswith(".")]  # no temp files left
    marker = json.loads((root / "step00000004" / ck.MARKER_FILE).read_text())
    assert marker["step"] == 4 and marker["world_size"] == 1 and marker["zero_stage"] == 2
    assert set(marker["files"]) == {
        "mp_rank_00_model_states.pt",
        "zero_pp_rank_0_mp_rank_00_optim_states.pt",
        "pertvl_rank00000.pt",
    }
    assert [info.step for info in ck.list_checkpoints(tmp_path)] == [3, 4]
    with pytest.raises(ValueError, match="keep_last"):
        ck.save(engine, tmp_path, 5, client(5), keep_last=0)


@pytest.mark.parametrize("config_name", ["cpu_zero0_fp32", "cpu_zero2_fp32", "cpu_zero1_bf16"])
def test_resume_is_exact(tmp_path: Path, config_name: str) -> None:
    """Kill after step 2, resume, train to step 4 == uninterrupted run to step 4, bit for bit
    (parameters, LR, step count; data comes from the restored RNG)."""
    torch.manual_seed(7)
    engine = make_engine(config_name)
    train(engine, 2)
    ck.save(engine, tmp_path, engine.global_steps, client(2))
    train(engine, 2)
    expected, expected_lr, expected_steps = params(engine), engine.get_lr(), engine.global_steps

    resumed = make_engine(
        config_name, init_seed=123
    )  # different init: everything must come from the checkpoint
    torch.manual_seed(999)
    random.seed(999)
    state = ck.resume(resumed, tmp_path, "latest")
    assert state is not None
    assert {k: state[k] for k in client(2)} == client(2)
    assert state["checkpoint_step"] == 2 and state["checkpoint"].endswith("step00000002")
    assert resumed.global_steps == 2
    train(resumed, 2)
    assert_same(params(resumed), expected)
    assert resumed.get_lr() == expected_lr and resumed.global_steps == expected_steps


def test_resume_without_checkpoint_returns_none(tmp_path: Path) -> None:
    engine = make_engine()
    assert ck.resume(engine, tmp_path / "fresh-run", "latest") is None
    with pytest.raises(FileNotFoundError):
        ck.resume(engine, tmp_path, tmp_path / "nowhere")


def test_crash_mid_save_keeps_previous_checkpoint_latest(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = make_engine()
    train(engine, 2)
    ck.save(engine, tmp_path, 2, client(2))
    at_step2 = params(engine)
    train(engine, 2)
    root = tmp_path / "checkpoints"

    # (a) crash after DeepSpeed wrote the tag folder, before the marker and `latest`
    engine.save_checkpoint(str(root), tag="step00000004", save_latest=False)
    assert (root / "latest").read_text() == "step00000002"
    assert ck.resolve_checkpoint(tmp_path).tag == "step00000002"

    # (b) crash after the marker, before `latest` is replaced
    real_write = ck.atomic_write_text

    def crash_on_latest(path: Path, text: str, **kwargs) -> None:
        if path.name == ck.LATEST_FILE:
            raise OSError("simulated crash")
        real_write(path, text, **kwargs)

    monkeypatch.setattr(ck, "atomic_write_text", crash_on_latest)
    with pytest.raises(OSError, match="simulated crash"):
        ck.save(engine, tmp_path, 4, client(4))
    monkeypatch.undo()
    assert (root / "latest").read_text() == "step00000002"

    fresh = make_engine(init_seed=5)
    state = ck.resume(fresh, tmp_path)
    assert state["global_step"] == 2 and fresh.global_steps == 2
    assert_same(params(fresh), at_step2)

    # the next save replaces the half-written folder and commits normally
    train(fresh, 3)
    ck.save(fresh, tmp_path, fresh.global_steps, client(5), keep_last=2)
    assert (root / "latest").read_text() == "step00000005"
    assert sorted(p.name for p in root.iterdir() if p.is_dir()) == ["step00000004", "step00000005"]


def test_latest_pointing_at_a_damaged_checkpoint_falls_back(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    engine = make_engine()
    for _ in range(2):
        train(engine, 1)
        ck.save(engine, tmp_path, engine.global_steps, client(engine.global_steps))
    damaged = tmp_path / "checkpoints" / "step00000002" / "mp_rank_00_model_states.pt"
    damaged.write_bytes(damaged.read_bytes()[:100])  # truncated by a crash of the file system
    assert ck.resolve_checkpoint(tmp_path).tag == "step00000001"
    assert "not a complete checkpoint" in caplog.text
    with pytest.raises(FileNotFoundError, match="incomplete"):
        ck.resolve_checkpoint(tmp_path, damaged.parent)


def test_resave_of_an_existing_step_replaces_it_safely(tmp_path: Path) -> None:
    engine = make_engine()
    train(engine, 2)
    ck.save(engine, tmp_path, 2, client(2))
    train(engine, 2)
    ck.save(engine, tmp_path, 4, client(4))
    # resume from step 2 explicitly (a PATH) and reach step 4 again with other data
    again = make_engine(init_seed=3)
    ck.resume(again, tmp_path, tmp_path / "checkpoints" / "step00000002")
    torch.manual_seed(1234)
    train(again, 2)
    ck.save(again, tmp_path, 4, client(4))
    root = tmp_path / "checkpoints"
    assert sorted(p.name for p in root.iterdir() if p.is_dir()) == ["step00000002", "step00000004"]
    check = make_engine(init_seed=4)
    ck.resume(check, tmp_path)
    assert_same(params(check), params(again))


def test_rng_round_trip_and_weights_only_safety(tmp_path: Path) -> None:
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    random.gauss(0, 1)  # leaves a cached gaussian in the python state
    state = ck.capture_rng_state()
    ck.check_weights_only_safe(state, "rng")
    torch.save(state, tmp_path / "rng.pt")
    loaded = torch.load(tmp_path / "rng.pt", weights_only=True)
    first = (random.random(), random.gauss(0, 1), np.random.rand(3).tolist(), torch.rand(3))
    ck.restore_rng_state(loaded)
    second = (random.random(), random.gauss(0, 1), np.random.rand(3).tolist(), torch.rand(3))
    assert first[:3] == second[:3] and torch.equal(first[3], second[3])
    with pytest.raises(ValueError, match="malformed RNG state"):
        ck.restore_rng_state({"python": {}})


def test_client_state_must_be_weights_only_safe(tmp_path: Path) -> None:
    engine = make_engine()
    with pytest.raises(ValueError, match=r"client_state\['loss'\].*numpy"):
        ck.save(engine, tmp_path, 1, {"loss": np.float64(0.5)})
    with pytest.raises(ValueError, match=r"client_state\['stream'\]\[0\].*Path"):
        ck.save(engine, tmp_path, 1, {"stream": [Path("x")]})
    assert not (tmp_path / "checkpoints").exists()


def test_loading_refuses_pickled_objects(tmp_path: Path) -> None:
    """resume reads with torch.load(weights_only=True): a checkpoint smuggling an arbitrary
    object is refused, not executed."""
    engine = make_engine()
    train(engine, 1)
    saved = ck.save(engine, tmp_path, 1, client(1))
    model_file = saved.path / "mp_rank_00_model_states.pt"
    with torch.serialization.safe_globals(ck.deepspeed_safe_globals()):
        state = torch.load(model_file, weights_only=True)
    state["smuggled"] = Path("/etc/passwd")  # any non-allow-listed class
    torch.save(state, model_file)
    marker = json.loads((saved.path / ck.MARKER_FILE).read_text())
    marker["files"][model_file.name] = model_file.stat().st_size
    (saved.path / ck.MARKER_FILE).write_text(json.dumps(marker))
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        ck.resume(make_engine(), tmp_path)


@pytest.mark.parametrize("config_path", DS_CONFIGS, ids=[p.stem for p in DS_CONFIGS])
def test_every_ds_config_trains_saves_and_resumes(tmp_path: Path, config_path: Path) -> None:
    """Each config initialises a DeepSpeed engine (GPU configs too: on CPU they still run here),
    trains one optimizer step, and its checkpoint loads back with weights_only loading. A precision
    this CPU cannot run (fp16 without AVX-512 FP16/AMX-FP16) is skipped with DeepSpeed's reason;
    `pertvl train` refuses it up front (test_train_refuses_an_unsupported_precision)."""
    reason = unsupported_precision(json.loads(config_path.read_text()))
    if reason:
        pytest.skip(f"{config_path.name}: {reason}")
    engine = make_engine(config_path.stem)
    assert (
        engine.zero_optimization_stage() == json.loads(config_path.read_text())["zero_optimization"]["stage"]
    )
    assert engine.gradient_clipping() == 0.0
    if engine.bfloat16_enabled():
        assert engine.module.norm.running_mean.dtype == torch.bfloat16  # data_types.buffer_dtype
    train(engine, 1)
    ck.save(engine, tmp_path, engine.global_steps, client(engine.global_steps))
    expected = params(engine)
    resumed = make_engine(config_path.stem, init_seed=11)
    assert ck.resume(resumed, tmp_path) is not None
    assert type(resumed.checkpoint_engine).__name__ == "WeightsOnlyCheckpointEngine"
    assert_same(params(resumed), expected)


def test_precision_check_asks_the_accelerator(monkeypatch) -> None:
    """The up-front check agrees with what DeepSpeed's accelerator says, on whatever CPU runs it,
    and names the file and the configs that do run when it refuses."""
    from deepspeed.accelerator import get_accelerator

    fp16 = load_ds_config(REPO / "ds_configs" / "gpu_zero2_fp16.json")
    bf16 = load_ds_config(REPO / "ds_configs" / "cpu_zero1_bf16.json")
    fp32 = load_ds_config(REPO / "ds_configs" / "cpu_zero1_fp32.json")
    acc = get_accelerator()
    assert (unsupported_precision(fp16) is None) == bool(acc.is_fp16_supported())
    assert (unsupported_precision(bf16) is None) == bool(acc.is_bf16_supported())
    assert unsupported_precision(fp32) is None
    monkeypatch.setattr(type(acc), "is_fp16_supported", lambda self: False)
    with pytest.raises(ValueError, match=r"gpu_zero2_fp16\.json: trains in fp16, but .* does not support fp16.*cpu_zero1_fp32"):
        check_precision(fp16, "ds_configs/gpu_zero2_fp16.json")
    check_precision(fp32, "ds_configs/cpu_zero1_fp32.json")


@pytest.mark.parametrize("config_name", ["cpu_zero1_fp32", "cpu_zero2_fp32"])
def test_deepspeed_zero_to_fp32_reads_pertvl_checkpoints(tmp_path: Path, config_name: str) -> None:
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    engine = make_engine(config_name)
    train(engine, 2)
    ck.save(engine, tmp_path, engine.global_steps, client(2))
    expected = params(engine)
    root = tmp_path / "checkpoints"
    state = get_fp32_state_dict_from_zero_checkpoint(str(root))  # reads our `latest`
    assert_same({k: v.float() for k, v in state.items() if k in expected}, expected)
    if config_name != "cpu_zero2_fp32":
        return
    # The recovery script DeepSpeed copies next to the checkpoints, run as users would.
    script = root / "zero_to_fp32.py"
    assert script.is_file()
    out = tmp_path / "fp32"
    proc = subprocess.run(
        [sys.executable, str(script), str(root), str(out), "--safe_serialization"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    from safetensors.torch import load_file

    exported = load_file(out / "model.safetensors")
    assert_same({k: v.float() for k, v in exported.items() if k in expected}, expected)
    assert set(expected) <= set(exported)


_TWO_RANK_SCRIPT = r"""
import json, sys, torch
sys.path.insert(0, sys.argv[2])
import test_checkpoint as t
from pertvl.train import checkpoint as ck
from pertvl.train.launch import detect_dist_env, init_distributed

env = detect_dist_env()
init_distributed(env)
run = sys.argv[1]
torch.manual_seed(100 + env.rank)  # each rank draws its own data: per-rank RNG must be restored
engine = t.make_engine("cpu_zero2_fp32")
t.train(engine, 2)
ck.save(engine, run, engine.global_steps, t.client(2), rank_state={"shard_cursor": 10 + env.rank})
t.train(engine, 2)
expected = t.params(engine)
resumed = t.make_engine("cpu_zero2_fp32", init_seed=50)
torch.manual_seed(0)
state = ck.resume(resumed, run)
t.train(resumed, 2)
same = all(torch.equal(a, b) for a, b in zip(expected.values(), t.params(resumed).values()))
print(json.dumps({"rank": env.rank, "same": same, "rank_state": state["rank_state"], "epoch": state["epoch"]}), flush=True)
# End as pertvl.train.engine.train does: the engines' reference cycles (all_gather autograd nodes
# hold the process group) are collected while the group is alive, then the group is destroyed.
# Gloo objects left to interpreter teardown abort the process ("terminate called without an
# active exception"); CI saw that once on this test.
import gc
from pertvl.train.launch import shutdown_distributed
torch.distributed.barrier()
del engine, resumed, state
gc.collect()
shutdown_distributed()
"""


def test_two_ranks_save_and_resume_exactly(tmp_path: Path) -> None:
    """2 gloo ranks, ZeRO-2: both ranks' ZeRO shards and RNG files are in the checkpoint and the
    resumed run equals the uninterrupted one on every rank."""
    port = free_port()
    procs = []
    for rank in range(2):
        env = {k: v for k, v in os.environ.items() if k not in _ENV_KEYS} | {
            "RANK": str(rank),
            "WORLD_SIZE": "2",
            "LOCAL_RANK": str(rank),
            "LOCAL_WORLD_SIZE": "2",
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
        }
        procs.append(
            subprocess.Popen(
                [sys.executable, "-c", _TWO_RANK_SCRIPT, str(tmp_path), str(Path(__file__).parent)],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                cwd=REPO,
            )
        )
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=180)
        assert proc.returncode == 0, err[-3000:]
        results.append(json.loads(out.strip().splitlines()[-1]))
    assert sorted((r["rank"], r["same"], r["rank_state"]["shard_cursor"], r["epoch"]) for r in results) == [
        (0, True, 10, 1),
        (1, True, 11, 1),
    ]
    marker = json.loads((tmp_path / "checkpoints" / "step00000002" / ck.MARKER_FILE).read_text())
    assert marker["world_size"] == 2
    assert {"pertvl_rank00000.pt", "pertvl_rank00001.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"} <= set(
        marker["files"]
    )


def test_schedule_counts_optimizer_steps_under_deepspeed() -> None:
    """Warm-up + cosine values, and DeepSpeed advances the schedule once per optimizer step
    (every gradient_accumulation_steps micro-steps), not per micro-batch."""
    import math

    from pertvl.train.optim import WarmupCosine

    sched = WarmupCosine(warmup_steps=2, total_steps=10, min_lr_ratio=0.1)
    assert [sched(s) for s in (0, 1)] == [0.5, 1.0]
    assert sched(2) == 1.0 and sched(10) == pytest.approx(0.1) and sched(50) == pytest.approx(0.1)
    assert sched(6) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 4 / 8)))
    engine = make_engine("cpu_zero1_fp32", total_steps=10)
    assert engine.gradient_accumulation_steps() == 2
    for optimizer_steps in (1, 3):
        train(engine, optimizer_steps)
    assert engine.global_steps == 4
    assert engine.get_lr() == [pytest.approx(0.05 * sched(4))]
    with pytest.raises(ValueError, match="warmup_steps"):
        build_scheduler(torch.optim.SGD(Tiny().parameters(), lr=0.1), 5, 4)
    with pytest.raises(ValueError, match="min_lr_ratio"):
        build_scheduler(torch.optim.SGD(Tiny().parameters(), lr=0.1), 0, 4, min_lr_ratio=2.0)
    with pytest.raises(ValueError, match="momentum"):
        build_optimizer(Tiny().parameters(), momentum=1.0)
    default = build_optimizer(Tiny().parameters())
    assert default.defaults["lr"] == 0.0015 and default.defaults["momentum"] == 0.9
    assert default.defaults["weight_decay"] == 5e-4
