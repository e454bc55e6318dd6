"""One real Serve application for the serving tests: a small trained model, a Ray-built index,
Ray Serve over HTTP on a free loopback port.  Package-scoped: built once, torn down after."""
from __future__ import annotations

import functools
import importlib.util
import io
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import requests

from deepindex.net import free_port

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:  # `serving/` is a top-level folder, not an installed package
    sys.path.insert(0, str(REPO))
GALLERY = 2000
LIMITS = {"max_image_bytes": 200_000, "max_image_pixels": 1_000_000, "max_images_per_request": 8, "max_k": 100}


@dataclass
class Served:
    url: str
    model_path: Path  # the live checkpoint the service polls (a plain path: version = file hash)
    trained: Path  # an untouched copy of the trained checkpoint
    collection_dir: Path  # the collection folder: one index per model version
    index_path: Path
    labels: list[list[str]]  # gallery ground truth, by row
    images: np.ndarray  # (N, 1, S, S) float32 in [0, 1]
    version: str

    def get(self, path: str, **kw) -> requests.Response:
        return requests.get(self.url + path, timeout=60, **kw)

    def post(self, path: str, **kw) -> requests.Response:
        return requests.post(self.url + path, timeout=60, **kw)


def png_bytes(unit: np.ndarray) -> bytes:
    """(1, S, S) or (S, S) in [0, 1] -> PNG bytes (grayscale)."""
    from PIL import Image

    a = np.asarray(unit).reshape(unit.shape[-2:])
    buf = io.BytesIO()
    Image.fromarray(np.clip(np.rint(a * 255), 0, 255).astype(np.uint8)).save(buf, format="PNG")
    return buf.getvalue()



@functools.cache
def load_job():
    """``jobs/load_serve.py`` as a module (``jobs/`` is scripts, not a package)."""
    spec = importlib.util.spec_from_file_location("load_serve", Path(REPO) / "jobs" / "load_serve.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


def wait_for(fn, timeout: float = 60.0, every: float = 0.5):
    end = time.time() + timeout
    last = None
    while time.time() < end:
        last = fn()
        if last:
            return last
        time.sleep(every)
    return last


@pytest.fixture(scope="package")
def served(tmp_path_factory):
    import ray
    from ray import serve

    from deepindex.index.build import build_index
    from deepindex.index.collection import digit_gallery
    from deepindex.tracking.registry import resolve_model
    from deepindex.index.store import index_dir_name
    from deepindex.index.tiny import train_small

    from serving.app import build_app

    root = tmp_path_factory.mktemp("serving")
    trained, _ = train_small(root / "trained", seed=0)
    live = root / "live"
    live.mkdir()
    shutil.copy(trained, live / "checkpoint.pt")
    version = resolve_model(str(live)).version

    from deepindex.serve_env import serve_env

    if ray.is_initialized():
        ray.shutdown()
    # The data plane `deepindex up` and k8s/ run (HAProxy + direct ingress where haproxy exists).
    saved = dict(os.environ)
    os.environ.update(serve_env())
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    os.environ.clear()
    os.environ.update(saved)  # the cluster has it now; later tests start from a clean environment
    coll = root / "indexes" / "digit-scenes"
    # In-process embedding: tests/index covers the Ray Data path; here the service is under test.
    built = build_index(str(live), size=GALLERY, out=coll / index_dir_name("local", version), use_ray=False)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    args = {"model": str(live), "index_dir": str(coll), "reload_interval_s": 1.0, "max_batch_size": 16,
            "batch_wait_timeout_s": 0.02, **LIMITS}
    serve.run(build_app(args), name="deepindex", route_prefix="/")
    g = digit_gallery(GALLERY)
    s = Served(f"http://127.0.0.1:{port}", live, trained.parent, coll, built.path, g.labels, g.images, version)
    assert wait_for(lambda: s.get("/readyz").status_code == 200, 60), s.get("/readyz").text
    yield s
    serve.shutdown()
    ray.shutdown()
