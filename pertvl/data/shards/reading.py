"""The read side of shards: tar members grouped into samples, their integrity check, and the ordered reader of
a split (evaluation). The training stream (pertvl.data.stream) builds on the same pieces."""

from __future__ import annotations

import io
import json
import os
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import numpy as np

from pertvl.data.image import decode_png_gray
from pertvl.data.shards.format import (
    ALLOWED_MEMBERS,
    MANIFEST_NAME,
    META_FIELDS,
    read_shards_manifest,
    split_info,
    split_member_name,
)


@dataclass
class RawSample:
    """The undecoded members of one sample as read from a tar (allow-listed members only)."""

    key: str
    members: dict[str, bytes]
    shard: str
    ignored: tuple[str, ...] = ()  # extensions present in the tar but never read (not allow-listed)


class ShardReadError(Exception):
    """A tar ended early or is damaged. `after_key` is the last sample read completely (or None)."""

    def __init__(self, shard: str, after_key: str | None, reason: str):
        super().__init__(f"{shard}: {reason} (after key {after_key!r})")
        self.shard, self.after_key, self.reason = shard, after_key, reason


def iter_raw_samples(fileobj: IO[bytes], shard: str) -> Iterator[RawSample]:
    """Group the members of one tar stream into samples, keeping only ALLOWED_MEMBERS (the others
    are skipped unread). Hand-written over `tarfile` so that a truncated shard is reported with its
    name and last key: ShardReadError once the tar is damaged, after every complete sample before it."""
    current: RawSample | None = None
    last_key: str | None = None
    try:
        with tarfile.open(fileobj=fileobj, mode="r|") as tar:
            for info in tar:
                if not info.isreg():
                    continue
                key, ext = split_member_name(info.name)
                if key is None or key.startswith("__"):
                    continue
                if current is not None and key != current.key:
                    last_key = current.key
                    yield current
                    current = None
                if current is None:
                    current = RawSample(key=key, members={}, shard=shard)
                if ext not in ALLOWED_MEMBERS:
                    current.ignored += (ext,)
                    continue
                if ext in current.members:
                    raise tarfile.TarError(f"duplicate member {info.name}")
                current.members[ext] = tar.extractfile(info).read()
    except (tarfile.TarError, OSError, EOFError, ValueError) as e:
        # The sample being assembled when the tar broke is complete only if the cut fell after
        # both of its members; otherwise it is part of the damage, not a sample of its own.
        if current is not None and {"png", "json"} <= set(current.members):
            yield current
            last_key = current.key
        raise ShardReadError(shard, last_key, f"{type(e).__name__}: {e}") from e
    if current is not None:
        yield current


def check_raw_sample(raw: RawSample, *, decode_png: bool = False) -> tuple[dict | None, str | None]:
    """Cheap integrity check of a raw sample: (meta, None) when usable, else (None, reason), the
    reason starting with "missing_member", "bad_json" or "corrupt_png". The PNG is checked with PIL's
    verify() (every chunk's CRC, no inflating), so the stream can check samples it skips on resume;
    `decode_png=True` decodes it fully.
    """
    from PIL import Image

    missing = [m for m in ("png", "json") if m not in raw.members]
    if missing:
        return None, f"missing_member: no {'/'.join(missing)} member"
    try:
        meta = json.loads(raw.members["json"])
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        return None, f"bad_json: {e}"
    if not isinstance(meta, dict):
        return None, "bad_json: not an object"
    absent = [k for k in META_FIELDS if k not in meta]
    if absent:
        return None, f"bad_json: lacks field(s) {absent}"
    if not (isinstance(meta["text"], str) and isinstance(meta["perturbations"], dict)
            and isinstance(meta["unavailable"], dict)):
        return None, "bad_json: text must be a string, perturbations/unavailable objects"
    try:
        with Image.open(io.BytesIO(raw.members["png"])) as im:
            if im.format != "PNG":
                return None, f"corrupt_png: not a PNG ({im.format})"
            if decode_png:
                im.load()
            else:
                im.verify()
    except Exception as e:  # any decoder failure on bad bytes means a corrupt image
        return None, f"corrupt_png: {type(e).__name__}: {e}"
    return meta, None


@dataclass
class Sample:
    """One decoded sample: image np.uint8 [H, W] and the json meta."""

    key: str
    image: np.ndarray
    meta: dict


def iter_samples(folder: str | os.PathLike, split: str) -> Iterator[Sample]:
    """Every sample of `split` in manifest order, no shuffle or augmentation (evaluation);
    ValueError naming shard and key on a damaged shard or sample."""
    folder = Path(folder)
    manifest = read_shards_manifest(folder)
    info = split_info(manifest, split, str(folder / MANIFEST_NAME))
    for entry in info["shards"]:
        name = entry["name"]
        count = 0
        try:
            with open(folder / name, "rb") as f:
                for raw in iter_raw_samples(f, name):
                    meta, problem = check_raw_sample(raw)
                    try:
                        image = None if problem else decode_png_gray(raw.members["png"])
                    except Exception as e:  # a decoder failure on bad bytes
                        problem = f"corrupt_png: {type(e).__name__}: {e}"
                    if problem:
                        raise ValueError(f"{folder / name}: sample {raw.key!r}: {problem} "
                                         "(run `pertvl shards verify`)")
                    count += 1
                    yield Sample(key=raw.key, image=image, meta=meta)
        except ShardReadError as e:
            raise ValueError(f"{folder / name}: damaged shard: {e.reason} after key {e.after_key!r}") from e
        if count != entry["num_samples"]:
            raise ValueError(f"{folder / name}: {count} samples, manifest says {entry['num_samples']}")
