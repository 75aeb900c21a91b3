"""The shard format: `shards/NAME/{split}-{000000..}.tar` + `manifest.json` (docs/ARCHITECTURE.md).

Each sample is `{key}.png` (8-bit grayscale, image_size², resized at pack time) and `{key}.json`
(META_FIELDS, plus `extra` with phantom facts and, only when packed with `--counterfactuals`,
`counterfactuals` and `cf_unavailable`).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

FORMAT = "pertvl-shards/1"
MANIFEST_NAME = "manifest.json"
PARTIAL_NAME = "manifest.partial.json"
# The only members a reader ever loads; anything else in a tar (.pyd, .pth, ...) is dropped unread.
ALLOWED_MEMBERS = ("png", "json", "txt")
META_FIELDS = ("id", "study_id", "projection", "split", "labels", "text", "perturbations", "unavailable")
SHARD_NAME = re.compile(r"^(?P<split>[A-Za-z0-9_]+)-(?P<index>\d{6})\.tar$")
_UNSAFE_KEY_CHARS = re.compile(r"[^A-Za-z0-9_-]")


def key_of(pair_id: str) -> str:
    """The WebDataset key of a pair id: every character outside [A-Za-z0-9_-] becomes "_" (webdataset
    splits member names at the first "."); pack makes colliding keys unique (`_assign_keys`)."""
    return _UNSAFE_KEY_CHARS.sub("_", pair_id) or "_"


def split_member_name(name: str) -> tuple[str | None, str]:
    """("dir/key", "ext") of a tar member, webdataset's rule: the extension starts at the first dot
    of the base name. Returns (None, "") for names without an extension."""
    head, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    if not dot or not stem:
        return None, ""
    return (f"{head}/{stem}" if head else stem), ext.lower()


def read_shards_manifest(folder: str | os.PathLike) -> dict:
    """The manifest.json of a shard folder (or the file itself): FileNotFoundError when there is
    none (naming an interrupted pack), ValueError when it is not a pertvl-shards manifest."""
    folder = Path(folder)
    if folder.is_file():
        folder, path = folder.parent, folder
    else:
        path = folder / MANIFEST_NAME
    if not path.is_file():
        if (folder / PARTIAL_NAME).is_file():
            raise FileNotFoundError(f"{path}: packing did not finish ({PARTIAL_NAME} is there); re-run the "
                                    "same `pertvl pack` command to resume it")
        raise FileNotFoundError(f"{path}: no manifest; is {folder} a shard folder written by `pertvl pack`?")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON: {e}") from e
    _check_manifest(manifest, path)
    return manifest


def _check_manifest(manifest: Any, path: Path) -> None:
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        got = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise ValueError(f"{path}: expected format {FORMAT!r}, got {got!r}")
    for name in ("image_size", "splits"):
        if name not in manifest:
            raise ValueError(f"{path}: lacks {name!r}")
    for split, info in manifest["splits"].items():
        if not isinstance(info, dict) or "shards" not in info or "num_samples" not in info:
            raise ValueError(f"{path}: split {split!r} lacks num_samples/shards")
        for s in info["shards"]:
            if not {"name", "num_samples", "bytes", "sha256"} <= set(s):
                raise ValueError(f"{path}: split {split!r} has a shard entry without "
                                 "name/num_samples/bytes/sha256")


def split_info(manifest: dict, split: str, where: str = "manifest") -> dict:
    """manifest["splits"][split], or a ValueError listing the splits there are."""
    if split not in manifest["splits"]:
        raise ValueError(f"{where}: no split {split!r}; it has {sorted(manifest['splits'])}")
    return manifest["splits"][split]
