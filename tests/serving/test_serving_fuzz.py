"""Hostile input against the running service: the whole HTTP API checked against its own OpenAPI
contract by schemathesis (every check, every phase), and every input limit hit, each a cheap 4xx
that never reaches the model."""
from __future__ import annotations

import io
import os
import re
import statistics
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from support import REPO, png_bytes
from tests.serving.conftest import LIMITS

pytestmark = [pytest.mark.slow, pytest.mark.serve, pytest.mark.cluster]

SCHEMATHESIS = Path(sys.executable).parent / "schemathesis"
HERE = Path(__file__).resolve().parent
# Per operation and phase: enough to hit every bound, enum and body shape, small enough that the whole
# run (4 phases, 13 operations, ~1,600 requests, stateful add -> get -> similar -> delete) stays near a minute.
EXAMPLES = 10
PHASES = ("examples", "coverage", "fuzzing", "stateful")


def _collection_ids(served) -> set[str]:
    return {it.id for it in served.store().snapshot()}


@pytest.mark.timeout(420)
def test_schemathesis_all_checks_all_phases_finds_nothing(served, tmp_path):
    """`schemathesis run --checks all` over every phase against the live service: zero failures, zero
    errors, and a contract whose every reference resolves.  The CLI (not the pytest plugin): it is
    what a client runs, and it alone drives the coverage and stateful phases with every check."""
    from serving.contract import unresolved_refs

    doc = served.get("/openapi.json").json()
    assert unresolved_refs(doc) == []
    ops = [f"{m.upper()} {p}" for p, item in doc["paths"].items() for m in item]
    assert len(ops) == 13 and "GET /v1/about" in ops, ops
    before = _collection_ids(served)
    env = {**os.environ, "SCHEMATHESIS_HOOKS": "tests.serving.schemathesis_hooks",  # how to make images
           "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "platform"), os.environ.get("PYTHONPATH", "")])}
    # One worker: hypothesis describes its strategies with ast.parse, which CPython 3.11 does not
    # survive from two threads at once (SystemError: AST constructor recursion depth mismatch).
    cmd = [str(SCHEMATHESIS), "--config-file", str(HERE / "schemathesis.toml"), "run", served.url + "/openapi.json",
           "--checks", "all", "--phases", ",".join(PHASES), "--max-examples", str(EXAMPLES), "--seed", "14",
           "--generation-database", "none", "--header", f"Authorization: Bearer {served.token}",
           "--request-timeout", "60", "--workers", "1", "--no-color", "--output-truncate", "false",
           "--report", "junit", "--report-junit-path", str(tmp_path / "junit.xml")]
    start = time.perf_counter()
    try:
        r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=360)
    finally:
        # The run adds (and deletes) items with random ids: leave the collection as the other tests know it.
        for extra in _collection_ids(served) - before:
            served.delete(f"/v1/items/{extra}", headers=served.auth)
    wall = time.perf_counter() - start
    out = r.stdout
    summary = out[out.rfind("SUMMARY"):] if "SUMMARY" in out else out[-4000:]
    print(f"schemathesis --checks all, phases {','.join(PHASES)}: {wall:.0f}s\n{summary}")
    assert r.returncode == 0, f"schemathesis exited {r.returncode}:\n{out[-12000:]}\n{r.stderr[-3000:]}"
    assert "No issues found" in summary, summary
    assert "Tested: 13" in summary, summary  # every operation
    for phase in PHASES:  # every phase ran and passed (none skipped for want of data)
        assert f"✅ {phase.capitalize()}" in summary, summary
    links = re.search(r"API Links:\s+(\d+) covered", out)
    assert links and int(links.group(1)) >= 4, out[-3000:]  # add -> get, similar, image, delete at least
    junit = (tmp_path / "junit.xml").read_text()
    assert 'failures="0"' in junit and 'errors="0"' in junit, junit[:2000]
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
