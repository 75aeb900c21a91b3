"""WebDataset shards: pack pairs + perturbations once, verify them, read them back in order.

- format.py        names, keys, member names, manifest.json (read_shards_manifest, split_info)
- reading.py       tar members -> samples, their integrity check, the ordered reader (iter_samples)
- packing.py       `pertvl pack`: parallel, crash-safe, resumable, byte-reproducible
- verification.py  `pertvl shards verify`: re-hash and decode every sample against the manifest

The pixel rule (decode, grayscale, resize) is pertvl.data.image. This package needs neither
torch nor webdataset (the stream does), so packing and verifying stay light. The names below are
the package's public surface; import them from `pertvl.data.shards`.
"""

from pertvl.data.shards.format import (
    ALLOWED_MEMBERS,
    FORMAT,
    MANIFEST_NAME,
    META_FIELDS,
    PARTIAL_NAME,
    SHARD_NAME,
    key_of,
    read_shards_manifest,
    split_info,
    split_member_name,
)
from pertvl.data.shards.packing import (
    MISSING_IMAGE,
    MISSING_PERTURBATIONS,
    UNDECODABLE_IMAGE,
    PackResult,
    command_of,
    merge_parts,
    pack,
    pack_cli_main,
    perturbations_by_text,
    write_shard,
)
from pertvl.data.shards.reading import (
    RawSample,
    Sample,
    ShardReadError,
    check_raw_sample,
    iter_raw_samples,
    iter_samples,
)
from pertvl.data.shards.verification import Problem, VerifyReport, verify, verify_cli_main

__all__ = [
    "ALLOWED_MEMBERS",
    "FORMAT",
    "MANIFEST_NAME",
    "META_FIELDS",
    "MISSING_IMAGE",
    "MISSING_PERTURBATIONS",
    "PARTIAL_NAME",
    "SHARD_NAME",
    "UNDECODABLE_IMAGE",
    "PackResult",
    "Problem",
    "RawSample",
    "Sample",
    "ShardReadError",
    "VerifyReport",
    "check_raw_sample",
    "command_of",
    "iter_raw_samples",
    "iter_samples",
    "key_of",
    "pack",
    "merge_parts",
    "pack_cli_main",
    "perturbations_by_text",
    "read_shards_manifest",
    "split_info",
    "split_member_name",
    "verify",
    "verify_cli_main",
    "write_shard",
]
