"""WebDataset shards: pack pairs + perturbations once, verify them, read them back in order.

format.py (names, keys, manifest.json), reading.py (tar members -> samples, their check, the ordered
reader), packing.py (`pertvl pack`), verification.py (`pertvl shards verify`). Needs neither torch nor
webdataset; the pixel rule is pertvl.data.image.
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

__all__ = ["ALLOWED_MEMBERS", "FORMAT", "MANIFEST_NAME", "META_FIELDS", "MISSING_IMAGE",
           "MISSING_PERTURBATIONS", "PARTIAL_NAME", "SHARD_NAME", "UNDECODABLE_IMAGE", "PackResult",
           "Problem", "RawSample", "Sample", "ShardReadError", "VerifyReport", "check_raw_sample",
           "command_of", "iter_raw_samples", "iter_samples", "key_of", "pack", "merge_parts", "pack_cli_main",
           "perturbations_by_text", "read_shards_manifest", "split_info", "split_member_name", "verify",
           "verify_cli_main", "write_shard"]
