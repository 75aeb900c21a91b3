"""The pixel rule: how an image file becomes the model's input (numpy + PIL only, no torch).

One rule for packing (`pertvl pack` stores the result as PNG), inference on an ONNX export and
fine-tuning (`pixel_rule` states it as data):

1. decode with PIL (EXIF orientation applied); a JPEG at the smallest of libjpeg's DCT scales 1/8,
   1/4, 1/2, 1/1 whose shorter side is still >= `size` (`Image.draft`; docs/DATA.md measures its
   effect), other formats at full size;
2. 8-bit grayscale: PIL's luma for 8-bit modes; 16/32-bit integer and float images min-max scaled;
3. shorter side resized to `size` (bilinear, antialiased), then a center crop size × size.

The model sees the uint8 result / 255 and normalizes intensities itself. A missing file raises
FileNotFoundError, an undecodable one ImageReadError (a ValueError), both naming the file.
"""

from __future__ import annotations

import io
import os
import zlib
from typing import Any

import numpy as np

from pertvl.errors import NotFoundError, UserError


class ImageReadError(UserError, ValueError):
    """An image file exists but cannot be decoded. `path` is the file, `reason` the decoder's error."""

    def __init__(self, path: str | os.PathLike, reason: str):
        super().__init__(f"{path}: cannot decode as an image ({reason})")
        self.path, self.reason = os.fspath(path), reason


def to_grayscale8(image) -> Any:
    """A PIL image as 8-bit grayscale ("L"): PIL's luma for 8-bit modes; 16/32-bit integer and
    float images min-max scaled to 0..255 (PIL's own conversion would clip them white)."""
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
    """Resize so the shorter side is `size` (bilinear, antialiased), then center-crop size x size
    (BioViL's Resize + CenterCrop geometry, torchvision's rounding of the offset)."""
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


def load_image(path: str | os.PathLike, size: int):
    """An image file as a PIL "L" image, size × size, by the pixel rule (errors: module docstring)."""
    from PIL import Image

    if not os.path.isfile(path):
        raise NotFoundError(f"{path}: no such image file")
    try:
        with Image.open(path) as im:
            im.draft(im.mode, (size, size))  # JPEG only (rule 1); other formats ignore it
            im.load()
            return resize_center_crop(to_grayscale8(im), size)
    except Exception as e:  # PIL raises OSError, ValueError, SyntaxError, ... on bad bytes
        raise ImageReadError(path, f"{type(e).__name__}: {e}") from None


def read_image(path: str | os.PathLike, size: int) -> np.ndarray:
    """An image file as np.uint8 [size, size] by the pixel rule (errors: see load_image)."""
    return np.asarray(load_image(path, size), dtype=np.uint8)


# zlib's run-length strategy: much faster than the default on radiograph rows and no larger. Fixed,
# so the bytes of a shard depend on its pixels only.
PNG_OPTIONS = {"compress_level": 6, "compress_type": zlib.Z_RLE}
# Names the pixel rule and PNG settings in a pack's manifest["inputs"]: a pack resumed after either
# changed rebuilds its shards instead of mixing old and new bytes.
SHARD_IMAGE_ENCODING = "pixel-rule/2 (JPEG DCT scaling); png zlib-rle level 6"


def encode_image_file(path: str | os.PathLike, size: int) -> bytes:
    """PNG bytes of an image file's size × size grayscale version (what a shard stores; errors: see load_image)."""
    buf = io.BytesIO()
    load_image(path, size).save(buf, format="PNG", **PNG_OPTIONS)
    return buf.getvalue()


def decode_png_gray(data: bytes) -> np.ndarray:
    """PNG bytes (a shard's image member) -> np.uint8 [H, W], converted to 8-bit grayscale if stored otherwise."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        im.load()
        return np.asarray(to_grayscale8(im), dtype=np.uint8).copy()


def pixel_rule(size: int) -> dict:
    """The pixel rule (`load_image` / `read_image`, then / 255) stated as data for an export's manifest."""
    return {
        "size": int(size),
        "channels": 1,
        "dtype": "float32",
        "layout": "NCHW: [N, 1, size, size]",
        "steps": [
            {"step": "decode", "how": "PIL Image.open, then Image.draft(image.mode, (size, size)) (JPEG only: "
             "libjpeg DCT scaling to the smallest of 1/8, 1/4, 1/2, 1/1 whose shorter side stays >= size), "
             "then ImageOps.exif_transpose"},
            {"step": "grayscale", "how": "mode L as it is; modes I, I;16*, F: min-max scaled to 0..255 "
             "(round((x - min) * 255 / (max - min))), all 0 when max == min; any other mode: convert('L')"},
            {"step": "resize", "how": "when the shorter side is not size: the shorter side to size, the longer to "
             "max(size, round(longer * size / shorter)), PIL Image.resize with Resampling.BILINEAR"},
            {"step": "center_crop", "how": "left = round((w - size) / 2), top = round((h - size) / 2), crop size x size"},
            {"step": "scale", "how": "uint8 / 255 -> float32 in [0, 1]"},
        ],
        "normalization": "inside the graph (the model's intensity mean/std): feed [0, 1] values",
    }
