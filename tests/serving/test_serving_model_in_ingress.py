"""``model_in_ingress``: no model replicas, each ingress replica holds the model and tags in process.

A second application beside the package's (its own collection, checkpoint and route prefix, on the
same Serve instance), deleted at the end: the tags equal the offline model's, bad input is a 4xx,
and a new model version is followed (the index replica's rollover moves the ingress's model).
"""
from __future__ import annotations

import io
import shutil

import numpy as np
import pytest
import requests

from support import png_bytes, wait_until
from tests.serving.conftest import LIMITS

pytestmark = [pytest.mark.slow, pytest.mark.serve, pytest.mark.cluster, pytest.mark.timeout(420)]

APP, PREFIX, ITEMS = "in-ingress", "/in-ingress", 300
CONCEPTS = [str(d) for d in range(10)]


def _offline(checkpoint, pngs: list[bytes]) -> np.ndarray:
    """The concept probabilities of the checkpoint's model, in this process: (N, 10)."""
    from PIL import Image

    from deepindex.checkpoint import load_model
    from deepindex.data.transforms import image_to_tensor

    lm = load_model(checkpoint)
    x = np.stack([image_to_tensor(Image.open(io.BytesIO(b)), 32, 1, lm.stats).numpy() for b in pngs])
    import torch

    return lm.model(torch.from_numpy(x)).sigmoid().detach().numpy()


def _tagged(url: str, pngs: list[bytes]) -> tuple[str, np.ndarray]:
    r = requests.post(f"{url}/v1/tag?top_k=10", files=[("images", (f"{i}.png", b)) for i, b in enumerate(pngs)],
                      timeout=60)
    assert r.status_code == 200, r.text
    body = r.json()
    probs = [{c["concept"]: c["probability"] for c in res["concepts"]} for res in body["results"]]
    return body["model"]["version"], np.array([[p[c] for c in CONCEPTS] for p in probs])


def test_model_in_ingress_tags_like_the_model_and_follows_a_new_version(served, tmp_path):
    import torch
    from ray import serve

    from deepindex.checkpoint import load_model, save_checkpoint
    from deepindex.collection import CollectionStore
    from deepindex.collection.imports import import_digit_scenes
    from deepindex.index.build import build_index
    from deepindex.tracking.registry import resolve_model
    from serving.app import build_app

    live = tmp_path / "live"
    live.mkdir()
    shutil.copy(served.trained / "checkpoint.pt", live / "checkpoint.pt")
    catalogue, blobs, coll = f"sqlite:///{tmp_path / 'catalogue.db'}", str(tmp_path / "blobs"), tmp_path / "indexes"
    import_digit_scenes(CollectionStore.open("digit-scenes", catalogue, blobs), size=ITEMS, seed=3)
    build_index(str(live), index_dir=coll, use_ray=False, catalogue_url=catalogue, blobs_url=blobs)
    args = {"model": str(live), "index_dir": str(coll), "catalogue_url": catalogue, "blobs_url": blobs,
            "reload_interval_s": 1.0, "max_batch_size": 16, "model_in_ingress": True, **LIMITS}
    serve.run(build_app(args), name=APP, route_prefix=PREFIX)
    url = served.url + PREFIX
    try:
        wait_until(lambda: requests.get(f"{url}/readyz", timeout=30).status_code == 200, 90, every=0.5,
                   what="the in-ingress application ready")
        # No model deployment: the ingress replica holds the model.
        deployments = set(serve.status().applications[APP].deployments)
        assert "ConceptModel" not in deployments and "Ingress" in deployments, deployments

        pngs = [png_bytes(served.images[i]) for i in range(6)]
        version, got = _tagged(url, pngs)
        assert version == served.version
        np.testing.assert_allclose(got, _offline(live / "checkpoint.pt", pngs), atol=1e-5)
        bad = requests.post(f"{url}/v1/tag", files=[("images", ("x.png", b"not an image"))], timeout=30)
        assert bad.status_code == 400 and bad.json()["error"]["code"] == "not_an_image", bad.text
        assert requests.post(f"{url}/v1/tag", files=[("images", ("0.png", pngs[0]))], timeout=30).status_code == 200

        # A new version at the followed URI: the index replica builds its index, then the ingress's
        # model moves to it, and tags are the new model's.
        lm = load_model(live / "checkpoint.pt")
        with torch.no_grad():
            lm.model.head.bias.add_(0.5)
        staged = tmp_path / "next"
        save_checkpoint(staged, model=lm.model, config=lm.config, stats=lm.stats, concepts=lm.concepts,
                        multilabel=lm.multilabel, epoch=lm.epoch)
        new = resolve_model(str(staged / "checkpoint.pt")).version
        shutil.copy(staged / "checkpoint.pt", live / "checkpoint.pt")
        wait_until(lambda: requests.get(f"{url}/readyz", timeout=30).json().get("model", {}).get("version") == new,
                   240, every=0.5, what=f"the ingress's model on version {new}")
        version, got = _tagged(url, pngs)
        assert version == new
        np.testing.assert_allclose(got, _offline(staged / "checkpoint.pt", pngs), atol=1e-5)
    finally:
        serve.delete(APP)
