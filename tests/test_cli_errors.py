"""What the commands refuse, they refuse in one line before anything starts; ``status --json`` is
always one JSON document.  No Ray, no MLflow, no process started: each test takes well under a second."""
from __future__ import annotations

import json
import os
import zipfile
from pathlib import Path
from typing import Any

import pytest

from deepindex.cli import main
from deepindex.localplatform import Service, read_state
from deepindex.net import free_port


@pytest.fixture
def no_spawn(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """Any service `up` would start is recorded and refused instead: nothing real starts."""
    started: list[Any] = []

    def spawn(name: str, cmd: list[str], env: dict[str, str]) -> Any:
        started.append(cmd)
        raise AssertionError(f"{name} was started: {cmd}")

    monkeypatch.setattr("deepindex.localplatform._spawn", spawn)
    return started


# ---- up: ports and CPUs --------------------------------------------------------------------------
@pytest.mark.parametrize(("flag", "value", "message"), [
    ("--ray-port", "70000", "a port must be 0-65535 (0: any free port), not 70000"),
    ("--ray-port", "-5", "a port must be 0-65535 (0: any free port), not -5"),
    ("--mlflow-port", "99999", "a port must be 0-65535 (0: any free port), not 99999"),
    ("--dashboard-port", "65536", "a port must be 0-65535 (0: any free port), not 65536"),
    ("--ray-port", "abc", "'abc' is not a whole number"),
    ("--num-cpus", "0", "must be >= 1 (leave it out for the default), not 0"),
    ("--num-cpus", "-2", "must be >= 1 (leave it out for the default), not -2"),
    ("--num-cpus", "two", "'two' is not a whole number"),
])
def test_up_names_a_bad_number_before_anything_starts(no_spawn: list[Any], capsys: pytest.CaptureFixture[str],
                                                      flag: str, value: str, message: str) -> None:
    ports = {"--ray-port": str(free_port()), "--mlflow-port": str(free_port()), "--dashboard-port": str(free_port())}
    argv = [a for k, v in {**ports, flag: value}.items() for a in (k, v)]
    with pytest.raises(SystemExit) as e:
        main(["up", *argv])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.splitlines()[-1] == f"deepindex up: error: argument {flag}: {message}", err
    assert no_spawn == [] and read_state() == {}


@pytest.mark.parametrize("value", ["abc", "0", "-3", "1.5"])
def test_up_names_a_bad_num_cpus_variable(no_spawn: list[Any], monkeypatch: pytest.MonkeyPatch,
                                          capsys: pytest.CaptureFixture[str], value: str) -> None:
    monkeypatch.setenv("DEEPINDEX_NUM_CPUS", value)
    rc = main(["up", "--ray-port", str(free_port()), "--mlflow-port", str(free_port()),
               "--dashboard-port", str(free_port())])
    err = capsys.readouterr().err
    assert rc == 2
    assert err == (f"deepindex up: error: DEEPINDEX_NUM_CPUS: must be a whole number >= 1 (the head's logical "
                   f"CPUs), not {value!r}\n"), err
    assert no_spawn == [] and read_state() == {}


def test_up_called_directly_checks_its_numbers(no_spawn: list[Any]) -> None:
    from deepindex.localplatform import up

    with pytest.raises(ValueError, match=r"^--mlflow-port: a port must be 0-65535 \(0: any free port\), not 70000$"):
        up(ray_port=free_port(), mlflow_port=70000, dashboard_port=free_port())
    with pytest.raises(ValueError, match=r"^--num-cpus: must be >= 1, not 0$"):
        up(ray_port=free_port(), mlflow_port=free_port(), dashboard_port=free_port(), num_cpus=0)
    assert no_spawn == [] and read_state() == {}


# ---- status --json ------------------------------------------------------------------------------
def test_status_json_when_the_platform_is_down(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["status", "--json"]) == 1
    out, err = capsys.readouterr()
    assert json.loads(out) == {"running": False, "services": {}, "pending_journals": []}
    assert err == "the local platform is not running (start it with: deepindex up)\n"
    assert main(["status"]) == 1  # for people: the sentence, as before
    assert capsys.readouterr().out == "the local platform is not running (start it with: deepindex up)\n"


def test_status_json_holds_the_pending_journals(_state_home: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from deepindex.localplatform import _write_state
    from deepindex.tracking.tracker import JOURNAL

    journal = _state_home / "ray_results" / "train-1" / JOURNAL
    journal.parent.mkdir(parents=True)
    journal.write_text("{}\n")
    assert main(["status", "--json"]) == 1  # down, with a journal
    out, err = capsys.readouterr()
    assert json.loads(out) == {"running": False, "services": {}, "pending_journals": [str(journal)]}
    assert "not yet in MLflow" in err and str(journal) in err

    # A recorded head that is alive (this test's own process stands in for it: no Ray is started).
    _write_state({"ray": Service("ray", os.getpid(), os.getsid(0), 6390, "127.0.0.1:6390", "ray.log", [],
                                 {"ray": "127.0.0.1:6390"})})
    assert main(["status", "--json"]) == 0
    out, err = capsys.readouterr()
    doc = json.loads(out)
    assert doc["running"] is True and doc["pending_journals"] == [str(journal)]
    assert doc["services"]["ray"]["state"] == "running" and doc["services"]["ray"]["pid"] == os.getpid()
    assert "not yet in MLflow" in err
    assert main(["status"]) == 0  # for people: the journals line, then the services
    out = capsys.readouterr().out
    assert out.startswith("runs with tracking journals not yet in MLflow") and "ray: running" in out


# ---- index build: the model and the collection before Ray ---------------------------------------
@pytest.fixture
def no_ray(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    calls: list[Any] = []
    monkeypatch.setattr("deepindex.cluster.connect", lambda *a, **k: calls.append((a, k)))
    return calls


def test_index_build_refuses_a_missing_model_before_ray(no_ray: list[Any], tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "nonexistent"
    assert main(["index", "build", "--model", str(missing)]) == 2
    err = capsys.readouterr().err
    assert err.splitlines() == [f"deepindex index: error: model: no checkpoint at {missing} (expected a models:/ "
                                "URI or a checkpoint path)"], err
    assert no_ray == []


def test_index_build_refuses_a_missing_collection_before_ray(no_ray: list[Any], tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    ckpt = tmp_path / "checkpoint.pt"
    with zipfile.ZipFile(ckpt, "w") as z:  # what require_model checks a path for: torch.save's zip archive
        z.writestr("data.pkl", b"")
    assert main(["index", "build", "--model", str(ckpt), "--collection", "nope"]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and err.startswith("deepindex index: error: collection: no collection named "
                                                         "'nope'"), err
    assert no_ray == []


# ---- serve --config: a malformed file is one line naming the key, before Ray -----------------------
@pytest.mark.parametrize(("text", "message"), [
    ("- a\n- b\n", "config: must be a mapping (key: value lines), not a list, in {path}"),
    ("applications: [\n", "config: {path} is not valid YAML (ParserError)"),
    ("applications:\n- name: x\n  args: [1, 2]\n",
     "applications[0].args: must be a mapping (key: value lines), not a list, in {path}"),
    ("applications:\n- 3\n", "applications[0]: must be a mapping (key: value lines), not an int, in {path}"),
    ("applications: {name: x}\n", "applications: must be a list of applications, not a dict, in {path}"),
    ("applications:\n- name: x\nhttp_options: [8000]\n",
     "http_options: must be a mapping (key: value lines), not a list, in {path}"),
    ("applications: []\n", "serve: {path} defines no application"),
], ids=["top-level-list", "invalid-yaml", "args-list", "application-int", "applications-dict", "http-options-list",
        "no-application"])
def test_serve_names_a_malformed_config_before_ray(no_ray: list[Any], monkeypatch: pytest.MonkeyPatch,
                                                   tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                   text: str, message: str) -> None:
    asked: list[Any] = []
    monkeypatch.setattr("deepindex.cluster.lasting_cluster", lambda *a, **k: asked.append(a))
    path = tmp_path / "serve.yaml"
    path.write_text(text)
    for detach in ([], ["--detach"]):
        assert main(["serve", *detach, "--config", str(path)]) == 2
        err = capsys.readouterr().err
        assert err.splitlines() == [f"deepindex serve: error: {message.format(path=path)}"], err
    assert no_ray == [] and asked == []  # refused before any cluster was looked for


# ---- the short commands: one line for any failure, never a traceback -----------------------------
def test_collection_names_a_catalogue_url_it_cannot_open(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["collection", "ls", "--catalogue", "bogus://x"]) == 2
    err = capsys.readouterr().err
    assert err.splitlines() == ["deepindex collection: error: catalogue: bogus://x: SQLAlchemy knows no database "
                                "'bogus' (expected sqlite:///PATH or postgresql://USER@HOST:PORT/DB)"], err

    port = free_port()  # nothing listens there: the connection is refused at once
    assert main(["collection", "ls", "--catalogue", f"postgresql://someone:s3cret@127.0.0.1:{port}/db"]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1, err
    where = f"postgresql://127.0.0.1:{port}/db"
    assert err.startswith(f"deepindex collection: error: catalogue: cannot open {where}: "), err
    assert "s3cret" not in err and "someone" not in err

    assert main(["collection", "ls", "--catalogue", "postgresql://someone:s3cret@127.0.0.1:notaport/db"]) == 2
    err = capsys.readouterr().err
    assert err == ("deepindex collection: error: catalogue: not a database URL: 'postgresql://...' (expected "
                   "sqlite:///PATH or postgresql://USER@HOST:PORT/DB)\n"), err


def test_a_short_command_fails_in_one_line(monkeypatch: pytest.MonkeyPatch,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    def broken(*a: Any, **k: Any) -> Any:
        raise RuntimeError("the disk is on fire\nsecond line")

    monkeypatch.setattr("deepindex.collection.list_collections", broken)
    assert main(["collection", "ls"]) == 1
    out, err = capsys.readouterr()
    assert err == ("deepindex collection: failed: RuntimeError: the disk is on fire (deepindex -v collection ... "
                   "prints the traceback)\n"), err
    assert "Traceback" not in out + err
    with pytest.raises(RuntimeError, match="the disk is on fire"):  # -v: the traceback
        main(["-v", "collection", "ls"])


# ---- overrides may stand between options ---------------------------------------------------------
@pytest.mark.parametrize(("argv", "overrides", "option"), [
    (["train", "optim.lr=0.1", "--name", "r1", "train.epochs=2"], ["optim.lr=0.1", "train.epochs=2"], ("name", "r1")),
    (["train", "a.b=1", "--config", "c.yaml", "a.b=2"], ["a.b=1", "a.b=2"], ("config", "c.yaml")),
    (["evaluate", "models:/m@champion", "--split", "val", "data.root=/new"], ["data.root=/new"], ("split", "val")),
    (["tune", "--space", "s", "optim.lr=0.1", "--samples", "3", "tune.seed_defaults=false"],
     ["optim.lr=0.1", "tune.seed_defaults=false"], ("samples", 3)),
])
def test_overrides_between_options_join_the_commands_own(argv: list[str], overrides: list[str],
                                                         option: tuple[str, Any]) -> None:
    from deepindex.cli import build_parser, parse

    args = parse(build_parser(), argv)
    assert args.overrides == overrides
    assert getattr(args, option[0]) == option[1]


@pytest.mark.parametrize("argv", [
    ["train", "a.b=1", "--name", "r1", "--nmae", "x"],  # a misspelt option stays argparse's error
    ["train", "a.b=1", "--name", "r1", "notanoverride"],
    ["collection", "ls", "a.b=1"],  # a command without overrides takes none
])
def test_what_is_not_an_override_is_still_refused(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.splitlines()[-1].startswith("deepindex: error: unrecognized arguments: "), err
