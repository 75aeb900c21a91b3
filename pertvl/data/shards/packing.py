"""Packing: pairs + perturbations -> WebDataset shards + manifest.json (`pertvl pack`).

Packing is parallel (PNG encoding is the bottleneck) and crash-safe: every shard is written under
a temporary name in the same folder, fsynced and renamed, so a shard name on disk is always a
complete shard. After each shard, `manifest.partial.json` records what is done; re-running the
same command with the same inputs keeps every finished shard whose bytes still hash to the
recorded sha256 and continues from there. `manifest.json` is written last, so a folder without it
is never mistaken for a finished pack.

The shard tars are written with fixed member metadata (mtime 0, uid 0, mode 644), so the same
inputs give byte-identical shards whether packed in one run, resumed, or with any worker count.
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
from collections.abc import Iterable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import IO

from pertvl import __version__
from pertvl.data.image import ImageReadError, encode_image_file
from pertvl.data.records import PERTURBATION_TYPES, SPLITS, Pair, read_pairs
from pertvl.data.shards.format import FORMAT, MANIFEST_NAME, PARTIAL_NAME, SHARD_NAME, key_of
from pertvl.data.text import clean_text
from pertvl.files import TEMP_MARK, atomic_open, sha256_file, write_json

log = logging.getLogger(__name__)

# Temporary shard files of a crashed run (pertvl.files.atomic_open names them), removed on resume.
_TEMP_NAME = re.compile(r"^\.[A-Za-z0-9_]+-\d{6}\.tar" + re.escape(TEMP_MARK) + r"[A-Za-z0-9_]+$")

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
    with atomic_open(path, "wb", durable=True) as f:
        writer = _HashingWriter(f)
        with tarfile.open(fileobj=writer, mode="w|", format=tarfile.PAX_FORMAT) as tar:
            for key, png, meta in samples:
                tar.addfile(*_member(f"{key}.png", png))
                tar.addfile(*_member(f"{key}.json", meta))
    return {
        "name": path.name,
        "num_samples": len(samples),
        "bytes": writer.size,
        "sha256": writer.sha.hexdigest(),
    }


def perturbations_by_text(path: str | os.PathLike) -> dict[str, dict]:
    """perturbations.jsonl -> {cleaned text: {perturbations, unavailable}}: the join table of pack.

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
    except ImageReadError as e:
        return pos, None, e.reason
    except OSError as e:  # the file went away or became unreadable after the existence check
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
    if p.extra:  # source facts (the phantom's findings and render seed: what grounding evaluation needs)
        meta["extra"] = p.extra
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
    records = perturbations_by_text(perturbations_path)
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
