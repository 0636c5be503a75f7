"""Image checks: decode by content, guard against decompression bombs, keep original bytes or re-encode.

An image is stored as its original bytes under its true extension whenever it decodes fully and no
resize/re-encode is configured (a PNG named ``.jpg`` is stored as ``.png``). When re-encoding, odd
modes (CMYK, 16-bit, palette, alpha) are converted to RGB first. Anything that does not decode is a
``Skip`` with a stable reason, never an exception that escapes a worker.
"""

from __future__ import annotations

import io
import warnings

from PIL import Image, UnidentifiedImageError

from fgcmr.shard.records import Skip

# Pillow format name → stored extension (the extensions fgcmr.dataset reads).
_EXTS = {"JPEG": "jpg", "MPO": "jpg", "PNG": "png", "WEBP": "webp", "GIF": "gif", "BMP": "bmp", "TIFF": "tiff"}


def check_image(
    data: bytes, max_pixels: int, max_side: int = 0, reencode: bool = False, quality: int = 90
) -> tuple[bytes, str, tuple[int, int]]:
    """Return ``(bytes, ext, (width, height))`` of a verified image, or raise ``Skip``."""
    if not data:
        raise Skip("empty_image", "zero-byte file")
    img = _open(data, max_pixels)
    width, height = img.size
    if width * height > max_pixels:
        raise Skip("too_many_pixels", f"{width}x{height} > max_pixels={max_pixels}")
    ext = _EXTS.get(img.format or "")
    too_big = max_side > 0 and max(width, height) > max_side
    keep = ext is not None and not reencode and not too_big
    if keep and img.format == "JPEG":
        # Verifying needs every entropy-coded byte, not full-size pixels: decode at 1/8 scale.
        img.draft(img.mode, (max(1, width // 8), max(1, height // 8)))
    _decode(img)
    if keep:
        return data, ext, (width, height)
    img = to_rgb(img)
    if too_big:
        img.thumbnail((max_side, max_side), Image.Resampling.BICUBIC)
    return encode_jpeg(img, quality), "jpg", img.size


def _open(data: bytes, max_pixels: int) -> Image.Image:
    """Open (header only); Pillow's own bomb check is aligned with ``max_pixels`` while it runs."""
    pil_limit, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, max_pixels
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            return Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as e:
        raise Skip("too_many_pixels", str(e)) from None
    except UnidentifiedImageError:
        raise Skip("not_an_image", f"not a recognised image format ({len(data)} bytes)") from None
    except Exception as e:  # a malformed header can raise almost anything inside a plugin
        raise Skip("corrupt_image", f"{type(e).__name__}: {e}") from None
    finally:
        Image.MAX_IMAGE_PIXELS = pil_limit


def _decode(img: Image.Image) -> None:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            img.load()
    except Exception as e:  # truncated data raises OSError; broken streams raise others
        raise Skip("corrupt_image", f"does not decode: {type(e).__name__}: {e}") from None


def to_rgb(img: Image.Image) -> Image.Image:
    """RGB for any mode: palette/alpha composited on white, 16-bit scaled down, CMYK converted."""
    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        img = img.point(lambda v: v / 256).convert("L")
    if img.mode == "P":
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA"):
        background = Image.new("RGB", img.size, (255, 255, 255))
        background.paste(img.convert("RGBA"), mask=img.convert("RGBA").getchannel("A"))
        return background
    return img.convert("RGB")


def encode_jpeg(img: Image.Image, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()
