"""Evaluation during training (train.eval_every): the same tiny run with and without it reaches
bit-identical weights, metrics.jsonl holds eval/… rows at every N-th step and the last, and the
numbers are those `pertvl eval` computes from the weights of that step.

One rank (plain python) on the tiny set-up of conftest.py (`tiny_train`): 64 px phantoms, a 2-layer
BERT with dropout, resnet-tiny with BatchNorm, so a consumed RNG draw, a switched train/eval mode
or an updated BatchNorm statistic would change the weights.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pertvl.config import RunConfig, load_config

REPO = Path(__file__).resolve().parents[1]
STEPS, EVERY = 5, 2  # evaluations at steps 2, 4 and 5 (the last)


def _start(setup, run: Path, *sets: str) -> tuple[subprocess.Popen, Path]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "RANK", "LOCAL_", "MASTER_"))}
    env.pop("WORLD_SIZE", None)
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    cmd = [sys.executable, "-m", "pertvl", "train", "--config", str(setup.config), "--out", str(run),
           "--max-steps", str(STEPS), "--no-wandb", "--set", "data.num_workers=1", *sets]
    log = run.with_suffix(".log")
    with open(log, "w") as out:
        return subprocess.Popen(cmd, env=env, cwd=REPO, stdout=out, stderr=subprocess.STDOUT), log


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def runs(tiny_train, tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("in_training")
    plain, evaluated = root / "plain", root / "evaluated"
    started = [_start(tiny_train, plain),  # side by side: one rank each
               _start(tiny_train, evaluated, "--set", f"train.eval_every={EVERY}", "--set", "train.eval_split=test")]
    for proc, log in started:
        try:
            rc = proc.wait(timeout=600)
        finally:
            if proc.poll() is None:
                proc.kill()
        assert rc == 0, log.read_text(errors="replace")[-6000:]
    return plain, evaluated


@pytest.mark.slow
def test_evaluating_during_training_leaves_the_weights_bit_identical(runs) -> None:
    from safetensors.torch import load_file

    plain, evaluated = runs
    a, b = load_file(plain / "final" / "model.safetensors"), load_file(evaluated / "final" / "model.safetensors")
    assert a.keys() == b.keys()
    assert [k for k in a if not a[k].equal(b[k])] == []
    assert _jsonl(plain / "samples.jsonl") == _jsonl(evaluated / "samples.jsonl")  # same data order
    train_rows = [{k: v for k, v in m.items() if k.startswith("loss/")} for m in _jsonl(plain / "metrics.jsonl")]
    assert train_rows == [{k: v for k, v in m.items() if k.startswith("loss/")}
                          for m in _jsonl(evaluated / "metrics.jsonl") if "loss/total" in m]


@pytest.mark.slow
def test_eval_rows_at_every_nth_step_and_the_last_match_pertvl_eval(runs, tiny_train) -> None:
    import torch

    from pertvl.data.shards import iter_samples
    from pertvl.evaluate.catalog import EVALUATIONS
    from pertvl.evaluate.in_training import task_options
    from pertvl.evaluate.torch_encoder import TorchEncoder

    _, run = runs
    rows = [m for m in _jsonl(run / "metrics.jsonl") if any(k.startswith("eval/") for k in m)]
    assert [m["step"] for m in rows] == [2, 4, 5]
    assert all(not any(k.startswith("loss/") for k in m) for m in rows)
    for m in rows:  # one row per evaluation, the default tasks, epochs as a fraction of the plan
        assert {"eval/structure/overall", "eval/structure/margin", "eval/retrieval/image_to_text/R@10",
                "eval/zeroshot/mean_auroc"} <= m.keys() or pytest.fail(sorted(m))
    steps_per_epoch = 113 // 8  # 113 training phantoms, micro-batch 4 x accumulation 2 on one rank
    assert [m["eval/epoch"] for m in rows] == pytest.approx([s / steps_per_epoch for s in (2, 4, 5)])
    assert sorted(p.name for p in (run / "eval").iterdir()) == ["step00000002", "step00000004", "step00000005"]

    # the last row is what `pertvl eval` computes from RUN_DIR/final (fp32: the same weights)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the training process ran
    try:
        encoder = TorchEncoder.from_run(run, device="cpu", batch_size=64)
        shards = str(tiny_train.shards)
        for name in ("structure", "retrieval", "zeroshot"):
            result = EVALUATIONS[name].run(encoder, iter_samples(shards, "test"),
                                           task_options(name, shards, "test", None, 64))
            expected = {f"eval/{k}": v for k, v in result.metrics().items()}
            got = {k: rows[-1][k] for k in expected}
            assert got == pytest.approx(expected, abs=1e-9, nan_ok=True), name
            saved = json.loads((run / "eval" / "step00000005" / f"{EVALUATIONS[name].key}.json").read_text())
            assert saved["schema"] == result.schema and saved["info"]["step"] == 5
    finally:
        torch.set_num_threads(threads)


def test_unknown_eval_task_and_bad_eval_every_fail_at_config_time() -> None:
    from pertvl.evaluate.in_training import eval_task_names, make_evaluator

    assert {"structure", "retrieval", "zeroshot"} <= set(eval_task_names())
    assert "text-structure" not in eval_task_names()  # a text model's, not the image encoder's
    cfg = RunConfig.from_dict(load_config(None, ["train.eval_every=10", "train.eval_tasks=[structure,twinz]"]))
    with pytest.raises(ValueError, match=r"unknown evaluation\(s\) \['twinz'\]"):
        make_evaluator(cfg)
    assert make_evaluator(RunConfig.from_dict(load_config(None, ["train.eval_tasks=[twinz]"]))) is None  # off
    with pytest.raises(ValueError, match="train.eval_every must be >= 0"):
        RunConfig.from_dict(load_config(None, ["train.eval_every=-1"]))
    with pytest.raises(ValueError, match="train.eval_split"):
        RunConfig.from_dict(load_config(None, ["train.eval_split=dev"]))


def test_the_engine_refuses_eval_every_without_an_evaluation() -> None:
    from pertvl.train.engine import Trainer

    cfg = load_config(None, ["train.eval_every=5"])
    with pytest.raises(ValueError, match="needs an evaluation"):
        Trainer(cfg)


@pytest.mark.slow
def test_report_curves_draws_the_tiny_runs_eval_rows(runs, tmp_path: Path) -> None:
    from PIL import Image

    from pertvl.cli import main

    _, run = runs
    assert main(["report", "curves", f"full={run}", f"again={run}", "--out", str(tmp_path)]) == 0
    doc = json.loads((tmp_path / "curves.json").read_text())
    rows = [m for m in _jsonl(run / "metrics.jsonl") if "eval/structure/overall" in m]
    c = doc["curves"]["full"]
    assert c["steps"] == [2, 4, 5] and c["series"]["eval/structure/overall"] == [m["eval/structure/overall"] for m in rows]
    chance = json.loads((run / "eval" / "step00000005" / "structure.json").read_text())["overall"]["chance"]
    assert c["structure_chance"] == chance and 0 < chance < 0.5
    texts = json.loads((run / "eval" / "step00000005" / "retrieval.json").read_text())["texts"]
    assert c["retrieval_chance"] == pytest.approx(min(1.0, 10 / texts))
    assert "Zero-shot mean AUROC" in doc["panels"] and Image.open(tmp_path / "curves.png").size[0] > 0
    assert (tmp_path / "curves.md").read_text().count("| full | 5 |") == 1


def _fake_run(run: Path, steps: list[int], overall: list[float | None], cf: bool) -> None:
    run.mkdir(parents=True)
    lines = []
    for s, acc in zip(steps, overall, strict=True):
        lines.append({"step": s, "loss/total": 1.0})
        row = {"step": s, "eval/epoch": s / 10, "eval/structure/overall": acc, "eval/structure/wrong_image": 0.2,
               "eval/structure/margin": None if acc is None else acc - 0.2,
               "eval/structure/margin_ci_low": 0.0, "eval/structure/margin_ci_high": 0.3,
               "eval/zeroshot/mean_auroc": 0.6}
        if cf:
            row |= {"eval/structure/cf_laterality_margin": 0.1, "eval/structure/cf_laterality_margin_ci_low": 0.0}
        lines.append(row)
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines) + '{"step": 3, "eval/')  # torn
    (run / "eval" / f"step{steps[-1]:08d}").mkdir(parents=True)
    (run / "eval" / f"step{steps[-1]:08d}" / "structure.json").write_text(json.dumps({"overall": {"chance": 0.125}}))


def test_curves_series_panels_and_errors(tmp_path: Path) -> None:
    from pertvl.evaluate.curves import _label_runs, write_curves

    _fake_run(tmp_path / "a", [10, 20], [0.3, None], cf=True)
    _fake_run(tmp_path / "b", [10, 20, 30], [0.25, 0.35, 0.5], cf=False)
    paths = write_curves({"full": tmp_path / "a", "convirt": tmp_path / "b"}, tmp_path / "out")
    doc = json.loads(paths["json"].read_text())
    assert doc["curves"]["full"]["series"]["eval/structure/overall"] == [0.3, None]
    assert doc["curves"]["convirt"]["epochs"] == [1.0, 2.0, 3.0]
    assert doc["curves"]["full"]["structure_chance"] == 0.125 and doc["curves"]["full"]["retrieval_chance"] is None
    # no retrieval, no twins in either run: those panels are left out; a panel one run has is drawn
    assert doc["panels"] == ["Structure accuracy (own image ─, wrong image ‒‒, text only ··)",
                             "Image-grounding margin: own − wrong image", "Grounded margin per counterfactual edit",
                             "Zero-shot mean AUROC"]
    md = paths["markdown"].read_text()
    assert "| convirt | 30 | 3.00 | 50.0% | 20.0% | +30.0 [0.0, 30.0] | — | 0.600 |" in md
    assert _label_runs(["x=/some/run", str(tmp_path / "a")]) == {"x": "/some/run", "a": str(tmp_path / "a")}
    with pytest.raises(ValueError, match="two runs labelled 'a'"):
        _label_runs([str(tmp_path / "a"), f"a={tmp_path / 'b'}"])
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "metrics.jsonl").write_text('{"step": 1, "loss/total": 1.0}\n')
    with pytest.raises(ValueError, match="no eval/… rows"):
        write_curves({"c": tmp_path / "c"}, tmp_path / "out2")


@pytest.mark.slow
def test_two_ranks_bf16_evaluate_on_rank_0_and_finish_together(tiny_train, tmp_path: Path) -> None:
    """torchrun, ZeRO-1 bf16: rank 0 scores an fp32 copy of the 16-bit weights while rank 1 waits."""
    from pertvl.train.launch import free_port

    run = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "RANK", "LOCAL_", "MASTER_"))}
    env.pop("WORLD_SIZE", None)
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    cmd = [str(Path(sys.executable).parent / "torchrun"), "--nproc_per_node", "2", "--master_port", str(free_port()),
           "-m", "pertvl", "train", "--config", str(tiny_train.config), "--out", str(run), "--max-steps", "3",
           "--no-wandb", "--deepspeed-config", str(REPO / "ds_configs" / "cpu_zero1_bf16.json"),
           "--set", "data.num_workers=1", "--set", "train.eval_every=2", "--set", "train.eval_tasks=[structure]"]
    done = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    rows = [m for m in _jsonl(run / "metrics.jsonl") if "eval/structure/overall" in m]
    assert [m["step"] for m in rows] == [2, 3]
    ranks = [json.loads((run / "ranks" / f"rank{r}.json").read_text()) for r in range(2)]
    assert [(r["global_step"], r["finished"]) for r in ranks] == [(3, True)] * 2
    assert ranks[0]["param_sha256"] == ranks[1]["param_sha256"]
    assert "step 3 eval structure: " in done.stderr


def test_an_eval_split_the_shards_lack_fails_before_training(tmp_path: Path) -> None:
    from pertvl.evaluate.in_training import make_evaluator

    cfg = RunConfig.from_dict(load_config(None, ["train.eval_every=10", f"data.shards={tmp_path}"]))
    with pytest.raises((ValueError, FileNotFoundError), match=str(tmp_path)):
        make_evaluator(cfg)


@pytest.mark.slow
def test_a_resumed_run_has_each_evaluation_once(tiny_train, tmp_path: Path) -> None:
    """Evaluated before the checkpoint of the same step: resuming from it neither repeats nor loses one."""
    run = tmp_path / "run"
    sets = ("--set", "train.eval_every=2", "--set", "train.checkpoint_every=2", "--set", "train.eval_tasks=[zeroshot]",
            "--resume", "latest")
    for steps in (3, STEPS):  # 3 steps (checkpoint 3, evaluations 2 and 3), then resumed from it to 5
        proc, log = _start(tiny_train, run, *sets, "--max-steps", str(steps))  # the last --max-steps counts
        assert proc.wait(timeout=600) == 0, log.read_text(errors="replace")[-6000:]
    rows = _jsonl(run / "metrics.jsonl")
    assert [m["step"] for m in rows if "eval/epoch" in m] == [2, 3, 4, 5]
    assert [m["step"] for m in rows if "loss/total" in m] == [1, 2, 3, 4, 5]
    assert sorted(p.name for p in (run / "eval").iterdir()) == [f"step{s:08d}" for s in (2, 3, 4, 5)]
