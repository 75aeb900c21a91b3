"""Speed levers (pertvl.train.speed): each trains the same numbers as without it.

A tiny dual encoder (resnet-tiny at 32 px, a 4-layer BERT of width 32 with its embeddings and
first 2 layers frozen, dropout 0 so both runs draw nothing random) trains 20 SGD steps on batches
of different sizes (so the packed text batch changes shape), once with the lever off and once
on, from the same weights. fp32: every step's loss within 1e-5 relative. bf16 (16-bit weights
with fp32 masters, as DeepSpeed's bf16 engine): within BF16_BOUND relative — bf16 keeps 8
significant bits (relative rounding 2^-8 ≈ 0.4 %), a kernel that rounds differently moves each
loss by a few of those, and 20 steps of SGD carry the differences forward.
"""

from __future__ import annotations

import pytest
import torch

from pertvl.data.batch import Batch
from pertvl.data.tokenize import encode_texts
from pertvl.losses import PretrainLoss
from pertvl.model import create_model
from pertvl.train.speed import apply_levers, compile_counters

STEPS = 20
K = 3
BF16_BOUND = 4 * 2.0**-8  # relative, see the module doc
REPORTS = [
    "the lungs are clear. no pleural effusion or pneumothorax.",
    "mild cardiomegaly. small left pleural effusion with adjacent atelectasis.",
    "right lower lobe opacity may represent pneumonia. heart size is normal.",
    "no focal airspace consolidation. degenerative changes of the thoracic spine.",
    "calcified granuloma in the right upper lobe.",
    "the heart is normal in size. the mediastinum is unremarkable. no acute disease.",
]


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory, minilm_path) -> str:
    from transformers import AutoTokenizer, BertConfig, BertModel

    path = tmp_path_factory.mktemp("speed_bert")
    tok = AutoTokenizer.from_pretrained(minilm_path)
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=4, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=128, hidden_dropout_prob=0.0,
                     attention_probs_dropout_prob=0.0)
    BertModel(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


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


def _train(tiny_bert: str, dtype: torch.dtype, **levers) -> list[float]:
    """The losses of STEPS SGD steps; bf16: 16-bit model, fp32 master weights and update."""
    torch.manual_seed(0)
    model = create_model({"text_name_or_path": tiny_bert, "image_arch": "resnet-tiny", "embed_dim": 16,
                          "text_pooling": "mean", "freeze_text_layers": 2})
    apply_levers(model, **levers)
    masters = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(masters, lr=0.05, momentum=0.9)
    if dtype != torch.float32:
        masters = [p.detach().clone() for p in masters]  # the fp32 copies the optimizer steps
        opt = torch.optim.SGD(masters, lr=0.05, momentum=0.9)
        model.to(dtype)
    trained = [p for p in model.parameters() if p.requires_grad]
    loss_fn = PretrainLoss({"preset": "full"})
    losses = []
    for step in range(STEPS):
        batch = _batch(model.tokenizer, step).to("cpu", image_dtype=dtype)
        loss = loss_fn(model(batch)).total
        loss.backward()
        for master, p in zip(masters, trained, strict=True):
            if master is not p:
                master.grad = p.grad.float()
        opt.step()
        opt.zero_grad(set_to_none=True)
        for master, p in zip(masters, trained, strict=True):
            if master is not p:
                p.grad = None
                p.data.copy_(master)
        losses.append(float(loss.detach()))
    return losses


def _max_rel(a: list[float], b: list[float]) -> float:
    return max(abs(x - y) / abs(y) for x, y in zip(a, b, strict=True))


@pytest.mark.parametrize("lever", [{"channels_last": True}, {"attention_fp32": True}])
def test_lever_trains_the_same_losses(tiny_bert, lever):
    base32, on32 = _train(tiny_bert, torch.float32), _train(tiny_bert, torch.float32, **lever)
    assert _max_rel(on32, base32) <= 1e-5, (on32, base32)
    base16, on16 = _train(tiny_bert, torch.bfloat16), _train(tiny_bert, torch.bfloat16, **lever)
    assert _max_rel(on16, base16) <= BF16_BOUND, (on16, base16)
    assert base16 != base32  # the bf16 runs did run in bf16


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
    reason = _inductor_builds()
    if reason:
        pytest.skip(reason)
    torch._dynamo.reset()
    base = _train(tiny_bert, torch.float32)
    before = compile_counters()
    on = _train(tiny_bert, torch.float32, compile="text")
    after = compile_counters()
    assert _max_rel(on, base) <= 1e-5, (on, base)
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
    with pytest.raises(ValueError, match="train.compile"):
        apply_levers(model, compile="yes")


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
