"""The Dockerfile cannot be built here; what can be checked without a daemon is checked: the files
it copies exist and reach the build context, its pins agree with pyproject.toml, it runs as non-root."""
from __future__ import annotations

import fnmatch
import re
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.timeout(30)


def instructions() -> list[tuple[str, str]]:
    text = (ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            op, _, rest = line.partition(" ")
            out.append((op.upper(), rest.strip()))
    return out


def args() -> dict[str, str]:
    return dict(rest.split("=", 1) for op, rest in instructions() if op == "ARG" and "=" in rest)


def project() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def dockerignored(path: str) -> bool:
    """Docker's rule: the last matching pattern wins; ``!`` re-includes."""
    ignored = False
    for raw in (ROOT / ".dockerignore").read_text().splitlines():
        pat = raw.strip()
        if not pat or pat.startswith("#"):
            continue
        neg = pat.startswith("!")
        pat = pat.lstrip("!").rstrip("/")
        parts = path.split("/")
        if any(fnmatch.fnmatch("/".join(parts[:i]), pat) for i in range(1, len(parts) + 1)):
            ignored = not neg
    return ignored


def test_copied_files_exist_and_reach_the_build_context():
    copies = [rest.split() for op, rest in instructions() if op == "COPY"]
    assert copies
    for *sources, _dest in copies:
        for src in sources:
            p = ROOT / src
            assert p.exists(), f"COPY {src}: missing"
            files = [p] if p.is_file() else [f for f in p.rglob("*") if f.is_file() and "__pycache__" not in f.parts]
            assert files, f"COPY {src}: empty directory"
            for f in files:
                rel = f.relative_to(ROOT).as_posix()
                assert not dockerignored(rel), f"{rel} is copied but .dockerignore drops it"
    # The build context is only what is copied: no local state, venv or tests.
    for rel in (".venv/bin/python", ".git/HEAD", ".deepindex/x", "tests/conftest.py", "k8s/base/kustomization.yaml"):
        assert dockerignored(rel), rel


def test_pins_agree_with_pyproject():
    a, deps = args(), project()["dependencies"]
    pin = re.compile(r"([\w-]+)(\[.*\])?==([\w.]+)")
    pins = {m.group(1).lower(): m.group(3) for d in deps if (m := pin.fullmatch(d.replace(" ", "")))}
    assert a["DEEPINDEX_VERSION"] == project()["version"]
    for pkg, arg in {"torch": "TORCH_VERSION", "torchvision": "TORCHVISION_VERSION", "ray": "RAY_VERSION",
                     "mlflow": "MLFLOW_VERSION"}.items():
        assert a[arg] == pins[pkg], f"{arg}={a[arg]} but pyproject pins {pkg}=={pins[pkg]}"
    # The extras installed for ray are the ones pyproject asks for.
    (ray_dep,) = [d for d in deps if d.startswith("ray[")]
    assert ray_dep.split("==")[0] in (ROOT / "Dockerfile").read_text()
    # Every package the Dockerfile installs by itself is pinned exactly.
    for op, rest in instructions():
        if op == "RUN" and "pip install" in rest:
            for spec in re.findall(r'"([A-Za-z][\w.\-]*(?:\[[^\]]*\])?[^"\s]*)"', rest):
                assert "==" in spec, f"unpinned: {spec}"


def test_base_image_is_pinned_and_matches_requires_python():
    a = args()
    (base,) = [rest for op, rest in instructions() if op == "FROM"]
    base = base.replace("${PYTHON_VERSION}", a["PYTHON_VERSION"])
    assert re.fullmatch(r"python:3\.\d+\.\d+-slim-\w+", base), base
    major_minor = ".".join(a["PYTHON_VERSION"].split(".")[:2])
    assert project()["requires-python"] == f">={major_minor},<3.{int(major_minor.split('.')[1]) + 1}"


def test_runs_as_non_root_with_the_uid_of_the_manifests():
    users = [rest for op, rest in instructions() if op == "USER"]
    assert users and users[-1] not in ("root", "0")
    assert users[-1] == "1000"  # runAsUser / fsGroup in k8s/
    assert re.search(r"useradd .*--uid 1000", (ROOT / "Dockerfile").read_text())
