"""WebDataset shards: pack pairs + perturbations once, verify them, read them back in order.

Layout (docs/ARCHITECTURE.md): `shards/NAME/{split}-{000000..}.tar` + `manifest.json`. Each sample
is `{key}.png` (8-bit grayscale, image_size x image_size, resized once here) and `{key}.json`
(id, study_id, projection, split, labels, cleaned text, perturbations, unavailable).

Packing is parallel (PNG encoding is the bottleneck) and crash-safe: every shard is written under
a temporary name in the same folder, fsynced and renamed, so a shard name on disk is always a
complete shard. After each shard, `manifest.partial.json` records what is done; re-running the
same command with the same inputs keeps every finished shard whose bytes still hash to the
recorded sha256 and continues from there. `manifest.json` is written last, so a folder without it
is never mistaken for a finished pack.

The shard tars are written with fixed member metadata (mtime 0, uid 0, mode 644), so the same
inputs give byte-identical shards whether packed in one run, resumed, or with any worker count.

This module needs neither torch nor webdataset (the stream does), so packing and verifying stay light.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import logging
import os
import re
import sys
import tarfile
from collections import Counter
from collections.abc import Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

import numpy as np

from pertvl import __version__
from pertvl.data.records import PERTURBATION_TYPES, SPLITS, Pair, read_pairs, write_json
from pertvl.data.text import clean_text

log = logging.getLogger(__name__)

FORMAT = "pertvl-shards/1"
MANIFEST_NAME = "manifest.json"
PARTIAL_NAME = "manifest.partial.json"
# The only members a reader ever loads; anything else in a tar (.pyd, .pth, ...) is dropped unread.
ALLOWED_MEMBERS = ("png", "json", "txt")
META_FIELDS = ("id", "study_id", "projection", "split", "labels", "text", "perturbations", "unavailable")
SHARD_NAME = re.compile(r"^(?P<split>[A-Za-z0-9_]+)-(?P<index>\d{6})\.tar$")
_TEMP_NAME = re.compile(r"^\.[A-Za-z0-9_]+-\d{6}\.tar\.tmp-\d+$")
_UNSAFE_KEY_CHARS = re.compile(r"[^A-Za-z0-9_-]")
_HASH_CHUNK = 1 << 20

# Skip reasons of packing (manifest["skipped"][i]["reason"]).
MISSING_IMAGE = "missing_image"
UNDECODABLE_IMAGE = "undecodable_image"
MISSING_PERTURBATIONS = "missing_perturbations"


# --------------------------------------------------------------------------------------------
# Keys, images, tar members
# --------------------------------------------------------------------------------------------


def key_of(pair_id: str) -> str:
    """The WebDataset key of a pair id: every character outside [A-Za-z0-9_-] becomes "_".

    webdataset splits member names at the first ".", so a key must not contain one (nor "/").
    Pack makes colliding keys unique by appending a hash of the id (see `_assign_keys`).
    """
    key = _UNSAFE_KEY_CHARS.sub("_", pair_id)
    return key or "_"


def to_grayscale8(image) -> Any:
    """A PIL image as 8-bit grayscale ("L").

    8-bit modes (L, RGB, P, ...) use PIL's luma conversion. 16/32-bit integer and float images
    (DICOM-derived PNGs) are min-max scaled to 0..255: PIL's own conversion would clip them at
    255 and turn most radiographs white.
    """
    from PIL import Image, ImageOps

    image = ImageOps.exif_transpose(image)
    if image.mode == "L":
        return image
    if image.mode in ("I", "F") or image.mode.startswith("I;16"):
        arr = np.asarray(image, dtype=np.float64)
        lo, hi = float(arr.min()), float(arr.max())
        scaled = np.zeros(arr.shape, np.uint8) if hi <= lo else np.round((arr - lo) * (255.0 / (hi - lo)))
        return Image.fromarray(scaled.astype(np.uint8), mode="L")
    return image.convert("L")


def resize_center_crop(image, size: int):
    """Resize so the shorter side is `size` (bilinear, antialiased), then center-crop size x size.

    The same geometry as BioViL's Resize(size) + CenterCrop(size) (torchvision rounding of the
    crop offset).
    """
    from PIL import Image

    w, h = image.size
    if min(w, h) != size:
        scale = size / min(w, h)
        w, h = (size, max(size, round(h * scale))) if w <= h else (max(size, round(w * scale)), size)
        image = image.resize((w, h), Image.Resampling.BILINEAR)
    left, top = int(round((w - size) / 2.0)), int(round((h - size) / 2.0))
    if (w, h) != (size, size):
        image = image.crop((left, top, left + size, top + size))
    return image


def encode_image_file(path: str | os.PathLike, size: int) -> bytes:
    """Read any image PIL can open and return the PNG bytes of its size x size grayscale version."""
    from PIL import Image

    with Image.open(path) as im:
        im.load()
        out = resize_center_crop(to_grayscale8(im), size)
    buf = io.BytesIO()
    out.save(buf, format="PNG")
    return buf.getvalue()


def split_member_name(name: str) -> tuple[str | None, str]:
    """("dir/key", "ext") of a tar member, webdataset's rule: the extension starts at the first dot
    of the base name. Returns (None, "") for names without an extension."""
    head, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    if not dot or not stem:
        return None, ""
    return (f"{head}/{stem}" if head else stem), ext.lower()


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
    """Group the members of one tar stream into samples, keeping only ALLOWED_MEMBERS.

    Hand-written over `tarfile` rather than webdataset's expander because a truncated shard must
    be reported with its name and the last key read, which webdataset's error handlers do not see.
    Members that are not allow-listed are skipped without reading their bytes.

    Raises:
        ShardReadError: when the tar is damaged or ends inside a member; every complete sample
            before that point has been yielded.
    """
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
    """Cheap integrity check of a raw sample: (meta, None) when usable, else (None, reason).

    The PNG is checked with PIL's verify(), which reads every chunk and checks its CRC without
    inflating the pixels (~0.02 ms against ~0.5 ms for a full decode at 224 px), so the stream
    can validate samples it is about to skip on resume. `decode_png=True` decodes fully (verify).
    Reasons: "missing_member", "bad_json", "corrupt_png".
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
    if (
        not isinstance(meta["text"], str)
        or not isinstance(meta["perturbations"], dict)
        or not isinstance(meta["unavailable"], dict)
    ):
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


def decode_png_gray(data: bytes) -> np.ndarray:
    """PNG bytes -> np.uint8 [H, W] (converted to 8-bit grayscale if stored otherwise)."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        im.load()
        return np.asarray(to_grayscale8(im), dtype=np.uint8).copy()


# --------------------------------------------------------------------------------------------
# Manifest and the ordered reader
# --------------------------------------------------------------------------------------------


def read_manifest(folder: str | os.PathLike) -> dict:
    """The manifest.json of a shard folder (or the manifest file itself).

    Raises:
        FileNotFoundError: no manifest (says so when a pack was interrupted: manifest.partial.json).
        ValueError: the manifest is not valid JSON or not a pertvl-shards manifest.
    """
    folder = Path(folder)
    if folder.is_file():
        folder, path = folder.parent, folder
    else:
        path = folder / MANIFEST_NAME
    if not path.is_file():
        if (folder / PARTIAL_NAME).is_file():
            raise FileNotFoundError(
                f"{path}: packing did not finish ({PARTIAL_NAME} is there); re-run the same "
                "`pertvl pack` command to resume it"
            )
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
                raise ValueError(
                    f"{path}: split {split!r} has a shard entry without name/num_samples/bytes/sha256"
                )


def split_info(manifest: dict, split: str, where: str = "manifest") -> dict:
    """manifest["splits"][split], or a ValueError listing the splits there are."""
    if split not in manifest["splits"]:
        raise ValueError(f"{where}: no split {split!r}; it has {sorted(manifest['splits'])}")
    return manifest["splits"][split]


@dataclass
class Sample:
    """One decoded sample: image np.uint8 [H, W], the json meta, and where it came from."""

    key: str
    image: np.ndarray
    meta: dict
    shard: str = ""


def iter_samples(folder: str | os.PathLike, split: str) -> Iterator[Sample]:
    """Every sample of `split` in manifest order (shard order, then tar order): no shuffle, no
    augmentation. For evaluation.

    Raises:
        ValueError: naming shard and key, on a damaged shard or sample (run `pertvl shards verify`).
    """
    folder = Path(folder)
    manifest = read_manifest(folder)
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
                        raise ValueError(
                            f"{folder / name}: sample {raw.key!r}: {problem} (run `pertvl shards verify`)"
                        )
                    count += 1
                    yield Sample(key=raw.key, image=image, meta=meta, shard=name)
        except ShardReadError as e:
            raise ValueError(f"{folder / name}: damaged shard: {e.reason} after key {e.after_key!r}") from e
        if count != entry["num_samples"]:
            raise ValueError(f"{folder / name}: {count} samples, manifest says {entry['num_samples']}")


# --------------------------------------------------------------------------------------------
# Packing
# --------------------------------------------------------------------------------------------


@dataclass
class PackResult:
    """What `pack` did: the manifest written, and how many shards were kept from an earlier run."""

    folder: Path
    manifest: dict
    shards_written: int
    shards_kept: int

    @property
    def samples_written(self) -> int:
        return sum(s["num_samples"] for s in self.manifest["splits"].values())

    @property
    def skipped(self) -> list[dict]:
        return self.manifest["skipped"]


@dataclass
class _Job:
    pos: int  # position of the pair inside its split (pairs-file order)
    pair: Pair
    key: str
    path: str
    record: dict


@dataclass
class _SplitState:
    shards: list[dict] = field(default_factory=list)
    pos: int = 0  # pairs of this split (in pairs-file order) consumed by the finished shards
    skipped: list[dict] = field(default_factory=list)  # skips among those pairs, in order


class _HashingWriter:
    """A write-only file wrapper that hashes and counts what goes through it."""

    def __init__(self, f: IO[bytes]):
        self.f, self.sha, self.size = f, hashlib.sha256(), 0

    def write(self, b: bytes) -> int:
        self.sha.update(b)
        self.size += len(b)
        return self.f.write(b)


def _member(name: str, data: bytes) -> tuple[tarfile.TarInfo, io.BytesIO]:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info, io.BytesIO(data)


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # some platforms cannot open folders; the rename is still atomic there
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_shard(path: Path, samples: list[tuple[str, bytes, bytes]]) -> dict:
    """Write one shard atomically: temp file in the same folder, fsync, os.replace, fsync folder.

    Tar members are written here with fixed metadata instead of webdataset's TarWriter, which
    stamps the current time into every member and would make identical inputs hash differently.

    Args:
        path: final shard path.
        samples: (key, png bytes, json bytes) in order.

    Returns:
        The manifest entry {name, num_samples, bytes, sha256}.
    """
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            writer = _HashingWriter(f)
            with tarfile.open(fileobj=writer, mode="w|", format=tarfile.PAX_FORMAT) as tar:
                for key, png, meta in samples:
                    tar.addfile(*_member(f"{key}.png", png))
                    tar.addfile(*_member(f"{key}.json", meta))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return {
        "name": path.name,
        "num_samples": len(samples),
        "bytes": writer.size,
        "sha256": writer.sha.hexdigest(),
    }


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def read_perturbations(path: str | os.PathLike) -> dict[str, dict]:
    """perturbations.jsonl -> {cleaned text: {perturbations, unavailable}}.

    Records are parsed and validated by pertvl.data.perturb (a bad line raises naming file and
    line); two different records for the same text are an error, exact repeats are fine.
    """
    from pertvl.data.perturb import read_perturbations as read_records  # no spaCy import at module load

    records: dict[str, dict] = {}
    for rec in read_records(path):
        slim = {"perturbations": rec.perturbations, "unavailable": rec.unavailable}
        if records.get(rec.text, slim) != slim:
            raise ValueError(f"{path}: a second, different record for the same text {rec.text[:60]!r}")
        records[rec.text] = slim
    return records


def _assign_keys(pairs: list[Pair], pairs_path: str) -> dict[str, str]:
    """id -> unique key-safe key. Duplicate ids are an error (ids are unique per image)."""
    keys: dict[str, str] = {}
    used: set[str] = set()
    for p in pairs:
        if p.id in keys:
            raise ValueError(f"{pairs_path}: duplicate pair id {p.id!r} (ids must be unique per image)")
        key = key_of(p.id)
        if key in used:  # two ids that differ only in unsafe characters
            key = f"{key}-{hashlib.blake2b(p.id.encode(), digest_size=4).hexdigest()}"
        used.add(key)
        keys[p.id] = key
    return keys


def _encode_job(args: tuple[int, str, int]) -> tuple[int, bytes | None, str | None]:
    """Pool worker: (pos, path, size) -> (pos, png bytes or None, error)."""
    pos, path, size = args
    try:
        return pos, encode_image_file(path, size), None
    except Exception as e:  # whatever a decoder raises on a bad file makes it undecodable
        return pos, None, f"{type(e).__name__}: {e}"


def _meta_bytes(job: _Job, split: str) -> bytes:
    p = job.pair
    meta = {
        "id": p.id,
        "study_id": p.study_id,
        "projection": p.projection,
        "split": split,
        "labels": p.labels,
        "text": clean_text(p.text),
        "perturbations": job.record["perturbations"],
        "unavailable": job.record["unavailable"],
    }
    return json.dumps(meta, ensure_ascii=False, sort_keys=True).encode("utf-8")


def _load_previous(out: Path, inputs: dict) -> dict | None:
    """The progress of an earlier run with the same inputs (partial manifest first), or None."""
    for name in (PARTIAL_NAME, MANIFEST_NAME):
        path = out / name
        if not path.is_file():
            continue
        try:
            prev = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError):
            log.warning("%s is not valid JSON; rebuilding every shard", path)
            return None
        if prev.get("inputs") == inputs and prev.get("format") == FORMAT:
            return prev
        log.info("%s was written for other inputs or settings; rebuilding every shard", path)
        return None
    return None


def _kept_prefix(out: Path, entries: list[dict]) -> list[dict]:
    """The longest prefix of an earlier run's shards whose files still match size and sha256."""
    kept = []
    for e in entries:
        path = out / e["name"]
        if not path.is_file() or path.stat().st_size != e["bytes"] or sha256_file(path) != e["sha256"]:
            log.info("shard %s from the earlier run is missing or changed; rebuilding from there", e["name"])
            break
        kept.append(e)
    return kept


def _split_order(pairs: Iterable[Pair]) -> list[str]:
    present = {p.split for p in pairs}
    return [s for s in SPLITS if s in present] + sorted(present - set(SPLITS))


def pack(
    pairs_path: str | os.PathLike,
    perturbations_path: str | os.PathLike,
    out: str | os.PathLike,
    *,
    images_root: str | os.PathLike | None = None,
    image_size: int = 224,
    maxcount: int = 256,
    workers: int = 2,
    command: list[str] | None = None,
) -> PackResult:
    """Pack pairs + their perturbations into `out/{split}-NNNNNN.tar` + `out/manifest.json`.

    Args:
        pairs_path: pairs.jsonl (pertvl.data.records.Pair per line).
        perturbations_path: perturbations.jsonl; a pair joins the record whose "text" equals
            clean_text(pair.text); pairs without one are skipped (missing_perturbations).
        out: shard folder (created).
        images_root: folder relative image paths are resolved against (default: the pairs file's folder).
        image_size: side of the stored square images (resize shorter side, center crop).
        maxcount: samples per shard (the last shard of a split may hold fewer).
        workers: image-encoding processes (1 = encode in this process).
        command: the command line recorded in the manifest.

    Returns:
        PackResult with the manifest. Reconciliation: pairs_in == samples_written + len(skipped).
    """
    if image_size < 1 or maxcount < 1 or workers < 1:
        raise ValueError(
            f"image_size, maxcount and workers must be >= 1, got {image_size}, {maxcount}, {workers}"
        )
    pairs_path, perturbations_path, out = Path(pairs_path), Path(perturbations_path), Path(out)
    root = Path(images_root) if images_root is not None else pairs_path.parent
    out.mkdir(parents=True, exist_ok=True)
    inputs = {
        "pairs": str(pairs_path.resolve()),
        "pairs_sha256": sha256_file(pairs_path),
        "perturbations": str(perturbations_path.resolve()),
        "perturbations_sha256": sha256_file(perturbations_path),
        "images_root": str(root.resolve()),
        "image_size": image_size,
        "maxcount": maxcount,
    }
    records = read_perturbations(perturbations_path)
    pairs = list(read_pairs(pairs_path))
    keys = _assign_keys(pairs, str(pairs_path))

    for leftover in out.iterdir():  # temp files of a crashed run are never shards
        if _TEMP_NAME.match(leftover.name):
            log.info("removing %s left by an interrupted run", leftover.name)
            leftover.unlink()
    prev = _load_previous(out, inputs)
    (out / MANIFEST_NAME).unlink(missing_ok=True)  # the folder is not a finished pack until the end

    by_split: dict[str, list[Pair]] = {s: [] for s in _split_order(pairs)}
    for p in pairs:
        by_split[p.split].append(p)
    packer = _Packer(out, inputs, image_size, maxcount, {s: _SplitState() for s in by_split})
    if prev is not None:
        for split, info in prev.get("splits", {}).items():
            if split in by_split and (kept := _kept_prefix(out, info["shards"])):
                done = {p.id for p in by_split[split][: kept[-1]["pairs_consumed"]]}
                packer.states[split] = _SplitState(
                    shards=kept,
                    pos=kept[-1]["pairs_consumed"],
                    skipped=[
                        s for s in prev.get("skipped", []) if s.get("split") == split and s["id"] in done
                    ],
                )
    kept_count = sum(len(st.shards) for st in packer.states.values())
    if kept_count:
        log.info("resuming: keeping %d finished shard(s) from the earlier run", kept_count)

    label_names: set[str] = set()
    types_present: set[str] = set()
    for p in pairs:
        label_names.update((p.labels or {}).keys())
        if (rec := records.get(clean_text(p.text))) is not None:
            types_present.update(rec["perturbations"], rec["unavailable"])

    # A process pool (PNG encoding is CPU-bound). ProcessPoolExecutor rather than multiprocessing.Pool:
    # a worker that dies raises BrokenProcessPool instead of being replaced forever (a hang).
    pool = ProcessPoolExecutor(workers) if workers > 1 else None
    try:
        for split, split_pairs in by_split.items():
            st = packer.states[split]
            jobs: list[_Job] = []
            for pos in range(st.pos, len(split_pairs)):
                p = split_pairs[pos]
                rec = records.get(clean_text(p.text))
                path = Path(p.image) if os.path.isabs(p.image) else root / p.image
                if rec is None:
                    st.skipped.append({"id": p.id, "split": split, "reason": MISSING_PERTURBATIONS})
                elif not path.is_file():
                    st.skipped.append(
                        {"id": p.id, "split": split, "reason": MISSING_IMAGE, "detail": str(path)}
                    )
                else:
                    jobs.append(_Job(pos, p, keys[p.id], str(path), rec))
            packer.pack_split(split, jobs, len(split_pairs), pool)
    finally:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)

    for split, split_pairs in by_split.items():  # skips in pairs-file order, however the run went
        order = {p.id: i for i, p in enumerate(split_pairs)}
        packer.states[split].skipped.sort(key=lambda s: order[s["id"]])
    skipped = [s for st in packer.states.values() for s in st.skipped]
    manifest = _manifest(
        packer.states, skipped, label_names, types_present, inputs, image_size, command, len(pairs)
    )
    n_out = sum(s["num_samples"] for s in manifest["splits"].values())
    if n_out + len(skipped) != len(pairs):  # a bug, not bad input: refuse to write a wrong manifest
        raise RuntimeError(
            f"reconciliation failed: {len(pairs)} pairs in, {n_out} written + {len(skipped)} skipped"
        )
    listed = {s["name"] for info in manifest["splits"].values() for s in info["shards"]}
    for f in out.iterdir():
        if SHARD_NAME.match(f.name) and f.name not in listed:
            log.info("removing stale shard %s (not part of this pack)", f.name)
            f.unlink()
    write_json(out / MANIFEST_NAME, manifest)
    (out / PARTIAL_NAME).unlink(missing_ok=True)
    reasons = Counter(s["reason"] for s in skipped)
    log.info(
        "packed %d of %d pairs into %d shard(s) in %s (%s); skipped %d %s; %d shard(s) kept from an earlier run",
        n_out, len(pairs), len(listed), out,
        ", ".join(f"{k}: {v['num_samples']}" for k, v in manifest["splits"].items()),
        len(skipped), dict(reasons), kept_count,
    )  # fmt: skip
    for s in skipped[:20]:
        log.info("skipped %s: %s%s", s["id"], s["reason"], f" ({s['detail']})" if s.get("detail") else "")
    if len(skipped) > 20:
        log.info("... and %d more skips, all listed in %s", len(skipped) - 20, out / MANIFEST_NAME)
    return PackResult(folder=out, manifest=manifest, shards_written=packer.written, shards_kept=kept_count)


@dataclass
class _Packer:
    """Writes the shards of each split in order and records progress after every shard."""

    out: Path
    inputs: dict
    image_size: int
    maxcount: int
    states: dict[str, _SplitState]
    written: int = 0

    def pack_split(self, split: str, jobs: list[_Job], n_pairs: int, pool) -> None:
        """Encode the remaining jobs of one split in order and write each shard as it fills."""
        st = self.states[split]
        args = [(j.pos, j.path, self.image_size) for j in jobs]
        results = pool.map(_encode_job, args, chunksize=8) if pool is not None else map(_encode_job, args)
        by_pos = {j.pos: j for j in jobs}
        buffer: list[tuple[str, bytes, bytes]] = []
        for pos, png, err in results:
            job = by_pos[pos]
            if png is None:
                st.skipped.append(
                    {"id": job.pair.id, "split": split, "reason": UNDECODABLE_IMAGE, "detail": err}
                )
                log.warning("skipping %s: cannot decode %s: %s", job.pair.id, job.path, err)
                continue
            buffer.append((job.key, png, _meta_bytes(job, split)))
            if len(buffer) == self.maxcount:
                self._flush(split, buffer, consumed=pos + 1)
                buffer = []
        if buffer:
            self._flush(split, buffer, consumed=n_pairs)
        st.pos = n_pairs

    def _flush(self, split: str, samples: list[tuple[str, bytes, bytes]], consumed: int) -> None:
        st = self.states[split]
        entry = write_shard(self.out / f"{split}-{len(st.shards):06d}.tar", samples)
        entry["pairs_consumed"] = consumed
        st.shards.append(entry)
        st.pos = consumed
        self.written += 1
        # Progress for a re-run: finished shards, and the skips among the pairs they consumed.
        partial = {
            "format": FORMAT,
            "inputs": self.inputs,
            "splits": {s: {"shards": x.shards} for s, x in self.states.items()},
            "skipped": [s for x in self.states.values() for s in x.skipped],
        }
        write_json(self.out / PARTIAL_NAME, partial)


def _manifest(
    states: dict[str, _SplitState],
    skipped: list[dict],
    label_names: set[str],
    types_present: set[str],
    inputs: dict,
    image_size: int,
    command: list[str] | None,
    pairs_in: int,
) -> dict:
    return {
        "format": FORMAT,
        "pertvl_version": __version__,
        "command": command if command is not None else [Path(sys.argv[0]).name, *sys.argv[1:]],
        "argv": list(sys.argv),
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "image_size": image_size,
        "perturbation_types": [t for t in PERTURBATION_TYPES if t in types_present],
        "label_names": sorted(label_names),
        "splits": {
            s: {"num_samples": sum(e["num_samples"] for e in st.shards), "shards": st.shards}
            for s, st in states.items()
        },
        "skipped": skipped,
        "skipped_counts": dict(Counter(s["reason"] for s in skipped)),
        "pairs_in": pairs_in,
        "inputs": inputs,
    }


def command_of(args: argparse.Namespace) -> list[str]:
    """The `pertvl pack` command line that reproduces this run (all options spelled out)."""
    cmd = [
        "pertvl",
        "pack",
        "--pairs",
        str(args.pairs),
        "--perturbations",
        str(args.perturbations),
        "--out",
        str(args.out),
    ]
    if args.images_root:
        cmd += ["--images-root", str(args.images_root)]
    return cmd + [
        "--image-size",
        str(args.image_size),
        "--maxcount",
        str(args.maxcount),
        "--workers",
        str(args.workers),
    ]


def pack_cli_main(args: argparse.Namespace) -> int:
    """`pertvl pack`: see `pack`."""
    result = pack(
        args.pairs,
        args.perturbations,
        args.out,
        images_root=args.images_root,
        image_size=args.image_size,
        maxcount=args.maxcount,
        workers=args.workers,
        command=command_of(args),
    )
    m = result.manifest
    counts = ", ".join(
        f"{k} {v['num_samples']} in {len(v['shards'])} shard(s)" for k, v in m["splits"].items()
    )
    print(f"{result.folder}: {counts}; skipped {len(m['skipped'])} {m['skipped_counts']}")
    return 0


# --------------------------------------------------------------------------------------------
# Verify
# --------------------------------------------------------------------------------------------


@dataclass
class Problem:
    shard: str | None
    key: str | None
    message: str

    def __str__(self) -> str:
        where = " ".join(
            x for x in (self.shard and f"shard {self.shard}", self.key and f"key {self.key}") if x
        )
        return f"{where or 'manifest'}: {self.message}"


@dataclass
class VerifyReport:
    folder: Path
    shards_checked: int = 0
    samples_checked: int = 0
    problems: list[Problem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def verify(folder: str | os.PathLike) -> VerifyReport:
    """Re-hash every shard against the manifest and decode every sample.

    Checks: each listed shard exists with the recorded size and sha256; every sample has a png
    that decodes to an 8-bit grayscale image_size x image_size image and a json with all fields,
    of the right split, with known perturbation types; keys are unique per split; sample counts
    match per shard and per split; pairs_in reconciles; no unlisted shard files lie in the folder.
    """
    folder = Path(folder)
    report = VerifyReport(folder)
    try:
        manifest = read_manifest(folder)
    except (FileNotFoundError, ValueError) as e:
        report.problems.append(Problem(None, None, str(e)))
        return report
    size = manifest["image_size"]
    listed: set[str] = set()
    total = 0
    for split, info in manifest["splits"].items():
        keys: set[str] = set()
        split_count = 0
        for entry in info["shards"]:
            name = entry["name"]
            listed.add(name)
            report.shards_checked += 1
            split_count += entry["num_samples"]
            path = folder / name
            if not path.is_file():
                report.problems.append(Problem(name, None, "shard file is missing"))
                continue
            nbytes, digest = path.stat().st_size, sha256_file(path)
            if nbytes != entry["bytes"]:
                report.problems.append(
                    Problem(name, None, f"size {nbytes} bytes, manifest says {entry['bytes']}")
                )
            if digest != entry["sha256"]:
                report.problems.append(
                    Problem(name, None, f"sha256 {digest} does not match the manifest's {entry['sha256']}")
                )
            count = _verify_shard(path, name, split, size, keys, report)
            if count != entry["num_samples"]:
                report.problems.append(
                    Problem(name, None, f"{count} samples, manifest says {entry['num_samples']}")
                )
        if split_count != info["num_samples"]:
            report.problems.append(
                Problem(
                    None,
                    None,
                    f"split {split}: shards hold {split_count} samples, num_samples says {info['num_samples']}",
                )
            )
        total += info["num_samples"]
    if "pairs_in" in manifest and manifest["pairs_in"] != total + len(manifest.get("skipped", [])):
        report.problems.append(
            Problem(
                None,
                None,
                f"pairs_in {manifest['pairs_in']} != {total} written + {len(manifest['skipped'])} skipped",
            )
        )
    for f in sorted(folder.iterdir()):
        if f.name.endswith(".tar") and f.name not in listed:
            report.problems.append(Problem(f.name, None, "tar file in the folder but not in the manifest"))
    return report


def _verify_shard(path: Path, name: str, split: str, size: int, keys: set[str], report: VerifyReport) -> int:
    count = 0
    try:
        with open(path, "rb") as f:
            for raw in iter_raw_samples(f, name):
                count += 1
                report.samples_checked += 1
                for problem in _sample_problems(raw, split, size, keys):
                    report.problems.append(Problem(name, raw.key, problem))
    except ShardReadError as e:
        report.problems.append(Problem(name, e.after_key, f"damaged tar: {e.reason}"))
    return count


def _sample_problems(raw: RawSample, split: str, size: int, keys: set[str]) -> list[str]:
    problems = []
    if raw.key in keys:
        problems.append("duplicate key in this split")
    keys.add(raw.key)
    if raw.ignored:
        problems.append(f"unexpected member(s) {sorted(set(raw.ignored))}")
    meta, problem = check_raw_sample(raw, decode_png=True)
    if problem:
        return problems + [problem]
    from PIL import Image

    with Image.open(io.BytesIO(raw.members["png"])) as im:
        if im.mode != "L":
            problems.append(f"png mode {im.mode}, expected L (8-bit grayscale)")
        if im.size != (size, size):
            problems.append(f"png is {im.size[0]}x{im.size[1]}, expected {size}x{size}")
    if meta["split"] != split:
        problems.append(f"json split {meta['split']!r} in a {split!r} shard")
    unknown = (set(meta["perturbations"]) | set(meta["unavailable"])) - set(PERTURBATION_TYPES)
    if unknown:
        problems.append(f"unknown perturbation type(s) {sorted(unknown)}")
    if key_of(str(meta["id"])) != raw.key and not raw.key.startswith(key_of(str(meta["id"])) + "-"):
        problems.append(f"key does not belong to id {meta['id']!r}")
    return problems


def verify_cli_main(args: argparse.Namespace) -> int:
    """`pertvl shards verify FOLDER`: print every problem; exit 1 if there is any."""
    report = verify(args.folder)
    for p in report.problems:
        print(f"{report.folder}: {p}", file=sys.stderr)
    status = "OK" if report.ok else f"{len(report.problems)} problem(s)"
    print(
        f"{report.folder}: {report.shards_checked} shard(s), {report.samples_checked} sample(s) checked: {status}"
    )
    return 0 if report.ok else 1
