"""Hostile input against the running service: the whole HTTP API fuzzed from its OpenAPI schema,
and every input limit hit, each a cheap 4xx that never reaches the model."""
from __future__ import annotations

import io
import statistics
import struct
import time
import zlib

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from prometheus_client.parser import text_string_to_metric_families
from schemathesis import GenerationMode
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)

from support import png_bytes
from tests.serving.conftest import LIMITS

pytestmark = [pytest.mark.slow, pytest.mark.serve, pytest.mark.cluster]

# What "no 5xx, responses conform to the schema" means; the other built-in checks judge API design
# choices (e.g. a schema-valid empty query is a 400 here) rather than faults.
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]


EXAMPLES = 20  # per operation and generation mode: ~14 operations x 2 modes, well under a minute


def _fuzz_operation(op, mode, url: str) -> None:
    @settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    @given(case=op.as_strategy(generation_mode=mode))
    def run(case) -> None:
        case.call_and_validate(base_url=url, checks=CHECKS, timeout=60)

    run()


@pytest.mark.timeout(300)
def test_api_fuzzed_from_openapi_no_5xx_and_responses_match_schema(served):
    # Driven by hand rather than by schemathesis' pytest plugin, whose lazy fixture loader does
    # not run under pytest 9; hypothesis still shrinks each failure to a minimal request.
    schema = schemathesis.openapi.from_url(served.url + "/openapi.json", timeout=30)
    ops = [r.ok() for r in schema.get_all_operations()]
    assert len(ops) >= 8, [op.label for op in ops]
    failures = []
    for op in ops:
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            try:
                _fuzz_operation(op, mode, served.url)
            except Unsatisfiable:  # no invalid request exists (no parameters, or only a free-form path)
                continue
            except Exception as e:  # noqa: BLE001 - collect every operation's failure, then report
                failures.append(f"{op.label} [{mode.value}]: {str(e)[:1500]}")
    assert not failures, "\n\n".join(failures)
    assert served.get("/healthz").status_code == 200


# ---- limits ------------------------------------------------------------------------------------
def _images_sent(served) -> float:
    """The model's image count (deepindex_images): a rejected request must not move it."""
    text = served.get("/metrics").text
    return sum(s.value for f in text_string_to_metric_families(text) if f.name == "deepindex_images"
               for s in f.samples if s.name.endswith("_total"))


def _png_claiming(width: int, height: int) -> bytes:
    """A valid PNG header claiming width x height, with one tiny IDAT: a decompression bomb's shape
    (a full bomb of this size would need gigabytes to decode)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit grayscale
    body = chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 1024)) + chunk(b"IEND", b"")
    return b"\x89PNG\r\n\x1a\n" + body


def _incompressible_png(side: int) -> bytes:
    import numpy as np
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (side, side, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def _timed(fn, n: int = 3) -> tuple[float, object]:
    times, r = [], None
    for _ in range(n):
        t = time.perf_counter()
        r = fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), r


@pytest.mark.timeout(180)
def test_each_limit_is_a_cheap_4xx_that_never_reaches_the_model(served):
    good = png_bytes(served.images[0])
    normal_tag, r = _timed(lambda: served.post("/v1/tag", files={"images": ("a.png", good)}), 5)
    assert r.status_code == 200
    # A bomb's real cost, for scale: decoding 4000 x 4000 pixels (a fifth of the 16 MP default limit).
    from PIL import Image

    t = time.perf_counter()
    Image.new("L", (4000, 4000)).tobytes()
    decode_4mp = time.perf_counter() - t
    big_body = b"x" * (LIMITS["max_images_per_request"] * LIMITS["max_image_bytes"] * 2 + (2 << 20))
    cases = {
        "body size": (lambda: served.post("/v1/tag", data=big_body, headers={"content-type": "application/json"}),
                      413, "request_too_large"),
        "image bytes": (lambda: served.post("/v1/tag", files={"images": ("a.png", _incompressible_png(300))}),
                        413, "image_too_large"),
        "image pixels (50000 x 50000 header)": (
            lambda: served.post("/v1/tag", files={"images": ("bomb.png", _png_claiming(50_000, 50_000))}),
            413, "too_many_pixels"),
        "images per request": (
            lambda: served.post("/v1/tag", files=[("images", (f"{i}.png", good))
                                                  for i in range(LIMITS["max_images_per_request"] + 1)]),
            413, "too_many_images"),
        "k": (lambda: served.get("/v1/search", params={"q": "three", "k": 10 ** 9}), 422, "k_out_of_range"),
        "top_k": (lambda: served.post("/v1/tag?top_k=100000", files={"images": ("a.png", good)}),
                  422, "top_k_out_of_range"),
        "query length": (lambda: served.get("/v1/search", params={"q": "three " * 2000}), 422, "query_too_long"),
    }
    before = _images_sent(served)
    rows, failures = [], []
    for name, (call, status, code) in cases.items():
        cost, r = _timed(call)
        rows.append((name, r.status_code, cost))
        body = r.json() if r.headers.get("content-type", "").startswith("application/json") else {}
        if r.status_code != status or body.get("error", {}).get("code") != code:
            failures.append((name, r.status_code, r.text[:200]))
        # Cheap: no dearer than a normal one-image request (plus slack for a noisy shared box).
        elif cost > max(3 * normal_tag, 0.5):
            failures.append((name, f"took {cost:.3f}s, a normal tag request {normal_tag:.3f}s"))
    after = _images_sent(served)
    print(f"normal tag request {normal_tag * 1000:.1f} ms; decoding 4 MP here {decode_4mp * 1000:.1f} ms; rejections: "
          + "; ".join(f"{n}: {s} in {c * 1000:.1f} ms" for n, s, c in rows))
    assert not failures, failures
    assert after == before, "a rejected request reached the model"
    assert served.get("/healthz").status_code == 200
