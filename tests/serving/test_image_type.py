"""serving.ingress.sniff_image_type: an item's original image goes back with its type, never decoded."""
from __future__ import annotations

import io
import zlib

import pytest
from PIL import Image

from serving.ingress import sniff_image_type


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "GIF", "BMP", "TIFF", "WEBP"])
def test_the_type_of_an_image_is_read_from_its_first_bytes_as_pil_names_it(fmt):
    buf = io.BytesIO()
    Image.new("RGB", (4, 4)).save(buf, format=fmt)
    assert sniff_image_type(buf.getvalue()) == Image.MIME[fmt]


def test_bytes_of_no_known_image_are_octet_stream_and_a_huge_image_is_not_decoded():
    assert sniff_image_type(b"not an image") == "application/octet-stream"
    buf = io.BytesIO()
    Image.new("L", (1, 1)).save(buf, format="PNG")
    data = bytearray(buf.getvalue())
    data[16:24] = (20000).to_bytes(4, "big") * 2  # a header claiming 400 M pixels: PIL's open would refuse it
    data[29:33] = zlib.crc32(bytes(data[12:29])).to_bytes(4, "big")  # its CRC, so that it reads as a PNG
    with pytest.raises(Image.DecompressionBombError):
        Image.open(io.BytesIO(bytes(data)))
    assert sniff_image_type(bytes(data)) == "image/png"
