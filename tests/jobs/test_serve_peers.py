"""jobs/serve_peers.py: the stacks jobs/bench_serve.py compares deepindex with answer what deepindex
answers (a benchmark against a peer that does less work, or other work, would measure nothing).

Each peer runs as the benchmark runs it (its own process group, killed with it) and tags the same
PNGs, sent both ways (multipart and base64 JSON); the top concepts and probabilities are the
offline model's.  No timing is asserted here: jobs/bench_serve.py measures.
"""
from __future__ import annotations

import base64
import importlib.util
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
import requests

from support import REPO, kill_session, png_bytes, wait_until

pytestmark = [pytest.mark.slow]


def _offline(model: str, images: list[bytes]) -> list[list[tuple[str, float]]]:
    spec = importlib.util.spec_from_file_location("serve_peers", REPO / "jobs" / "serve_peers.py")
    assert spec is not None and spec.loader is not None
    peers = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(peers)  # a script of jobs/, not a package module
    t = peers.Tagger(model, threads=1)
    probs = t.probs([t.pixels(b) for b in images])
    return [[(c["concept"], c["probability"]) for c in t.answer(p)["concepts"]] for p in probs]


@pytest.mark.timeout(240)
@pytest.mark.parametrize("stack", ["fastapi", "litserve"])
def test_peer_tags_like_the_offline_model(stack, small_model, tmp_path):
    from deepindex.index.collection import digit_gallery
    from deepindex.net import free_port

    images = [png_bytes(im) for im in digit_gallery(3, seed=5).images]
    want = _offline(str(small_model), images)
    port = free_port()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "platform"), str(REPO)])}
    with (tmp_path / "server.log").open("wb") as log:
        proc = subprocess.Popen([sys.executable, str(REPO / "jobs" / "serve_peers.py"), stack, "--model",
                                 str(small_model), "--port", str(port)], stdout=log, stderr=subprocess.STDOUT,
                                env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        def up() -> bool:
            try:
                return requests.get(f"{url}/healthz", timeout=2).status_code == 200
            except requests.RequestException:
                return False

        wait_until(up, 180, every=0.5, alive=lambda: proc.poll() is None, what=f"{stack} on {url}")
        for i, img in enumerate(images):
            multipart = requests.post(f"{url}/v1/tag", files={"images": ("x.png", img, "image/png")}, timeout=60)
            as_json = requests.post(f"{url}/v1/tag", json={"images": [{"data": base64.b64encode(img).decode()}]},
                                    timeout=60)
            for r in (multipart, as_json):
                log_tail = (tmp_path / "server.log").read_text()[-2000:]
                assert r.status_code == 200, (r.status_code, r.text[:500], log_tail)
                got = [(c["concept"], c["probability"]) for c in r.json()["results"][0]["concepts"]]
                assert [c for c, _ in got] == [c for c, _ in want[i]]
                np.testing.assert_allclose([p for _, p in got], [p for _, p in want[i]], atol=1e-5)
    finally:
        kill_session(proc, signal.SIGKILL)
