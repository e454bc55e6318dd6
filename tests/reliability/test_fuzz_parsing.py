"""Property-based fuzzing of config and manifest parsing: only the project's own clear errors."""
from __future__ import annotations

import contextlib
import json
import string

import numpy as np
import pytest
import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from PIL import Image

from deepindex.config import PATH_KEYS, ConfigError, load_config
from deepindex.data.files import ManifestError, read_concepts, read_manifest

KNOWN = list(load_config().flat())
keys = st.one_of(st.sampled_from(KNOWN), st.text(string.ascii_letters + "._", min_size=0, max_size=20))
scalars = st.one_of(st.none(), st.booleans(), st.integers(-10**12, 10**12), st.floats(allow_nan=True),
                    st.text(max_size=30), st.lists(st.integers(-5, 300), max_size=4))
FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@FAST
@given(st.dictionaries(keys, scalars, max_size=4))
@example({"data.root": "\x00"})  # found by this test: Path.resolve's ValueError, not a ConfigError
@example({"ray.storage_path": "/runs/a\x00b"})  # absolute, never resolved: it failed later, mid-run
def test_config_overrides_fail_only_with_config_errors(overrides):
    try:
        cfg = load_config(None, overrides)
    except ConfigError as e:
        assert str(e).split(":")[0], "the error names a key"
    else:
        assert not any("\x00" in str(cfg.flat()[k] or "") for k in PATH_KEYS), cfg.flat()
        assert cfg.train.epochs >= 1


@FAST
@given(st.lists(st.text(max_size=40), max_size=4))
def test_cli_style_overrides_fail_only_with_config_errors(items):
    with contextlib.suppress(ConfigError):
        load_config(None, items)


@FAST
@given(st.recursive(scalars, lambda c: st.dictionaries(st.text(max_size=10), c, max_size=3), max_leaves=8))
def test_yaml_files_fail_only_with_config_errors(tmp_path, doc):
    f = tmp_path / "c.yaml"
    f.write_text(yaml.safe_dump(doc))
    with contextlib.suppress(ConfigError):
        load_config(f)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    r = tmp_path_factory.mktemp("root")
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(r / "ok.png")
    (r / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    return r


@FAST
@given(content=st.binary(max_size=300), suffix=st.sampled_from([".csv", ".jsonl"]))
def test_manifests_of_random_bytes_fail_clearly(tmp_path, root, content, suffix):
    m = tmp_path / f"m{suffix}"
    m.write_bytes(content)
    try:
        read_manifest(m, root, ["a", "b"])
    except ManifestError as e:
        assert str(e).startswith(str(m))


rows = st.tuples(st.sampled_from(["ok.png", "broken.png", "../x.png", "/etc/passwd", "", "nope.png", "ok.png\x00"]),
                 st.lists(st.sampled_from(["a", "b", "c", "", " a "]), max_size=3))


@FAST
@given(st.lists(rows, min_size=1, max_size=5), st.booleans())
def test_structured_manifests_fail_clearly(tmp_path, root, items, as_json):
    if as_json:
        m = tmp_path / "m.jsonl"
        m.write_text("".join(json.dumps({"path": p, "tags": t}) + "\n" for p, t in items))
    else:
        m = tmp_path / "m.csv"
        m.write_text("path,tags\n" + "".join(f"{json.dumps(p)},{';'.join(t)}\n" for p, t in items))
    try:
        out = read_manifest(m, root, ["a", "b"])
    except ManifestError as e:
        assert str(e).startswith(f"{m}:")
    else:
        assert all(p.name == "ok.png" for p in out.paths)  # only the good image gets through


@FAST
@given(st.binary(max_size=200))
def test_concept_lists_fail_clearly(tmp_path, content):
    f = tmp_path / "concepts.txt"
    f.write_bytes(content)
    try:
        concepts = read_concepts(f)
    except (ManifestError, ValueError) as e:
        assert "concept" in str(e)
    else:
        assert concepts and len(set(concepts)) == len(concepts)
