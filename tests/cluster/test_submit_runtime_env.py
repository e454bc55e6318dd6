"""``deepindex submit`` without a cluster: what it would send, and its one-line errors."""
from __future__ import annotations

import json
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from deepindex import submit as s

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.timeout(120)


def test_submission_ships_the_project_and_the_tracking_uri(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    sub = s.build_submission("train", ["--name", "r 1", "optim.lr=0.1"], ROOT, tracking_uri="http://mlflow:5000",
                             env={"A": "1"})
    assert sub.entrypoint == "python jobs/train.py --name 'r 1' optim.lr=0.1"
    env = sub.runtime_env
    assert env["working_dir"] == str(ROOT) and env["py_modules"] == [str(ROOT / "platform" / "deepindex")]
    assert env["env_vars"] == {"MLFLOW_TRACKING_URI": "http://mlflow:5000", "A": "1"}
    assert {".venv", ".git", ".deepindex"} <= set(env["excludes"])
    no_ship = s.build_submission("promote", ["--sweep", "x"], ROOT, ship_code=False).runtime_env
    assert set(no_ship) == {"env_vars"}


def test_a_folder_of_ones_own_ships_with_the_installed_library_and_runs_the_cli(tmp_path, monkeypatch):
    """Outside a checkout (deepindex installed, a folder with a recipe and images): that folder is the
    working dir, the installed package the py_module, and the job is the CLI's own command."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    assert s.find_project_root() is None and s.folder_to_ship() == tmp_path.resolve()
    sub = s.build_submission("audit", ["--config", "photos/train.yaml", "audit.folds=3"], s.folder_to_ship())
    assert sub.entrypoint == "python -m deepindex.cli data audit --config photos/train.yaml audit.folds=3"
    env = sub.runtime_env
    import deepindex

    assert env["working_dir"] == str(tmp_path.resolve())
    assert env["py_modules"] == [str(Path(deepindex.__file__).resolve().parent)]
    assert "/tests" not in env["excludes"] and {".deepindex", "mlruns", "*.pt"} <= set(env["excludes"])
    # Every job's command is one the CLI knows (its parser accepts the words before the job's args).
    from deepindex.cli import build_parser

    for job in s.JOBS.values():
        with pytest.raises(SystemExit) as e:
            build_parser().parse_args([*job.command, "--help"])
        assert e.value.code == 0, job
    # In a checkout, from any folder inside it: the checkout and its job scripts, as before.
    monkeypatch.chdir(ROOT / "platform")
    assert s.folder_to_ship() == ROOT
    assert s.build_submission("audit", [], s.folder_to_ship()).entrypoint == "python jobs/audit.py"


@pytest.mark.parametrize("module", ["working_dir", "py_modules"])
def test_uploaded_packages_hold_the_whole_library_and_no_local_state(tmp_path, module):
    """Pack what Ray would upload, with Ray's own packer (it honours .gitignore as well as our
    excludes, and applies the excludes to py_modules with the module as base)."""
    from ray._private.runtime_env.packaging import create_package

    env = s.build_runtime_env(ROOT)
    src = Path(env["working_dir"]) if module == "working_dir" else Path(env["py_modules"][0])
    target = tmp_path / "pkg.zip"
    create_package(str(src), target, include_parent_dir=module == "py_modules", excludes=env["excludes"],
                   include_gitignore=True)  # Ray's default (RAY_RUNTIME_ENV_IGNORE_GITIGNORE unset)
    names = zipfile.ZipFile(target).namelist()
    lib = [n for n in names if n.endswith(".py") and "deepindex/" in n]
    if module == "py_modules":
        want = {p.relative_to(src.parent).as_posix() for p in src.rglob("*.py") if "__pycache__" not in p.parts}
        assert want and want <= set(names), sorted(want - set(names))[:5]  # e.g. deepindex/data/*.py
    else:
        assert "jobs/train.py" in names and lib
    assert not [n for n in names if n.startswith((".venv/", ".git/", ".deepindex/", "tests/", "k8s/"))]
    assert not [n for n in names if n.endswith((".pt", ".pyc"))]


def test_a_folder_of_ones_own_uploads_its_recipe_and_images_and_no_local_state(tmp_path):
    from ray._private.runtime_env.packaging import create_package

    own = tmp_path / "mine"
    for rel in ("photos/train.yaml", "photos/a.png", "tests/notes.txt", ".deepindex/state.json",
                "mlruns/0/meta.yaml", "best.pt"):
        (own / rel).parent.mkdir(parents=True, exist_ok=True)
        (own / rel).write_text("x")
    env = s.build_runtime_env(own)
    create_package(str(own), tmp_path / "pkg.zip", excludes=env["excludes"], include_gitignore=True)
    names = {n for n in zipfile.ZipFile(tmp_path / "pkg.zip").namelist() if not n.endswith("/")}
    assert names == {"photos/train.yaml", "photos/a.png", "tests/notes.txt"}, names


def test_cli_errors_are_one_line_and_name_the_field(tmp_path):
    def run(*argv, **env):
        return subprocess.run([sys.executable, "-m", "deepindex.cli", "submit", *argv], cwd=ROOT, capture_output=True,
                              text=True, timeout=60, env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), **env})

    for argv, env, field in [(["--env", "NOEQUALS", "train"], {}, "env:"),
                             (["train"], {}, "address:"),
                             (["--address", "http://127.0.0.1:9", "train"], {}, "address:"),
                             (["--project-dir", str(tmp_path), "train"], {}, "project-dir:"),
                             (["--address", "http://127.0.0.1:9", "train"],
                              {"RAY_AUTH_TOKEN_PATH": str(tmp_path / "no")},
                              "RAY_AUTH_TOKEN_PATH:")]:
        out = run(*argv, **env)
        assert out.returncode == 2, (argv, out.stderr)
        assert out.stderr.count("\n") == 1 and f"error: {field}" in out.stderr, (argv, out.stderr)
    dry = run("--dry-run", "--tracking-uri", "http://m:5000", "tune", "--space", "tune_configs/smoke.yaml")
    assert dry.returncode == 0, dry.stderr
    assert json.loads(dry.stdout)["entrypoint"] == "python jobs/tune.py --space tune_configs/smoke.yaml"
    # From a folder of one's own (deepindex installed, no checkout above it).
    own = subprocess.run([sys.executable, "-m", "deepindex.cli", "submit", "--dry-run", "tune", "--space", "smoke"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=60,
                         env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)})
    assert own.returncode == 0, own.stderr
    sent = json.loads(own.stdout)
    assert sent["entrypoint"] == "python -m deepindex.cli tune --space smoke"
    assert sent["runtime_env"]["working_dir"] == str(tmp_path.resolve())


def test_auth_token_lookup_follows_ray(tmp_path, monkeypatch):
    for k in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_AUTH_MODE"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert s.auth_headers() == {}
    (tmp_path / ".ray").mkdir()
    (tmp_path / ".ray" / "auth_token").write_text("home-token\n")
    assert s.auth_headers() == {"Authorization": "Bearer home-token"}
    (tmp_path / "t").write_text("file-token")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "t"))
    assert s.read_auth_token() == "file-token"
    monkeypatch.setenv("RAY_AUTH_TOKEN", "env-token")
    assert s.read_auth_token() == "env-token"
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    assert s.auth_headers() == {}


def test_a_followed_jobs_log_shows_its_lines_whole_without_rays_own():
    """Ray's job manager writes its own INFO line into every job's log: the console is for the job's."""
    from deepindex.submit import JobLogLines

    ray_line = "2026-12-06 09:47:28,996\tINFO job_manager.py:581 -- Runtime env is setting up.\n"
    ours = "training convnet on 2 worker(s), 2 epochs (manifest)\n"
    log = ray_line + "Running entrypoint for job j1: python -m deepindex.cli train\n" + ours + "{\n  \"name\": \"t\"\n}"
    for cut in range(1, len(log)):  # wherever the stream splits its chunks
        lines = JobLogLines()
        shown = lines.feed(log[:cut]) + lines.feed(log[cut:]) + lines.end()
        assert shown == log[len(ray_line):], cut
    verbose = JobLogLines(keep_ray=True)
    assert verbose.feed(log) + verbose.end() == log  # -v shows everything
    # Ray's warnings stay: they may say why a job waits or failed.
    warning = "2026-12-06 09:47:29,001\tWARNING worker.py:1 -- a warning of Ray's stays on the console\n"
    assert JobLogLines().feed(warning) == warning
