"""Speed levers (pertvl.train.speed): each trains the same numbers as without it.

A tiny dual encoder (resnet-tiny at 32 px, a 4-layer BERT of width 32 with its embeddings and
first 2 layers frozen, dropout 0 so nothing random is drawn) trains 20 SGD steps on batches of
different sizes (so the packed text batch changes shape). At every step a second copy with the
lever on gets the same weights and the same batch, and its loss and gradients are compared with
the lever-off model's: fp32 losses within 1e-5 relative (gradients: GRAD_BOUND_FP32); bf16 (16-bit weights with fp32 masters, as
DeepSpeed's bf16 engine) within BF16_BOUND relative — bf16 keeps 8 significant bits (relative
rounding 2^-8 ≈ 0.4 %), and a kernel that rounds differently moves the loss by a few of those.
Step by step rather than two free runs: this tiny model's training amplifies any difference
about tenfold per step (a 6e-6 difference at step 1 of two free fp32 runs is 1e-3 at step 3 and
10-40 % by step 10, BatchNorm over 3-6 images of 1x1 maps), so two free runs compare the
model's chaos, not the lever.
"""

from __future__ import annotations

import os

import pytest
import torch
from conftest import save_tiny_bert

from pertvl.config import TrainConfig
from pertvl.data.batch import Batch
from pertvl.data.tokenize import encode_texts
from pertvl.errors import ConfigError
from pertvl.losses import PretrainLoss
from pertvl.model import create_model
from pertvl.train.speed import apply_levers

STEPS = 20
K = 3
BF16_BOUND = 4 * 2.0**-8  # relative, see the module doc
# fp32 gradients, relative to the largest gradient: BatchNorm over 3-6 images of tiny maps divides
# by a small spread, which magnifies a convolution's reordered sums (1.1e-4 measured). In bf16 the
# same magnification makes single gradient entries differ by up to the largest gradient at some
# steps (lever or not: two bf16 kernels), so bf16 is held to the loss.
GRAD_BOUND_FP32 = 1e-3
REPORTS = [
    "the lungs are clear. no pleural effusion or pneumothorax.",
    "mild cardiomegaly. small left pleural effusion with adjacent atelectasis.",
    "right lower lobe opacity may represent pneumonia. heart size is normal.",
    "no focal airspace consolidation. degenerative changes of the thoracic spine.",
    "calcified granuloma in the right upper lobe.",
    "the heart is normal in size. the mediastinum is unremarkable. no acute disease.",
]


def compile_counters() -> dict[str, int]:
    """Graphs compiled, graph breaks and recompilations so far in this process (torch._dynamo)."""
    from torch._dynamo.utils import counters

    return {
        "graphs": int(counters["stats"]["unique_graphs"]),
        "graph_breaks": int(sum(counters["graph_break"].values())),
        "recompiles": int(sum(counters["recompiles"].values())),
        "frames": int(counters["frames"]["ok"]),
    }


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory, minilm_path) -> str:
    return save_tiny_bert(tmp_path_factory.mktemp("speed_bert"), minilm_path, layers=4, seed=0,
                          hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


def _batch(tokenizer, step: int) -> Batch:
    """Step `step`'s batch: 3 to 6 reports, K word rotations each, some invalid."""
    g = torch.Generator().manual_seed(step)
    b = 3 + step % 4
    texts = [REPORTS[(step + i) % len(REPORTS)] for i in range(b)]
    perts = [" ".join(t.split()[k + 1:] + t.split()[:k + 1]) for t in texts for k in range(K)]
    enc, penc = encode_texts(tokenizer, texts), encode_texts(tokenizer, perts)
    lp = penc.input_ids.shape[1]
    return Batch(images=torch.rand(b, 1, 32, 32, generator=g), input_ids=torch.from_numpy(enc.input_ids),
                 attention_mask=torch.from_numpy(enc.attention_mask), word_ids=torch.from_numpy(enc.word_ids),
                 pert_input_ids=torch.from_numpy(penc.input_ids).view(b, K, lp),
                 pert_attention_mask=torch.from_numpy(penc.attention_mask).view(b, K, lp),
                 pert_valid=torch.rand(b, K, generator=g) > 0.3, texts=texts)


def _model(tiny_bert: str, dtype: torch.dtype, **levers):
    torch.manual_seed(0)
    model = create_model({"text_name_or_path": tiny_bert, "image_arch": "resnet-tiny", "embed_dim": 16,
                          "text_pooling": "mean", "freeze_text_layers": 2})
    apply_levers(model, **levers)
    return model.to(dtype)


def _grads(model, loss_fn, batch) -> tuple[float, list[torch.Tensor]]:
    loss = loss_fn(model(batch)).total
    loss.backward()
    grads = [p.grad.float() for p in model.parameters() if p.requires_grad]
    model.zero_grad(set_to_none=True)
    return float(loss.detach()), grads


def _compare(tiny_bert: str, dtype: torch.dtype, **levers) -> tuple[float, float, list[float]]:
    """STEPS SGD steps of the lever-off model (fp32 masters when 16-bit); at each, the lever-on copy
    with the same weights. Returns the largest relative loss difference, the largest gradient
    difference relative to the largest gradient, and the lever-off losses."""
    off, on = _model(tiny_bert, dtype), _model(tiny_bert, dtype, **levers)
    trained = [p for p in off.parameters() if p.requires_grad]
    masters = [p.detach().float().clone().requires_grad_() for p in trained]
    opt = torch.optim.SGD(masters, lr=0.05, momentum=0.9)
    loss_fn = PretrainLoss({"preset": "full"})
    worst_loss = worst_grad = 0.0
    losses = []
    for step in range(STEPS):
        on.load_state_dict(off.state_dict())
        batch = _batch(off.tokenizer, step).to("cpu", image_dtype=dtype)
        loss_off, g_off = _grads(off, loss_fn, batch)
        loss_on, g_on = _grads(on, loss_fn, batch)
        worst_loss = max(worst_loss, abs(loss_on - loss_off) / abs(loss_off))
        scale = max(float(g.abs().max()) for g in g_off)
        worst_grad = max(worst_grad, max(float((a - b).abs().max()) for a, b in zip(g_on, g_off, strict=True)) / scale)
        for master, g in zip(masters, g_off, strict=True):
            master.grad = g
        opt.step()
        with torch.no_grad():
            for p, master in zip(trained, masters, strict=True):
                p.copy_(master)
        losses.append(loss_off)
    return worst_loss, worst_grad, losses


@pytest.fixture(autouse=True)
def _one_thread():
    """One thread: the tiny model's ops are too small to share; on a busy machine two threads
    mostly wait for each other (the numbers do not depend on it)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("lever", [{"channels_last": True}, {"attention_fp32": True}])
def test_lever_trains_the_same_losses(tiny_bert, lever):
    loss32, grad32, losses32 = _compare(tiny_bert, torch.float32, **lever)
    assert loss32 <= 1e-5 and grad32 <= GRAD_BOUND_FP32, (loss32, grad32)
    loss16, _, losses16 = _compare(tiny_bert, torch.bfloat16, **lever)
    assert loss16 <= BF16_BOUND, loss16
    assert losses16 != losses32  # the bf16 runs did run in bf16
    if "attention_fp32" in lever:  # it changes the bf16 kernels only; fp32 runs it unchanged
        assert loss32 == 0.0 and grad32 == 0.0 and loss16 > 0.0  # and in bf16 it is on


def _inductor_builds() -> str | None:
    """None when torch.compile (inductor) builds and runs a kernel here, else the reason."""
    try:
        fn = torch.compile(lambda x: x * 2 + 1)
        if not torch.equal(fn(torch.ones(3)), torch.full((3,), 3.0)):
            return "inductor's kernel gave a wrong result"
    except Exception as exc:  # no C++ compiler, no Python headers, …
        return f"inductor cannot build a kernel here: {type(exc).__name__}: {str(exc)[:200]}"
    return None


@pytest.mark.slow
def test_compiled_text_tower_trains_the_same_losses_without_recompiling(tiny_bert):
    """fp32 only: inductor's fused kernels reorder float sums, within 1e-5 of eager."""
    if os.environ.get("PERTVL_TEST_COMPILE") != "1":
        pytest.skip("compiling the text tower takes minutes on a small CPU; PERTVL_TEST_COMPILE=1 runs it")
    reason = _inductor_builds()
    if reason:
        pytest.skip(reason)
    torch._dynamo.reset()
    before = compile_counters()
    worst_loss, worst_grad, _ = _compare(tiny_bert, torch.float32, compile="text")
    after = compile_counters()
    assert worst_loss <= 1e-5 and worst_grad <= 1e-5, (worst_loss, worst_grad)
    # batches of 3 to 6 reports: the packed rows and their length change, the graphs do not
    assert after["graph_breaks"] == before["graph_breaks"]
    assert after["recompiles"] == before["recompiles"]
    assert after["frames"] > before["frames"]  # it did compile


def test_compile_keeps_the_state_dict_keys(tiny_bert):
    """Checkpoints, resume and export read the same keys from a compiled model (no `_orig_mod.`)."""
    model = create_model({"text_name_or_path": tiny_bert, "image_arch": "resnet-tiny", "embed_dim": 16})
    keys = list(model.state_dict())
    apply_levers(model, compile="all")
    assert list(model.state_dict()) == keys
    with pytest.raises(ConfigError, match="train.compile"):  # checked where the config is read
        TrainConfig(compile="yes")


def test_frozen_prefix_records_nothing_for_backward(tiny_bert):
    """The frozen embeddings and layers keep no tensor for backward and pass on no gradient, so the
    first trainable layer computes no input gradient: autograd already does the lever's work."""
    model = create_model({"text_name_or_path": tiny_bert, "image_arch": "resnet-tiny", "embed_dim": 16,
                          "freeze_text_layers": 2})
    backbone = model.text.backbone
    where, saved, grad_in = ["outside"], {}, {}

    def enter(name):
        def hook(module, args):
            where[0] = name
            if args and isinstance(args[0], torch.Tensor) and args[0].is_floating_point():
                grad_in[name] = args[0].requires_grad
        return hook

    def count(t):
        saved[where[0]] = saved.get(where[0], 0) + t.numel()
        return t

    backbone.embeddings.register_forward_pre_hook(enter("embeddings"))
    for i, layer in enumerate(backbone.encoder.layer):
        layer.register_forward_pre_hook(enter(f"layer{i}"))
    batch = _batch(model.tokenizer, 0)
    with torch.autograd.graph.saved_tensors_hooks(count, lambda t: t):
        hidden = model.text.hidden_states(batch.input_ids, batch.attention_mask, pack=True)
    assert hidden.requires_grad
    assert "embeddings" not in saved and "layer0" not in saved and "layer1" not in saved, saved
    assert saved["layer2"] > 0 and saved["layer3"] > 0
    assert grad_in == {"layer0": False, "layer1": False, "layer2": False, "layer3": True}


@pytest.mark.slow
def test_bench_gpu_sweep_runs_on_cpu_quick(tmp_path):
    """bench/bench_gpu.py --sweep in its CPU form: one run per lever, one JSON and one Markdown
    table whose rows are the runs' own numbers."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(repo), env.get("PYTHONPATH", "")) if p)
    out = tmp_path / "sweep.json"
    proc = subprocess.run([sys.executable, "bench/bench_gpu.py", "--cpu", "--quick", "--sweep", "--levers",
                           "channels_last", "--budget-s", "100000", "--json", str(out)], cwd=repo, env=env, capture_output=True, text=True,
                          timeout=900)  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    levers = json.loads(out.read_text())["levers"]
    assert list(levers) == ["baseline", "channels_last"]
    assert levers["channels_last"]["overrides"] == ["train.channels_last=true"]
    table = out.with_suffix(".md").read_text()
    for name, r in levers.items():
        ratio = r["pairs_per_s_steady"] / levers["baseline"]["pairs_per_s_steady"]
        assert f"| {name} | " in table and f"| {r['pairs_per_s_steady']:.1f} | {ratio:.2f} |" in table
        assert r["steps"] == 12 and r["warmup_s"] >= 0
