"""The training stream: WebDataset shards -> augmented, tokenized `Batch`es, the same number of
batches on every rank, resumable at any (epoch, batch).

The epoch plan comes from the manifest and the arguments only, never from counting at run time:

- N samples in S shards, R ranks, W = max(1, num_workers) workers per rank, batch size B: R x W
  streams, each yielding P = floor(N / (B R W)) full batches per epoch (`batches_per_epoch` = P x W
  per rank). The samples that do not fit are left out of that epoch (different ones each epoch).
- Each epoch the shard list is permuted from (seed, epoch), identically on every rank; stream (r, w)
  takes positions r + R w, r + R (w + W), ... (webdataset's split_by_node then split_by_worker).
  S >= R x W is checked up front. Resampled mode draws shards with replacement per stream instead.
- A stream keeps the first Q = P x B *good* samples of its shards, wrapping to its first shard when
  they run out: bad samples and truncated shards are counted, logged and replaced, so a corrupt
  sample never makes one rank shorter (and DDP hang).
- The Q samples pass a shuffle buffer seeded by (seed, epoch, rank, stream), are decoded (PNG by
  pertvl.data.image.decode_png_gray, json; nothing unpickled), augmented (parameters from (seed,
  epoch, key)), tokenized and collated *inside the worker*; the DataLoader takes batches
  round-robin, so rank batch i is batch i // W of stream i mod W.
- Resume at (epoch, b): stream w drops its first ceil((b - w) / W) batches as raw samples (never
  decoded), and worker j plays stream (j + b) mod W; the remaining batches equal the uninterrupted
  epoch's. (A PNG with a good CRC that still fails to decode before the resume point shifts its
  stream by one sample.)
- One set of workers per rank serves consecutive epochs, started from a forkserver (see TrainStream);
  each sends the same number of items per epoch (batches, fillers, its report) so that the
  round-robin stays aligned across epoch boundaries.
"""

from __future__ import annotations

import atexit
import faulthandler
import functools
import hashlib
import importlib
import itertools
import json
import logging
import os
import random
import re
import signal
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from pertvl.data.augment import AugmentConfig, apply_augmentation, sample_params
from pertvl.data.batch import Batch
from pertvl.data.image import decode_png_gray
from pertvl.data.records import PERTURBATION_TYPES
from pertvl.data.shards import (
    ALLOWED_MEMBERS,
    MANIFEST_NAME,
    Sample,
    ShardReadError,
    check_raw_sample,
    iter_raw_samples,
    read_shards_manifest,
    split_info,
)
from pertvl.data.tokenize import CachedTokenizer, backend_of, encode_texts
from pertvl.errors import ConfigError, DamagedDataError, NotFoundError
from pertvl.files import sha256_file
from pertvl.process import die_with_parent

log = logging.getLogger(__name__)

# Keys of TrainStream.skipped and TrainStream.masked.
SKIP_REASONS = ("corrupt_png", "bad_json", "missing_member", "decode_error", "truncated_shard",
                "unreadable_shard")
MASK_REASONS = ("unavailable_perturbations", "identical_perturbations")


@dataclass(frozen=True)
class ShardSource:
    """Where the shards of one split are and what the manifest says about them."""

    urls: tuple[str, ...]
    shard_counts: tuple[int | None, ...]  # samples per shard when known (for detecting short shards)
    num_samples: int
    image_size: int | None
    label_names: tuple[str, ...]
    description: str
    counterfactual_types: tuple[str, ...] | None  # the manifest's (); None: no manifest
    shard_bytes: tuple[int | None, ...]  # the manifest's size and sha256 of each shard
    shard_sha256: tuple[str | None, ...]


def _shard_name(url: str) -> str:
    return os.path.basename(url) if "://" not in url and not url.startswith("pipe:") else url


class ShardDownloadError(OSError):
    """A remote shard or manifest could not be fetched after the allowed attempts (names the URL)."""


_URL_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")


def _scheme(url: str) -> str:
    """The scheme of a remote URL (http, s3, ...); "" for local paths, file:// and `pipe:` commands."""
    m = _URL_SCHEME.match(url)
    return m.group(1).lower() if m and m.group(1).lower() != "file" else ""


def _open_remote(url: str, retries: int, timeout_s: float = 60.0):
    """A binary stream of `url` (http(s) through urllib, else fsspec), with `retries` retries and
    back-off; a ShardDownloadError names the URL, the attempts and the last reason."""
    scheme, attempts, last = _scheme(url), max(1, retries + 1), ""
    for attempt in range(attempts):
        try:
            if scheme in ("http", "https"):
                import urllib.request

                return urllib.request.urlopen(url, timeout=timeout_s)  # noqa: S310 - the user's own URL
            try:
                import fsspec
            except ImportError as e:
                raise ShardDownloadError(f"{url}: {scheme}:// needs fsspec (and its {scheme} backend): {e}") from e
            return fsspec.open(url, "rb").open()
        except ShardDownloadError:
            raise
        except Exception as e:  # noqa: BLE001 - HTTP 5xx/4xx, refused, timeout, a backend's own errors
            last = f"{type(e).__name__}: {e}"
            if attempt + 1 < attempts:
                log.warning("%s: attempt %d of %d failed (%s); retrying", url, attempt + 1, attempts, last)
                time.sleep(min(8.0, 0.25 * 2**attempt))
    raise ShardDownloadError(f"{url}: download failed after {attempts} attempt(s): {last}")


def _remote_manifest(url: str, retries: int) -> dict:
    with _open_remote(url, retries) as f:
        data = f.read()
    try:
        man = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{url}: not a shard manifest (not JSON: {e})") from e
    if not isinstance(man, dict) or "splits" not in man:
        raise ValueError(f"{url}: not a pertvl shard manifest (no 'splits')")
    return man


def resolve_source(source: str | os.PathLike, split: str = "train", *,
                   manifest: str | os.PathLike | dict | None = None, num_samples: int | None = None,
                   retries: int = 3) -> ShardSource:
    """Resolve a shard source to URLs and counts.

    `source`: a local shard folder with manifest.json; the URL of a manifest.json (http(s) or any fsspec
    URL: the shards are streamed from beside it); a brace pattern of shard paths/URLs (webdataset's rules);
    or `pipe:` URLs. `manifest` (path, folder or dict) serves a pattern (a pattern of local files finds
    the one beside them); `num_samples` replaces the manifest's count (virtual epochs). ConfigError when
    the sample count cannot be known or a URL matches no manifest shard.
    """
    from webdataset.shardlists import expand_urls

    src = os.fspath(source)
    man = manifest if isinstance(manifest, dict) or manifest is None else read_shards_manifest(manifest)
    remote = bool(_scheme(src)) and src.split("?", 1)[0].endswith(".json")  # the URL of a manifest
    if remote or os.path.isdir(src):
        if man is None:
            man = _remote_manifest(src, retries) if remote else read_shards_manifest(src)
        entries = split_info(man, split, src if remote else os.path.join(src, MANIFEST_NAME))["shards"]
        base = src.split("?", 1)[0].rsplit("/", 1)[0]
        urls = [f"{base}/{e['name']}" if remote else os.path.join(src, e["name"]) for e in entries]
    else:
        if not _scheme(src) and not src.startswith("pipe:") and "{" not in src and not os.path.exists(src):
            raise NotFoundError(f"shard folder {src} does not exist; pack one with `pertvl pack --out {src}` "
                                "or pass --shards FOLDER (a folder with manifest.json)")  # fmt: skip
        urls = expand_urls(src)
        if not urls:
            raise NotFoundError(f"{src}: the pattern expands to no shard")
        local = all(_shard_name(u) == os.path.basename(u) for u in urls)
        if man is None and local and (Path(urls[0]).parent / MANIFEST_NAME).is_file():
            man = read_shards_manifest(Path(urls[0]).parent)
        named = {e["name"]: e for e in split_info(man, split)["shards"]} if man is not None else {}
        entries = [named.get(_manifest_name(u, named)) for u in urls]  # None: not in the manifest
        unmatched = [u for u, e in zip(urls, entries, strict=True) if e is None]
        if man is not None and unmatched and num_samples is None:
            raise ConfigError(f"{unmatched[0]}: no shard of split {split!r} in the manifest matches it; "
                              "pass a shard folder with its manifest.json (--shards FOLDER; in Python, "
                              "num_samples=)")
    counts = [e["num_samples"] if e else None for e in entries]
    if num_samples is None:
        if None in counts:
            raise ConfigError(f"{src}: no manifest.json beside these shards to count their samples; pass a "
                              "shard folder written by `pertvl pack` (--shards FOLDER; in Python, manifest= or "
                              "num_samples=)")  # fmt: skip
        num_samples = sum(counts)
    return ShardSource(urls=tuple(urls), shard_counts=tuple(counts), num_samples=int(num_samples),
                       image_size=man.get("image_size") if man else None,
                       label_names=tuple(man.get("label_names", [])) if man else (),
                       description=f"{src} [{split}]",
                       counterfactual_types=tuple(man.get("counterfactual_types", [])) if man else None,
                       shard_bytes=tuple(e.get("bytes") if e else None for e in entries),
                       shard_sha256=tuple(e.get("sha256") if e else None for e in entries))


def _manifest_name(url: str, named: dict) -> str | None:
    """The manifest entry name of a shard URL (its basename, or the longest name it contains)."""
    base = url.rsplit("/", 1)[-1]
    if base in named:
        return base
    hits = [n for n in named if n in url]
    return max(hits, key=len) if hits else None


def check_shards(src: ShardSource, mode: str, max_damaged: int = 0, *, rank: int = 0, world_size: int = 1) -> list[str]:
    """Check local shards against the manifest before training: "size", "sha256" or "off"; rank r
    checks shards r, r + world_size, ...; remote shards and shards without a manifest size are not checked.
    Returns the problems (each logged); DamagedDataError when there are more than `max_damaged`."""
    if mode == "off":
        return []
    problems = []
    for i in range(rank, len(src.urls), world_size):
        url, size, digest = src.urls[i], src.shard_bytes[i], src.shard_sha256[i]
        if _scheme(url) or url.startswith("pipe:") or size is None:
            continue
        name = _shard_name(url)
        if not os.path.isfile(url):
            problems.append(f"{name}: missing")
        elif (actual := os.path.getsize(url)) != size:
            problems.append(f"{name}: {actual} bytes, the manifest says {size}")
        elif mode == "sha256" and digest and sha256_file(url) != digest:
            problems.append(f"{name}: sha256 differs from the manifest's")
    if len(problems) > max_damaged:
        shown = "; ".join(problems[:5]) + (f"; and {len(problems) - 5} more" if len(problems) > 5 else "")
        raise DamagedDataError(
            f"{src.description}: {len(problems)} damaged shard(s) ({shown}); re-pack them (`pertvl pack` with "
            f"the same arguments rewrites what does not match), or allow up to N with --set data.max_damaged_shards=N"
        )
    for problem in problems:
        log.warning("damaged shard %s (allowed by data.max_damaged_shards = %d)", problem, max_damaged)
    return problems


def collate_samples(samples: Sequence[Sample], tokenizer, *, max_length: int = 128,
                    label_names: Sequence[str] = (), image_size: int | None = None,
                    augment: AugmentConfig | None = None, seed: int = 0, epoch: int = 0,
                    pert_types: Sequence[str] = PERTURBATION_TYPES) -> tuple[Batch, Counter]:
    """Collate decoded samples (the stream's, or pertvl.data.shards.iter_samples') into a Batch.

    `tokenizer`: tokenizers/HF fast tokenizer (encode_texts) or a CachedTokenizer (its own max_length).
    `image_size`: resize to this side (antialiased bilinear) when different. `augment`, `seed`, `epoch`:
    with each sample key they fix its augmentation. `pert_types`: the batch's K columns, perturbation
    texts from the sample json's `perturbations`, counterfactual (cf_*) texts from its `counterfactuals`.
    Returns (Batch, counts of "unavailable_perturbations" and "identical_perturbations"); pert_valid is
    False for both (identical: the same token ids after truncation).
    """
    if not samples:
        raise ValueError("collate_samples needs at least one sample")
    import torch.nn.functional as F

    target = (image_size, image_size) if image_size else samples[0].image.shape
    images = []
    for s in samples:
        x = torch.tensor(s.image, dtype=torch.float32).div_(255.0)[None, None]  # a copy: arrays are read-only
        if x.shape[-2:] != target:
            x = F.interpolate(x, size=tuple(target), mode="bilinear", antialias=True, align_corners=False)
        images.append(x)
    img = torch.cat(images).clamp_(0.0, 1.0)
    keys = [s.key for s in samples]
    if augment is not None:
        img = apply_augmentation(img, sample_params(keys, seed=seed, epoch=epoch, config=augment))

    pert_types = tuple(pert_types)
    b, k = len(samples), len(pert_types)
    if isinstance(tokenizer, CachedTokenizer):
        encode = tokenizer
    else:
        encode = functools.partial(encode_texts, tokenizer, max_length=max_length)
    enc = encode([s.meta["text"] for s in samples])
    available = np.zeros((b, k), dtype=bool)
    flat = []
    for i, s in enumerate(samples):
        perts = s.meta.get("perturbations") or {}
        cfs = s.meta.get("counterfactuals") or {}
        for j, name in enumerate(pert_types):
            text = perts.get(name) if name in PERTURBATION_TYPES else cfs.get(name)
            available[i, j] = isinstance(text, str)
            flat.append(text if isinstance(text, str) else "")
    penc = encode(flat)
    lp = penc.input_ids.shape[1]
    p_ids, p_mask = penc.input_ids.reshape(b, k, lp), penc.attention_mask.reshape(b, k, lp)
    # Identical after truncation: same tokens and same length (compared on a common padded width).
    width = max(lp, enc.input_ids.shape[1])
    o_ids = np.pad(enc.input_ids * enc.attention_mask, ((0, 0), (0, width - enc.input_ids.shape[1])))[:, None]
    o_mask = np.pad(enc.attention_mask, ((0, 0), (0, width - enc.input_ids.shape[1])))[:, None]
    q_ids = np.pad(p_ids * p_mask, ((0, 0), (0, 0), (0, width - lp)))
    q_mask = np.pad(p_mask, ((0, 0), (0, 0), (0, width - lp)))
    identical = available & np.all(o_ids == q_ids, axis=-1) & np.all(o_mask == q_mask, axis=-1)
    valid = available & ~identical
    counts = Counter(unavailable_perturbations=int((~available).sum()),
                     identical_perturbations=int(identical.sum()))

    labels = None
    if label_names:
        arr = np.full((b, len(label_names)), np.nan, dtype=np.float32)
        for i, s in enumerate(samples):
            known = s.meta.get("labels") or {}
            for j, name in enumerate(label_names):
                if known.get(name) is not None:
                    arr[i, j] = float(known[name])
        labels = torch.from_numpy(arr)

    batch = Batch(images=img, input_ids=torch.from_numpy(enc.input_ids),
                  attention_mask=torch.from_numpy(enc.attention_mask),
                  word_ids=torch.from_numpy(enc.word_ids),
                  pert_input_ids=torch.from_numpy(np.ascontiguousarray(p_ids)),
                  pert_attention_mask=torch.from_numpy(np.ascontiguousarray(p_mask)),
                  pert_valid=torch.from_numpy(valid), ids=[str(s.meta["id"]) for s in samples],
                  study_ids=[str(s.meta.get("study_id", "")) for s in samples],
                  texts=[s.meta["text"] for s in samples], labels=labels, pert_types=pert_types)
    return batch, counts


@dataclass(frozen=True)
class _Plan:
    """Everything a worker needs; plain picklable values (spawn-safe)."""

    source: ShardSource
    tokenizer: object
    batch_size: int
    world_size: int
    rank: int
    streams: int  # W
    seed: int
    augment: AugmentConfig | None
    max_length: int
    resampled: bool
    image_size: int | None
    shuffle_buffer: int
    faults: tuple = ()  # pertvl.faults.Fault from PERTVL_FAULT, read in the main process
    download_retries: int = 3  # remote shards: retries before the run fails
    pert_types: tuple[str, ...] = PERTURBATION_TYPES  # the batch's K columns (loss.pert_types)
    max_damaged_shards: int | None = None  # damaged shards a stream may skip (None: any number)

    @property
    def batches_per_stream(self) -> int:
        return self.source.num_samples // (self.batch_size * self.world_size * self.streams)


@dataclass
class _WorkerReport:
    """Sent by a worker after its last batch of an epoch: its skip and mask counts. A `filler` stands
    in for a batch the worker does not have (a resumed epoch), keeping the round-robin aligned."""

    epoch: int = 0
    counts: dict[str, int] = field(default_factory=dict)
    filler: bool = False
    damaged: str | None = None  # a DamagedDataError's message: the rank raises it (one line, no worker traceback)


def _rng_seed(*parts) -> int:
    return int.from_bytes(hashlib.blake2b(repr(parts).encode(), digest_size=8).digest(), "little")


def _shard_sequence(plan: _Plan, epoch: int, stream: int) -> tuple[Iterator[int], int]:
    """(endless iterator of shard indices for this stream, shards per full pass)."""
    n = len(plan.source.urls)
    if plan.resampled:
        rng = random.Random(_rng_seed("resample", plan.seed, epoch, plan.rank, stream))
        return (rng.randrange(n) for _ in itertools.count()), n
    order = list(range(n))
    random.Random(_rng_seed("shards", plan.seed, epoch)).shuffle(order)
    mine = order[plan.rank + plan.world_size * stream :: plan.world_size * plan.streams]
    return itertools.cycle(mine), len(mine)


def _damaged(plan: _Plan, name: str, problem: str, damaged: set[str]) -> None:
    """Count a damaged shard of this stream; past plan.max_damaged_shards it ends the run."""
    damaged.add(name)
    limit = plan.max_damaged_shards
    if limit is not None and len(damaged) > limit:
        raise DamagedDataError(
            f"shard {name} of {plan.source.description} is damaged: {problem}; re-pack it (`pertvl pack` with the "
            "same arguments rewrites what does not match the manifest), or allow up to N damaged shards with "
            "--set data.max_damaged_shards=N")
    log.warning("shard %s is damaged: %s; continuing with the next shard", name, problem)


def _read_shard(plan: _Plan, index: int, stats: Counter, damaged: set[str]) -> Iterator[tuple]:
    """Good (raw sample, meta) of one shard; bad samples counted and logged, a damaged shard counted
    in `damaged` or, past plan.max_damaged_shards, a DamagedDataError."""
    import webdataset as wds

    url, expected = plan.source.urls[index], plan.source.shard_counts[index]
    name = _shard_name(url)
    if _scheme(url):  # an unreachable remote shard ends the run; a missing local one is damaged data
        stream = _open_remote(url, plan.download_retries)
    else:
        try:
            stream = wds.gopen(url, "rb")
        except Exception as e:  # any opener failure (missing file, failing pipe) makes it unreadable
            stats["unreadable_shard"] += 1
            _damaged(plan, name, f"cannot open it ({type(e).__name__}: {e})", damaged)
            return
    read, last = 0, None
    try:
        for raw in iter_raw_samples(stream, name):
            read += 1
            if raw.ignored:
                stats["ignored_members"] += len(raw.ignored)
                log.warning("shard %s key %s: ignored member(s) %s (only %s are read)",
                            name, raw.key, sorted(set(raw.ignored)), "/".join(ALLOWED_MEMBERS))  # fmt: skip
            meta, problem = check_raw_sample(raw)
            if problem:
                stats[problem.split(":", 1)[0]] += 1
                log.warning("skipping sample %s in shard %s: %s", raw.key, name, problem)
                continue
            last = raw.key
            yield raw, meta
    except ShardReadError as e:
        stats["truncated_shard"] += 1
        where = f"after key {e.after_key}" if e.after_key else "at its first sample (no sample could be read)"
        _damaged(plan, name, f"unreadable {where} ({e.reason})", damaged)
        return
    finally:
        try:
            stream.close()  # a pipe: URL reports its command's failure here
        except OSError as e:
            log.warning("shard %s: %s", name, e)
    if expected is not None and read < expected:
        stats["truncated_shard"] += 1
        _damaged(plan, name, f"it ended after {read} of {expected} samples (last key {last})", damaged)


def _good_samples(plan: _Plan, epoch: int, stream: int, stats: Counter) -> Iterator[tuple]:
    """Endless good raw samples of one stream, wrapping over its shards; RuntimeError when a whole
    pass yields nothing."""
    shards, per_pass = _shard_sequence(plan, epoch, stream)
    empty = 0
    tried: set[str] = set()
    damaged: set[str] = set()
    for index in shards:
        good = 0
        for item in _read_shard(plan, index, stats, damaged):
            good += 1
            yield item
        empty = 0 if good else empty + 1
        tried.add(_shard_name(plan.source.urls[index]))
        if empty >= max(per_pass, 1) * (4 if plan.resampled else 1):
            raise RuntimeError(
                f"rank {plan.rank} stream {stream}: no usable sample in {empty} consecutive shard reads "
                f"({sorted(tried)[:8]}...); run `pertvl shards verify` on {plan.source.description}")


def _decoded(items: Iterator[tuple], stats: Counter) -> Iterator[Sample]:
    for raw, meta in items:
        try:
            image = decode_png_gray(raw.members["png"])
        except Exception as e:  # a decoder failure on bad bytes: skip and fill
            stats["decode_error"] += 1
            log.warning("skipping sample %s in shard %s: cannot decode: %s", raw.key, raw.shard, e)
            continue
        yield Sample(key=raw.key, image=image, meta=meta)


def _stream_batches(
    plan: _Plan, epoch: int, stream: int, skip_batches: int, *, items: int | None = None, worker: int = 0
) -> Iterator[Batch | _WorkerReport]:
    """The batches of one stream for one epoch from batch `skip_batches` on, filler reports up to
    `items` items (None: none), then its _WorkerReport."""
    from webdataset.filters import _shuffle

    from pertvl import faults

    stats: Counter = Counter()
    b = plan.batch_size
    per_stream = plan.batches_per_stream
    good = _good_samples(plan, epoch, stream, stats)
    rng = random.Random(_rng_seed("samples", plan.seed, epoch, plan.rank, stream))
    bufsize = max(1, plan.shuffle_buffer)
    shuffled = _shuffle(itertools.islice(good, per_stream * b), bufsize=bufsize, initial=bufsize, rng=rng)
    for _ in range(skip_batches * b):  # resume: drop raw samples, nothing decoded
        next(shuffled)
    # The continuation of `good` is only reached after the shuffled quota is exhausted: it fills
    # in for samples that fail to decode, keeping the batch count.
    samples = _decoded(itertools.chain(shuffled, good), stats)
    count = per_stream - skip_batches
    for i in range(count):
        if plan.faults:
            for j in range(b):
                faults.at_worker_sample(plan.faults, rank=plan.rank, worker=worker, sample=i * b + j + 1)
        chunk = [next(samples) for _ in range(b)]
        batch, counts = collate_samples(chunk, plan.tokenizer, max_length=plan.max_length,
                                        label_names=plan.source.label_names, image_size=plan.image_size,
                                        augment=plan.augment, seed=plan.seed, epoch=epoch,
                                        pert_types=plan.pert_types)
        stats.update(counts)
        yield batch
    for _ in range((items or count) - count):
        yield _WorkerReport(epoch, filler=True)
    yield _WorkerReport(epoch, dict(stats))


# Loader workers register this signal with faulthandler: a rank's watchdog (pertvl.train.watchdog)
# sends it to them before ending a stalled run, so the workers' Python stacks are in the log too.
WORKER_STACKS_SIGNAL = signal.SIGUSR2


class _RunDataset(torch.utils.data.IterableDataset):
    """The epochs of one rank from (epoch, start_batch) on, one worker per stream: in `epoch` worker
    j plays stream (j + start_batch) mod W, in later epochs stream j."""

    def __init__(self, plan: _Plan, epoch: int, start_batch: int, epochs: int | None):
        super().__init__()
        self.plan, self.epoch, self.start_batch, self.epochs = plan, epoch, start_batch, epochs

    def __iter__(self) -> Iterator[Batch | _WorkerReport]:
        info = torch.utils.data.get_worker_info()
        worker = info.id if info is not None else 0
        if info is not None:
            # SLURM's SIGTERM reaches every process of the job; the rank decides when to stop
            # (pertvl.train.signals) and ends its workers itself (TrainStream.close).
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            faulthandler.register(WORKER_STACKS_SIGNAL, all_threads=True)
            die_with_parent()  # a rank killed by the OOM killer leaves no worker behind
        w, total = self.plan.streams, self.plan.batches_per_stream * self.plan.streams
        epoch, start = self.epoch, self.start_batch
        while self.epochs is None or epoch < self.epoch + self.epochs:
            stream = (worker + start) % w
            skip = max(0, -(-(start - stream) // w))  # batches of this stream before start_batch
            items = -(-(total - start) // w)  # what worker 0 (the one with the most batches) sends
            try:
                yield from _stream_batches(self.plan, epoch, stream, skip, items=items, worker=worker)
            except DamagedDataError as e:
                yield _WorkerReport(epoch, damaged=str(e))
                return
            epoch, start = epoch + 1, 0


class TrainStream:
    """Iterable over the Batches of one epoch of one rank (the plan: module docstring).

    Call `set_epoch(e)` (or `set_epoch(e, start_batch=b)` to resume) before each epoch; without it a pass
    repeats the epoch. After a complete pass `skipped` and `masked` hold this rank's counts. With workers,
    one set serves consecutive epochs (a pass that does not continue the last complete one starts new
    ones); they start from a forkserver, never by forking the threaded rank, whose threads may hold a
    lock the child would wait on forever. `close()` ends them.
    """

    def __init__(self, plan: _Plan, *, epoch: int, start_batch: int, num_workers: int,
                 multiprocessing_context) -> None:  # fmt: skip
        self._plan = plan
        self.num_workers = num_workers
        self.multiprocessing_context = multiprocessing_context
        self.batches_per_epoch = plan.batches_per_stream * plan.streams
        self.skipped: dict[str, int] = {}
        self.masked: dict[str, int] = {}
        self.workers_started = 0  # sets of loader workers started so far (tests, logs)
        self._loader = None  # the DataLoader iterator whose workers serve consecutive epochs
        self._next_epoch = epoch  # the epoch whose first item it yields next
        self.set_epoch(epoch, start_batch)

    @property
    def source(self) -> ShardSource:
        return self._plan.source

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        if epoch < 0 or not 0 <= start_batch <= self.batches_per_epoch:
            raise ValueError(
                f"need epoch >= 0 and 0 <= start_batch <= {self.batches_per_epoch}, got {epoch}, {start_batch}"
            )
        self.epoch, self.start_batch = epoch, start_batch

    def __len__(self) -> int:
        """Batches the next pass yields."""
        return self.batches_per_epoch - self.start_batch

    def close(self) -> None:
        """End the loader workers (idempotent; the next pass starts new ones): torch's shutdown (a done
        event, then join), then SIGKILL any still alive."""
        it, self._loader = self._loader, None
        if it is None:
            return
        atexit.unregister(self.close)
        workers = list(getattr(it, "_workers", []))
        shutdown = getattr(it, "_shutdown_workers", None)
        if shutdown is not None:
            try:
                shutdown()
            except Exception as e:  # noqa: BLE001 - a broken queue must not stop the kill below
                log.warning("loader shutdown: %s: %s", type(e).__name__, e)
        # torch's shutdown ends a hung worker with SIGTERM, which ours ignore (_RunDataset).
        for proc in workers:
            if proc.is_alive():
                proc.kill()
                proc.join(timeout=5)

    def _items(self, epoch: int, start: int) -> Iterator[Batch | _WorkerReport]:
        if self.num_workers == 0:
            return iter(_RunDataset(self._plan, epoch, start, epochs=1))
        if self._loader is None or self._next_epoch != epoch or start != 0:
            self.close()
            loader = torch.utils.data.DataLoader(
                _RunDataset(self._plan, epoch, start, epochs=None),
                batch_size=None,  # batches are made inside the workers
                num_workers=self.num_workers,
                multiprocessing_context=self.multiprocessing_context or default_worker_context(),
            )
            self._loader, self._next_epoch = iter(loader), epoch
            # Runs before multiprocessing's own exit hook (atexit is LIFO), which would SIGTERM the
            # workers (ignored: see _RunDataset) and then join them forever.
            atexit.register(self.close)
            self.workers_started += 1
        return self._loader

    def __iter__(self) -> Iterator[Batch]:
        epoch, start = self.epoch, self.start_batch
        expected = self.batches_per_epoch - start
        streams = self._plan.streams
        stats: Counter = Counter()
        produced = reports = 0
        complete = False
        try:
            items = self._items(epoch, start)
            for item in items:
                if isinstance(item, _WorkerReport):
                    if item.damaged:
                        raise DamagedDataError(item.damaged)
                    if item.epoch != epoch:  # the round-robin lost its alignment: never train on it
                        raise RuntimeError(f"rank {self._plan.rank}: a worker reported epoch {item.epoch} "
                                           f"during epoch {epoch}")  # fmt: skip
                    if not item.filler:
                        stats.update(item.counts)
                        reports += 1
                        if reports == streams:  # every stream is done: the epoch is complete
                            break
                    continue
                produced += 1
                yield item
            complete = reports == streams
        finally:
            if not complete:  # abandoned or failed half-way: these workers are mid-epoch
                self.close()
        self._next_epoch = epoch + 1
        if produced != expected:  # would desynchronise ranks: fail loudly instead of hanging a collective
            raise RuntimeError(f"rank {self._plan.rank}: produced {produced} batches, planned {expected}")
        self.skipped = {k: stats[k] for k in (*SKIP_REASONS, "ignored_members") if stats[k]}
        self.masked = {k: stats[k] for k in MASK_REASONS}
        self.start_batch = 0
        level = logging.WARNING if self.skipped else logging.INFO
        log.log(level, "epoch %d rank %d: %d batches from %s; skipped %s; perturbations masked %s",
                epoch, self._plan.rank, produced, self.source.description, self.skipped or "none", self.masked)  # fmt: skip


def default_worker_context() -> str | None:
    """"forkserver" where the platform has it, its server preloading this module (workers start
    fast) and pertvl.data._forkserver (SIGTERM ignored); else None, the platform's default."""
    import multiprocessing

    if "forkserver" not in multiprocessing.get_all_start_methods():
        return None
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["pertvl.data._forkserver", __name__])  # the first: SIGTERM ignored there
    return "forkserver"


def preflight_imports(augment: bool) -> None:
    """Import here what the loader workers import: a missing package is one clear ImportError
    before the first step, not a worker crash mid-run."""
    needed = [("webdataset", "reading shards"), ("PIL.Image", "decoding PNG"), ("tokenizers", "tokenizing")]
    if augment:
        needed.append(("kornia.geometry.transform", "augmentation (data.augment)"))
    for module, why in needed:
        try:
            importlib.import_module(module)
        except ImportError as e:
            top = module.split(".")[0]
            raise ImportError(
                f"the training stream needs {top} for {why}, and importing {module} failed: {e}; "
                f"install it (pip install -c constraints.txt {'pillow' if top == 'PIL' else top}) "
                f"{'or set data.augment=false' if module.startswith('kornia') else ''}".rstrip()
            ) from e


def check_counterfactuals(src: ShardSource, pert_types: Sequence[str], where: str) -> None:
    """ValueError naming the shards `where` when `pert_types` asks for counterfactual types their
    manifest does not list; without a manifest nothing can be checked (missing ones are masked)."""
    types = [t for t in pert_types if t not in PERTURBATION_TYPES]
    if not types or src.counterfactual_types is None:
        return
    missing = [t for t in types if t not in src.counterfactual_types]
    if not src.counterfactual_types:
        raise ValueError(f"loss.pert_types asks for counterfactual negatives {list(types)}, but the shards in "
                         f"{where} carry no counterfactuals (their manifest has no counterfactual_types): re-pack "
                         f"them with `pertvl pack --counterfactuals COUNTERFACTUALS.jsonl`, or drop the cf_* "
                         f"types from loss.pert_types")
    if missing:
        raise ValueError(f"loss.pert_types asks for counterfactual negatives {missing}, but the shards in {where} "
                         f"carry only the counterfactual types {list(src.counterfactual_types)} (manifest "
                         f"counterfactual_types): pack with `--counterfactuals` records that have them, or drop "
                         f"{missing} from loss.pert_types")


def build_train_stream(source: str | os.PathLike, split: str = "train", *, tokenizer, batch_size: int,
                       world_size: int = 1, rank: int = 0, num_workers: int = 2, seed: int = 0,
                       epoch: int = 0, start_batch: int = 0, augment: bool | AugmentConfig = True,
                       max_length: int = 128, resampled: bool = False, image_size: int | None = None,
                       manifest: str | os.PathLike | dict | None = None, num_samples: int | None = None,
                       shuffle_buffer: int = 1000, multiprocessing_context=None,
                       download_retries: int = 3, pert_types: Sequence[str] = PERTURBATION_TYPES,
                       verify: str = "off", max_damaged_shards: int | None = None) -> TrainStream:
    """The training stream of one rank (the plan: module docstring). `source`: see resolve_source;
    `tokenizer`: pertvl.data.tokenize.load_tokenizer's; `num_workers` 0: one stream in this process; `seed`
    fixes shard order, sample shuffle and augmentation; (`epoch`, `start_batch`): where the first pass
    starts; `augment` True: AugmentConfig() defaults; `resampled`: shards drawn with replacement;
    `verify`: check_shards' mode; `max_damaged_shards` (None: any number, counted): beyond it a
    DamagedDataError. ValueError: bad arguments, fewer shards than streams, or fewer samples than one
    batch per stream.
    """
    if batch_size < 1 or world_size < 1 or not 0 <= rank < world_size or num_workers < 0:
        raise ValueError(
            f"need batch_size >= 1, world_size >= 1, 0 <= rank < world_size, num_workers >= 0; got "
            f"{batch_size}, {world_size}, {rank}, {num_workers}")
    src = resolve_source(source, split, manifest=manifest, num_samples=num_samples, retries=download_retries)
    pert_types = tuple(pert_types)
    check_counterfactuals(src, pert_types, os.fspath(source))
    check_shards(src, verify, len(src.urls) if max_damaged_shards is None else max_damaged_shards,
                 rank=rank, world_size=world_size)  # fmt: skip
    streams = max(1, num_workers)
    needed = world_size * streams
    if not resampled and len(src.urls) < needed:
        per_shard = src.num_samples // max(1, len(src.urls))
        raise ValueError(
            f"{src.description} has {len(src.urls)} shard(s), but {world_size} rank(s) x {streams} worker(s) "
            f"need at least {needed} (one per stream); re-pack with a smaller --maxcount "
            f"(at most {max(1, src.num_samples // needed)} samples per shard; now ~{per_shard}), use fewer "
            f"workers, or resampled=True")
    if src.num_samples < batch_size * needed:
        raise ValueError(
            f"{src.description} has {src.num_samples} samples, fewer than one batch of {batch_size} for each of "
            f"the {needed} streams ({world_size} rank(s) x {streams} worker(s)); lower batch_size or num_workers"
        )
    if augment is True:
        augment = AugmentConfig()
    from pertvl import faults

    injected = tuple(faults.active("worker-"))
    backend = backend_of(tokenizer)
    if num_workers > 0:
        preflight_imports(bool(augment))
        # tokenizers' own thread pool does not survive fork; workers parallelize instead
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    plan = _Plan(source=src, tokenizer=CachedTokenizer(backend, max_length), batch_size=batch_size,
                 world_size=world_size, rank=rank, streams=streams, seed=seed, augment=augment or None,
                 max_length=max_length, resampled=resampled, image_size=image_size or src.image_size,
                 shuffle_buffer=shuffle_buffer, faults=injected, download_retries=download_retries,
                 pert_types=pert_types, max_damaged_shards=max_damaged_shards)
    return TrainStream(plan, epoch=epoch, start_batch=start_batch, num_workers=num_workers,
                       multiprocessing_context=multiprocessing_context)
