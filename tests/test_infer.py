"""pertvl.infer on an ONNX export: no torch, preprocessing, batching, attention maps, `pertvl embed/similarity`.

The export is the tiny one of tests/test_export.py (built once per session).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from test_export import build_tiny_export, build_tiny_run, torch_image, torch_text, words_text

from pertvl.data.text import clean_text
from pertvl.evaluate.embed import format_similarity_table
from pertvl.infer import Embedder, attention_maps


@pytest.fixture(scope="session")
def export_dir(tmp_path_factory, minilm_path) -> Path:
    return build_tiny_export(tmp_path_factory.getbasetemp(), minilm_path)


@pytest.fixture(scope="session")
def model(tmp_path_factory, minilm_path, export_dir):
    from pertvl.model import DualEncoder

    return DualEncoder.from_pretrained(build_tiny_run(tmp_path_factory.getbasetemp(), minilm_path) / "final").eval()


@pytest.fixture(scope="session")
def emb(export_dir) -> Embedder:
    return Embedder.from_export(export_dir, batch_size=2)


@pytest.fixture()
def image_files(tmp_path) -> list[Path]:
    """An RGB landscape PNG, an 8-bit portrait PNG and a 16-bit PNG."""
    from PIL import Image

    rng = np.random.default_rng(0)
    files = [tmp_path / "rgb.png", tmp_path / "gray.png", tmp_path / "sixteen.png"]
    Image.fromarray(rng.integers(0, 256, (80, 120, 3), dtype=np.uint8), "RGB").save(files[0])
    Image.fromarray(rng.integers(0, 256, (150, 70), dtype=np.uint8), "L").save(files[1])
    Image.fromarray(rng.integers(0, 4096, (90, 90)).astype(np.uint16)).save(files[2])
    return files


# ------------------------------------------------------------------------------------------------
_NO_TORCH = textwrap.dedent("""
    import json, sys
    import numpy as np
    import onnxruntime as ort
    export, work = sys.argv[1], sys.argv[2]
    # plain onnxruntime loads both files
    for name in ("image_encoder.onnx", "text_encoder.onnx"):
        session = ort.InferenceSession(f"{export}/{name}", providers=["CPUExecutionProvider"])
        assert session.get_modelmeta().custom_metadata_map["pertvl.format"] == '"pertvl-export/1"'
    from pertvl.infer import Embedder, attention_maps
    e = Embedder.from_export(export)
    images = np.load(f"{work}/images.npy")
    texts = json.load(open(f"{work}/texts.json"))
    np.save(f"{work}/image_emb.npy", e.embed_images(images))
    np.save(f"{work}/text_emb.npy", e.embed_texts(texts))
    f, t = e.image_features(images), e.text_features(texts)
    attention_maps(f.regions[0], f.grid, t.words[0], t.word_mask[0])
    e.similarity(images, texts)
    heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "transformers", "matplotlib")
                   or m.startswith("pertvl.evaluate"))
    print(json.dumps(heavy))
""")


def test_fresh_process_never_imports_torch(export_dir, model, tmp_path):
    from pertvl.export.samples import REAL_REPORTS, phantom_like_images

    images = phantom_like_images(3, 64, seed=5)
    np.save(tmp_path / "images.npy", images)
    (tmp_path / "texts.json").write_text(json.dumps(list(REAL_REPORTS)))
    script = tmp_path / "no_torch.py"
    script.write_text(_NO_TORCH)
    done = subprocess.run([sys.executable, str(script), str(export_dir), str(tmp_path)], check=True,
                          capture_output=True, text=True, timeout=120)
    assert json.loads(done.stdout.strip().splitlines()[-1]) == []  # neither torch, transformers, matplotlib nor an evaluation module
    assert np.abs(np.load(tmp_path / "image_emb.npy") - torch_image(model, images)[0]).max() <= 1e-4
    ref = torch_text(model, [clean_text(t) for t in REAL_REPORTS])[0]
    assert np.abs(np.load(tmp_path / "text_emb.npy") - ref).max() <= 1e-4


def test_attention_maps_match_torch_losses():
    import torch
    from test_losses import local_attention_maps

    rng = np.random.default_rng(0)
    regions = rng.normal(size=(12, 8)).astype(np.float32)
    words = rng.normal(size=(7, 8)).astype(np.float32)
    mask = np.array([True] * 5 + [False] * 2)
    words[~mask] = 0.0
    maps = attention_maps(regions, (3, 4), words, mask, gamma1=4.0)
    ref = local_attention_maps(torch.from_numpy(regions), torch.from_numpy(words[mask]), gamma1=4.0).numpy()
    assert maps.shape == (5, 3, 4) and maps.dtype == np.float32
    assert np.abs(maps.reshape(5, 12) - ref).max() <= 1e-5
    np.testing.assert_allclose(maps.sum(axis=(1, 2)), 1.0, atol=1e-6)
    # the first softmax is over the report's words only: padding must not change any map
    assert np.abs(attention_maps(regions, (3, 4), words[mask], None) - maps).max() <= 1e-6
    with pytest.raises(ValueError, match="grid 3x3 does not hold M=12"):
        attention_maps(regions, (3, 3), words, mask)
    with pytest.raises(ValueError, match="same feature width"):
        attention_maps(regions, (3, 4), words[:, :5], mask)
    with pytest.raises(ValueError, match="no words"):
        attention_maps(regions, (3, 4), words, np.zeros(7, bool))


def test_load_images_matches_pack_preprocessing(emb, image_files, tmp_path):
    from PIL import Image

    from pertvl.data.image import resize_center_crop, to_grayscale8

    arr = emb.load_images(image_files)
    assert arr.shape == (3, 1, 64, 64) and arr.dtype == np.float32
    assert 0.0 <= arr.min() and arr.max() <= 1.0
    for i, path in enumerate(image_files):
        with Image.open(path) as im:
            expected = np.asarray(resize_center_crop(to_grayscale8(im), 64), dtype=np.float32) / 255.0
        np.testing.assert_array_equal(arr[i, 0], expected)
    assert 0.4 < arr[2].mean() < 0.6  # the 16-bit image is min-max scaled, not clipped to white
    bad = tmp_path / "report.png"
    bad.write_text("not an image")
    with pytest.raises(ValueError, match=r"report\.png: cannot decode as an image"):
        emb.load_images([image_files[0], bad])


def test_input_validation(emb):
    from pertvl.evaluate.encoder import Encoder

    assert isinstance(emb, Encoder)  # the evaluation protocol
    with pytest.raises(ValueError, match=r"expected images \[N, 1, 64, 64\]"):
        emb.embed_images(np.zeros((2, 1, 32, 32), np.float32))
    with pytest.raises(ValueError, match="divided by 255"):
        emb.embed_images(np.full((1, 1, 64, 64), 200.0, np.float32))
    with pytest.raises(ValueError, match="list of texts"):
        emb.embed_texts("the lungs are clear")
    assert emb.embed_images(np.zeros((0, 1, 64, 64), np.float32)).shape == (0, 16)
    assert emb.embed_texts([]).shape == (0, 16)


def test_texts_are_cleaned_and_batching_keeps_order(export_dir, emb):
    messy = ["The LUNGS are clear.  XXXX  No effusión!", "Heart size: normal; t-spine 2.5 cm."]
    cleaned = [clean_text(t) for t in messy]
    assert cleaned == ["the lungs are clear no effusion", "heart size normal t-spine 2.5 cm"]
    assert [clean_text(t) for t in cleaned] == cleaned  # the rule is idempotent
    np.testing.assert_array_equal(emb.embed_texts(messy), emb.embed_texts(cleaned))
    texts = [words_text(n, offset=n) for n in (40, 3, 17, 1, 60, 8, 25)]
    one_batch = Embedder.from_export(export_dir, batch_size=64).embed_texts(texts)
    many = emb.embed_texts(texts)  # batch_size 2, sorted by length inside
    assert np.abs(one_batch - many).max() <= 1e-5
    for i, t in enumerate(texts):
        assert np.abs(emb.embed_texts([t])[0] - many[i]).max() <= 1e-5
    feats = emb.text_features(texts)
    assert feats.word_mask.sum(1).tolist() == [40, 3, 17, 1, 60, 8, 25]
    assert not feats.words[~feats.word_mask].any()  # padded word slots are zero


def test_similarity_is_cosine_of_embeddings(emb, image_files):
    texts = ["the lungs are clear", "small left pleural effusion", "cardiomegaly"]
    sim = emb.similarity([str(p) for p in image_files], texts)
    ref = emb.embed_images(emb.load_images(image_files)) @ emb.embed_texts(texts).T
    assert sim.shape == (3, 3) and np.abs(sim - ref).max() <= 1e-6
    table = format_similarity_table(sim, [str(p) for p in image_files], texts)
    rows = table.splitlines()[-3:]
    for i, row in enumerate(rows):
        assert row.startswith(image_files[i].name)
        assert row.count("*") == 1
        cells = row[len(row) - 10 * 3:]
        assert cells[10 * int(np.argmax(sim[i])) : 10 * int(np.argmax(sim[i])) + 10].endswith("*")


def test_cli_embed_with_attention_maps(export_dir, emb, image_files, tmp_path, capsys):
    from PIL import Image

    from pertvl.cli import main

    texts = ["The lungs are clear.", "Small left pleural effusion XXXX."]
    out, maps = tmp_path / "emb", tmp_path / "maps"
    assert main(["embed", "--export", str(export_dir), "--images", *map(str, image_files[:2]),
                 "--texts", *texts, "--out", str(out), "--attention-maps", str(maps)]) == 0
    img, txt, sim = (np.load(out / f"{n}.npy") for n in ("image_emb", "text_emb", "similarity"))
    np.testing.assert_array_equal(img, emb.embed_images(emb.load_images(image_files[:2])))
    np.testing.assert_array_equal(txt, emb.embed_texts(texts))
    assert np.abs(sim - img @ txt.T).max() <= 1e-6
    index = json.loads((out / "index.json").read_text())
    assert index["images"] == [str(p) for p in image_files[:2]] and index["texts"] == texts
    assert index["cleaned_texts"] == ["the lungs are clear", "small left pleural effusion"]
    listing = json.loads((maps / "attention_maps.json").read_text())["maps"]
    assert len(listing) == 2 * (4 + 4) == index["attention_maps"]["count"]
    assert [r["word"] for r in listing[:4]] == ["the", "lungs", "are", "clear"]
    pngs = sorted(maps.glob("*.png"))
    assert len(pngs) == 16
    with Image.open(pngs[0]) as im:
        assert im.size == (400, 440)


def test_cli_similarity_prints_table(export_dir, emb, image_files, capsys):
    from pertvl.cli import main

    texts = ["the lungs are clear", "large right pneumothorax"]
    assert main(["similarity", "--export", str(export_dir), "--images", *map(str, image_files),
                 "--texts", *texts]) == 0
    printed = capsys.readouterr().out
    sim = emb.similarity([str(p) for p in image_files], texts)
    for i, path in enumerate(image_files):
        row = next(line for line in printed.splitlines() if line.startswith(path.name))
        assert [float(x.rstrip("*")) for x in row[len(path.name):].split()] == pytest.approx(sim[i], abs=1e-4)
    assert "R1  the lungs are clear" in printed
    assert main(["similarity", "--export", str(export_dir), "--images", str(image_files[0])]) == 2  # no texts
    assert "pertvl: error: pertvl similarity: give --texts or --texts-file" in capsys.readouterr().err


def test_sessions_leave_the_callers_float_mode_alone(export_dir):
    """onnxruntime sessions run with denormals flushed to zero (faster masked softmax); that
    flag must stay on pertvl's onnxruntime thread, not leak into the caller's numpy/torch. A fresh
    process: onnxruntime sets the flag while creating the first session of the process."""
    code = textwrap.dedent(f"""
        import numpy as np
        from pertvl.export.samples import REAL_REPORTS
        from pertvl.infer import Embedder
        emb = Embedder.from_export({str(export_dir)!r}, int8=True)
        emb.embed_texts(list(REAL_REPORTS))
        emb.embed_images(np.zeros((2, 1, 64, 64), np.float32))
        assert emb.text_session.get_session_options().get_session_config_entry("session.set_denormal_as_zero") == "1"
        print("denormal", (np.array([1e-39], np.float32) * np.float32(1.0))[0])
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "denormal 1e-39" in out, out


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_sessions_work_in_a_forked_child(export_dir):
    """The private onnxruntime thread does not survive fork(); a child gets a fresh one instead
    of queueing its calls behind a thread that does not exist (which would hang)."""
    import signal

    emb = Embedder.from_export(export_dir)
    emb.embed_texts(["the lungs are clear"])
    pid = os.fork()
    if pid == 0:  # child: exit 0 only if a new session runs; the alarm turns a hang into a failure
        signal.alarm(60)
        ok = False
        try:
            ok = Embedder.from_export(export_dir).embed_texts(["no pleural effusion"]).shape == (1, 16)
        finally:
            os._exit(0 if ok else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


def test_torch_encoder_local_features_match_the_export(emb, model):
    """The grounding evaluation reads regions and words from either path (--export / --run): the
    torch adapter gives what the ONNX export gives, word lists included."""
    from pertvl.evaluate.torch_encoder import TorchEncoder

    enc = TorchEncoder(model, device="cpu", batch_size=2)
    rng = np.random.default_rng(0)
    images = rng.random((3, 1, emb.image_size, emb.image_size), dtype=np.float32)
    texts = [clean_text(t) for t in ("Small left pleural effusion. No pneumothorax.", "Heart size is normal.",
                                     "The lungs are clear without focal consolidation or pleural effusion.")]
    ti, oi = enc.image_features(images), emb.image_features(images)
    assert ti.grid == oi.grid and np.allclose(ti.regions, oi.regions, atol=2e-3)
    assert np.allclose(ti.emb, oi.emb, atol=2e-3)
    tt, ot = enc.text_features(texts), emb.text_features(texts)
    assert tt.word_lists == ot.word_lists == [t.split() for t in texts]
    for i in range(3):
        a, b = tt.words[i][tt.word_mask[i]], ot.words[i][ot.word_mask[i]]
        assert a.shape == b.shape and np.allclose(a, b, atol=2e-3)
        maps_t = attention_maps(ti.regions[0], ti.grid, tt.words[i], tt.word_mask[i])
        maps_o = attention_maps(oi.regions[0], oi.grid, ot.words[i], ot.word_mask[i])
        assert np.allclose(maps_t, maps_o, atol=1e-3)


# ------------------------------------------------------------------------------------------------
# examples/ort_embed.py: the export's manifest alone is enough to use it
REPO = Path(__file__).resolve().parents[1]
TRICKY_TEXTS = [
    "Pleural effusión, left > right; T-spine XXXX noted. Size 2.5 cm (3/4 of prior).",
    "NO ACUTE cardiopulmonary process.. heart-size normal",
    "",
    " ".join(["word"] * 70) + " tail",  # past max_words
]
_BLOCK_TORCH = ("import runpy, sys\n"
                "for name in ('torch', 'transformers', 'pertvl'):\n"
                "    sys.modules[name] = None  # `import torch` now raises ImportError\n"
                "sys.argv = sys.argv[1:]\n"
                "runpy.run_path(sys.argv[0], run_name='__main__')\n")


def test_ort_example_reproduces_the_embedder_without_torch(export_dir, emb, image_files, tmp_path):
    from PIL import Image

    from pertvl.export.samples import REAL_REPORTS

    jpeg = tmp_path / "big.jpg"  # big enough for the JPEG DCT scaling step
    rng = np.random.default_rng(1)
    Image.fromarray(rng.integers(0, 256, (300, 260), dtype=np.uint8), "L").save(jpeg, quality=90)
    images = [*map(str, image_files), str(jpeg)]
    texts = [*REAL_REPORTS, *TRICKY_TEXTS]
    out = tmp_path / "emb.npz"
    done = subprocess.run([sys.executable, "-c", _BLOCK_TORCH, str(REPO / "examples" / "ort_embed.py"),
                           str(export_dir), "--image", *images, "--text", *texts, "--save", str(out)],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    got = np.load(out)
    want_img, want_txt = emb.embed_images(emb.load_images(images)), emb.embed_texts(texts)
    assert np.abs(got["image_emb"] - want_img).max() <= 1e-5
    assert np.abs(got["text_emb"] - want_txt).max() <= 1e-5
    assert len(done.stdout.strip().splitlines()) == len(images)
    np.testing.assert_allclose(np.linalg.norm(got["text_emb"], axis=1), 1.0, atol=1e-5)  # unit length, as stated


def test_manifest_cleaning_rule_is_clean_text(export_dir):
    import importlib.util

    spec = importlib.util.spec_from_file_location("ort_embed", REPO / "examples" / "ort_embed.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    manifest = json.loads((export_dir / "pertvl_export.json").read_text())
    rule = manifest["text"]["cleaning"]
    for text in TRICKY_TEXTS + ["Ünïcödé ﬁbrosis ½", "xxxx-ray XXXXX; 1.2.3 a/b 4/5"]:
        assert example.clean(text, rule) == clean_text(text, max_words=rule["max_words"], drop_deid=rule["drop_deid"])


def test_cli_refuses_content_free_texts_and_reports_cut_ones(export_dir, emb, image_files, tmp_path, capsys):
    from pertvl.cli import main

    base = ["similarity", "--export", str(export_dir), "--images", str(image_files[0]), "--texts", "the lungs are clear"]
    for empty in ("", "...", "XXXX"):  # the empty report's embedding would be scored like any other
        assert main([*base, empty]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"pertvl: error: text 2 ({empty!r}) has no words after cleaning") and err.count("\n") == 1
    long_text = " ".join(["effusion"] * 20_000)  # 100,000+ characters
    (tmp_path / "texts.txt").write_text(f"large right pneumothorax\n\n{long_text}\n")
    assert main([*base, "--texts-file", str(tmp_path / "texts.txt")]) == 0
    printed = capsys.readouterr().out
    assert f"note: R3 has 20000 words; the model read the first {emb.max_words} ({20000 - emb.max_words} dropped)" in printed
    assert "R2  large right pneumothorax" in printed
    assert main(["embed", "--export", str(export_dir), "--texts-file", str(tmp_path / "texts.txt"),
                 "--out", str(tmp_path / "emb")]) == 0  # fmt: skip
    index = json.loads((tmp_path / "emb" / "index.json").read_text())
    assert index["texts_cut"] == [{"text": 2, "words": 20000, "dropped": 20000 - emb.max_words}]
    assert len(index["texts"]) == 2


def test_cli_names_a_file_that_is_not_an_image(export_dir, tmp_path, capsys):
    from pertvl.cli import main

    (tmp_path / "report.txt").write_text("not an image")
    base = ["similarity", "--export", str(export_dir), "--texts", "the lungs are clear", "--images"]
    assert main([*base, str(tmp_path / "report.txt")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"pertvl: error: {tmp_path / 'report.txt'}: cannot decode as an image (") and err.count("\n") == 1
    assert main([*base, str(tmp_path / "missing.png")]) == 2
    assert capsys.readouterr().err == f"pertvl: error: {tmp_path / 'missing.png'}: no such image file\n"
