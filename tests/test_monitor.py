"""pertvl.train.monitor: W&B offline runs in RUN_DIR/wandb, metrics.jsonl, resume, API key rules."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from pertvl.train.monitor import Monitor, memory_metrics, resolve_wandb_mode

SENTINEL_KEY = "pertvl0sentinel0key0" + "0123456789abcdef01234567"  # 44 chars, never a real key


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Offline W&B with every network route pointing at a closed port: any connection attempt
    would fail or hang, so a passing test made none."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")
    for var in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy"):
        monkeypatch.setenv(var, "http://127.0.0.1:9")
    monkeypatch.setenv("WANDB_API_KEY", SENTINEL_KEY)
    monkeypatch.setenv("WANDB_SILENT", "true")


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_offline_run_jsonl_and_resume(tmp_path: Path, no_network: None) -> None:
    config = {"model": {"embed_dim": 128}, "optim": {"lr": 0.0015}, "tags": ["demo"]}
    start = time.monotonic()
    mon = Monitor(tmp_path, config, True, "pertvl-test", "demo-run", ["phantom", "cpu"], rank=0)
    assert mon.wandb_mode == "offline" and mon.run_id
    mon.log(
        {"loss/total": torch.tensor(2.5), "loss/global": np.float32(1.25), "lr": 0.0015, "samples_per_s": 40},
        step=1,
    )
    mon.log({"loss/total": 2.0, "lr": 0.001}, step=2)
    mon.log({"loss/total": 1.5, "lr": 0.0005}, step=3)
    mon.summary({"final_loss": 1.5})
    mon.finish()
    assert time.monotonic() - start < 60

    runs = sorted((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and runs[0].name.endswith(f"-{mon.run_id}")
    assert (runs[0] / f"run-{mon.run_id}.wandb").stat().st_size > 0
    records = _read_jsonl(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2, 3]
    assert (
        records[0]["loss/total"] == 2.5
        and records[0]["loss/global"] == 1.25
        and records[0]["samples_per_s"] == 40
    )
    assert [r["lr"] for r in records] == [0.0015, 0.001, 0.0005]
    assert json.loads((tmp_path / "summary.json").read_text()) == {"final_loss": 1.5}

    # Resume from the checkpoint of step 2: same W&B run id, metrics of step 3 (logged after
    # that checkpoint by the run that died) dropped, new lines appended.
    again = Monitor(
        tmp_path, config, True, "pertvl-test", "demo-run", None, 0, resume_run_id=mon.run_id, resume_step=2
    )
    assert again.run_id == mon.run_id
    again.log({"loss/total": 1.4}, step=3)
    again.finish()
    assert [(r["step"], r["loss/total"]) for r in _read_jsonl(tmp_path / "metrics.jsonl")] == [
        (1, 2.5),
        (2, 2.0),
        (3, 1.4),
    ]
    # the resumed run writes a second folder under the same id (offline-run-<time>-<id>, with a
    # "-1" suffix when both started within the same second)
    runs = sorted((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and all(f"-{mon.run_id}" in run.name for run in runs)

    # The API key came from the environment only and was written nowhere.
    for file in tmp_path.rglob("*"):
        if file.is_file():
            assert SENTINEL_KEY.encode() not in file.read_bytes(), file


def test_api_key_in_config_is_refused(tmp_path: Path, no_network: None) -> None:
    for config in ({"wandb": {"api_key": "abc"}}, {"WANDB_API_KEY": "abc"}, {"loggers": [{"apiKey": "x"}]}):
        with pytest.raises(ValueError, match="WANDB_API_KEY"):
            Monitor(tmp_path, config, True, "p", "r", None, rank=0)
    assert not (tmp_path / "wandb").exists()


def test_no_wandb_and_other_ranks(tmp_path: Path, no_network: None, capsys: pytest.CaptureFixture) -> None:
    mon = Monitor(tmp_path / "run", {"a": 1}, False, "p", "r", None, rank=0)
    assert mon.run_id is None
    bar = mon.progress(total=4, initial=1)
    mon.log({"loss/total": 0.5}, step=2)
    bar.update(1)
    mon.finish()
    assert not (tmp_path / "run" / "wandb").exists()
    assert _read_jsonl(tmp_path / "run" / "metrics.jsonl")[0]["loss/total"] == 0.5
    assert "total=0.5" in capsys.readouterr().err  # progress bar postfix

    mon = Monitor(tmp_path / "run", {"a": 1}, False, "p", "r", None, rank=0)
    mon.log({"loss/total": 0.25}, step=3)
    mon.finish()
    assert "step 3: loss/total=0.25" in capsys.readouterr().out  # console line without a bar

    other = Monitor(tmp_path / "rank1", {"a": 1}, True, "p", "r", None, rank=1)
    other.log({"loss/total": 1.0}, step=1)
    other.summary({"x": 1})
    other.finish()
    assert other.run_id is None and not (tmp_path / "rank1").exists()


def test_resolve_wandb_mode() -> None:
    assert resolve_wandb_mode(None, {}) == "offline"
    assert resolve_wandb_mode(None, {"WANDB_MODE": "online"}) == "online"
    assert resolve_wandb_mode("disabled", {"WANDB_MODE": "online"}) == "disabled"
    assert resolve_wandb_mode(None, {"WANDB_MODE": "dryrun"}) == "offline"
    with pytest.raises(ValueError, match="W&B mode"):
        resolve_wandb_mode("cloud", {})


def test_memory_metrics() -> None:
    metrics = memory_metrics(torch.device("cpu"))
    assert 10 < metrics["mem/rss_mib"] <= metrics["mem/rss_peak_mib"]
    status = Path("/proc/self/status").read_text()
    hwm_kib = int(next(line for line in status.splitlines() if line.startswith("VmHWM:")).split()[1])
    assert metrics["mem/rss_peak_mib"] == pytest.approx(hwm_kib / 1024, rel=0.05)
    assert not any(key.startswith("mem/cuda") for key in metrics)
