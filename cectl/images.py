"""Image decoding and normalisation: any input file to an RGB image or a clear skip reason.

This is the "resizer" stage of sharding, also used by `cectl inpaint` to read user images.
"""

from __future__ import annotations

import io
import warnings
from typing import NamedTuple

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

# Anything bigger is refused before its pixels are decoded (a 30000x30000 header would
# otherwise ask for 2.7 GB). Checked here, not through Pillow's process-wide
# Image.MAX_IMAGE_PIXELS, which belongs to whoever imports cectl.
MAX_PIXELS = 100_000_000
LOSSLESS_FORMATS = {"PNG", "BMP", "TIFF", "PPM", "GIF"}
EXIF_ORIENTATION = 0x0112


class Skip(Exception):
    """An input that cannot become a sample; `reason` is a short, countable word."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


class Decoded(NamedTuple):
    image: Image.Image  # upright RGB
    format: str  # of the source: JPEG, PNG, ...
    mode: str  # of the source
    width: int  # of the source, as stored
    height: int
    upright: bool  # whether the source needed no EXIF rotation


def decode(data: bytes, min_size: int = 1, draft_to: int = 0) -> Decoded:
    """Decode bytes into an upright RGB image, or raise Skip with the reason."""
    img = open_image(data)
    width, height = img.size
    fmt, mode = img.format or "", img.mode
    if min(width, height) < min_size:
        raise Skip("too-small", f"{width}x{height}")
    if draft_to and img.format == "JPEG" and min(width, height) > draft_to:
        # Let libjpeg decode at 1/2, 1/4 or 1/8 scale when that still covers the target.
        scale = draft_to / min(width, height)
        img.draft("RGB", (round(width * scale), round(height * scale)))
    try:
        img.load()
        upright = _orientation(img) == 1
        rgb = to_rgb(img if upright else ImageOps.exif_transpose(img))
        return Decoded(rgb, fmt, mode, width, height, upright)
    except Exception as e:  # Pillow raises many types for damaged files
        raise Skip("corrupt", str(e) or type(e).__name__) from None


def open_image(data: bytes) -> Image.Image:
    """The image's header, its pixels not yet decoded; Skip if it is no image or over
    MAX_PIXELS."""
    if not data:
        raise Skip("empty")
    try:
        with warnings.catch_warnings():
            # Pillow warns from 89 MP on and refuses from 179 MP; MAX_PIXELS decides here.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise Skip("not-an-image") from None
    except Image.DecompressionBombError:
        raise Skip("too-large") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise Skip("corrupt", str(e)) from None
    if img.width * img.height > MAX_PIXELS:
        raise Skip("too-large", f"{img.width}x{img.height}")
    return img


def _orientation(img: Image.Image) -> int:
    try:
        return int(img.getexif().get(EXIF_ORIENTATION, 1))
    except Exception:
        return 1


def to_rgb(img: Image.Image) -> Image.Image:
    """Any Pillow mode to RGB: 16-bit scaled down, transparency composited on white."""
    if img.mode == "RGB":
        return img
    if img.mode.startswith("I"):
        img = to_8bit_grey(img)
    if img.mode in ("RGBA", "LA", "PA", "La", "RGBa") or "transparency" in img.info:
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def to_8bit_grey(img: Image.Image) -> Image.Image:
    """A 16-bit (I;16, I) grey image as 8-bit L."""
    depth = np.asarray(img).astype(np.int64)
    return Image.fromarray((np.clip(depth, 0, 65535) >> 8).astype(np.uint8), "L")


def resize_shorter(img: Image.Image, size: int, upscale: bool = False) -> Image.Image:
    """Scale so the shorter side is `size`; small images stay as they are unless `upscale`
    (shards never upscale: it adds bytes, not detail; the loader does when it must)."""
    width, height = img.size
    if min(width, height) == size or (min(width, height) < size and not upscale):
        return img
    scale = size / min(width, height)
    new = (max(size, round(width * scale)), max(size, round(height * scale)))
    return img.resize(new, Image.Resampling.BICUBIC, reducing_gap=3.0)


def encode(img: Image.Image, fmt: str, quality: int) -> bytes:
    buf = io.BytesIO()
    if fmt == "png":
        img.save(buf, "PNG", compress_level=6)
    else:
        img.save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def prepare_sample(
    data: bytes, resize: int, quality: int, min_size: int
) -> tuple[bytes, str, dict]:
    """Source bytes to (payload, extension, {width, height}) for a shard, or raise Skip.

    `resize=0` keeps the bytes untouched when they already are an upright RGB JPEG or PNG.
    """
    src = decode(data, min_size=min_size, draft_to=resize)
    meta = {"width": src.width, "height": src.height}
    if resize == 0:
        if src.format in ("JPEG", "PNG") and src.mode == "RGB" and src.upright:
            return data, "jpg" if src.format == "JPEG" else "png", meta
        ext = "png" if src.format in LOSSLESS_FORMATS else "jpg"
        return encode(src.image, ext, quality), ext, meta
    return encode(resize_shorter(src.image, resize), "jpg", quality), "jpg", meta
