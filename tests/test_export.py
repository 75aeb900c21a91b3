"""ONNX export (pertvl.export.onnx and its steps, `pertvl export`): files, manifest, metadata, parity, int8, errors.

The model is tiny and really trained for two SGD steps: the small ResNet at 64 px and a random
2-layer BERT (hidden 32) with MiniLM's tokenizer, saved with save_pretrained as a run's `final`.
The fixtures are shared with tests/test_infer.py (`build_tiny_export`).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import yaml

from pertvl.data.text import cleaning_rule
from pertvl.export import (
    MANIFEST_NAME,
    ONNX_FILES,
    ExportFormatError,
    decode_metadata,
    sha256_file,
    tower_metadata,
)

TINY_MODEL = {"image_arch": "resnet-tiny", "embed_dim": 16, "local_dim": 24}
IMAGE_SIZE = 64
MEDICAL_WORDS = ("the lungs are clear there is no pleural effusion or pneumothorax heart size is normal "
                 "mild cardiomegaly with small bilateral effusions and bibasilar atelectasis right upper "
                 "lobe opacity stable chest").split()
_CACHE: dict[str, Path] = {}


def words_text(n: int, offset: int = 0) -> str:
    """A report of exactly `n` cleaned words."""
    return " ".join(MEDICAL_WORDS[(offset + i) % len(MEDICAL_WORDS)] for i in range(n))


def tokenize(model, texts: list[str]) -> dict:
    """Reports -> input_ids/attention_mask/word_ids tensors [N, L] (clean_text, then encode_texts)."""
    import torch

    from pertvl.data.text import clean_text
    from pertvl.data.tokenize import encode_texts

    enc = encode_texts(model.tokenizer, [clean_text(t) for t in texts], model.config.max_length)
    return {k: torch.from_numpy(getattr(enc, k)) for k in ("input_ids", "attention_mask", "word_ids")}


def build_tiny_run(base: Path, minilm_path: str) -> Path:
    """RUN/final (save_pretrained after 2 SGD steps) + RUN/config.yaml; built once per session."""
    if "run" in _CACHE:
        return _CACHE["run"]
    import torch
    from transformers import BertConfig, BertModel

    from pertvl.data.text import clean_text
    from pertvl.export.samples import REAL_REPORTS, phantom_like_images
    from pertvl.losses import global_contrastive_loss, local_attentive_loss
    from pertvl.model import create_model

    bert = base / "tiny-bert"
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=64)).save_pretrained(bert)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt"):
        if (Path(minilm_path) / name).is_file():
            shutil.copy(Path(minilm_path) / name, bert / name)
    model_cfg = {**TINY_MODEL, "text_name_or_path": str(bert)}
    model = create_model(model_cfg)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    images = torch.from_numpy(phantom_like_images(4, IMAGE_SIZE, seed=3))
    tokens = tokenize(model, [clean_text(t) for t in REAL_REPORTS[:4]])
    model.train()
    for _ in range(2):
        img, txt = model.encode_image(images), model.encode_text(**tokens)
        loss = global_contrastive_loss(img.global_emb, txt.global_emb) + local_attentive_loss(
            img.regions, txt.words, txt.word_mask, reduction="mean")
        opt.zero_grad()
        loss.backward()
        opt.step()
    run = base / "run"
    model.eval().save_pretrained(run / "final")
    (run / "config.yaml").write_text(yaml.safe_dump({"model": model_cfg, "data": {"image_size": IMAGE_SIZE}}))
    _CACHE["run"] = run
    return run


def build_tiny_export(base: Path, minilm_path: str) -> Path:
    """`pertvl export --run RUN --out EXPORT --quantize int8` through pertvl.cli.main; once per session."""
    if "export" in _CACHE:
        return _CACHE["export"]
    from pertvl.cli import main

    run = build_tiny_run(base, minilm_path)
    out = base / "exports" / "tiny"
    assert main(["export", "--run", str(run), "--out", str(out), "--quantize", "int8"]) == 0
    _CACHE["export"] = out
    return out


@pytest.fixture(scope="session")
def tiny_export(tmp_path_factory, minilm_path) -> Path:
    return build_tiny_export(tmp_path_factory.getbasetemp(), minilm_path)


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, minilm_path, tiny_export) -> Path:
    return build_tiny_run(tmp_path_factory.getbasetemp(), minilm_path)


@pytest.fixture(scope="session")
def tiny_model(tiny_run):
    from pertvl.model import DualEncoder

    return DualEncoder.from_pretrained(tiny_run / "final").eval()


@pytest.fixture(scope="session")
def manifest(tiny_export) -> dict:
    return json.loads((tiny_export / MANIFEST_NAME).read_text())


@pytest.fixture(scope="session")
def embedder(tiny_export):
    from pertvl.infer import Embedder

    return Embedder.from_export(tiny_export, batch_size=3)


def torch_image(model, images: np.ndarray):
    import torch
    import torch.nn.functional as F

    with torch.inference_mode():
        out = model.encode_image(torch.from_numpy(images))
        return F.normalize(out.global_emb, dim=-1).numpy(), out.regions.numpy()


def torch_text(model, texts: list[str]):
    import torch
    import torch.nn.functional as F

    from pertvl.data.tokenize import encode_texts

    enc = encode_texts(model.tokenizer, texts, max_length=128)
    with torch.inference_mode():
        out = model.encode_text(*(torch.from_numpy(getattr(enc, k)) for k in ("input_ids", "attention_mask", "word_ids")))
        return F.normalize(out.global_emb, dim=-1).numpy(), out.words.numpy(), out.word_mask.numpy()


# ------------------------------------------------------------------------------------------------
def test_export_folder_files_and_manifest(tiny_export, manifest):
    names = sorted(p.name for p in tiny_export.iterdir())
    assert names == sorted([*ONNX_FILES.values(), MANIFEST_NAME, "MODEL_CARD.md", *manifest["text"]["tokenizer_files"]])
    assert "tokenizer.json" in names and not any(n.endswith(".data") for n in names)  # single files
    assert not [p for p in tiny_export.parent.iterdir() if p.name.startswith(".")]  # no partial folders left
    for name, entry in manifest["files"].items():
        assert sha256_file(tiny_export / name) == entry["sha256"]
        assert (tiny_export / name).stat().st_size == entry["bytes"]
    assert manifest["embedding_dim"] == 16 and manifest["local_dim"] == 24 and manifest["opset"] == 17
    assert manifest["source"]["kind"] == "run"
    img, txt = manifest["image"], manifest["text"]
    assert img["preprocessing"]["size"] == IMAGE_SIZE and img["preprocessing"]["channels"] == 1  # from config.yaml
    assert img["grid"] == [4, 4]
    assert img["inputs"] == [{"name": "images", "dtype": "float32", "shape": ["batch", 1, 64, 64]}]
    assert img["outputs"] == [{"name": "image_emb", "dtype": "float32", "shape": ["batch", 16]},
                              {"name": "regions", "dtype": "float32", "shape": ["batch", 16, 24]}]
    assert [i["name"] for i in txt["inputs"]] == ["input_ids", "attention_mask", "word_ids"]
    assert all(i["shape"] == ["batch", "sequence"] and i["dtype"] == "int64" for i in txt["inputs"])
    assert txt["outputs"][1] == {"name": "words", "dtype": "float32", "shape": ["batch", "sequence", 24]}
    assert txt["outputs"][2]["dtype"] == "bool"
    assert txt["cleaning"] == cleaning_rule(60, True) and txt["tokenization"]["pad_id"] == 0  # MiniLM's [PAD]
    assert txt["max_length"] == 128 and "max_length" not in manifest["model_config"]  # one max length
    assert img["output_norm"]["image_emb"].startswith("L2") and txt["output_norm"]["text_emb"].startswith("L2")
    graph = manifest["exporter"]["text_graph"]
    assert graph["mode"] == "unpadded" and graph["contrib_ops"] == {"MultiHeadAttention": 2}  # both layers
    assert graph["int8"]["op_types"] == ["MatMul", "Gemm", "Attention"]
    assert graph["int8"]["residual"] == {"ffn-in": 2 * 2}  # the default: both layers, both row groups


def _weight_ops(path: Path) -> tuple[dict[str, list[str]], dict[str, int], dict]:
    """({op type: [initializers it reads]}, {op type: node count}, {initializer: TensorProto})."""
    import onnx

    graph = onnx.load(os.fspath(path)).graph
    inits = {i.name: i for i in graph.initializer}
    reads: dict[str, list[str]] = {}
    counts: dict[str, int] = {}
    for node in graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
        reads.setdefault(node.op_type, []).extend(i for i in node.input if i in inits)
    return reads, counts, inits


def test_text_graphs_are_unpadded_and_int8_keeps_embeddings_float(tiny_export):
    """The fp32 text graph: dense layers as Gemm, attention as the MultiHeadAttention contrib op
    (none of the padded-row Attention/SkipLayerNormalization fusion). int8: every dense layer runs
    as integer matmuls, twice (the [CLS]/[SEP] rows apart from the word rows) on one stored int8
    weight, and the FFN input layers once more for their residual pass; the embedding tables
    stay float."""
    import onnx

    _, counts, _ = _weight_ops(tiny_export / "text_encoder.onnx")
    assert counts["MultiHeadAttention"] == 2 and "Attention" not in counts and "SkipLayerNormalization" not in counts
    assert counts["Gemm"] == 2 * 4 + 1 and counts["MatMul"] == 2  # + word projection, word-piece mean
    reads, counts, inits = _weight_ops(tiny_export / "text_encoder.int8.onnx")
    assert "Gemm" not in counts and counts["MatMul"] == 1  # only the word-piece mean (no weight) is float
    weights = [n for n in reads["MatMulInteger"] if n.endswith("_quantized")]
    # shared by the two row groups (and the residual pass of the FFN input layers)
    assert len(weights) == 2 * 2 * 4 + 2 + 2 * 2 and len(set(weights)) == 2 * 4 + 2
    residual = [n for n in weights if ".intermediate.dense." in n]
    assert len(residual) == 2 * 2 * 2 and len(set(residual)) == 2
    assert all(inits[n].data_type == onnx.TensorProto.INT8 for n in weights)
    tables = [n for n in reads["Gather"] if n.endswith("embeddings.weight")]
    assert any("word_embeddings" in n for n in tables)
    assert all(inits[n].data_type == onnx.TensorProto.FLOAT for n in tables)


def test_fused_text_graph_passes_parity(tiny_model, tmp_path):
    """text_graph="fused": onnxruntime's BERT fusion of the eager-attention trace, checked
    against torch by the built-in parity check (export_model raises ParityError otherwise)."""
    from pertvl.export.onnx import export_model

    result = export_model(tiny_model, tmp_path / "fused", image_size=64, text_graph="fused")
    graph = result.manifest["exporter"]["text_graph"]
    assert graph["mode"] == "fused" and graph["fused"]["Attention"] == 2 and graph["fused"]["EmbedLayerNormalization"] == 1
    assert max(result.manifest["parity"]["fp32"]["max_abs"]["text"].values()) <= 1e-4
    assert _weight_ops(tmp_path / "fused" / "text_encoder.onnx")[1]["Attention"] == 2


def test_attention_pool_image_graph_passes_parity(tiny_run, tmp_path):
    """model.image_pool=attention (CLIP's pool, positional embedding resized from 7x7 to the 2x2
    grid of a 64 px image): the image graph passes the built-in parity gate (export_model raises
    ParityError otherwise) and runs in onnxruntime on a batch it was not traced with."""
    import onnxruntime as ort
    import torch

    from pertvl.export.onnx import export_model
    from pertvl.model import create_model

    cfg = yaml.safe_load((tiny_run / "config.yaml").read_text())["model"]
    torch.manual_seed(0)
    model = create_model({**cfg, "image_pool": "attention", "image_pool_heads": 4}).eval()
    result = export_model(model, tmp_path / "attn", image_size=IMAGE_SIZE)
    assert result.manifest["parity"]["fp32"]["max_abs"]["image"]["image_emb"] <= 1e-4
    session = ort.InferenceSession(str(tmp_path / "attn" / "image_encoder.onnx"), providers=["CPUExecutionProvider"])
    images = np.random.default_rng(0).random((5, 1, IMAGE_SIZE, IMAGE_SIZE), dtype=np.float32)
    with torch.inference_mode():
        ref = model.encode_image(torch.from_numpy(images)).global_emb
        ref = torch.nn.functional.normalize(ref, dim=-1).numpy()
    emb = session.run(None, {session.get_inputs()[0].name: images})[0]
    assert np.abs(emb - ref).max() <= 1e-4


def test_builtin_parity_covers_batches_and_lengths(manifest):
    from pertvl.export.parity import PARITY_TOLERANCE, parity_bound

    fp32 = manifest["parity"]["fp32"]
    # The gate's own bound: absolute on the normalized embeddings, relative to the magnitude on the
    # unnormalized region/word features (|x| reaches ~400 here, where fp32 rounding alone is ~1e-4
    # and differs between CPUs' kernels).
    for tower, outputs in fp32["max_abs"].items():
        for name, diff in outputs.items():
            bound = parity_bound(name, PARITY_TOLERANCE, fp32["scale"][tower][name])
            assert diff <= bound, (tower, name, diff, bound)
    assert all(v <= PARITY_TOLERANCE for t in fp32["max_abs"].values() for k, v in t.items() if k.endswith("_emb"))
    inputs = [c["input"] for c in fp32["cases"]]
    for b in (1, 3, 8):
        assert f"random uniform, batch {b}" in inputs
        for w in (5, 60):
            assert f"random words, batch {b}, {w} words" in inputs
    assert any(i.startswith("real reports") for i in inputs) and any(i.startswith("phantom") for i in inputs)
    sixty = next(c for c in fp32["cases"] if c["input"] == "random words, batch 3, 60 words")
    assert sixty["shape"] == [3, 62]  # [CLS] + 60 one-piece words + [SEP]


@pytest.mark.parametrize("batch", [1, 3, 8])
def test_image_parity_against_torch(embedder, tiny_model, batch):
    from pertvl.export.samples import phantom_like_images

    images = np.concatenate([np.random.default_rng(batch).random((batch, 1, 64, 64), dtype=np.float32),
                             phantom_like_images(batch, 64, seed=batch)])
    feats = embedder.image_features(images)  # batch_size 3: several onnxruntime calls
    emb, regions = torch_image(tiny_model, images)
    assert feats.emb.shape == (2 * batch, 16) and feats.regions.shape == (2 * batch, 16, 24)
    assert np.abs(feats.emb - emb).max() <= 1e-4
    # regions are not normalized (|x| ~ 170 here: BatchNorm running stats after 2 steps), so fp32
    # rounding is relative: the bound is 1e-4 x max(1, |x|)  (pertvl.export.parity.parity_bound)
    assert np.abs(feats.regions - regions).max() <= 1e-4 * max(1.0, np.abs(regions).max())
    np.testing.assert_allclose(np.linalg.norm(feats.emb, axis=1), 1.0, atol=1e-6)


@pytest.mark.parametrize("batch", [1, 3, 8])
@pytest.mark.parametrize("words", [5, 60])
def test_text_parity_against_torch(embedder, tiny_model, batch, words):
    texts = [words_text(words, offset=i) for i in range(batch)]
    feats = embedder.text_features(texts)
    emb, w, mask = torch_text(tiny_model, texts)
    assert feats.word_mask.sum(1).tolist() == [words] * batch
    assert [len(x) for x in feats.word_lists] == [words] * batch
    assert feats.word_lists[0] == texts[0].split()
    assert np.abs(feats.emb - emb).max() <= 1e-4
    width = min(w.shape[1], feats.words.shape[1])
    assert np.abs(feats.words[:, :width] - w[:, :width]).max() <= 1e-4 * max(1.0, np.abs(w).max())
    assert not feats.word_mask[:, width:].any() and not mask[:, width:].any()
    assert (feats.word_mask[:, :width] == mask[:, :width]).all()


def test_metadata_round_trip(tiny_export, manifest, embedder):
    import onnx

    for (tower, variant), name in ONNX_FILES.items():
        model = onnx.load(str(tiny_export / name), load_external_data=False)
        props = {p.key: p.value for p in model.metadata_props}
        assert {k: v for k, v in props.items() if k.startswith("pertvl.")} == tower_metadata(manifest, tower, variant)
        meta = decode_metadata(props)
        assert meta["tower"] == tower and meta["variant"] == variant
        assert meta["export_id"] == manifest["export_id"] and meta["embedding_dim"] == manifest["embedding_dim"]
        assert meta["inputs"] == manifest[tower]["inputs"] and meta["outputs"] == manifest[tower]["outputs"]
        if tower == "image":
            assert meta["preprocessing"] == manifest["image"]["preprocessing"] and meta["grid"] == [4, 4]
        else:
            assert meta["cleaning"] == manifest["text"]["cleaning"]
            assert meta["tokenizer_files"] == manifest["text"]["tokenizer_files"]
    for tower, session in (("image", embedder.image_session), ("text", embedder.text_session)):
        loaded = decode_metadata(session.get_modelmeta().custom_metadata_map)
        assert loaded == decode_metadata(tower_metadata(manifest, tower, "fp32"))
    assert (embedder.embedding_dim, embedder.local_dim) == (16, 24)
    assert (embedder.grid, embedder.image_size) == ((4, 4), 64)


def test_int8_agrees_in_cosine(tiny_export, manifest, embedder):
    from pertvl.export.samples import REAL_REPORTS, phantom_like_images
    from pertvl.infer import Embedder

    int8 = Embedder.from_export(tiny_export, int8=True)
    assert int8.variant == "int8"
    assert decode_metadata(int8.text_session.get_modelmeta().custom_metadata_map)["variant"] == "int8"
    images = phantom_like_images(6, 64, seed=11)
    for a, b in ((int8.embed_images(images), embedder.embed_images(images)),
                 (int8.embed_texts(list(REAL_REPORTS)), embedder.embed_texts(list(REAL_REPORTS)))):
        assert (np.sum(a * b, axis=1) > 0.99).all()
    assert all(v > 0.99 for v in manifest["parity"]["int8"]["min_cosine"].values())
    for tower in ("image", "text"):
        speed = manifest["speed"][tower]
        assert speed["seconds"]["fp32"] > 0 and speed["seconds"]["int8"] > 0 and speed["int8_speedup"] > 0


def _copy(export: Path, dest: Path) -> Path:
    shutil.copytree(export, dest)
    return dest


def test_corrupted_onnx_file_is_named(tiny_export, tmp_path):
    import onnx

    from pertvl.infer import Embedder

    bad = _copy(tiny_export, tmp_path / "flipped")
    path = bad / "image_encoder.onnx"
    data = bytearray(path.read_bytes())
    weights = max(onnx.load(str(path)).graph.initializer, key=lambda t: len(t.raw_data)).raw_data
    at = bytes(data).find(weights[:256]) + 512
    data[at : at + 16] = bytes(b ^ 0xFF for b in data[at : at + 16])  # flip bytes inside a weight
    path.write_bytes(bytes(data))
    with pytest.raises(ExportFormatError, match=r"image_encoder\.onnx: sha256 .* modified or corrupted"):
        Embedder.from_export(bad)

    broken = _copy(tiny_export, tmp_path / "header")
    path = broken / "text_encoder.onnx"
    path.write_bytes(b"\xff" * 64 + path.read_bytes()[64:])  # the protobuf header destroyed
    with pytest.raises(ExportFormatError, match=r"text_encoder\.onnx: onnxruntime cannot load it.*corrupted"):
        Embedder.from_export(broken)


def test_mismatched_onnx_file_from_another_export(tiny_export, tiny_model, tmp_path):
    from pertvl.export.onnx import export_model
    from pertvl.infer import Embedder

    other = export_model(tiny_model, tmp_path / "other", image_size=64, parity=False, text_graph="traced").out_dir
    mixed = _copy(tiny_export, tmp_path / "mixed")
    shutil.copy(other / "text_encoder.onnx", mixed / "text_encoder.onnx")
    with pytest.raises(ExportFormatError, match=r"text_encoder\.onnx: its ONNX metadata does not match.*another "
                                                r"export.*export_id: file has"):
        Embedder.from_export(mixed)
    # an image tower renamed into the text slot: the tower and its inputs differ
    swapped = _copy(tiny_export, tmp_path / "swapped")
    shutil.copy(swapped / "image_encoder.onnx", swapped / "text_encoder.onnx")
    with pytest.raises(ExportFormatError, match=r"text_encoder\.onnx.*tower: file has \"image\""):
        Embedder.from_export(swapped)


def test_manifest_tokenizer_and_missing_files(tiny_export, tmp_path):
    from pertvl.infer import Embedder

    edited = _copy(tiny_export, tmp_path / "edited")
    manifest = json.loads((edited / MANIFEST_NAME).read_text())
    manifest["embedding_dim"] = 32
    (edited / MANIFEST_NAME).write_text(json.dumps(manifest))
    with pytest.raises(ExportFormatError, match=r"image_encoder\.onnx.*embedding_dim: file has 16, manifest says 32"):
        Embedder.from_export(edited)

    tok = _copy(tiny_export, tmp_path / "tok")
    (tok / "tokenizer.json").write_text((tok / "tokenizer.json").read_text().replace('"[SEP]"', '"[SEQ]"'))
    with pytest.raises(ExportFormatError, match=r"tokenizer\.json: sha256"):
        Embedder.from_export(tok)

    missing = _copy(tiny_export, tmp_path / "missing")
    (missing / "text_encoder.int8.onnx").unlink()
    with pytest.raises(FileNotFoundError, match=r"text_encoder\.int8\.onnx: listed in pertvl_export\.json but missing"):
        Embedder.from_export(missing, int8=True)
    with pytest.raises(FileNotFoundError, match="not a pertvl export folder"):
        Embedder.from_export(tmp_path)


def test_int8_residual_layers_from_the_command_line(tiny_run, tmp_path, capsys):
    """--int8-residual chooses the layers that get a residual pass ('none': no extra matmul)."""
    from pertvl.cli import main

    for spec, expected in (("qkv,ffn-out", {"qkv": 2 * 2, "ffn-out": 2 * 2}), ("none", {})):
        out = tmp_path / spec.replace(",", "_")
        assert main(["export", "--run", str(tiny_run), "--out", str(out), "--quantize", "int8", "--no-parity",
                     "--int8-residual", spec]) == 0  # fmt: skip
        manifest = json.loads((out / "pertvl_export.json").read_text())
        assert manifest["exporter"]["text_graph"]["int8"]["residual"] == expected
        _, counts, _ = _weight_ops(out / "text_encoder.int8.onnx")
        assert counts["MatMulInteger"] == 2 * 2 * 4 + 2 + sum(expected.values())
        printed = capsys.readouterr().out
        assert "int8 text residual passes: " + ("qkv (4 matmuls), ffn-out (4 matmuls)" if expected else "none") in printed
    with pytest.raises(SystemExit):
        main(["export", "--run", str(tiny_run), "--out", str(tmp_path / "x"), "--int8-residual", "ffn"])
    assert "unknown ['ffn']" in capsys.readouterr().err


def test_failed_parity_leaves_no_folder(tiny_run, tmp_path, monkeypatch, capsys):
    import pertvl.export.parity as exp
    from pertvl.cli import main

    real = exp.run_torch

    def shifted(model, tower, feeds):
        outs = real(model, tower, feeds)
        return [outs[0] + 1e-3, *outs[1:]]

    monkeypatch.setattr(exp, "run_torch", shifted)
    out = tmp_path / "exports" / "bad"
    assert main(["export", "--run", str(tiny_run), "--out", str(out), "--text-graph", "traced"]) == 1
    err = capsys.readouterr().err
    assert "parity check FAILED" in err and "image_encoder.onnx: output 'image_emb' differs from torch" in err
    assert not out.exists() and list((tmp_path / "exports").iterdir()) == []


def test_existing_out_needs_force_and_attention_restored(tiny_run, tiny_model, tmp_path):
    from pertvl.export.onnx import export_model

    before = tiny_model.text.backbone.config._attn_implementation
    first = export_model(tiny_model, tmp_path / "e", image_size=64, parity=False, text_graph="traced")
    assert tiny_model.text.backbone.config._attn_implementation == before  # eager only during the trace
    with pytest.raises(FileExistsError, match="use --force"):
        export_model(tiny_model, tmp_path / "e", image_size=64, parity=False, text_graph="traced")
    second = export_model(tiny_model, tmp_path / "e", image_size=64, parity=False, text_graph="traced", force=True)
    assert second.manifest["export_id"] != first.manifest["export_id"]
    assert json.loads((tmp_path / "e" / MANIFEST_NAME).read_text())["export_id"] == second.manifest["export_id"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["e"]


_DS_SCRIPT = textwrap.dedent("""
    import os, sys
    import numpy as np, torch, yaml, deepspeed
    import torch.nn.functional as F
    from pertvl.train.launch import detect_dist_env, init_distributed, load_ds_config, shutdown_distributed
    from pertvl.train.checkpoint import save
    from pertvl.model import create_model
    from pertvl.losses import global_contrastive_loss
    from pertvl.export.samples import phantom_like_images, REAL_REPORTS
    from pertvl.data.text import clean_text
    from pertvl.data.tokenize import encode_texts
    run, model_cfg, ds_config = sys.argv[1], yaml.safe_load(sys.argv[2]), sys.argv[3]
    os.makedirs(run, exist_ok=True)
    with open(os.path.join(run, "config.yaml"), "w") as f:
        yaml.safe_dump({"model": model_cfg, "data": {"image_size": 64}}, f)
    init_distributed(detect_dist_env({}))
    torch.manual_seed(1)
    model = create_model(model_cfg)
    cfg = load_ds_config(ds_config, micro_batch=4)
    cfg.update(gradient_accumulation_steps=1, train_batch_size=4)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.05),
                                           config=cfg)
    images = torch.from_numpy(phantom_like_images(4, 64))
    enc = encode_texts(model.tokenizer, [clean_text(t) for t in REAL_REPORTS[:4]], model.config.max_length)
    tok = {k: torch.from_numpy(getattr(enc, k)) for k in ("input_ids", "attention_mask", "word_ids")}
    loss = global_contrastive_loss(engine.module.encode_image(images).global_emb,
                                   engine.module.encode_text(**tok).global_emb)
    engine.backward(loss)
    engine.step()
    save(engine, run, 1, {"step": 1})
    engine.module.eval()
    with torch.inference_mode():
        np.save(os.path.join(run, "image_emb.npy"),
                F.normalize(engine.module.encode_image(images).global_emb, dim=-1).numpy())
        np.save(os.path.join(run, "text_emb.npy"),
                F.normalize(engine.module.encode_text(**tok).global_emb, dim=-1).numpy())
    import gc
    del engine, loss
    gc.collect()  # while the group lives: gloo objects freed at interpreter teardown can abort
    shutdown_distributed()
""")


def test_export_from_deepspeed_checkpoint(tiny_run, tmp_path):
    """A ZeRO-1 checkpoint + the run's config.yaml export to the weights the engine trained."""
    pytest.importorskip("deepspeed")
    from pertvl.cli import main
    from pertvl.export.samples import REAL_REPORTS, phantom_like_images
    from pertvl.infer import Embedder

    run = tmp_path / "dsrun"
    model_cfg = yaml.safe_load((tiny_run / "config.yaml").read_text())["model"]
    script = tmp_path / "make_ds.py"
    script.write_text(_DS_SCRIPT)
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    repo = Path(__file__).resolve().parents[1]
    subprocess.run([sys.executable, str(script), str(run), yaml.safe_dump(model_cfg),
                    str(repo / "ds_configs" / "cpu_zero1_fp32.json")], check=True, env=env, cwd=tmp_path,
                   capture_output=True, timeout=240)
    out = tmp_path / "exp"
    assert main(["export", "--checkpoint", str(run / "checkpoints" / "step00000001"), "--out", str(out)]) == 0
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    assert manifest["source"]["kind"] == "deepspeed" and manifest["source"]["step"] == 1
    emb = Embedder.from_export(out)
    assert np.abs(emb.embed_images(phantom_like_images(4, 64)) - np.load(run / "image_emb.npy")).max() <= 1e-4
    assert np.abs(emb.embed_texts(list(REAL_REPORTS[:4])) - np.load(run / "text_emb.npy")).max() <= 1e-4


def test_every_export_holds_a_model_card(tiny_export, manifest, tmp_path):
    from pertvl.export.card import model_card, write_model_card

    card = (tiny_export / "MODEL_CARD.md").read_text()
    sections = ["Model details", "Intended use", "Out-of-scope use", "Training data", "Training configuration",
                "Evaluation results", "Limitations", "How to cite"]
    positions = [card.index(f"## {s}\n") for s in sections]
    assert positions == sorted(positions) and manifest["model_card"] == "MODEL_CARD.md"
    assert "Not for clinical decisions" in card and manifest["export_id"] in card and "Not evaluated" in card
    assert "Perturbed Report Discrimination" in card
    copy = tmp_path / "copy"
    shutil.copytree(tiny_export, copy)
    line = "structure accuracy 80.6% (chance 10.2%) over 72 images; image-grounding margin +13.9 pts [+1.4, +25.0]"
    write_model_card(copy, {"data": {"shards": str(tmp_path / "nowhere")}}, [line])
    rewritten = (copy / "MODEL_CARD.md").read_text()
    assert f"- {line}" in rewritten and "Not evaluated" not in rewritten and "was not readable" in rewritten
    assert rewritten == model_card(manifest, {"data": {"shards": str(tmp_path / "nowhere")}}, [line])
