"""Building an index on a real local Ray cluster (Ray Data actors) and through the CLI."""
from __future__ import annotations

import json

import numpy as np
import pytest

pytestmark = [pytest.mark.slow, pytest.mark.cluster]


@pytest.mark.timeout(300)
def test_ray_data_build_matches_local(small_model, ray_local, tmp_path):
    from deepindex.index.build import build_index
    from deepindex.index.store import IndexStore
    from deepindex.tracking.registry import resolve_model

    r = build_index(str(small_model), size=700, out=tmp_path / "ray", workers=2, batch_size=64)
    local = build_index(str(small_model), size=700, out=tmp_path / "local", use_ray=False)
    a, b = IndexStore.load(r.path), IndexStore.load(local.path)
    assert a.ids == b.ids == [f"scene-{i:06d}" for i in range(700)]  # row order survives the actor pool
    np.testing.assert_allclose(a.probs, b.probs, atol=1e-5)
    np.testing.assert_allclose(a.embeddings, b.embeddings, atol=1e-4)
    assert a.thumbs.shape == (700, 1, 32, 32) and a.thumbs.dtype == np.uint8
    m = a.manifest
    assert m.model.version == resolve_model(str(small_model)).version
    assert m.metric == "ip" and m.kind == "flat" and m.count == 700 and m.dim == 64
    assert a.meta[0]["labels"] and set(a.meta[0]["labels"]) <= set(m.concepts)


@pytest.mark.timeout(300)
def test_cli_build_and_info(small_model, tmp_path, capsys, monkeypatch):
    from deepindex.cli import main

    monkeypatch.setenv("DEEPINDEX_HOME", str(tmp_path / "state"))
    assert main(["index", "build", "--model", str(small_model), "--size", "300", "--local",
                 "--kind", "hnsw", "--metric", "l2"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["items"] == 300 and out["kind"] == "hnsw" and out["metric"] == "l2"
    # The default location: one folder per (collection, model version).
    assert out["path"].endswith(f"indexes/digit-scenes/local-{out['version']}")
    assert main(["index", "info", out["path"]]) == 0
    assert json.loads(capsys.readouterr().out)["model"]["version"] == out["version"]
    assert main(["index", "build", "--model", str(tmp_path / "missing"), "--local"]) == 2  # a clean error
