"""What schemathesis cannot invent from a schema alone: image files.

The contract (serving/contract.py) says an upload is an image file whose part names its type
(``encoding.images.contentType``), and a JSON image is ``format: image`` (a base64 image file).
Random bytes are neither, so schemathesis is told how to make them: small PNG and JPEG files of
random size, mode and pixels.  Loaded by the CLI through ``SCHEMATHESIS_HOOKS`` (this module's
import path); it registers the strategies on import.

The text parts of a multipart body (``id``, ``tags``: ``text/plain``) get a strategy too (item ids,
which are valid tags fields as well): schemathesis 4.32's coverage phase fills a required part it has
no strategy for with ``""`` once another part has one, and calls that body valid although ``""``
breaks the part's pattern.
"""
from __future__ import annotations

import base64
import io

import numpy as np
import schemathesis
from hypothesis import strategies as st


@st.composite
def image_file(draw: st.DrawFn, fmt: str) -> bytes:
    from PIL import Image

    w, h = draw(st.integers(1, 40)), draw(st.integers(1, 40))
    mode = draw(st.sampled_from(["L", "RGB"]))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    pixels = rng.integers(0, 256, (h, w) if mode == "L" else (h, w, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels, mode).save(buf, format=fmt)
    return buf.getvalue()


def text_parts() -> st.SearchStrategy[bytes]:
    """Valid for both text parts: a new item id is also a tags field of one tag."""
    from serving.contract import NEW_ITEM_ID_PATTERN

    return st.from_regex(NEW_ITEM_ID_PATTERN, fullmatch=True).map(str.encode)


schemathesis.openapi.media_type("image/png", image_file("PNG"))
schemathesis.openapi.media_type("text/plain", text_parts())
schemathesis.openapi.media_type("image/jpeg", image_file("JPEG"))
schemathesis.openapi.format("image", st.one_of(image_file("PNG"), image_file("JPEG"))
                            .map(lambda b: base64.b64encode(b).decode()))
