"""Faults a cluster produces every week, and what the user sees (docs/TRAINING.md, "Faults and what
you see"): two writers of one run folder, a SIGKILLed rank or pack, damaged shards, a config used
from another directory, and user errors (one line `pertvl: error: ...`, exit 2, no traceback).

The tiny set-up is conftest.py's `tiny_train`; runs are a few optimizer steps.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from test_train import _child_env, _jsonl, _start, _tail, _wait

from pertvl.cli import main
from pertvl.config import CONFIGS_DIR, find_config, load_config
from pertvl.errors import ConfigError, UserError
from pertvl.files import LOCK_NAME, lock_folder
from pertvl.train.launch import free_port

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
GONE_WITHIN = 15.0  # seconds for every process of a killed run to end


def _train(tiny_train, run: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "pertvl", "train", "--config", str(tiny_train.config), "--out", str(run),
            "--no-wandb", "--deepspeed-config", "cpu_zero1_fp32", *extra]  # fmt: skip


def _tagged(tag: str) -> list[int]:
    """Live (non-zombie) processes whose environment holds PERTVL_TEST_TAG=tag."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            environ = Path(f"/proc/{entry}/environ").read_bytes()
            state = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if f"PERTVL_TEST_TAG={tag}".encode() in environ.split(b"\0") and state != "Z":
            pids.append(int(entry))
    return pids


def _error_line(stderr: str) -> str:
    """The one `pertvl: error: ...` line of a command's stderr."""
    lines = [line for line in stderr.splitlines() if line.startswith("pertvl: error: ")]
    assert len(lines) == 1, stderr[-3000:]
    return lines[0]


def _wait_until(what, timeout: float, proc: subprocess.Popen | None = None, log: Path | None = None):
    deadline = time.monotonic() + timeout
    while not (value := what()):
        assert time.monotonic() < deadline, f"timed out; log:\n{_tail(log) if log else ''}"
        assert proc is None or proc.poll() is None, f"ended early ({proc.returncode}):\n{_tail(log) if log else ''}"
        time.sleep(0.05)
    return value


def _forkserver_processes(tag: str) -> list[int]:
    """The loader forkservers and workers among the tagged processes."""
    out = []
    for pid in _tagged(tag):
        try:
            if b"multiprocessing.forkserver" in Path(f"/proc/{pid}/cmdline").read_bytes():
                out.append(pid)
        except OSError:
            continue
    return out


def _gone(tag: str) -> tuple[list[int], float]:
    """(processes still tagged after GONE_WITHIN seconds, seconds until none was left)."""
    t0 = time.monotonic()
    while (left := _tagged(tag)) and time.monotonic() - t0 < GONE_WITHIN:
        time.sleep(0.1)
    described = []
    for pid in left:  # never leave them to the next test
        try:
            described.append(f"{pid} {Path(f'/proc/{pid}/cmdline').read_bytes()[:120]!r}")
            os.kill(pid, signal.SIGKILL)
        except OSError:
            continue
    return described, time.monotonic() - t0


# ------------------------------------------------------------------------------ one writer per folder


def test_a_removed_lock_leaves_no_file_and_stays_exclusive(tmp_path: Path) -> None:
    """A lock beside a folder (export's) is deleted on release; a writer that opened the old file
    before it was unlinked does not count as holding the new one (the inode is re-checked)."""
    import fcntl

    lock = lock_folder(tmp_path, "export", name=".x.lock", remove=True)
    stale = os.open(tmp_path / ".x.lock", os.O_RDWR)  # opened while held, locked after the unlink
    lock.release()
    assert not (tmp_path / ".x.lock").exists()
    fcntl.flock(stale, fcntl.LOCK_EX | fcntl.LOCK_NB)  # succeeds on the unlinked inode ...
    with lock_folder(tmp_path, "next", name=".x.lock", remove=True):  # ... which guards nothing now
        assert (tmp_path / ".x.lock").read_text().endswith(": next\n")
        with pytest.raises(UserError, match=": next"):
            lock_folder(tmp_path, "third", name=".x.lock")
    os.close(stale)
    assert not (tmp_path / ".x.lock").exists()


def test_folder_lock_names_its_holder_and_dies_with_it(tmp_path: Path) -> None:
    with lock_folder(tmp_path / "run", "pertvl train --out run"):
        with pytest.raises(UserError, match=rf"run is in use by pid {os.getpid()} on host .*: pertvl train --out run; "):
            lock_folder(tmp_path / "run", "another")
    lock_folder(tmp_path / "run", "after release").release()
    # A holder killed by SIGKILL leaves no stale lock: the kernel releases a flock with its process.
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from pertvl.files import lock_folder; "
                               f"lock_folder({str(tmp_path / 'run')!r}, 'holder'); print('held', flush=True); "
                               "time.sleep(600)"], stdout=subprocess.PIPE, text=True)  # fmt: skip
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(UserError, match=f"pid {holder.pid} .*: holder"):
        lock_folder(tmp_path / "run", "me")
    holder.kill()
    holder.wait()
    lock_folder(tmp_path / "run", "me").release()


def test_a_second_train_on_the_same_folder_is_refused_and_the_first_is_what_a_lone_run_writes(
    tiny_train, tmp_path: Path
) -> None:
    run, lone = tmp_path / "run", tmp_path / "lone"
    first = _start(_train(tiny_train, run, "--max-steps", "3"), tmp_path / "first.log", tmp_path)
    try:
        _wait_until(lambda: (run / LOCK_NAME).is_file() and f"pid {first.pid} " in (run / LOCK_NAME).read_text(),
                    120, first, tmp_path / "first.log")  # fmt: skip
        t0 = time.monotonic()
        second = subprocess.run(_train(tiny_train, run, "--max-steps", "3", "--seed", "1"), env=_child_env(tmp_path),
                                capture_output=True, text=True, cwd=tmp_path, timeout=120)  # fmt: skip
        refused_after = time.monotonic() - t0
        assert first.poll() is None, "the first run ended before the second was refused: nothing was tested"
    finally:
        rc = _wait(first, tmp_path / "first.log")
    assert second.returncode == 2, second.stderr
    assert _error_line(second.stderr).startswith(f"pertvl: error: {run} is in use by pid {first.pid}")
    assert "Traceback" not in second.stderr
    print(f"second writer refused after {refused_after:.1f} s")
    assert rc == 0, _tail(tmp_path / "first.log")
    alone = _start(_train(tiny_train, lone, "--max-steps", "3"), tmp_path / "lone.log", tmp_path)
    assert _wait(alone, tmp_path / "lone.log") == 0
    # The first run's folder is exactly a lone run's: same files, same config but for --out, same
    # losses step by step, the same weights byte for byte.
    def files(folder: Path) -> set[str]:
        return {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file() and "wandb" not in p.parts}

    assert files(run) == files(lone)
    cfg_run, cfg_lone = load_config(run / "config.yaml"), load_config(lone / "config.yaml")
    assert cfg_run["train"].pop("out") == str(run) and cfg_lone["train"].pop("out") == str(lone)
    assert cfg_run == cfg_lone and cfg_run["train"]["seed"] == 0
    losses = [[m["loss/total"] for m in _jsonl(folder / "metrics.jsonl")] for folder in (run, lone)]
    assert losses[0] == losses[1] and len(losses[0]) == 3
    assert (run / "final" / "model.safetensors").read_bytes() == (lone / "final" / "model.safetensors").read_bytes()


# ------------------------------------------------------------------------------ no orphan processes


def test_a_sigkilled_rank_of_a_two_rank_run_leaves_no_process(tiny_train, tmp_path: Path) -> None:
    """rank 1 SIGKILLs itself before step 2 (an OOM kill): its forkserver and loader workers, and
    everything of rank 0, end with the job."""
    tag = uuid.uuid4().hex
    log = tmp_path / "kill.log"
    launcher = [str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", str(free_port()), "-m", "pertvl"]
    proc = _start([*launcher, *_train(tiny_train, tmp_path / "run", "--max-steps", "50")[3:]], log, tmp_path,
                  env={"PERTVL_TEST_TAG": tag, "PERTVL_FAULT": "rank-kill:rank=1,step=3"})  # fmt: skip
    _wait_until(lambda: len(_forkserver_processes(tag)) >= 2 * 3, 180, proc, log)  # 2 ranks x (server + 2 workers)
    assert _wait(proc, log) != 0
    left, seconds = _gone(tag)
    assert not left, f"still alive {GONE_WITHIN:.0f} s after the job ended: {left}\n{_tail(log)}"
    print(f"no process left {seconds:.1f} s after the job ended")


def test_sigkill_of_a_training_process_ends_its_forkserver_and_workers(tiny_train, tmp_path: Path) -> None:
    tag = uuid.uuid4().hex
    log = tmp_path / "kill.log"
    proc = _start(_train(tiny_train, tmp_path / "run", "--max-steps", "500"), log, tmp_path,
                  env={"PERTVL_TEST_TAG": tag})  # fmt: skip
    _wait_until(lambda: len(_forkserver_processes(tag)) >= 3, 180, proc, log)  # the server and 2 workers
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    left, seconds = _gone(tag)
    assert not left, f"still alive {GONE_WITHIN:.0f} s after SIGKILL: {left}"
    print(f"no process left {seconds:.1f} s after SIGKILL")


def test_sigkill_of_pack_ends_its_pool_workers(tiny_train, tmp_path: Path) -> None:
    tag = uuid.uuid4().hex
    corpus = tiny_train.root / "corpus"
    pairs = [json.loads(line) for line in (corpus / "pairs.jsonl").read_text().splitlines() if line.strip()]
    many = tmp_path / "pairs.jsonl"  # the same images many times over: a pack that takes a while
    with open(many, "w") as f:
        for k in range(40):
            for p in pairs:
                image = p["image"] if os.path.isabs(p["image"]) else str(corpus / p["image"])
                f.write(json.dumps({**p, "id": f"{p['id']}-{k}", "image": image}) + "\n")
    log = tmp_path / "pack.log"
    proc = _start([sys.executable, "-m", "pertvl", "pack", "--pairs", str(many), "--perturbations",
                   str(corpus / "perturbations.jsonl"), "--out", str(tmp_path / "shards"), "--image-size", "256",
                   "--workers", "2"], log, tmp_path, env={"PERTVL_TEST_TAG": tag})  # fmt: skip
    _wait_until(lambda: len(_tagged(tag)) >= 3, 120, proc, log)  # pack + its 2 pool workers
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    left, seconds = _gone(tag)
    assert not left, f"still alive {GONE_WITHIN:.0f} s after SIGKILL: {left}"
    print(f"no pool worker left {seconds:.1f} s after SIGKILL")
    _wait_until(lambda: _free(tmp_path / "shards"), 5)  # no stale lock (a dying worker closes its files last)


def _free(folder: Path) -> bool:
    try:
        lock_folder(folder, "test").release()
    except UserError:
        return False
    return True


# ------------------------------------------------------------------------------ damaged shards


def _copy_shards(tiny_train, tmp_path: Path) -> Path:
    shards = tmp_path / "shards"
    shutil.copytree(tiny_train.shards, shards)
    return shards


def test_a_truncated_shard_stops_train_before_the_first_step(tiny_train, tmp_path: Path) -> None:
    shards = _copy_shards(tiny_train, tmp_path)
    victim = shards / "train-000003.tar"
    size = victim.stat().st_size
    victim.write_bytes(victim.read_bytes()[: size // 2])
    out = subprocess.run(_train(tiny_train, tmp_path / "run", "--max-steps", "2", "--shards", str(shards)),
                         env=_child_env(tmp_path), capture_output=True, text=True, cwd=tmp_path, timeout=300)  # fmt: skip
    assert out.returncode == 2, out.stderr[-3000:]
    last = _error_line(out.stderr)
    assert last.startswith(f"pertvl: error: {shards} [train]: 1 damaged shard(s) (train-000003.tar: {size // 2} "
                           f"bytes, the manifest says {size});")  # fmt: skip
    assert "data.max_damaged_shards=N" in last and "Traceback" not in out.stderr
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_random_bytes_of_the_right_size_are_found_by_sha256(tiny_train, tmp_path: Path) -> None:
    from pertvl.data.stream import check_shards, resolve_source
    from pertvl.errors import DamagedDataError

    shards = _copy_shards(tiny_train, tmp_path)
    victim = shards / "train-000001.tar"
    victim.write_bytes(os.urandom(victim.stat().st_size))
    src = resolve_source(shards, "train")
    assert check_shards(src, "size") == []  # the size matches: only the checksum tells
    with pytest.raises(DamagedDataError, match=r"1 damaged shard\(s\) \(train-000001.tar: sha256 differs"):
        check_shards(src, "sha256")
    assert check_shards(src, "sha256", max_damaged=1) == ["train-000001.tar: sha256 differs from the manifest's"]
    assert check_shards(src, "off") == []


# ------------------------------------------------------------------------------ config from anywhere


def test_train_runs_from_another_directory_with_paths_relative_to_its_config(tiny_train, tmp_path: Path) -> None:
    project = tmp_path / "project"
    project.mkdir()
    shutil.copytree(tiny_train.shards, project / "shards")
    shutil.copytree(tiny_train.text_model, project / "tiny_bert")
    text = tiny_train.config.read_text()
    text = text.replace(str(tiny_train.shards), "shards").replace(str(tiny_train.text_model), "tiny_bert")
    text = text.replace("train:\n", "train:\n  deepspeed_config: ds_configs/cpu_zero0_fp32.json\n")
    (project / "run.yaml").write_text(text)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    out = subprocess.run([sys.executable, "-m", "pertvl", "train", "--config", "../project/run.yaml", "--out", "run",
                          "--max-steps", "1", "--no-wandb"], env=_child_env(tmp_path) | {"PYTHONPATH": str(REPO)},
                         capture_output=True, text=True, cwd=elsewhere, timeout=300)  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    cfg = load_config(elsewhere / "run" / "config.yaml")
    assert cfg["data"]["shards"] == str(project / "shards") and cfg["model"]["text_name_or_path"] == str(project / "tiny_bert")
    assert (elsewhere / "run" / "final" / "model.safetensors").is_file()


def test_bundled_configs_by_name() -> None:
    from pertvl.train.launch import find_ds_config

    assert find_config("demo") == CONFIGS_DIR / "demo.yaml" and (CONFIGS_DIR / "demo.yaml").is_file()
    demo = load_config("demo")
    assert find_ds_config(demo["train"]["deepspeed_config"]).name == "cpu_zero1_bf16.json"
    assert find_ds_config("cpu_zero0_fp32").is_file()
    with pytest.raises(UserError, match="config nope: no such file .*bundled configs, usable by name: .*demo"):
        find_config("nope")
    with pytest.raises(UserError, match="DeepSpeed config nope.json: no such file"):
        find_ds_config("nope.json")


# ------------------------------------------------------------------------------ one-line user errors


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--set", "train.lrr=0.1"], "unknown config key 'train.lrr'; known keys here: "),
        (["--set", "train.lr=abc"], "+ --set: train.lr must be float, got 'abc' (str)"),
        (["--set", "data.verify=md5"], "data.verify must be one of size, sha256, off, got 'md5'"),
        (["--set", "data.max_damaged_shards=-1"], "data.max_damaged_shards must be >= 0, got -1"),
        (["--set", "train.lr=[1"], "override 'train.lr=[1': the value is not valid YAML"),
    ],
)
def test_config_errors_are_one_line_and_exit_2(tiny_train, tmp_path: Path, capsys, monkeypatch, args, message):
    monkeypatch.delenv("PERTVL_DEBUG", raising=False)
    assert main(["train", "--config", str(tiny_train.config), "--out", str(tmp_path / "run"), *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("pertvl: error: ") and message in err and err.count("\n") == 1, err
    if "known keys here" in message:  # the near miss is among the listed keys
        assert ", lr, " in err, err
    assert not (tmp_path / "run").exists()  # refused before anything was written
    monkeypatch.setenv("PERTVL_DEBUG", "1")
    assert main(["train", "--config", str(tiny_train.config), "--out", str(tmp_path / "run"), *args]) == 2
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and err.rstrip().splitlines()[-1].startswith("pertvl: error: ")


def test_config_error_is_still_the_builtin_type_for_python_callers() -> None:
    with pytest.raises(KeyError):
        load_config(None, ["train.lrr=1"])
    with pytest.raises(TypeError):
        load_config(None, ["train.lr=abc"])
    assert issubclass(ConfigError, ValueError)


def test_missing_shards_and_missing_model_are_named(tiny_train, tmp_path: Path) -> None:
    out = subprocess.run(_train(tiny_train, tmp_path / "run", "--shards", str(tmp_path / "missing")),
                         env=_child_env(tmp_path), capture_output=True, text=True, cwd=tmp_path, timeout=300)  # fmt: skip
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr[-3000:]
    assert f"shard folder {tmp_path / 'missing'} does not exist" in _error_line(out.stderr)
    assert out.stderr.count("does not exist") == 1
    assert "pass --shards FOLDER" in out.stderr and "num_samples=" not in out.stderr
    empty = tmp_path / "empty_run"
    empty.mkdir()
    export = subprocess.run([sys.executable, "-m", "pertvl", "export", "--run", str(empty), "--out",
                             str(tmp_path / "export")], env=_child_env(tmp_path), capture_output=True, text=True,
                            cwd=tmp_path, timeout=300)  # fmt: skip
    assert export.returncode == 2 and "Traceback" not in export.stderr, export.stderr[-3000:]
    assert _error_line(export.stderr) == (
        f"pertvl: error: {empty}: no trained model (expected {empty / 'final'} with config.json + "
        "model.safetensors, written by save_pretrained at the end of `pertvl train`); for an unfinished run use "
        f"one of its checkpoints under {empty / 'checkpoints'}")  # fmt: skip


def test_rerunning_a_run_without_resume_is_one_line(tiny_train, tmp_path: Path) -> None:
    run = tmp_path / "run"
    cmd = _train(tiny_train, run, "--max-steps", "1", "--set", "train.checkpoint_every=1")
    first = subprocess.run(cmd, env=_child_env(tmp_path), capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert first.returncode == 0, first.stderr[-3000:]
    again = subprocess.run(cmd, env=_child_env(tmp_path), capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert again.returncode == 2 and "Traceback" not in again.stderr, again.stderr[-3000:]
    assert _error_line(again.stderr).startswith(
        f"pertvl: error: {run} already holds checkpoints; pass --resume latest to continue that run")


def test_train_help_explains_the_exit_codes(capsys) -> None:
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = "".join(capsys.readouterr().out.split())  # argparse wraps lines (and at hyphens)
    for said in ("75 stopped by SIGTERM/SIGUSR1 after writing a checkpoint (preempted, a time limit): re-run with "
                 "--resume latest", "70 stalled", "2 a user error"):
        assert "".join(said.split()) in text
