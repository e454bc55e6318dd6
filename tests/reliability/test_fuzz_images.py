"""Fuzzing the service's image decoding (``serving.decode``): random bytes, damaged real files of
every accepted format, and valid headers claiming huge sizes (decompression bombs).  Whatever
comes in, the outcome is an image within the limits or the service's own :class:`ApiError` with a
4xx status and one of its codes: never a PIL exception, never a long decode."""
from __future__ import annotations

import base64
import functools
import io
import struct
import time
import zlib

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from serving.decode import FORMATS, b64_bytes, decode_image
from serving.errors import ApiError

pytestmark = [pytest.mark.timeout(240)]

MAX_BYTES, MAX_PIXELS = 200_000, 1_000_000  # the serving tests' limits (tests/serving/conftest.py)
CODES = {"empty_image", "image_too_large", "unsupported_format", "too_many_pixels", "not_an_image",
         "truncated_image", "corrupt_image"}
SLOW_S = 3.0  # one decode within the limits takes milliseconds; this is "hung", with slack for a busy box
FUZZ = settings(max_examples=1000, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def _seed_files() -> dict[str, bytes]:
    """One small real file per accepted format (plus a grayscale PNG and a progressive JPEG)."""
    from PIL import Image

    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 255, (24, 20, 3), dtype=np.uint8))
    out = {}
    for fmt in sorted(FORMATS):
        buf = io.BytesIO()
        (rgb.convert("P") if fmt == "GIF" else rgb).save(buf, format=fmt)
        out[fmt] = buf.getvalue()
    buf = io.BytesIO()
    rgb.convert("L").save(buf, format="PNG")
    out["PNG-L"] = buf.getvalue()
    buf = io.BytesIO()
    rgb.save(buf, format="JPEG", progressive=True)
    out["JPEG-progressive"] = buf.getvalue()
    return out


@functools.cache
def _seeds() -> dict[str, bytes]:
    return _seed_files()  # built on first use: no work at import time


def check_decode(data: bytes) -> str:
    """Decode; an image within the limits, or an ApiError with a known 4xx code.  Returns the outcome."""
    t = time.perf_counter()
    try:
        im = decode_image(data, "image", MAX_BYTES, MAX_PIXELS)
    except ApiError as e:
        outcome = e.code
        assert 400 <= e.status < 500 and e.code in CODES and e.message.startswith("image"), (e.status, e.code)
    else:
        outcome = "ok"
        assert im.format in FORMATS and im.size[0] * im.size[1] <= MAX_PIXELS
        im.convert("RGB")  # usable as the ingress uses it
    took = time.perf_counter() - t
    assert took < SLOW_S, f"{took:.1f}s on {len(data)} bytes"
    return outcome


@FUZZ
@given(st.binary(max_size=4096))
def test_random_bytes(data):
    check_decode(data)


@st.composite
def damaged(draw) -> bytes:
    """A real file cut short and/or with a few bytes overwritten (headers included)."""
    name = draw(st.sampled_from(sorted(_seeds())))
    b = bytearray(_seeds()[name])
    for _ in range(draw(st.integers(0, 6))):
        # Bias towards the first bytes: headers and chunk lengths are where parsers go wrong.
        i = draw(st.one_of(st.integers(0, min(64, len(b) - 1)), st.integers(0, len(b) - 1)))
        b[i] = draw(st.integers(0, 255))
    cut = draw(st.one_of(st.just(len(b)), st.integers(0, len(b))))
    return bytes(b[:cut])


@FUZZ
@given(damaged())
def test_damaged_real_files(data):
    check_decode(data)


def test_every_seed_decodes_and_every_cut_is_a_clear_error():
    """The corpus is sound (each file decodes), and a file cut anywhere is a 4xx, exhaustively for PNG."""
    for name, data in _seeds().items():
        assert check_decode(data) == "ok", name
    png = _seeds()["PNG"]
    outcomes = {n: check_decode(png[:n]) for n in range(len(png))}
    assert set(outcomes.values()) - {"ok"} <= CODES and "truncated_image" in outcomes.values()
    # Only checksums and the end marker may go missing (IEND 12 bytes, IDAT CRC 4, zlib adler32 4):
    # every pixel is there before them.
    assert min(n for n, o in outcomes.items() if o == "ok") >= len(png) - 20


# ---- decompression bombs: headers claiming huge sizes --------------------------------------
def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_header(w: int, h: int) -> bytes:
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)  # 8-bit RGB
    body = _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", zlib.compress(b"\0" * 4096)) + _chunk(b"IEND", b"")
    return b"\x89PNG\r\n\x1a\n" + body


def gif_header(w: int, h: int) -> bytes:
    screen = struct.pack("<HHBBB", w, h, 0x80, 0, 0) + b"\0" * 6  # global colour table of 2 colours
    image = b"\x2c" + struct.pack("<HHHHB", 0, 0, w, h, 0) + b"\x02\x02\x44\x01\x00"
    return b"GIF89a" + screen + image + b"\x3b"


def bmp_header(w: int, h: int) -> bytes:
    info = struct.pack("<IiiHHIIiiII", 40, w, h, 1, 24, 0, 0, 2835, 2835, 0, 0)
    return b"BM" + struct.pack("<IHHI", 14 + 40 + 64, 0, 0, 54) + info + b"\0" * 64


def jpeg_header(w: int, h: int) -> bytes:
    sof = b"\xff\xc0" + struct.pack(">HBHHB", 11, 8, h, w, 1) + b"\x01\x11\x00"
    return b"\xff\xd8" + sof + b"\xff\xd9"


HEADERS = {"png": (png_header, 2 ** 31 - 1), "gif": (gif_header, 2 ** 16 - 1), "bmp": (bmp_header, 2 ** 31 - 1),
           "jpeg": (jpeg_header, 2 ** 16 - 1)}


@st.composite
def bomb(draw) -> tuple[str, int, int, bytes]:
    kind = draw(st.sampled_from(sorted(HEADERS)))
    make, top = HEADERS[kind]
    side = st.integers(1, top)
    w, h = draw(side), draw(side)
    return kind, w, h, make(w, h)


@FUZZ
@given(bomb())
def test_headers_claiming_huge_sizes_stop_at_the_header(b):
    kind, w, h, data = b
    outcome = check_decode(data)
    if w * h > MAX_PIXELS:
        assert outcome == "too_many_pixels", (kind, w, h, outcome)


@pytest.mark.parametrize("kind", sorted(HEADERS))
def test_a_gigapixel_header_is_refused_in_milliseconds(kind):
    make, top = HEADERS[kind]
    side = min(top, 50_000)  # 2.5 gigapixels: ~7.5 GB as RGB, if it were ever decoded
    t = time.perf_counter()
    with pytest.raises(ApiError) as e:
        decode_image(make(side, side), "image", MAX_BYTES, MAX_PIXELS)
    took = time.perf_counter() - t
    assert e.value.status == 413 and e.value.code == "too_many_pixels", e.value.code
    assert took < 0.5, took


# ---- base64 ---------------------------------------------------------------------------------
@FUZZ
@given(st.one_of(st.text(max_size=200), st.binary(max_size=150).map(lambda b: base64.b64encode(b).decode()),
                 st.binary(max_size=150).map(lambda b: "data:image/png;base64," + base64.b64encode(b).decode())))
def test_base64_fields(text):
    try:
        data = b64_bytes(text, "images[0]")
    except ApiError as e:
        assert e.status == 400 and e.code == "bad_base64"
        return
    if data:
        check_decode(data)
