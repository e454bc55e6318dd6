"""``deepindex submit``: which cluster ``--address`` reaches whatever the shell exports, which token goes
with it, and what the Jobs API's refusals say.  No cluster: the errors come from closed ports and Ray's
own error formatting."""
from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from deepindex import submit as s
from deepindex.cli import main
from deepindex.net import free_port

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def clean_auth(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    for k in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_AUTH_MODE", "RAY_API_SERVER_ADDRESS", "RAY_ADDRESS"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.ray/auth_token of the machine's
    return tmp_path


@pytest.fixture
def other_cluster() -> Iterator[tuple[str, list[str]]]:
    """An HTTP server standing for the cluster the shell's variables name: it records every request (404s)."""
    seen: list[str] = []

    class Record(BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

        def do_GET(self) -> None:
            seen.append(self.path)
            self.send_response(404)
            self.send_header("Content-Length", "0")
            self.end_headers()

        do_POST = do_GET

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Record)
    httpd.daemon_threads = True
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}", seen
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_address_wins_over_the_address_variables(clean_auth: Path, other_cluster: tuple[str, list[str]],
                                                 monkeypatch: pytest.MonkeyPatch,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    """After `eval $(deepindex env)` the shell names the local platform in RAY_API_SERVER_ADDRESS and RAY_ADDRESS;
    Ray's client took those over the address it was given, and the job went there."""
    other, seen = other_cluster
    monkeypatch.setenv("RAY_API_SERVER_ADDRESS", other)
    monkeypatch.setenv("RAY_ADDRESS", f"127.0.0.1:{free_port()}")
    closed = free_port()  # nothing listens there: refused at once
    assert main(["submit", "--address", f"http://127.0.0.1:{closed}", "train"]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1, err
    assert err.startswith(f"deepindex submit: error: address: cannot reach the Ray Jobs API at "
                          f"http://127.0.0.1:{closed} (--address): "), err
    assert other not in err and seen == [], (err, seen)
    # The shell's variables are as they were for whatever else the command does.
    assert os.environ["RAY_API_SERVER_ADDRESS"] == other

    # Without --address the variables name the cluster, as with `ray job submit`.
    assert main(["submit", "train"]) == 2
    err = capsys.readouterr().err
    assert f"cannot reach the Ray Jobs API at {other}: " in err and seen, (err, seen)


def test_an_address_ray_cannot_parse_names_the_option(clean_auth: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["submit", "--address", "notaurl", "train"]) == 2
    err = capsys.readouterr().err
    assert err.splitlines() == ["deepindex submit: error: address: cannot reach the Ray Jobs API at notaurl "
                                "(--address): Invalid address format: notaurl (an address looks like "
                                "http://HEAD:8265)"], err


def test_the_local_platforms_token_goes_to_it_alone(clean_auth: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`deepindex env` exports the local head's token file: sent to the cluster --address names, it would hand
    that cluster the local head's token.  The local platform's own address gets its token whatever the shell holds."""
    from deepindex.localplatform import Service, _write_state, ray_client_env, token_path

    token = token_path()
    token.parent.mkdir(parents=True, exist_ok=True)
    token.write_text("local-token")
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(token))
    other = "http://10.0.0.9:8265"
    with s._environ(s.client_environ(other, given=True)):
        assert s.auth_headers() == {}
        assert "RAY_AUTH_TOKEN_PATH" not in os.environ and "RAY_API_SERVER_ADDRESS" not in os.environ
    assert os.environ["RAY_AUTH_TOKEN_PATH"] == str(token)  # back as it was
    (clean_auth / ".ray").mkdir()
    (clean_auth / ".ray" / "auth_token").write_text("my-remote-token")
    with s._environ(s.client_environ(other, given=True)):
        assert s.auth_headers() == {"Authorization": "Bearer my-remote-token"}
    # Not given (the variables or the local platform named it): the environment's token, as before.
    with s._environ(s.client_environ(other, given=False)):
        assert s.auth_headers() == {"Authorization": "Bearer local-token"}

    # The local platform's Jobs API given with --address: its token, not another cluster's in RAY_AUTH_TOKEN.
    # (This test's own process stands in for the head: no Ray is started.)
    dashboard = f"http://127.0.0.1:{free_port()}"
    _write_state({"ray": Service("ray", os.getpid(), os.getsid(0), 6390, "127.0.0.1:6390", "ray.log", [],
                                 {"ray": "127.0.0.1:6390", "dashboard": dashboard})})
    monkeypatch.setenv("RAY_AUTH_TOKEN", "another-clusters-token")
    monkeypatch.delenv("RAY_AUTH_TOKEN_PATH")
    with s._environ(s.client_environ(dashboard + "/", given=True)):
        assert s.auth_headers() == {"Authorization": "Bearer local-token"}
        assert {k: os.environ[k] for k in ray_client_env()} == ray_client_env()
    assert os.environ["RAY_AUTH_TOKEN"] == "another-clusters-token" and "RAY_AUTH_TOKEN_PATH" not in os.environ


# What Ray's Jobs API answers a second job with an id already taken (HTTP 500, the server's traceback), as its
# client raises it (ray.dashboard.modules.dashboard_sdk.SubmissionClient._raise_error).
_TAKEN = ("Traceback (most recent call last):\n"
          '  File ".../ray/dashboard/modules/job/job_head.py", line 373, in submit_job\n'
          "    submission_id = await job_manager.submit_job(\n"
          "                    ^^^^^^^^^^^^^^^^^^^^^^^^^^^^^\n"
          '  File ".../ray/dashboard/modules/job/job_manager.py", line 554, in submit_job\n'
          "    raise ValueError(\n"
          "ValueError: Job with submission_id run-1 already exists. Please use a different submission_id.\n")


class _Response:
    status_code = 500
    text = _TAKEN


def _rays_error() -> RuntimeError:
    from ray.dashboard.modules.dashboard_sdk import SubmissionClient

    try:
        SubmissionClient._raise_error(None, _Response())  # type: ignore[arg-type]
    except RuntimeError as e:
        return e
    raise AssertionError("Ray's client raised nothing")


def test_a_server_traceback_is_said_by_its_last_line() -> None:
    e = _rays_error()
    assert str(e).splitlines()[0] == "Request failed with status code 500: Traceback (most recent call last):"
    assert s.server_message(e) == ("Request failed with status code 500: ValueError: Job with submission_id run-1 "
                                   "already exists. Please use a different submission_id.")
    assert s.server_message(RuntimeError("Failed to connect to Ray at address: http://x:1.")) == \
        "Failed to connect to Ray at address: http://x:1."
    assert s.server_message(RuntimeError("")) == "RuntimeError"


def test_a_submission_id_in_use_is_named(capsys: pytest.CaptureFixture[str]) -> None:
    class Taken:  # a fake of Ray's JobSubmissionClient at the call submit() makes; the error is Ray's own
        def submit_job(self, **kw: object) -> str:
            raise _rays_error()

    sub = s.Submission("python jobs/train.py", {}, submission_id="run-1")
    with pytest.raises(ValueError) as e:
        s.submit(Taken(), sub)  # type: ignore[arg-type]
    assert str(e.value) == ("--submission-id: a job run-1 already exists on the cluster: give another id, or leave "
                            "it out for a new one (Request failed with status code 500: ValueError: Job with "
                            "submission_id run-1 already exists. Please use a different submission_id.)")
    with pytest.raises(ValueError) as e:  # another refusal: its reason, not the traceback's first line
        s.submit(Taken(), s.Submission("python jobs/train.py", {}))  # type: ignore[arg-type]
    assert str(e.value).startswith("submit: Request failed with status code 500: ValueError: Job with")
