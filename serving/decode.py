"""Untrusted image bytes -> a PIL image, within limits, or an :class:`ApiError` (4xx).

The pixel limit is checked from the header, before any pixel is decoded, so a
decompression bomb (a small file that expands to gigapixels) costs nothing; PIL's own
``MAX_IMAGE_PIXELS`` guard (``DecompressionBombError``) is set to the same limit as a backstop.
"""
from __future__ import annotations

import base64
import binascii
import io
import warnings

from PIL import Image, UnidentifiedImageError

from serving.errors import ApiError

# What the service accepts; anything else PIL can read (PPM, ICO, EPS, ...) is a 415.
FORMATS = {"PNG", "JPEG", "GIF", "BMP", "WEBP", "TIFF"}


def b64_bytes(data: str, what: str) -> bytes:
    try:
        return base64.b64decode(data.split(",", 1)[-1] if data.startswith("data:") else data, validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(400, "bad_base64", f"{what}: not valid base64") from None


def decode_image(data: bytes, what: str, max_bytes: int, max_pixels: int) -> Image.Image:
    if not data:
        raise ApiError(400, "empty_image", f"{what}: no bytes")
    if len(data) > max_bytes:
        raise ApiError(413, "image_too_large", f"{what}: {len(data)} bytes, the limit is {max_bytes}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data))
            if im.format not in FORMATS:
                raise ApiError(415, "unsupported_format",
                               f"{what}: format {im.format} is not accepted; send one of {', '.join(sorted(FORMATS))}")
            w, h = im.size
            if w * h > max_pixels:
                raise ApiError(413, "too_many_pixels", f"{what}: {w}x{h} pixels, the limit is {max_pixels}")
            im.load()  # decode now: a truncated or corrupt file fails here, not later
    except ApiError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ApiError(413, "too_many_pixels", f"{what}: over the pixel limit of {max_pixels}") from None
    except UnidentifiedImageError:
        raise ApiError(400, "not_an_image", f"{what}: not an image file") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        code = "truncated_image" if "truncated" in str(e).lower() or isinstance(e, EOFError) else "corrupt_image"
        raise ApiError(400, code, f"{what}: the image cannot be decoded ({e})") from None
    return im
