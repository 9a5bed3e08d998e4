"""The one way every stage turns an image file (or a shard's bytes) into pixels.

Proposals, shards, the training stream and the evaluations all decode with this module, so the
pixels a model sees for an image are the pixels its proposals were searched on. The policy:

- **Frame: the stored pixel grid.** EXIF orientation is never applied (`ImageOps.exif_transpose`
  nowhere). That is the frame the images table's `width`/`height` describe (read from the file
  header), the frame of COCO's and OpenImages' boxes as the readers take them, and what SoCo and
  torchvision's loader (`Image.open(p).convert("RGB")`) decode. The tag is reported
  (`notes["exif_orientation"]`), never acted on; a JPEG keeps it in its bytes.
- **Colour: 8-bit RGB.** Grayscale (`L`, `1`), palette (`P`) and `CMYK`/`YCbCr` become RGB through
  PIL's `.convert("RGB")`; 16-bit grayscale (`I;16*`) is scaled from 0-65535 to 0-255 (PIL's own
  conversion clips at 255, which made such images solid white); 32-bit `I` and float `F` are read as
  8-bit when their values fit, else scaled from the 16-bit range.
- **Alpha: dropped.** `RGBA`, `LA`, `PA` and palette transparency keep the stored colour under the
  alpha (what `.convert("RGB")` gives; no compositing onto a background).
- **Size limit: PIL's.** An image over `Image.MAX_IMAGE_PIXELS` pixels is `too_large` (PIL itself
  raises only above twice that).

Every failure is an `ImageFailure` (a `ValueError`, so a caller catching ValueError catches it) with
`reason` one of `FAILURE_REASONS` and a `detail` that names no object repr and no absolute path
beyond the one the caller passed.
"""
from __future__ import annotations

import hashlib
import io
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np
from PIL import Image

POLICY = "stored-frame/rgb8/alpha-dropped/i16-scaled/v1"
"""Names the decoding policy above; part of what a shard's stamp depends on (change it with the policy)."""

FAILURE_REASONS = (
    "missing_file",     # no file at the path (or it cannot be read)
    "not_an_image",     # PIL cannot identify the format (text, empty file, unknown format)
    "truncated",        # the data ends before the image does
    "corrupt",          # the format is known but the data cannot be decoded
    "too_large",        # over PIL's pixel limit (Image.MAX_IMAGE_PIXELS)
    "unsupported_mode", # a decoded mode with no RGB conversion
    "size_mismatch",    # decoded size differs from the images table's width/height
)
SIXTEEN_BIT = ("I;16", "I;16B", "I;16L", "I;16N")
WIDE = ("I", "F")


class ImageFailure(ValueError):
    """An image no stage uses; `reason` is one of FAILURE_REASONS (or a stage's own category)."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


def classify(e: BaseException) -> ImageFailure:
    """The failure a decoder's exception stands for."""
    if isinstance(e, ImageFailure):
        return e
    if isinstance(e, Image.DecompressionBombError):
        return ImageFailure("too_large", str(e))
    if isinstance(e, Image.UnidentifiedImageError):
        return ImageFailure("not_an_image", "cannot identify the image format")   # PIL's message holds a repr
    msg = str(e)
    if "truncat" in msg.lower():
        return ImageFailure("truncated", f"{type(e).__name__}: {msg}")
    return ImageFailure("corrupt", f"{type(e).__name__}: {msg}")


def read_bytes(path: str | Path) -> bytes:
    """The bytes of a file or object (a local path or a URL such as `s3://bucket/key`, read
    through `pipeline.storage`); a missing or unreadable one is an ImageFailure `missing_file`.
    An object store that cannot be reached at all (bad URL scheme, missing credentials) raises
    `pipeline.storage.StorageError` instead: that is the job's problem, not the image's."""
    from pipeline import storage

    try:
        return storage.read_bytes(path)
    except storage.StorageError:
        raise
    except FileNotFoundError:
        raise ImageFailure("missing_file", f"no file at {path}") from None
    except OSError as e:
        raise ImageFailure("missing_file", f"cannot read {path} ({type(e).__name__}: {e.strerror or e})") from None


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@contextmanager
def open_image(src: bytes | str | Path) -> Iterator[Image.Image]:
    """PIL image of `src` (bytes, or a path), header read, pixels not yet decoded. Raises
    ImageFailure (`missing_file`, `not_an_image`, `too_large`, ...); checks the pixel limit."""
    data = src if isinstance(src, (bytes, bytearray, memoryview)) else read_bytes(src)
    try:
        im = Image.open(io.BytesIO(data))
    except Exception as e:  # noqa: BLE001 - a broken header can raise almost anything
        raise classify(e) from None
    with im:
        w, h = im.size
        limit = Image.MAX_IMAGE_PIXELS
        if limit and w * h > limit:
            raise ImageFailure("too_large", f"{w}x{h} = {w * h} pixels, over PIL's limit of {limit}")
        yield im


def to_rgb(im: Image.Image) -> np.ndarray:
    """HxWx3 uint8 RGB of an opened PIL image by the module's policy (decodes it; a JPEG draft set
    by the caller applies). Raises ImageFailure."""
    try:
        im.load()
        if im.mode in SIXTEEN_BIT or im.mode in WIDE:
            a = np.asarray(im, dtype=np.float32)
            if im.mode in SIXTEEN_BIT or a.max(initial=0) > 255:
                a = a / 257.0
            a = np.clip(a, 0, 255).astype(np.uint8)
            return np.ascontiguousarray(np.repeat(a[:, :, None], 3, axis=2))
        try:
            rgb = im if im.mode == "RGB" else im.convert("RGB")
        except ValueError as e:
            raise ImageFailure("unsupported_mode", f"mode {im.mode}: {e}") from None
        return np.asarray(rgb)
    except Exception as e:  # noqa: BLE001
        raise classify(e) from None


def notes_of(im: Image.Image) -> dict:
    """What decoding notices: the mode if not RGB, the EXIF orientation if not 1 (never applied).
    Call it after `to_rgb`: for some formats (PNG) reading the EXIF decodes the image."""
    notes: dict = {}
    if im.mode != "RGB":
        notes["mode"] = im.mode
    try:
        orientation = im.getexif().get(0x0112, 1)
    except Exception:  # noqa: BLE001 - a broken EXIF block is not a broken image
        orientation = 1
    if orientation not in (1, None):
        notes["exif_orientation"] = int(orientation)
    return notes


def check_size(im: Image.Image, width: int | None, height: int | None) -> None:
    if width is not None and height is not None and im.size != (width, height):
        raise ImageFailure("size_mismatch", f"file is {im.size[0]}x{im.size[1]}, "
                                            f"the images table says {width}x{height}")


def decode(src: bytes | str | Path, width: int | None = None, height: int | None = None) -> tuple[np.ndarray, dict]:
    """HxWx3 uint8 RGB of an image file or its bytes, by the module's policy, checking its size
    against the images table's when given. Returns (rgb, notes); raises ImageFailure."""
    with open_image(src) as im:
        check_size(im, width, height)
        rgb = to_rgb(im)
        return rgb, notes_of(im)        # after the decode: reading a PNG's EXIF loads it, and a failed load is not retried


def encode_jpeg(rgb: np.ndarray, quality: int) -> bytes:
    """JPEG bytes of HxWx3 uint8 RGB (deterministic for the same pixels, settings and libjpeg)."""
    buf = io.BytesIO()
    Image.fromarray(rgb, "RGB").save(buf, format="JPEG", quality=quality)
    return buf.getvalue()
