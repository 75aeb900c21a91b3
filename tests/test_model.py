"""The dual encoder: contract shapes, one text pass per forward, word aggregation by hand,
perturbation gather/scatter, need_* flags, trust_remote_code pass-through, save/load round trip."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import save_tiny_bert

from pertvl.data.batch import Batch
from pertvl.data.records import PERTURBATION_TYPES
from pertvl.data.text import clean_text
from pertvl.data.tokenize import encode_texts
from pertvl.losses import LossConfig, PretrainLoss
from pertvl.model import DualEncoder, DualEncoderConfig, aggregate_words, create_model

K = len(PERTURBATION_TYPES)
REPORTS = [
    "The lungs are clear. There is no pleural effusion or pneumothorax.",
    "Heart size is normal; small left pneumothorax.",
    "Stable cardiomegaly",
]


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory, minilm_path) -> str:
    """A 2-layer, 32-wide random BERT with MiniLM's WordPiece tokenizer (fast model tests)."""
    return save_tiny_bert(tmp_path_factory.mktemp("tiny_bert"), minilm_path, layers=2, seed=0)


def _model(tiny_bert, **kw) -> DualEncoder:
    torch.manual_seed(0)
    return create_model({"text_name_or_path": tiny_bert, "embed_dim": 16, "local_dim": 24, **kw})


def tokenize(model, texts: list[str]) -> dict[str, torch.Tensor]:
    """Reports -> input_ids/attention_mask/word_ids tensors [N, L] (clean_text, then encode_texts)."""
    enc = encode_texts(model.tokenizer, [clean_text(t) for t in texts], model.config.max_length)
    return {k: torch.from_numpy(getattr(enc, k)) for k in ("input_ids", "attention_mask", "word_ids")}


def make_batch(tokenizer, image_size: int = 64, valid: torch.Tensor | None = None) -> Batch:
    """Originals + word-order perturbations (rotations by k+1 words); `valid` masks some."""
    texts = [clean_text(t) for t in REPORTS]
    b = len(texts)
    enc = encode_texts(tokenizer, texts)
    perts = []
    for t in texts:
        words = t.split()
        perts += [" ".join(words[(k + 1) % len(words):] + words[:(k + 1) % len(words)]) for k in range(K)]
    penc = encode_texts(tokenizer, perts)
    lp = penc.input_ids.shape[1]
    if valid is None:
        valid = torch.rand(b, K, generator=torch.Generator().manual_seed(1)) > 0.3
        valid[2] = False  # one report with no valid perturbation
    g = torch.Generator().manual_seed(2)
    return Batch(
        images=torch.rand(b, 1, image_size, image_size, generator=g),
        input_ids=torch.from_numpy(enc.input_ids),
        attention_mask=torch.from_numpy(enc.attention_mask),
        word_ids=torch.from_numpy(enc.word_ids),
        pert_input_ids=torch.from_numpy(penc.input_ids).view(b, K, lp),
        pert_attention_mask=torch.from_numpy(penc.attention_mask).view(b, K, lp),
        pert_valid=valid,
        texts=texts,
    )


def _count_calls(module: torch.nn.Module) -> list[int]:
    """Rows of each forward call of `module` (input_ids or pixel_values)."""
    rows: list[int] = []

    def hook(mod, args, kwargs):
        x = kwargs.get("input_ids") if kwargs.get("input_ids") is not None else kwargs.get("pixel_values", args[0] if args else None)
        rows.append(int(x.shape[0]))

    module.register_forward_pre_hook(hook, with_kwargs=True)
    return rows


def test_forward_gives_the_contract_shapes_with_one_pass_per_tower(tiny_bert):
    model = _model(tiny_bert)
    assert model.pack_texts  # a BertModel with sdpa attention packs by default
    batch = make_batch(model.tokenizer)
    text_rows, image_rows = _count_calls(model.text.backbone), _count_calls(model.image.backbone)
    out = model(batch)
    b, d, dl = 3, 16, 24
    n_valid = int(batch.pert_valid.sum())
    assert len(text_rows) == 1, "one text pass over the originals and the valid perturbations"
    assert text_rows[0] < b + n_valid, "several texts per packed row"
    assert image_rows == [b], "one image backbone pass"
    model.pack_texts = False
    model(batch)
    assert text_rows[1:] == [b + n_valid], "unpacked: one row per text"
    words = [len(t.split()) for t in batch.texts]
    assert out.image.global_emb.shape == (b, d)
    assert out.image.grid == (4, 4)  # resnet-tiny at 64 px: stage 3 is 1/16
    assert out.image.regions.shape == (b, 16, dl)
    assert out.text.global_emb.shape == (b, d)
    assert out.text.words.shape == (b, max(words), dl) and out.text.word_mask.dtype == torch.bool
    assert out.text.word_mask.sum(1).tolist() == words
    assert torch.all(out.text.words[~out.text.word_mask] == 0)
    assert out.pert_emb.shape == (b, K, d) and torch.equal(out.pert_valid, batch.pert_valid)
    assert torch.all(out.pert_emb[~batch.pert_valid] == 0) and torch.all(out.pert_emb[batch.pert_valid] != 0)
    assert out.logit_scale is None


def test_one_pass_equals_encoding_each_text_alone(tiny_bert):
    """Gather/pad/scatter is exact: each embedding equals its text encoded on its own."""
    model = _model(tiny_bert).eval()
    batch = make_batch(model.tokenizer)
    with torch.no_grad():
        out = model(batch)
        for i in range(3):
            n = int(batch.attention_mask[i].sum())
            alone = model.encode_text(batch.input_ids[i:i + 1, :n], batch.attention_mask[i:i + 1, :n],
                                      batch.word_ids[i:i + 1, :n])
            torch.testing.assert_close(out.text.global_emb[i], alone.global_emb[0], rtol=1e-5, atol=1e-6)
            # The batch has max-words slots, the text alone W = L static slots: compare the common ones.
            w = min(out.text.words.shape[1], alone.words.shape[1])
            torch.testing.assert_close(out.text.words[i, :w], alone.words[0, :w], rtol=1e-5, atol=1e-6)
            assert torch.equal(out.text.word_mask[i, :w], alone.word_mask[0, :w])
            assert not out.text.word_mask[i, w:].any() and not alone.word_mask[0, w:].any()
            for k in range(K):
                if batch.pert_valid[i, k]:
                    m = int(batch.pert_attention_mask[i, k].sum())
                    e = model.encode_text(batch.pert_input_ids[i, k:k + 1, :m], batch.pert_attention_mask[i, k:k + 1, :m],
                                          need_local=False).global_emb[0]
                    torch.testing.assert_close(out.pert_emb[i, k], e, rtol=1e-5, atol=1e-6)


def test_packed_pass_equals_padded_pass(tiny_bert):
    from pertvl.model.text import pack_lengths

    place, rows = pack_lengths([5, 9, 3, 4, 9, 1], 9)
    assert rows == 4  # 9 | 9 | 5+4 | 3+1
    slots = {}
    for i, (r, o) in enumerate(place):
        n = [5, 9, 3, 4, 9, 1][i]
        assert o + n <= 9
        for t in range(o, o + n):
            assert (r, t) not in slots
            slots[r, t] = i
    model = _model(tiny_bert).eval()
    batch = make_batch(model.tokenizer)
    ids = torch.cat([batch.input_ids, batch.pert_input_ids[:, :, :batch.input_ids.shape[1]].reshape(-1, batch.input_ids.shape[1])])
    mask = torch.cat([batch.attention_mask, batch.pert_attention_mask[:, :, :ids.shape[1]].reshape(-1, ids.shape[1])])
    with torch.no_grad():
        padded = model.text.hidden_states(ids, mask)
        packed = model.text.hidden_states(ids, mask, pack=True)
        real = mask.bool()
        torch.testing.assert_close(packed[real], padded[real], rtol=1e-5, atol=1e-5)
        assert torch.all(packed[~real] == 0)
        model.text.backbone.set_attn_implementation("eager")  # additive float mask instead of bool
        torch.testing.assert_close(model.text.hidden_states(ids, mask, pack=True)[real], padded[real],
                                   rtol=1e-5, atol=1e-5)
        model.text.backbone.set_attn_implementation("sdpa")
        a = model(batch)
        model.pack_texts = False
        b = model(batch)
    for x, y in [(a.text.global_emb, b.text.global_emb), (a.text.words, b.text.words), (a.pert_emb, b.pert_emb)]:
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5)


def test_need_flags_skip_work_and_the_loss_trains_every_used_parameter(tiny_bert):
    model = _model(tiny_bert, learnable_temperature=True)
    batch = make_batch(model.tokenizer)
    model.pack_texts = False
    text_rows = _count_calls(model.text.backbone)
    out = model(batch, need_local=False, need_perturbations=False)
    assert text_rows == [3] and out.pert_emb is None and out.image.regions is None and out.text.words is None
    loss = PretrainLoss(LossConfig(preset="convirt"))(out)
    loss.total.backward()
    local_heads = {"image.local_proj.weight", "image.local_proj.bias", "text.word_proj.weight", "text.word_proj.bias"}
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert (p.grad is None) == (name in local_heads), name
    model.zero_grad(set_to_none=True)
    out = model(batch)
    assert out.logit_scale.shape == (1,) and abs(out.logit_scale.item() - 1 / 0.07) < 1e-4
    PretrainLoss(LossConfig(preset="full"))(out).total.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    assert model.logit_scale.shape == (1,)  # never 0-dim (DeepSpeed)


def test_no_valid_perturbation_at_all(tiny_bert):
    model = _model(tiny_bert)
    model.pack_texts = False
    batch = make_batch(model.tokenizer, valid=torch.zeros(3, K, dtype=torch.bool))
    rows = _count_calls(model.text.backbone)
    out = model(batch)
    assert rows == [3] and torch.all(out.pert_emb == 0)
    assert PretrainLoss({"preset": "no_local"})(out).terms["pert"].item() == 0.0


def test_word_aggregation_by_hand_minilm(minilm_path):
    """MiniLM splits "pneumothorax" into 6 pieces; its word vector is their mean."""
    model = create_model({"text_name_or_path": minilm_path, "image_arch": "resnet-tiny"}).eval()
    text = clean_text("Small left pneumothorax.")
    enc = tokenize(model, [text])
    tokens = model.tokenizer.convert_ids_to_tokens(enc["input_ids"][0].tolist())
    assert tokens == ["[CLS]", "small", "left", "p", "##ne", "##um", "##otho", "##ra", "##x", "[SEP]"]
    assert enc["word_ids"][0].tolist() == [-1, 0, 1, 2, 2, 2, 2, 2, 2, -1]
    with torch.no_grad():
        hidden = model.text.hidden_states(enc["input_ids"], enc["attention_mask"])[0]
        out = model.encode_text(enc["input_ids"], enc["attention_mask"], enc["word_ids"])
        by_hand = torch.stack([hidden[1], hidden[2], hidden[3:9].mean(0)])
        torch.testing.assert_close(out.words[0, :3], model.text.word_proj(by_hand), rtol=1e-5, atol=1e-6)
        # W = L static slots by default: 3 real words, 7 empty slots.
        assert out.words.shape[1] == 10 and out.word_mask[0].tolist() == [True] * 3 + [False] * 7
        torch.testing.assert_close(out.global_emb[0], model.text.global_proj(hidden[0]))


def test_aggregate_words_small_example_and_mean_pooling(tiny_bert):
    hidden = torch.arange(2 * 5 * 2, dtype=torch.float32).view(2, 5, 2)
    word_ids = torch.tensor([[-1, 0, 0, 1, -1], [-1, 0, 1, 1, 1]])
    words, mask = aggregate_words(hidden, word_ids, num_words=3)
    assert mask.tolist() == [[True, True, False], [True, True, False]]
    torch.testing.assert_close(words[0], torch.tensor([[3.0, 4.0], [6.0, 7.0], [0.0, 0.0]]))
    torch.testing.assert_close(words[1], torch.tensor([[12.0, 13.0], [16.0, 17.0], [0.0, 0.0]]))
    with pytest.raises(ValueError, match=r"expected hidden \[N, L, H\] and word_ids \[N, L\]"):
        aggregate_words(hidden, word_ids[:, :4])
    model = _model(tiny_bert, text_pooling="mean").eval()
    enc = tokenize(model, ["small left pneumothorax", "clear"])
    with torch.no_grad():
        h = model.text.hidden_states(enc["input_ids"], enc["attention_mask"])
        emb = model.encode_text(enc["input_ids"], enc["attention_mask"], need_local=False).global_emb
        torch.testing.assert_close(emb[1], model.text.global_proj(h[1, 1:2].mean(0)))  # [CLS] clear [SEP] pad...
        torch.testing.assert_close(emb[0], model.text.global_proj(h[0, 1:9].mean(0)))


@pytest.fixture(scope="module")
def tiny_bert4(tmp_path_factory, minilm_path) -> str:
    """A 4-layer, 32-wide random BERT (seeded, no download) with MiniLM's tokenizer: GLoRIA's word
    features sum the last 4 hidden states."""
    return save_tiny_bert(tmp_path_factory.mktemp("tiny_bert4"), minilm_path, layers=4, seed=1)


def _gloria_words_by_hand(tokens: list[str], hidden_states: tuple, row: int) -> torch.Tensor:
    """GLoRIA's BertEncoder.aggregate_tokens + local_loss slice, written out: per layer of the last
    4, a word = the sum of its pieces ("##" continues a word; [CLS] is a word; stop at [SEP]); the
    layers are summed; local_loss keeps the first (words not starting with "[") + 1 slots."""
    per_layer = []
    for layer in hidden_states[-4:]:
        words, bank = [], []
        for t, tok in enumerate(tokens):
            if tok == "[SEP]":
                words.append(torch.stack(bank).sum(0))
                break
            if tok.startswith("##"):
                bank.append(layer[row, t])
            else:
                if bank:
                    words.append(torch.stack(bank).sum(0))
                bank = [layer[row, t]]
        per_layer.append(torch.stack(words))
    summed = torch.stack(per_layer).sum(0)
    cap_len = len([t for t in tokens[:tokens.index("[SEP]")] if not t.startswith(("[", "##"))]) + 1
    return summed[:cap_len]


def test_gloria_word_features_equal_a_hand_computation(tiny_bert4):
    model = _model(tiny_bert4, word_features="gloria").double().eval()
    assert model.text.word_features == "gloria"
    reports = [clean_text(t) for t in REPORTS] + [clean_text("Small left pneumothorax.")]
    enc = tokenize(model, reports)
    with torch.no_grad():
        out = model.encode_text(enc["input_ids"], enc["attention_mask"], enc["word_ids"])
        hs = model.text.backbone(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"],
                                 output_hidden_states=True).hidden_states
        assert len(hs) == 5  # embeddings + 4 layers: the last 4 are the 4 layers
        for i, text in enumerate(reports):
            n = int(enc["attention_mask"][i].sum())
            tokens = model.tokenizer.convert_ids_to_tokens(enc["input_ids"][i, :n].tolist())
            by_hand = _gloria_words_by_hand(tokens, hs, i)
            assert by_hand.shape[0] == len(text.split()) + 1  # [CLS] + the words; [SEP] is not kept
            assert out.word_mask[i].sum().item() == by_hand.shape[0]
            assert not out.word_mask[i, by_hand.shape[0]:].any()
            torch.testing.assert_close(out.words[i, :by_hand.shape[0]], model.text.word_proj(by_hand),
                                       rtol=1e-12, atol=1e-12)
        # "pneumothorax" is 6 word pieces: GLoRIA SUMS them (the paper's features average them).
        last = len(reports) - 1
        assert model.tokenizer.convert_ids_to_tokens(enc["input_ids"][last, 3:9].tolist())[1] == "##ne"
        pieces = sum(h[last, 3:9] for h in hs[-4:]).sum(0)
        torch.testing.assert_close(out.words[last, 3], model.text.word_proj(pieces), rtol=1e-12, atol=1e-12)
        # The training forward (one packed pass, batch word slots) gives the same word features.
        batch = make_batch(model.tokenizer)
        batch.images = batch.images.double()
        train = model(batch)
        for i in range(3):
            n = int(batch.attention_mask[i].sum())
            alone = model.encode_text(batch.input_ids[i:i + 1, :n], batch.attention_mask[i:i + 1, :n],
                                      batch.word_ids[i:i + 1, :n])
            w = int(alone.word_mask.sum())
            assert w == len(batch.texts[i].split()) + 1 and int(train.text.word_mask[i].sum()) == w
            torch.testing.assert_close(train.text.words[i, :w], alone.words[0, :w], rtol=1e-9, atol=1e-9)


def test_word_features_default_is_the_papers_and_gloria_needs_4_hidden_states(tiny_bert):
    assert DualEncoderConfig().word_features == "paper"
    model = _model(tiny_bert).eval()
    enc = tokenize(model, [clean_text(REPORTS[0])])
    with torch.no_grad():
        hidden = model.text.hidden_states(enc["input_ids"], enc["attention_mask"])
        out = model.encode_text(enc["input_ids"], enc["attention_mask"], enc["word_ids"])
    words, _ = aggregate_words(hidden, enc["word_ids"])  # last layer, pieces averaged, no [CLS]/[SEP]
    assert torch.equal(out.words, model.text.word_proj(words) * out.word_mask.unsqueeze(-1).float())
    with pytest.raises(ValueError, match=r"word_features: expected one of \('paper', 'gloria'\), got 'last4'"):
        DualEncoderConfig(word_features="last4")
    with pytest.raises(ValueError, match="word_features 'gloria' sums the last 4 hidden states; BertModel has 2 layers"):
        _model(tiny_bert, word_features="gloria")
    with pytest.raises(ValueError, match="pass word_hidden from TextEncoder.states"):
        gl = model.text
        gl.word_features = "gloria"
        gl.outputs(hidden, enc["input_ids"], enc["attention_mask"], enc["word_ids"])


def test_word_aggregation_exports_without_data_dependent_shapes():
    """With W = L (num_words=None) the word mean traces with a dynamic batch and length."""

    class Agg(torch.nn.Module):
        def forward(self, hidden, word_ids):
            return aggregate_words(hidden, word_ids)

    hidden, word_ids = torch.randn(2, 7, 4), torch.tensor([[-1, 0, 0, 1, -1, -1, -1], [-1, 0, 1, 2, 2, 3, -1]])
    batch, length = torch.export.Dim("batch"), torch.export.Dim("length")
    ep = torch.export.export(Agg(), (hidden, word_ids), dynamic_shapes=({0: batch, 1: length}, {0: batch, 1: length}))
    h2, w2 = torch.randn(3, 5, 4), torch.tensor([[-1, 0, 1, -1, -1], [-1, 0, 0, 0, -1], [-1, 0, 1, 2, -1]])
    for a, b in zip(ep.module()(h2, w2), aggregate_words(h2, w2), strict=True):
        torch.testing.assert_close(a, b)


def test_image_tower_normalizes_inside_and_repeats_grayscale(tiny_bert):
    model = _model(tiny_bert, image_mean=[0.5, 0.5, 0.5], image_std=[0.25, 0.25, 0.25]).eval()
    gray = torch.rand(2, 1, 128, 128)
    with torch.no_grad():
        a = model.encode_image(gray)
        b = model.encode_image(gray.expand(-1, 3, -1, -1).contiguous())
        ref = model.image.backbone((gray.expand(-1, 3, -1, -1) - 0.5) / 0.25).pooler_output.flatten(1)
    torch.testing.assert_close(a.global_emb, b.global_emb)
    torch.testing.assert_close(a.global_emb, model.image.global_proj(ref))
    assert a.grid == (8, 8) and a.regions.shape == (2, 64, 24)
    with pytest.raises(ValueError, match=r"expected \[B, 1\|3, H, W\], got shape \(2, 2, 8, 8\)"):
        model.encode_image(torch.rand(2, 2, 8, 8))


def test_paper_resnet50_configuration_builds():
    from pertvl.model.image import build_resnet

    net = build_resnet("resnet50")
    assert net.config.hidden_sizes == [256, 512, 1024, 2048] and net.config.layer_type == "bottleneck"
    with pytest.raises(ValueError, match="image_arch: expected one of"):
        DualEncoderConfig(image_arch="resnet51")


def test_trust_remote_code_is_opt_in_and_passed_through(monkeypatch):
    import transformers

    seen = []

    class HubContacted(Exception):
        pass

    def fake_from_pretrained(name, **kwargs):
        seen.append((name, kwargs.get("trust_remote_code")))
        raise HubContacted(name)

    monkeypatch.setattr(transformers.AutoModel, "from_pretrained", fake_from_pretrained)
    cxr = "microsoft/BiomedVLP-CXR-BERT-specialized"
    with pytest.raises(HubContacted):
        create_model({"text_name_or_path": cxr, "trust_remote_code": True})
    with pytest.raises(HubContacted):
        create_model({"text_name_or_path": cxr})
    assert seen == [(cxr, True), (cxr, False)]


def test_encoder_of_a_wrapper_checkpoint_is_used(tiny_bert, monkeypatch, tmp_path):
    """Checkpoints with heads (CXR-BERT = BertForMaskedLM + projection): only the encoder is kept."""
    import transformers
    from transformers import BertConfig, BertForMaskedLM, BertModel

    real = transformers.AutoModel.from_pretrained
    calls = []

    def wrapped(name, **kwargs):
        calls.append(name)
        if len(calls) == 1:
            return BertForMaskedLM(BertConfig.from_pretrained(name))
        return real(name, **kwargs)

    monkeypatch.setattr(transformers.AutoModel, "from_pretrained", wrapped)
    model = _model(tiny_bert).eval()
    assert type(model.text.backbone) is BertModel and not any("cls." in n for n, _ in model.named_parameters())
    model.save_pretrained(tmp_path / "m")
    loaded = DualEncoder.from_pretrained(tmp_path / "m").eval()
    batch = make_batch(model.tokenizer)
    with torch.no_grad():
        torch.testing.assert_close(model(batch).pert_emb, loaded(batch).pert_emb)


def test_save_pretrained_round_trip(tiny_bert, tmp_path):
    from transformers import AutoModel, AutoTokenizer, ResNetModel

    model = _model(tiny_bert, learnable_temperature=True, projection="mlp").eval()
    with torch.no_grad():
        model.logit_scale.fill_(2.5)
    out_dir = model.save_pretrained(tmp_path / "model")
    meta = json.loads((out_dir / "config.json").read_text())
    assert meta["format"] == "pertvl-dual-encoder/1" and meta["config"]["projection"] == "mlp"
    # The towers are readable by transformers on their own.
    bert = AutoModel.from_pretrained(out_dir / "text_encoder")
    tok = AutoTokenizer.from_pretrained(out_dir / "text_encoder")
    assert (out_dir / "text_encoder" / "tokenizer.json").is_file()
    assert tok("pneumothorax")["input_ids"] == model.tokenizer("pneumothorax")["input_ids"]
    torch.testing.assert_close(bert.embeddings.word_embeddings.weight, model.text.backbone.embeddings.word_embeddings.weight)
    resnet = ResNetModel.from_pretrained(out_dir / "image_encoder")
    torch.testing.assert_close(resnet.embedder.embedder.convolution.weight,
                               model.image.backbone.embedder.embedder.convolution.weight)
    loaded = DualEncoder.from_pretrained(out_dir).eval()
    assert loaded.config.projection == "mlp" and loaded.config.learnable_temperature
    batch = make_batch(model.tokenizer)
    with torch.no_grad():
        a, b = model(batch), loaded(batch)
    for x, y in [(a.image.global_emb, b.image.global_emb), (a.image.regions, b.image.regions),
                 (a.text.global_emb, b.text.global_emb), (a.text.words, b.text.words),
                 (a.pert_emb, b.pert_emb), (a.logit_scale, b.logit_scale)]:
        assert torch.equal(x, y)
    with pytest.raises(FileNotFoundError, match="no pertvl model config"):
        DualEncoder.from_pretrained(tmp_path)


@pytest.mark.parametrize("frozen_dropout", [True, False])
def test_frozen_text_dropout_switches_the_frozen_prefix_to_eval_mode(tiny_bert, frozen_dropout):
    """frozen_text_dropout false: in train mode the frozen prefix runs without dropout (what enters
    the first trainable layer is the same in every forward) while the trainable layers still drop
    out; true (the default) drops out everywhere. eval() turns everything off either way."""
    model = _model(tiny_bert, freeze_text_layers=1, frozen_text_dropout=frozen_dropout).train()
    bb = model.text.backbone
    assert bb.embeddings.training == bb.encoder.layer[0].training == frozen_dropout
    assert bb.encoder.layer[1].training and model.text.training and model.image.training
    enc = encode_texts(model.tokenizer, [clean_text(t) for t in REPORTS])
    entering, last = [], []
    hook = bb.encoder.layer[1].register_forward_pre_hook(lambda m, args: entering.append(args[0].detach()))
    for seed in (1, 2):
        torch.manual_seed(seed)
        ids, mask = torch.as_tensor(enc.input_ids), torch.as_tensor(enc.attention_mask)
        last.append(model.text.hidden_states(ids, mask).detach())
    hook.remove()
    assert torch.equal(entering[0], entering[1]) != frozen_dropout
    assert not torch.equal(last[0], last[1])  # the trainable layer's dropout
    model.eval()
    assert not any(m.training for m in model.modules())


def test_config_validation_and_freezing(tiny_bert):
    with pytest.raises(ValueError, match=r"unknown keys \['embed_dims'\]"):
        create_model({"embed_dims": 3})
    with pytest.raises(ValueError, match="text_pooling: expected one of"):
        DualEncoderConfig(text_pooling="max")
    model = _model(tiny_bert, freeze_text_layers=1)
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert any(n.startswith("text.backbone.embeddings.") for n in frozen)
    assert any(n.startswith("text.backbone.encoder.layer.0.") for n in frozen)
    assert not any(n.startswith("text.backbone.encoder.layer.1.") for n in frozen)
    with pytest.raises(ValueError, match="at most 2 layers"):
        _model(tiny_bert, freeze_text_layers=3)


def test_attention_pool_matches_torch_multihead_attention_and_keeps_the_side():
    """AttentionPool2d against nn.MultiheadAttention with the same weights (CLIP's reference uses
    F.multi_head_attention_forward); a mirrored feature map pools to another vector, which the
    paper's average pool cannot do (its two outputs are equal)."""
    from pertvl.model.image import AttentionPool2d

    torch.manual_seed(0)
    pool = AttentionPool2d(channels=16, out_dim=8, heads=4, base_grid=3).eval()
    mha = torch.nn.MultiheadAttention(16, 4, batch_first=True).eval()
    with torch.no_grad():
        mha.in_proj_weight.copy_(torch.cat([pool.q_proj.weight, pool.k_proj.weight, pool.v_proj.weight]))
        mha.in_proj_bias.copy_(torch.cat([pool.q_proj.bias, pool.k_proj.bias, pool.v_proj.bias]))
        mha.out_proj.weight.copy_(torch.eye(16))
        mha.out_proj.bias.zero_()
    x = torch.randn(2, 16, 3, 3)
    with torch.no_grad():
        tokens = x.flatten(2).transpose(1, 2)
        tokens = torch.cat([tokens.mean(1, keepdim=True), tokens], 1) + pool.pos
        ref = pool.c_proj(mha(tokens[:, :1], tokens, tokens, need_weights=False)[0][:, 0])
        torch.testing.assert_close(pool(x), ref)
        # another grid: the positional embedding is resized, the mean token's kept
        pos = pool.positions(5, 4)
        assert pos.shape == (21, 16) and torch.equal(pos[0], pool.pos[0])
        assert pool(torch.randn(2, 16, 5, 4)).shape == (2, 8)
        mirrored = x.flip(-1)
        assert (pool(x) - pool(mirrored)).abs().max() > 1e-3
        torch.testing.assert_close(x.mean((2, 3)), mirrored.mean((2, 3)))  # equal up to summation order


def test_image_pool_attention_in_the_model_saves_and_reloads(tiny_bert, tmp_path):
    model = _model(tiny_bert, image_pool="attention", image_pool_heads=4).eval()
    assert model.config.image_pool == "attention"
    gray = torch.rand(2, 1, 128, 128)
    with torch.no_grad():
        out = model.encode_image(gray)
        ref = model.image.global_proj(model.image.backbone(model.image.normalize(gray)).last_hidden_state)
    torch.testing.assert_close(out.global_emb, ref)
    assert out.grid == (8, 8) and out.regions.shape[:2] == (2, 64)
    model.save_pretrained(tmp_path / "m")
    again = type(model).from_pretrained(tmp_path / "m").eval()
    with torch.no_grad():
        torch.testing.assert_close(again.encode_image(gray).global_emb, out.global_emb)
    with pytest.raises(ValueError, match="image_pool: expected one of"):
        _model(tiny_bert, image_pool="max")
