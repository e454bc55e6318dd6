"""One real Serve application for the serving tests: the session's small trained model, its index,
Ray Serve over HTTP on a free loopback port, on the session's Ray cluster.  Package-scoped: built
once, deleted after."""
from __future__ import annotations

import functools
import importlib.util
import secrets
import shutil
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

import numpy as np
import pytest
import requests

from deepindex.net import free_port
from support import REPO, ensure_ray, wait_until

if TYPE_CHECKING:
    from deepindex.collection import CollectionStore

GALLERY = 2000
LIMITS = {"max_image_bytes": 200_000, "max_image_pixels": 1_000_000, "max_images_per_request": 8, "max_k": 100}


@dataclass
class Served:
    url: str
    model_path: Path  # the live checkpoint the service follows (a plain path: version = file hash)
    trained: Path  # an untouched copy of the trained checkpoint
    collection_dir: Path  # the collection's index folder: one index per model version
    index_path: Path
    labels: list[list[str]]  # gallery ground truth, by row
    images: np.ndarray  # (N, 1, S, S) float32 in [0, 1]
    version: str
    catalogue_url: str
    blobs_url: str
    token: str  # the API token writes need

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}

    def get(self, path: str, **kw: Any) -> requests.Response:
        return requests.get(self.url + path, timeout=60, **kw)

    def post(self, path: str, **kw: Any) -> requests.Response:
        return requests.post(self.url + path, timeout=60, **kw)

    def delete(self, path: str, **kw: Any) -> requests.Response:
        return requests.delete(self.url + path, timeout=60, **kw)

    def store(self) -> CollectionStore:
        from deepindex.collection import CollectionStore

        return CollectionStore.open("digit-scenes", self.catalogue_url, self.blobs_url, create=False)


@functools.cache
def load_job() -> ModuleType:
    """``jobs/load_serve.py`` as a module (``jobs/`` is scripts, not a package)."""
    spec = importlib.util.spec_from_file_location("load_serve", Path(REPO) / "jobs" / "load_serve.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="package")
def served(tmp_path_factory: pytest.TempPathFactory, small_model: Path) -> Iterator[Served]:
    """The gallery imported into a collection, its index built, and the app serving it (the index replica
    finds the index by the model's version; the rollover tests make it build others itself)."""
    from ray import serve

    from deepindex.collection import CollectionStore
    from deepindex.collection.imports import import_digit_scenes
    from deepindex.index.build import build_index
    from deepindex.index.collection import digit_gallery
    from deepindex.tracking.registry import resolve_model
    from serving.app import build_app

    ensure_ray()
    root = tmp_path_factory.mktemp("serving")
    trained = root / "trained"
    trained.mkdir()
    shutil.copy(small_model, trained / "checkpoint.pt")  # an untouched copy: tests overwrite the live one
    live = root / "live"
    live.mkdir()
    shutil.copy(small_model, live / "checkpoint.pt")
    version = resolve_model(str(live)).version
    # The version's retrieval report, kept beside the checkpoint as `evaluate-retrieval --attach` keeps
    # it (the page's "about" panel shows it); measured on held-out scenes the gallery does not hold.
    from deepindex.checkpoint import load_model
    from deepindex.index.evaluate import evaluate_retrieval
    from deepindex.tracking.retrieval import attach_report

    report = evaluate_retrieval(load_model(str(live / "checkpoint.pt")), digit_gallery(300, seed=7), k=10)
    attach_report(resolve_model(str(live)), report)
    catalogue, blobs, coll = f"sqlite:///{root / 'catalogue.db'}", str(root / "blobs"), root / "indexes"
    import_digit_scenes(CollectionStore.open("digit-scenes", catalogue, blobs), size=GALLERY, seed=0)
    # In-process embedding: tests/index covers the Ray Data path; here the service is under test.
    built = build_index(str(live), index_dir=coll, use_ray=False, catalogue_url=catalogue, blobs_url=blobs)
    token = secrets.token_hex(16)
    (root / "api_token").write_text(token)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    args = {"model": str(live), "index_dir": str(coll), "catalogue_url": catalogue, "blobs_url": blobs,
            "api_token_file": str(root / "api_token"), "reload_interval_s": 1.0, "max_batch_size": 16,
            "batch_wait_timeout_s": 0.02, **LIMITS}
    serve.run(build_app(args), name="deepindex", route_prefix="/")
    g = digit_gallery(GALLERY)
    s = Served(f"http://127.0.0.1:{port}", live, trained, coll, built.path, g.labels, g.images, version, catalogue,
               blobs, token)
    wait_until(lambda: s.get("/readyz").status_code == 200, 60, every=0.5, what="the service ready")
    yield s
    serve.shutdown()
