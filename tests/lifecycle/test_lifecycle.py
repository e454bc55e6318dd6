"""A living collection on a real local platform (`deepindex up`: Ray head + MLflow server), over HTTP.

One service for the module, started as a user starts `make demo`'s: from a project folder with no
DEEPINDEX_HOME and no MLFLOW_TRACKING_URI (the state lives in the project's ``.deepindex``), the
`deepindex` console script, a collection imported with the CLI, the registry's `champion` served by
`deepindex serve` behind HAProxy, items added and deleted with the service's token.  In order:

0. the serve command itself: a quiet console (the URL and how to write), Serve's output in the log
   file, `deepindex status`, the first index built from the collection before it is ready, tagging
   through HAProxy; and at the end `deepindex down` stops HAProxy too; a model that is not there is
   refused in one line before anything deploys;
1. add items -> promote a better model -> zero non-2xx answers on tag, search and similar during the
   whole rollover (a client polling every ~100 ms) -> the new version serves every item, the added
   ones included -> delete one -> roll the alias back by hand -> still every item;
2. the same rollover with the index replica (the build's driver) SIGKILLed while it builds: the old
   pair keeps answering, the restarted replica builds again and switches;
3. the index replica (the collection's writer) SIGKILLed during a burst of adds: every acknowledged
   add survives, and nothing is half there (catalogue rows, bytes and the index agree).
"""
from __future__ import annotations

import base64
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import requests

from deepindex.localplatform import ray_temp_dir
from support import REPO, pid_alive, png_bytes, wait_until

if TYPE_CHECKING:
    from deepindex.collection import CollectionStore

pytestmark = [pytest.mark.slow, pytest.mark.serve, pytest.mark.cluster, pytest.mark.mlflow]

GALLERY = 2000
MODEL = "deepindex"


def _cli(project: Path, env: dict[str, str], *args: str, timeout: int = 300) -> subprocess.CompletedProcess[str]:
    """``deepindex ARGS`` (this venv's console script) in the project folder, as a user runs it."""
    exe = Path(sys.executable).parent / "deepindex"
    out = subprocess.run([str(exe), *args], cwd=project, env=env, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, f"deepindex {' '.join(args)}:\n{out.stdout[-2000:]}\n{out.stderr[-4000:]}"
    return out


def _console(out: subprocess.CompletedProcess[str]) -> list[str]:
    return [line for line in (out.stdout + out.stderr).splitlines() if line.strip()]


def _replica_pids(home: Path, deployment: str) -> list[int]:
    """Live Serve replica processes of this platform's app, by their process title
    (``ray::ServeReplica:app:Deployment``), among the platform's Ray session (other Rays may run here)."""
    from deepindex.sessions import session_members

    ray_session = json.loads((home / "platform" / "state.json").read_text())["ray"]["pgid"]
    pids = []
    for pid in session_members(ray_session):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
        except OSError:
            continue
        if cmd.startswith(f"ray::ServeReplica:{MODEL}:{deployment}") and pid_alive(pid):
            pids.append(pid)
    return pids


@dataclass
class Platform:
    project: Path  # the folder the commands run in
    env: dict[str, str]
    home: Path  # the project's .deepindex
    url: str
    tracking_uri: str
    token: str
    v1: str  # registered versions: v1 weaker, v2 better
    v2: str
    run2: str  # v2's run, promoted by the first test
    served: subprocess.CompletedProcess[str]  # what `deepindex serve --detach` printed

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}

    def get(self, path: str, **kw) -> requests.Response:
        return requests.get(self.url + path, timeout=60, **kw)

    def post(self, path: str, **kw) -> requests.Response:
        return requests.post(self.url + path, timeout=60, **kw)

    def status(self) -> dict:
        return self.get("/v1/status").json()

    def store(self) -> CollectionStore:
        from deepindex.collection import CollectionStore

        c = self.home / "collections"
        return CollectionStore.open("digit-scenes", f"sqlite:///{c / 'catalogue.db'}", str(c / "blobs"), create=False)

    def set_champion(self, version: str) -> None:
        from deepindex.tracking.registry import set_alias

        set_alias(MODEL, version, tracking_uri=self.tracking_uri)

    def index_dir(self, version: str) -> Path | None:
        from deepindex.index.store import find_index

        return find_index(self.home / "indexes" / "digit-scenes", MODEL, version)

    def wait_serving(self, version: str, timeout: float = 240) -> float:
        start = time.monotonic()
        wait_until(lambda: (st := self.status()["rollover"])["serving"] == version and st["phase"] == "idle",
                   timeout, every=0.2, what=f"serving version {version}")
        wait_until(lambda: self.get("/readyz").json()["model"]["version"] == version, 60, every=0.2,
                   what=f"model replicas on version {version}")
        return time.monotonic() - start


def _register(uri: str, ckpt: Path, name: str) -> tuple[str, str]:
    """A run holding ``checkpoint/checkpoint.pt``, registered as a version of MODEL (not promoted)."""
    from deepindex.tracking.registry import register_run
    from deepindex.tracking.tracker import mlflow_client

    client = mlflow_client(uri)
    exp = client.get_experiment_by_name("lifecycle") or None
    exp_id = exp.experiment_id if exp else client.create_experiment("lifecycle")
    run = client.create_run(exp_id, run_name=name)
    client.log_artifact(run.info.run_id, str(ckpt), "checkpoint")
    client.set_terminated(run.info.run_id)
    return register_run(run.info.run_id, MODEL, uri), run.info.run_id


@pytest.fixture(scope="module")
def platform(tmp_path_factory: pytest.TempPathFactory, small_model: Path) -> Iterator[Platform]:
    import ray

    from deepindex.index.tiny import train_small
    from deepindex.net import free_port

    if ray.is_initialized():  # this module talks to the platform's own head, not the session cluster
        ray.shutdown()
    root = tmp_path_factory.mktemp("lifecycle")
    project = root / "project"
    project.mkdir()
    home = project / ".deepindex"  # where the commands keep their state when DEEPINDEX_HOME is not set
    env = {k: v for k, v in os.environ.items()
           if k not in ("DEEPINDEX_HOME", "MLFLOW_TRACKING_URI") and not k.startswith("RAY_")}
    env["PYTHONUNBUFFERED"] = "1"
    up = _cli(project, env, "up", "--num-cpus", "4", "--ray-port", str(free_port()), "--mlflow-port", str(free_port()),
              "--dashboard-port", str(free_port()))
    assert _console(up)[0].startswith("platform up: Ray head 127.0.0.1:"), up.stderr
    haproxy: list[int] = []
    try:
        uri = json.loads((home / "platform" / "state.json").read_text())["mlflow"]["address"]
        _cli(project, env, "collection", "import", "digit-scenes", "--digit-scenes", "--size", str(GALLERY))
        weak, _ = train_small(root / "weak", ["train.epochs=1", "data.train_size=300"], seed=1)
        v1, run1 = _register(uri, weak, "weak")
        _cli(project, env, "promote", "--run", run1)  # no champion yet: v1 becomes it
        v2, run2 = _register(uri, small_model, "better")
        port = free_port()
        # No index exists yet: the service builds the champion's from the collection before it is ready.
        served = _cli(project, env, "serve", "--detach", "--config", str(REPO / "serving" / "config.yaml"),
                      "--model", f"models:/{MODEL}@champion", "--collection", "digit-scenes",
                      "--host", "127.0.0.1", "--port", str(port), "--arg", "reload_interval_s=1")
        token = (home / "serving" / "api_token").read_text().strip()
        p = Platform(project, env, home, f"http://127.0.0.1:{port}", uri, token, v1, v2, run2, served)
        p.wait_serving(v1)  # first start: the service built v1's index from the collection itself
        listeners = subprocess.run(["ss", "-ltnpH", f"sport = :{port}"], capture_output=True, text=True).stdout
        assert '"haproxy"' in listeners, listeners
        haproxy = [int(x) for x in re.findall(r'"haproxy",pid=(\d+)', listeners)]
        yield p
    finally:
        down = _cli(project, env, "down", timeout=180)
        shutil.rmtree(ray_temp_dir(home.resolve()), ignore_errors=True)  # its head's sockets and logs
    # HAProxy is a child of a Ray worker, not a worker: `down` must stop it too (it holds the port).
    assert not [x for x in haproxy if pid_alive(x)], f"haproxy {haproxy} outlived `deepindex down`"
    # With a Serve application on it, the head still stops on SIGTERM (no drain on one node): no SIGKILL.
    assert "SIGKILL" not in down.stdout + down.stderr, down.stdout + down.stderr


class Poller:
    """A client calling tag, keyword search and similar-item every ~100 ms, every answer recorded."""

    def __init__(self, p: Platform) -> None:
        from deepindex.index.collection import digit_gallery

        self.p, self.png = p, png_bytes(digit_gallery(1, seed=99).images[0])
        self.stop = threading.Event()
        self.answers: list[tuple[str, int, dict]] = []
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _one(self, what: str) -> tuple[str, int, dict]:
        try:
            if what == "tag":
                r = self.p.post("/v1/tag", files={"images": ("q.png", self.png)})
            elif what == "search":
                r = self.p.get("/v1/search", params={"q": "seven", "k": 5})
            else:
                r = self.p.get("/v1/items/scene-000003/similar", params={"k": 5})
            return what, r.status_code, r.json()
        except (requests.RequestException, ValueError) as e:
            return what, 0, {"error": repr(e)}

    def _run(self) -> None:
        with ThreadPoolExecutor(3) as pool:
            while not self.stop.is_set():
                self.answers += pool.map(self._one, ["tag", "search", "similar"])
                time.sleep(0.1)

    def __enter__(self) -> Poller:
        self.thread.start()
        wait_until(lambda: len(self.answers) >= 6, 60, what="the poller's first answers")
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(30)

    def versions(self) -> list[str]:
        """Every answer 2xx, model and index of the same version in each; the versions, in order."""
        bad = [(w, c, b) for w, c, b in self.answers if not 200 <= c < 300]
        assert not bad, f"{len(bad)} of {len(self.answers)} answers failed: {bad[:5]}"
        for what, _, body in self.answers:
            if what != "tag":
                assert body["index"]["model_version"] == body["model"]["version"], body
        return [b["model"]["version"] for _, _, b in self.answers]


def _count(p: Platform) -> int:
    return int(p.status()["index"]["count"])


@pytest.mark.timeout(600)
def test_serve_command_serves_the_champion_behind_haproxy(platform: Platform) -> None:
    """`deepindex serve` as `make demo` runs it (the fixture): what it printed, where Serve's output
    went, `deepindex status`, the first index built from the collection, a tag through HAProxy."""
    from deepindex.index.collection import digit_gallery

    p = platform
    # A quiet console: the service's URL and how to write; Serve's and its replicas' output is in the log file.
    lines = _console(p.served)
    assert len(lines) == 2 and lines[0].split(" (")[0] == f"service ready: {p.url}/", lines
    assert lines[1].startswith("writes (POST/DELETE /v1/items) need: Authorization: Bearer"), lines
    (log,) = (p.home / "logs").glob("serve-*.log")
    assert "ServeController" in log.read_text()
    status = _cli(p.project, p.env, "status").stdout
    assert "serve: answering" in status and f"serve      {p.url}" in status, status
    body = p.get("/readyz").json()
    assert body["model"]["version"] == p.v1 and body["index"]["count"] == GALLERY, body
    tag = p.post("/v1/tag", files={"images": ("a.png", png_bytes(digit_gallery(1, seed=5).images[0]))})
    assert tag.status_code == 200 and tag.json()["model"]["version"] == p.v1
    assert len(tag.json()["results"][0]["concepts"]) == 10


@pytest.mark.timeout(300)
def test_serve_command_refuses_a_model_that_is_not_there_before_it_deploys(platform: Platform) -> None:
    """A version the registry does not hold: one line naming the model, exit status 2, and the running
    service (the same application name) untouched."""
    p = platform
    before = p.get("/readyz").json()["model"]["version"]
    out = subprocess.run([str(Path(sys.executable).parent / "deepindex"), "serve", "--detach", "--config",
                          str(REPO / "serving" / "config.yaml"), "--model", f"models:/{MODEL}/99",
                          "--port", p.url.rsplit(":", 1)[1]],
                         cwd=p.project, env=p.env, capture_output=True, text=True, timeout=240)
    lines = _console(out)
    assert out.returncode == 2 and len(lines) == 1, (out.returncode, lines)
    assert lines[0].startswith(f"deepindex serve: error: model: models:/{MODEL}/99 not found in the registry ("), lines
    assert p.get("/readyz").json()["model"]["version"] == before


@pytest.mark.timeout(600)
def test_add_promote_delete_roll_back_with_no_failed_request(platform: Platform) -> None:
    from deepindex.index.collection import digit_gallery

    p = platform
    new = digit_gallery(3, seed=7)
    pngs = [png_bytes(new.images[j]) for j in range(3)]
    r = p.post("/v1/items", headers=p.auth, files=[("images", (f"n{j}.png", pngs[j])) for j in range(3)],
               data={"id": ["mine/a", "mine/b", "mine/c"]})
    assert r.status_code == 201, r.text
    assert _count(p) == GALLERY + 3

    with Poller(p) as poll:
        start = time.monotonic()
        _cli(p.project, p.env, "promote", "--run", p.run2)  # better on the test split: the alias moves to v2
        switch_s = p.wait_serving(p.v2)
        # Keep polling a moment on the new pair.
        wait_until(lambda: poll.versions()[-3:] == [p.v2] * 3, 30, what="answers from the new pair")
    versions = poll.versions()
    rollover = p.status()["rollover"]["last_switch"]
    print(f"promotion -> new pair served after {time.monotonic() - start:.1f}s (switch {switch_s:.1f}s; "
          f"{rollover}); {len(versions)} answers during it, all 2xx")
    assert set(versions) == {p.v1, p.v2} and versions.index(p.v2) > 0
    # The new version serves every item, the added ones included (embedded by the new model).
    assert _count(p) == GALLERY + 3 and p.status()["index"]["model_version"] == p.v2
    hit = p.post("/v1/search/similar?k=1", files={"image": ("q.png", pngs[1])}).json()
    assert hit["results"][0]["id"] == "mine/b" and hit["model"]["version"] == p.v2

    assert requests.delete(f"{p.url}/v1/items/mine/a", headers=p.auth, timeout=60).status_code == 200
    with Poller(p) as poll:
        p.set_champion(p.v1)  # a rollback, as a user does it in the MLflow UI
        back_s = p.wait_serving(p.v1)
    poll.versions()
    print(f"rollback to version {p.v1} (its index kept, caught up): {back_s:.1f}s")
    assert _count(p) == GALLERY + 2
    assert p.get("/v1/items/mine/a").status_code == 404 and p.get("/v1/items/mine/c").status_code == 200


@pytest.mark.timeout(600)
def test_index_replica_killed_while_building_keeps_the_old_pair_and_retries(platform: Platform) -> None:
    p = platform
    assert p.status()["rollover"]["serving"] == p.v1
    built = p.index_dir(p.v2)
    if built is not None:
        shutil.rmtree(built)  # so the rollover to v2 must build its index (again)
    with Poller(p) as poll:
        p.set_champion(p.v2)
        wait_until(lambda: p.status()["rollover"]["phase"] == "building", 120, every=0.05,
                   what="the rollover building")
        (victim,) = _replica_pids(p.home, "IndexService")
        os.kill(victim, signal.SIGKILL)  # the build's driver: the build dies with it
        wait_until(lambda: (now := _replica_pids(p.home, "IndexService")) and victim not in now, 120,
                   what="a new index replica")
        switch_s = p.wait_serving(p.v2, timeout=300)
    versions = poll.versions()
    print(f"index replica SIGKILLed while building: new pair served {switch_s:.1f}s later; "
          f"{len(versions)} answers, all 2xx")
    assert p.v1 in versions and versions[-1] == p.v2
    assert _count(p) == p.store().count()  # every item of the collection in the new index


@pytest.mark.timeout(600)
def test_writer_killed_during_a_burst_of_adds_loses_no_acknowledged_item(platform: Platform) -> None:
    from deepindex.index.collection import digit_gallery

    p = platform
    g = digit_gallery(60, seed=31)
    bodies = {f"burst/{j}": base64.b64encode(png_bytes(g.images[j])).decode() for j in range(60)}
    acked: dict[str, int] = {}
    lock = threading.Lock()

    def add(item_id: str) -> None:
        for _ in range(30):  # a client retries what was not acknowledged (re-posting is idempotent)
            try:
                r = p.post("/v1/items", headers=p.auth, json={"images": [{"id": item_id, "data": bodies[item_id]}]})
            except requests.RequestException:
                r = None
            if r is not None and r.status_code in (200, 201):
                with lock:
                    acked[item_id] = r.status_code
                return
            time.sleep(0.2)

    (victim,) = _replica_pids(p.home, "IndexService")
    with ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(add, i) for i in bodies]
        wait_until(lambda: len(acked) >= 10, 120, what="the first acknowledged adds")
        os.kill(victim, signal.SIGKILL)  # the collection's writer, mid-burst
        for f in futures:
            f.result(timeout=300)
    assert set(acked) == set(bodies), sorted(set(bodies) - set(acked))
    store = p.store()
    report = store.verify()
    assert report["ok"], report
    print(f"writer SIGKILLed after {10}+ acknowledged adds of 60; all 60 acknowledged in the end; {report}")
    for item_id, b64 in bodies.items():  # every acknowledged add is there, byte for byte
        assert store.image(item_id) == base64.b64decode(b64)
    wait_until(lambda: p.status()["index"]["count"] == store.count(), 120, what="the index caught up")
    hit = p.post("/v1/search/similar?k=1", files={"image": ("q.png", png_bytes(g.images[5]))}).json()
    assert hit["results"][0]["id"] == "burst/5"
