"""WebDataset shards: pack pairs + perturbations once, verify them, read them back in order.

format.py (names, keys, manifest.json), reading.py (tar members -> samples, their check, the ordered
reader), packing.py (`pertvl pack`), verification.py (`pertvl shards verify`). Needs neither torch nor
webdataset; the pixel rule is pertvl.data.image.
"""

from pertvl.data.shards.format import (
    ALLOWED_MEMBERS,
    MANIFEST_NAME,
    META_FIELDS,
    read_shards_manifest,
    split_info,
)
from pertvl.data.shards.packing import merge_parts, pack
from pertvl.data.shards.reading import (
    Sample,
    ShardReadError,
    check_raw_sample,
    iter_raw_samples,
    iter_samples,
)
from pertvl.data.shards.verification import verify

__all__ = ["ALLOWED_MEMBERS", "MANIFEST_NAME", "META_FIELDS", "Sample", "ShardReadError", "check_raw_sample",
           "iter_raw_samples", "iter_samples", "merge_parts", "pack", "read_shards_manifest", "split_info",
           "verify"]
