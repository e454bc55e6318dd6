"""Live reload: a new model version is picked up, the old version's index refused, the new one found.

Runs after the other serving tests (it changes the served model).  The model URI is a plain
checkpoint path, whose version is the file hash; the registry's ``champion`` resolves the same way
through ``resolve_model``.
"""
from __future__ import annotations

import pytest

from support import png_bytes, wait_until

pytestmark = [pytest.mark.slow, pytest.mark.serve, pytest.mark.cluster, pytest.mark.timeout(300)]


def test_new_version_reloads_and_old_index_is_refused(served):
    import torch

    from deepindex.checkpoint import load_model, save_checkpoint
    from deepindex.index.build import build_index
    from deepindex.index.store import index_dir_name
    from deepindex.tracking.registry import resolve_model

    lm = load_model(served.trained)
    with torch.no_grad():
        lm.model.head.bias.add_(0.5)  # another version: other weights, other hash
    save_checkpoint(served.model_path, model=lm.model, config=lm.config, stats=lm.stats, concepts=lm.concepts,
                    multilabel=lm.multilabel, epoch=lm.epoch)
    new = resolve_model(str(served.model_path)).version
    assert new != served.version

    def readyz():
        r = served.get("/readyz")
        return r.status_code, r.json()  # a tuple: truthy whatever the status (a 503 Response is falsy)

    status, body = wait_until(lambda: (s := readyz())[1].get("model", {}).get("version") == new and s, 60, every=0.5,
                              what=f"the service reloaded version {new}")
    assert status == 503  # the model moved on; its index does not exist yet
    assert "no index for model local version " + new in body["reasons"][0]
    search = served.get("/v1/search", params={"q": "three"})
    assert search.status_code == 503 and search.json()["error"]["code"] == "index_unavailable"
    tag = served.post("/v1/tag", files={"images": ("a.png", png_bytes(served.images[0]))})
    assert tag.status_code == 200 and tag.json()["model"]["version"] == new  # tagging keeps working

    # Index the collection with the new version: the service finds it by version, no restart.
    build_index(str(served.model_path), size=300, out=served.collection_dir / index_dir_name("local", new),
                use_ray=False)
    status, body = wait_until(lambda: (s := readyz())[0] == 200 and s, 30, every=0.5, what="ready with the new index")
    assert status == 200 and body["index"]["model"]["version"] == new and body["index"]["count"] == 300
    assert served.get("/v1/search", params={"q": "three"}).status_code == 200
