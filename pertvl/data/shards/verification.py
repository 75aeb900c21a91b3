"""Verification of a shard folder against its manifest (`pertvl shards verify`)."""

from __future__ import annotations

import argparse
import io
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

from pertvl.data.records import PERTURBATION_TYPES
from pertvl.data.shards.format import key_of, read_shards_manifest
from pertvl.data.shards.reading import RawSample, ShardReadError, check_raw_sample, iter_raw_samples
from pertvl.files import sha256_file


@dataclass
class Problem:
    shard: str | None
    key: str | None
    message: str

    def __str__(self) -> str:
        parts = (self.shard and f"shard {self.shard}", self.key and f"key {self.key}")
        where = " ".join(x for x in parts if x)
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
    """Re-hash every shard against the manifest and decode every sample: listed shards exist with
    their size and sha256; every sample has an 8-bit grayscale image_size² png and a complete json of its
    split with known perturbation types; keys are unique per split; counts match per shard and split;
    pairs_in reconciles; no unlisted tar lies in the folder.
    """
    folder = Path(folder)
    report = VerifyReport(folder)
    try:
        manifest = read_shards_manifest(folder)
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
                report.problems.append(Problem(name, None, f"size {nbytes} bytes, manifest says "
                                                           f"{entry['bytes']}"))
            if digest != entry["sha256"]:
                report.problems.append(Problem(name, None, f"sha256 {digest} does not match the manifest's "
                                                           f"{entry['sha256']}"))
            count = _verify_shard(path, name, split, size, keys, report)
            if count != entry["num_samples"]:
                report.problems.append(Problem(name, None, f"{count} samples, manifest says "
                                                           f"{entry['num_samples']}"))
        if split_count != info["num_samples"]:
            report.problems.append(Problem(None, None, f"split {split}: shards hold {split_count} samples, "
                                                       f"num_samples says {info['num_samples']}"))
        total += info["num_samples"]
    if "pairs_in" in manifest and manifest["pairs_in"] != total + len(manifest.get("skipped", [])):
        report.problems.append(Problem(None, None, f"pairs_in {manifest['pairs_in']} != {total} written + "
                                                   f"{len(manifest['skipped'])} skipped"))
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
    print(f"{report.folder}: {report.shards_checked} shard(s), {report.samples_checked} sample(s) checked: "
          f"{status}")
    return 0 if report.ok else 1
