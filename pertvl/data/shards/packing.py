"""Packing: pairs + perturbations -> WebDataset shards + manifest.json (`pertvl pack`).

Crash-safe: every shard is written under a temporary name, fsynced and renamed; after each shard
`manifest.partial.json` records the progress, and a re-run with the same inputs keeps every finished
shard whose bytes still match. `manifest.json` is written last.

Shard k of a split holds the good samples of the split's pairs k·maxcount ... (k+1)·maxcount − 1
(pairs-file order), so a shard depends on its own pairs only: `pack(part=(i, n))` packs a contiguous
range of each split's shards (slurm/pack_array.sbatch) and `merge_parts` joins the parts' manifests.
Tar members have fixed metadata (mtime 0, uid 0, mode 644): the same inputs give byte-identical
shards in one run, resumed, with any worker count, or in parts.
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
import time
from collections import Counter
from collections.abc import Iterable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import IO

from pertvl import __version__
from pertvl.data.image import SHARD_IMAGE_ENCODING, ImageReadError, encode_image_file
from pertvl.data.records import PERTURBATION_TYPES, SPLITS, Pair, read_pairs
from pertvl.data.shards.format import FORMAT, MANIFEST_NAME, PARTIAL_NAME, SHARD_NAME, key_of
from pertvl.data.text import clean_text
from pertvl.files import LOCK_NAME, TEMP_MARK, atomic_open, lock_folder, sha256_file, write_json
from pertvl.process import die_with_parent

log = logging.getLogger(__name__)

# Temporary shard files of a crashed run (pertvl.files.atomic_open's names).
_TEMP_NAME = re.compile(r"^\.([A-Za-z0-9_]+)-(\d{6})\.tar" + re.escape(TEMP_MARK) + r"[A-Za-z0-9_]+$")

# Skip reasons of packing (manifest["skipped"][i]["reason"]).
MISSING_IMAGE = "missing_image"
UNDECODABLE_IMAGE = "undecodable_image"
MISSING_PERTURBATIONS = "missing_perturbations"


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
    counterfactual: dict | None = None  # {counterfactuals, unavailable}; None when packed without them


@dataclass
class _SplitState:
    shards: list[dict] = field(default_factory=list)
    pos: int = 0  # pairs of this split (in pairs-file order) consumed by the finished shards
    skipped: list[dict] = field(default_factory=list)  # skips among those pairs, in order


class _HashingWriter:
    """A write-only file wrapper that hashes and counts what goes through it (no second read)."""

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


def write_shard(path: Path, samples: list[tuple[str, bytes, bytes]]) -> dict:
    """Write one shard atomically from (key, png bytes, json bytes) samples, with fixed member
    metadata (webdataset's TarWriter stamps the time); returns its manifest entry."""
    with atomic_open(path, "wb", durable=True) as f:
        writer = _HashingWriter(f)
        with tarfile.open(fileobj=writer, mode="w|", format=tarfile.PAX_FORMAT) as tar:
            for key, png, meta in samples:
                tar.addfile(*_member(f"{key}.png", png))
                tar.addfile(*_member(f"{key}.json", meta))
    return {"name": path.name, "num_samples": len(samples), "bytes": writer.size,
            "sha256": writer.sha.hexdigest()}


def _join_table(path: Path, field: str) -> dict[str, dict]:
    """perturbations.jsonl ("perturbations") or counterfactuals.jsonl ("counterfactuals"), read and
    validated by its module, as pack's join table {cleaned text: {field, unavailable}}; two different
    records for the same text are an error naming the file, exact repeats are fine."""
    if field == "perturbations":
        from pertvl.data.perturb import read_perturbations as read  # no spaCy import at module load
    else:
        from pertvl.data.counterfactual import read_counterfactuals as read
    table: dict[str, dict] = {}
    for rec in read(path):
        slim = {field: getattr(rec, field), "unavailable": rec.unavailable}
        if table.get(rec.text, slim) != slim:
            raise ValueError(f"{path}: a second, different record for the same text {rec.text[:60]!r}")
        table[rec.text] = slim
    return table


# What a sample without a counterfactual record gets (counted in the manifest, never a skip).
_NO_COUNTERFACTUALS = {"counterfactuals": {}, "unavailable": {}}


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
    except ImageReadError as e:
        return pos, None, e.reason
    except OSError as e:  # the file went away or became unreadable after the existence check
        return pos, None, f"{type(e).__name__}: {e}"


def _meta_bytes(job: _Job, split: str) -> bytes:
    p = job.pair
    meta = {"id": p.id, "study_id": p.study_id, "projection": p.projection, "split": split,
            "labels": p.labels, "text": clean_text(p.text), "perturbations": job.record["perturbations"],
            "unavailable": job.record["unavailable"]}
    if job.counterfactual is not None:  # only with --counterfactuals: a pack without them keeps its bytes
        meta["counterfactuals"] = job.counterfactual["counterfactuals"]
        meta["cf_unavailable"] = job.counterfactual["unavailable"]
    if p.extra:  # source facts (the phantom's findings and render seed: what grounding evaluation needs)
        meta["extra"] = p.extra
    return json.dumps(meta, ensure_ascii=False, sort_keys=True).encode("utf-8")


def _load_previous(out: Path, inputs: dict, *names: str) -> dict | None:
    """The progress of an earlier run with the same inputs (partial manifest first), or None."""
    for name in names:
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


def part_name(part: tuple[int, int], partial: bool = False) -> str:
    """manifest.part-I-of-N.json (or its in-progress manifest.partial.part-I-of-N.json)."""
    return f"manifest.{'partial.' if partial else ''}part-{part[0]}-of-{part[1]}.json"


_PART_NAME = re.compile(r"^manifest\.part-(\d+)-of-(\d+)\.json$")


def _part_range(n_pairs: int, maxcount: int, part: tuple[int, int] | None) -> tuple[int, int]:
    """The pair positions [lo, hi) of a split that part (i, n) packs: whole shards, contiguous."""
    if part is None:
        return 0, n_pairs
    shards = -(-n_pairs // maxcount)
    first, last = shards * part[0] // part[1], shards * (part[0] + 1) // part[1]
    return min(first * maxcount, n_pairs), min(last * maxcount, n_pairs)


def _in_part(temp: re.Match, part: tuple[int, int], pairs: list[Pair], maxcount: int) -> bool:
    """Whether a crashed run's temp shard file (its _TEMP_NAME match: split, shard index) belongs to
    this part (others may be writing theirs)."""
    n = sum(p.split == temp.group(1) for p in pairs)
    lo, hi = _part_range(n, maxcount, part)
    return lo <= int(temp.group(2)) * maxcount < hi


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


def pack(pairs_path: str | os.PathLike, perturbations_path: str | os.PathLike, out: str | os.PathLike, *,
         images_root: str | os.PathLike | None = None, image_size: int = 224, maxcount: int = 256,
         workers: int = 2, command: list[str] | None = None, part: tuple[int, int] | None = None,
         counterfactuals_path: str | os.PathLike | None = None) -> PackResult:
    """Pack pairs + their perturbations into `out/{split}-NNNNNN.tar` + `out/manifest.json`.

    A pair joins the perturbation record whose text is clean_text(pair.text); pairs without one, or
    without a readable image, are skipped (manifest["skipped"]). `image_size`: side of the stored square
    images (shorter side resized, center crop). `maxcount`: pairs per shard. `part` (i, n), 0 <= i < n:
    of every split, shards floor(S·i/n) .. floor(S·(i+1)/n) − 1, written with `manifest.part-I-of-N.json`
    instead (parts may run at once in one folder). `counterfactuals_path`: every sample json gains
    `counterfactuals` and `cf_unavailable`, joined by cleaned text (empty maps without a record, counted
    in `counterfactuals_missing`); without it the shards carry no counterfactual keys.
    Reconciliation: pairs in == samples written + skipped (for a part: its pairs).
    """
    if image_size < 1 or maxcount < 1 or workers < 1:
        raise ValueError(f"image_size, maxcount and workers must be >= 1, got {image_size}, {maxcount}, "
                         f"{workers}")
    partial_name = PARTIAL_NAME if part is None else part_name(part, partial=True)
    pairs_path, perturbations_path, out = Path(pairs_path), Path(perturbations_path), Path(out)
    root = Path(images_root) if images_root is not None else pairs_path.parent
    out.mkdir(parents=True, exist_ok=True)
    inputs = {"pairs": str(pairs_path.resolve()), "pairs_sha256": sha256_file(pairs_path),
              "perturbations": str(perturbations_path.resolve()),
              "perturbations_sha256": sha256_file(perturbations_path), "images_root": str(root.resolve()),
              "image_size": image_size, "maxcount": maxcount, "image_encoding": SHARD_IMAGE_ENCODING}
    cf_records: dict[str, dict] | None = None
    if counterfactuals_path is not None:
        counterfactuals_path = Path(counterfactuals_path)
        inputs["counterfactuals"] = str(counterfactuals_path.resolve())
        inputs["counterfactuals_sha256"] = sha256_file(counterfactuals_path)
        cf_records = _join_table(counterfactuals_path, "counterfactuals")
    records = _join_table(perturbations_path, "perturbations")
    pairs = list(read_pairs(pairs_path))
    keys = _assign_keys(pairs, str(pairs_path))

    for leftover in out.iterdir():  # temp files of a crashed run are never shards
        temp = _TEMP_NAME.match(leftover.name)
        if temp and (part is None or _in_part(temp, part, pairs, maxcount)):
            log.info("removing %s left by an interrupted run", leftover.name)
            leftover.unlink(missing_ok=True)
    prev = _load_previous(out, inputs, partial_name, MANIFEST_NAME if part is None else part_name(part))
    (out / MANIFEST_NAME).unlink(missing_ok=True)  # the folder is not a finished pack until the end

    by_split: dict[str, list[Pair]] = {s: [] for s in _split_order(pairs)}
    for p in pairs:
        by_split[p.split].append(p)
    ranges = {split: _part_range(len(ps), maxcount, part) for split, ps in by_split.items()}
    packer = _Packer(out, inputs, image_size, maxcount, {s: _SplitState(pos=ranges[s][0]) for s in by_split},
                     partial_name)  # fmt: skip
    if prev is not None:
        for split, info in prev.get("splits", {}).items():
            if split in by_split and (kept := _kept_prefix(out, info["shards"])):
                done = {p.id for p in by_split[split][ranges[split][0] : kept[-1]["pairs_consumed"]]}
                skips = [s for s in prev.get("skipped", []) if s.get("split") == split and s["id"] in done]
                packer.states[split] = _SplitState(shards=kept, pos=kept[-1]["pairs_consumed"], skipped=skips)
    kept_count = sum(len(st.shards) for st in packer.states.values())
    if kept_count:
        log.info("resuming: keeping %d finished shard(s) from the earlier run", kept_count)

    label_names: set[str] = set()
    types_present: set[str] = set()
    for p in pairs:
        label_names.update((p.labels or {}).keys())
        if (rec := records.get(clean_text(p.text))) is not None:
            types_present.update(rec["perturbations"], rec["unavailable"])

    # ProcessPoolExecutor: a worker that dies raises BrokenProcessPool (multiprocessing.Pool would hang).
    pool = ProcessPoolExecutor(workers, initializer=die_with_parent) if workers > 1 else None
    try:
        for split, split_pairs in by_split.items():
            st = packer.states[split]
            jobs: list[_Job] = []
            for pos in range(st.pos, ranges[split][1]):
                p = split_pairs[pos]
                rec = records.get(clean_text(p.text))
                path = Path(p.image) if os.path.isabs(p.image) else root / p.image
                if rec is None:
                    st.skipped.append({"id": p.id, "split": split, "reason": MISSING_PERTURBATIONS})
                elif not path.is_file():
                    st.skipped.append({"id": p.id, "split": split, "reason": MISSING_IMAGE,
                                       "detail": str(path)})
                else:
                    cf = None if cf_records is None else cf_records.get(clean_text(p.text), _NO_COUNTERFACTUALS)
                    jobs.append(_Job(pos, p, keys[p.id], str(path), rec, cf))
            packer.pack_split(split, jobs, ranges[split][1], pool)
    finally:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)

    for split, split_pairs in by_split.items():  # skips in pairs-file order, however the run went
        order = {p.id: i for i, p in enumerate(split_pairs)}
        packer.states[split].skipped.sort(key=lambda s: order[s["id"]])
    skipped = [s for st in packer.states.values() for s in st.skipped]
    pairs_in = sum(hi - lo for lo, hi in ranges.values())
    manifest = _manifest(packer.states, skipped, label_names, types_present, inputs, image_size, command,
                         pairs_in)
    n_out = sum(s["num_samples"] for s in manifest["splits"].values())
    if cf_records is not None:
        _add_counterfactual_counts(manifest, pairs, by_split, ranges, cf_records, skipped)
    if n_out + len(skipped) != pairs_in:  # a bug, not bad input: refuse to write a wrong manifest
        raise RuntimeError(f"reconciliation failed: {pairs_in} pairs in, {n_out} written + {len(skipped)} "
                           "skipped")
    listed = {s["name"] for info in manifest["splits"].values() for s in info["shards"]}
    if part is None:  # a part shares the folder with the others: it never removes their shards
        for f in out.iterdir():
            if SHARD_NAME.match(f.name) and f.name not in listed:
                log.info("removing stale shard %s (not part of this pack)", f.name)
                f.unlink()
        write_json(out / MANIFEST_NAME, manifest)
    else:
        manifest["part"] = {"index": part[0], "count": part[1], "pairs": {s: list(r) for s, r in ranges.items()}}
        write_json(out / part_name(part), manifest)
    (out / partial_name).unlink(missing_ok=True)
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
    partial_name: str = PARTIAL_NAME
    written: int = 0

    def pack_split(self, split: str, jobs: list[_Job], end: int, pool) -> None:
        """Encode the jobs of one split (pairs up to position `end`) in order, writing shard k once
        its pairs are done."""
        st = self.states[split]
        args = [(j.pos, j.path, self.image_size) for j in jobs]
        results = pool.map(_encode_job, args, chunksize=8) if pool is not None else map(_encode_job, args)
        by_pos = {j.pos: j for j in jobs}
        buffer: list[tuple[str, bytes, bytes]] = []
        chunk = st.pos // self.maxcount
        for pos, png, err in results:
            job = by_pos[pos]
            if pos // self.maxcount != chunk:  # the pairs of shard `chunk` are all done
                self._flush(split, chunk, buffer)
                buffer, chunk = [], pos // self.maxcount
            if png is None:
                st.skipped.append({"id": job.pair.id, "split": split, "reason": UNDECODABLE_IMAGE,
                                   "detail": err})
                log.warning("skipping %s: cannot decode %s: %s", job.pair.id, job.path, err)
                continue
            buffer.append((job.key, png, _meta_bytes(job, split)))
        if buffer:
            self._flush(split, chunk, buffer)
        st.pos = end

    def _flush(self, split: str, chunk: int, samples: list[tuple[str, bytes, bytes]]) -> None:
        st = self.states[split]
        st.pos = (chunk + 1) * self.maxcount
        if not samples:  # every pair of this shard was skipped: no empty tar
            return
        entry = write_shard(self.out / f"{split}-{chunk:06d}.tar", samples)
        entry["pairs_consumed"] = st.pos
        st.shards.append(entry)
        self.written += 1
        # Progress for a re-run: finished shards, and the skips among the pairs they consumed.
        write_json(self.out / self.partial_name, {
            "format": FORMAT, "inputs": self.inputs,
            "splits": {s: {"shards": x.shards} for s, x in self.states.items()},
            "skipped": [s for x in self.states.values() for s in x.skipped]})


def _provenance(command: list[str] | None) -> dict:
    return {"command": command if command is not None else [Path(sys.argv[0]).name, *sys.argv[1:]],
            "argv": list(sys.argv), "created": datetime.now(UTC).isoformat(timespec="seconds")}


def _manifest(states: dict[str, _SplitState], skipped: list[dict], label_names: set[str],
              types_present: set[str], inputs: dict, image_size: int, command: list[str] | None,
              pairs_in: int) -> dict:
    return {
        "format": FORMAT,
        "pertvl_version": __version__,
        **_provenance(command),
        "image_size": image_size,
        "perturbation_types": [t for t in PERTURBATION_TYPES if t in types_present],
        "label_names": sorted(label_names),
        "splits": {s: {"num_samples": sum(e["num_samples"] for e in st.shards), "shards": st.shards}
                   for s, st in states.items()},
        "skipped": skipped,
        "skipped_counts": dict(Counter(s["reason"] for s in skipped)),
        "pairs_in": pairs_in,
        "inputs": inputs,
    }


def _add_counterfactual_counts(manifest: dict, pairs: list[Pair], by_split: dict[str, list[Pair]],
                               ranges: dict[str, tuple[int, int]], cf_records: dict[str, dict],
                               skipped: list[dict]) -> None:
    """manifest["counterfactual_types"] (the types some packed text has, made or unavailable) and
    manifest["counterfactuals_missing"] {split: packed samples without a counterfactual record}."""
    from pertvl.data.counterfactual import COUNTERFACTUAL_TYPES

    dropped = {s["id"] for s in skipped}
    present: set[str] = set()
    missing: dict[str, int] = {}
    for split, ps in by_split.items():
        lo, hi = ranges[split]
        missing[split] = 0
        for p in ps[lo:hi]:
            if p.id in dropped:
                continue
            rec = cf_records.get(clean_text(p.text))
            if rec is None:
                missing[split] += 1
            else:
                present.update(rec["counterfactuals"], rec["unavailable"])
    manifest["counterfactual_types"] = [t for t in COUNTERFACTUAL_TYPES if t in present] + sorted(
        present - set(COUNTERFACTUAL_TYPES))
    manifest["counterfactuals_missing"] = missing


def merge_parts(folder: str | os.PathLike, *, if_complete: bool = False, command: list[str] | None = None) -> dict | None:
    """Join the manifests of `pack(part=...)`'s n parts into `folder/manifest.json`, after checking
    that all parts are there, share their inputs, and every shard matches its size and sha256.

    `if_complete`: return None while parts are missing, and let one caller at a time merge (a lock
    file), so every task of a SLURM array can call it. ValueError naming what is missing or differs.
    """
    folder = Path(folder)
    if not folder.is_dir():
        if if_complete:
            return None
        raise ValueError(f"{folder}: no such shard folder")
    lock = folder / ".merge.lock"
    if if_complete:
        # One merger at a time, each looking only once it holds the lock: the last task sees every part.
        for _ in range(600):
            try:
                os.close(os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
                break
            except FileExistsError:
                time.sleep(0.1)
        else:
            raise ValueError(f"{lock}: held for a minute; remove it if no merge is running")
    try:
        found = {}
        for f in folder.iterdir():
            if m := _PART_NAME.match(f.name):
                found[(int(m.group(1)), int(m.group(2)))] = f
        counts = {n for _, n in found}
        if not found:
            if if_complete:
                return None
            raise ValueError(f"{folder}: no part manifest (manifest.part-I-of-N.json); run `pertvl pack --part I/N` first")
        if len(counts) != 1:
            raise ValueError(f"{folder}: part manifests of different part counts: {sorted(f.name for f in found.values())}")
        n = counts.pop()
        missing = [i for i in range(n) if (i, n) not in found]
        if missing:
            if if_complete:
                return None
            raise ValueError(f"{folder}: part(s) {missing} of {n} are missing (no manifest.part-I-of-{n}.json)")
        return _merge(folder, found, n, command)
    finally:
        if if_complete:
            lock.unlink(missing_ok=True)


def _merge(folder: Path, found: dict[tuple[int, int], Path], n: int, command: list[str] | None) -> dict:
    """The merge itself, once all n part manifests are there (see merge_parts)."""
    parts = [json.loads(found[(i, n)].read_text(encoding="utf-8")) for i in range(n)]
    first = parts[0]
    for i, p in enumerate(parts):
        for key in ("format", "inputs", "image_size", "perturbation_types", "label_names", "counterfactual_types"):
            if p.get(key) != first.get(key):
                raise ValueError(f"{found[(i, n)]}: {key} differs from part 0's: the parts were not packed "
                                 "from the same inputs and settings")  # fmt: skip
    splits: dict[str, dict] = {}
    for p in parts:
        for split, info in p["splits"].items():
            splits.setdefault(split, {"num_samples": 0, "shards": []})
            splits[split]["num_samples"] += info["num_samples"]
            splits[split]["shards"].extend(info["shards"])
    for info in splits.values():
        for e in info["shards"]:
            path = folder / e["name"]
            if not path.is_file() or path.stat().st_size != e["bytes"] or sha256_file(path) != e["sha256"]:
                raise ValueError(f"{path}: missing, or not the shard its part manifest lists (size/sha256)")
    order = {s: i for i, s in enumerate(first["splits"])}
    skipped = sorted((s for p in parts for s in p["skipped"]), key=lambda s: order.get(s["split"], len(order)))
    # stable sort: within a split, parts are contiguous ranges in pairs-file order
    manifest = {
        **{k: first[k] for k in ("format", "pertvl_version", "image_size", "perturbation_types", "label_names")},
        **_provenance(command),
        "splits": splits,
        "skipped": skipped,
        "skipped_counts": dict(Counter(s["reason"] for s in skipped)),
        "pairs_in": sum(p["pairs_in"] for p in parts),
        "inputs": first["inputs"],
        "parts": n,
    }
    if "counterfactual_types" in first:
        manifest["counterfactual_types"] = first["counterfactual_types"]
        manifest["counterfactuals_missing"] = {
            s: sum(p.get("counterfactuals_missing", {}).get(s, 0) for p in parts) for s in splits}
    write_json(folder / MANIFEST_NAME, manifest)
    for f in found.values():
        f.unlink()
    log.info("merged %d part(s) into %s: %s", n, folder / MANIFEST_NAME, _counts(splits))
    return manifest


def _counts(splits: dict[str, dict]) -> str:
    return ", ".join(f"{k} {v['num_samples']} in {len(v['shards'])} shard(s)" for k, v in splits.items())


def command_of(args: argparse.Namespace) -> list[str]:
    """The `pertvl pack` command line that reproduces this run (all options spelled out)."""
    cmd = ["pertvl", "pack", "--pairs", str(args.pairs), "--perturbations", str(args.perturbations),
           "--out", str(args.out)]
    if args.images_root:
        cmd += ["--images-root", str(args.images_root)]
    if getattr(args, "counterfactuals", None):
        cmd += ["--counterfactuals", str(args.counterfactuals)]
    cmd += ["--image-size", str(args.image_size), "--maxcount", str(args.maxcount), "--workers", str(args.workers)]
    return cmd + (["--part", f"{args.part[0]}/{args.part[1]}"] if args.part else [])


def merge_cli_main(args: argparse.Namespace) -> int:
    """`pertvl shards merge FOLDER`: see `merge_parts`."""
    try:
        m = merge_parts(args.folder, if_complete=args.if_complete,
                        command=["pertvl", "shards", "merge", str(args.folder)])  # fmt: skip
    except ValueError as e:
        log.error("pertvl shards merge: %s", e)
        return 2
    if m is None:
        print(f"{args.folder}: parts still missing or another task is merging; nothing to do")
        return 0
    print(f"{args.folder}: merged {m['parts']} part(s): {_counts(m['splits'])}; skipped {len(m['skipped'])} {m['skipped_counts']}")
    return 0


def pack_cli_main(args: argparse.Namespace) -> int:
    """`pertvl pack`: see `pack`. One writer per output folder (per part with --part)."""
    lock = LOCK_NAME if args.part is None else f".pertvl.part-{args.part[0]}-of-{args.part[1]}.lock"
    with lock_folder(args.out, " ".join(command_of(args)), name=lock):
        result = pack(args.pairs, args.perturbations, args.out, images_root=args.images_root,
                      image_size=args.image_size, maxcount=args.maxcount, workers=args.workers,
                      command=command_of(args), part=args.part,
                      counterfactuals_path=getattr(args, "counterfactuals", None))
    m = result.manifest
    print(f"{result.folder}: {_counts(m['splits'])}; skipped {len(m['skipped'])} {m['skipped_counts']}")
    if "counterfactual_types" in m:
        print(f"counterfactuals: types {m['counterfactual_types']}; samples without a record (empty maps): "
              f"{m['counterfactuals_missing']}")
    return 0
