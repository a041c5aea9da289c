"""Decode a training image exactly once, completely, and into 8-bit RGB.

Everything that can be wrong with an image file is turned into an `ImageProblem` with a stable
`reason` code, so preflight can list every bad file instead of crashing on the first one.
"""

from __future__ import annotations

import io
import struct
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp")

# Decoded formats we accept, whatever the file is called (MPO is how Pillow opens many camera JPEGs).
_ALLOWED_FORMATS = frozenset({"JPEG", "MPO", "PNG", "WEBP"})
_HIGH_BIT_MODES = frozenset({"I;16", "I;16B", "I;16L", "I;16N", "I", "F"})
_ALPHA_MODES = frozenset({"RGBA", "LA", "PA"})
_STRIP_PIXELS = 1 << 20  # pixels a high-bit-depth conversion holds as float64 at a time (8 MB)
_DECODE_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError, struct.error, EOFError)


class ImageProblem(Exception):
    """An image file that cannot be used; `reason` is a stable code, `detail` is for people."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def has_image_extension(name: str | Path) -> bool:
    """True when the file name ends in one of IMAGE_EXTENSIONS (case-insensitive)."""
    return str(name).lower().endswith(IMAGE_EXTENSIONS)


_UNREADABLE = "cannot read the file ({}); give the user running the engine read access to it"


def load_rgb(path: str | Path, *, max_pixels: int = 64_000_000, notes: list[str] | None = None) -> Image.Image:
    """Open `path` read-only, decode it fully, apply EXIF orientation and return 8-bit RGB.

    Transparent pixels are composited onto black (Bria converts transparent backgrounds to
    black), high-bit-depth images are scaled (not clipped) to 8 bits and animated images give
    their first frame. Raises ImageProblem with reason empty_file, not_an_image, truncated,
    corrupt, too_many_pixels, unsupported_format, missing_file or unreadable. Each conversion applied is
    appended to `notes` (exif_rotated, alpha_on_black, cmyk_converted, high_bit_depth_scaled,
    first_frame_only), so preflight can tell the user what their images became.
    """
    notes = notes if notes is not None else []
    path = Path(path)
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise ImageProblem("missing_file", f"{path} does not exist") from None
    except PermissionError as e:
        raise ImageProblem("unreadable", _UNREADABLE.format(e.strerror)) from None
    if size == 0:
        raise ImageProblem("empty_file", "the file is empty (0 bytes)")
    return _open(path, max_pixels, notes)


def decode_rgb(data: bytes, *, max_pixels: int = 64_000_000) -> Image.Image:
    """`load_rgb` for an image held in memory (an upload sent as base64 or fetched from a URL)."""
    if not data:
        raise ImageProblem("empty_file", "the image is empty (0 bytes)")
    return _open(io.BytesIO(data), max_pixels, [])


def _open(source: Path | io.BytesIO, max_pixels: int, notes: list[str]) -> Image.Image:
    try:
        with warnings.catch_warnings():
            # Pillow only warns between MAX_IMAGE_PIXELS and twice that; a bomb must be a hard error.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(source) as im:
                return _decode(im, max_pixels, notes)
    except ImageProblem:
        raise
    except PermissionError as e:
        raise ImageProblem("unreadable", _UNREADABLE.format(e.strerror)) from None
    except UnidentifiedImageError:
        raise ImageProblem("not_an_image", "the file is not an image Pillow can read") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageProblem("too_many_pixels", f"image is too large to decode safely ({e})") from None
    except _DECODE_ERRORS as e:
        reason = "truncated" if "truncated" in str(e).lower() else "corrupt"
        raise ImageProblem(reason, f"the image could not be decoded: {e}") from None


def _decode(im: Image.Image, max_pixels: int, notes: list[str]) -> Image.Image:
    """Check format and size from the header, then decode, orient and normalise."""
    if im.format not in _ALLOWED_FORMATS:
        raise ImageProblem(
            "unsupported_format", f"the file contains {im.format} data; use JPEG, PNG or WebP"
        )
    width, height = im.size
    if width * height > max_pixels:
        raise ImageProblem(
            "too_many_pixels", f"{width}x{height} is {width * height} pixels, more than the {max_pixels} allowed"
        )
    if getattr(im, "is_animated", False):
        im.seek(0)  # the first frame stands for an animated image
        notes.append("first_frame_only")
    im.load()  # decode everything now so truncation surfaces here, not mid-training
    if im.getexif().get(0x0112, 1) not in (1, None):  # 0x0112: EXIF Orientation
        notes.append("exif_rotated")
    ImageOps.exif_transpose(im, in_place=True)  # in place: a copy would be one more full-size image
    oriented = im
    if oriented.mode in _HIGH_BIT_MODES:
        notes.append("high_bit_depth_scaled")
    elif oriented.mode == "CMYK":
        notes.append("cmyk_converted")
    elif oriented.mode in _ALPHA_MODES or oriented.mode in ("RGBa", "La") or "transparency" in oriented.info:
        notes.append("alpha_on_black")
    out = _to_rgb8(oriented)
    # Never hand back an object tied to the open file handle.
    return out.copy() if out is im else out


def _to_rgb8(im: Image.Image) -> Image.Image:
    """Normalise any Pillow mode to 8-bit RGB with alpha composited onto black."""
    mode = im.mode
    if mode in _HIGH_BIT_MODES:
        return _high_bit_to_rgb(im)
    if mode == "RGBa":
        # Premultiplied colour already equals the colour composited onto black.
        return Image.merge("RGB", im.split()[:3])
    if mode == "La":
        return im.getchannel(0).convert("RGB")
    if mode in _ALPHA_MODES or "transparency" in im.info:
        rgba = im if mode == "RGBA" else im.convert("RGBA")
        out = Image.new("RGB", im.size, (0, 0, 0))
        out.paste(rgba, mask=rgba.getchannel("A"))
        return out
    return im if mode == "RGB" else im.convert("RGB")


def _high_bit_to_rgb(im: Image.Image) -> Image.Image:
    """Scale 16/32-bit integer or float greyscale to 8 bits; Pillow's convert would clip.

    Works a strip of rows at a time: besides the decoded image and the 8-bit result, only one strip
    is held (whole-image float copies took ~27 bytes per pixel: 1.7 GB for an 8000x8000 PNG)."""
    width, height = im.size
    rows = max(1, _STRIP_PIXELS // max(width, 1))
    strips = [(top, min(top + rows, height)) for top in range(0, height, rows)]
    transparency = im.info.get("transparency")
    transparency = transparency if isinstance(transparency, int) else None

    def strip(top: int, bottom: int) -> np.ndarray:
        return np.asarray(im.crop((0, top, width, bottom))).astype(np.float64)

    lo, hi = np.inf, -np.inf
    for top, bottom in strips:
        values = np.nan_to_num(strip(top, bottom), nan=0.0, posinf=0.0, neginf=0.0)
        if values.size:
            lo, hi = min(lo, float(values.min())), max(hi, float(values.max()))
    lo, hi = (lo, hi) if lo <= hi else (0.0, 0.0)
    out = np.empty((height, width), dtype=np.uint8)
    for top, bottom in strips:
        arr = strip(top, bottom)
        transparent = arr == transparency if transparency is not None else None
        arr = np.nan_to_num(arr, nan=0.0, posinf=0.0, neginf=0.0)
        if im.mode == "F" and lo >= 0.0 and hi <= 1.0:
            scaled = arr * 255.0  # float images are conventionally 0..1
        elif im.mode == "F" and lo >= 0.0 and hi <= 255.0:
            scaled = arr
        elif lo >= 0.0 and hi <= 65535.0:
            scaled = arr * (255.0 / 65535.0)  # 16-bit PNGs open as I;16 or I: keep their full range
        else:
            # Values outside 16 bits have no standard white point: stretch what is there.
            scaled = (arr - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(arr)
        out[top:bottom] = np.rint(scaled).astype(np.uint8)
        if transparent is not None:
            out[top:bottom][transparent] = 0  # tRNS on greyscale: transparent becomes black like other alpha
    return Image.fromarray(out).convert("RGB")
