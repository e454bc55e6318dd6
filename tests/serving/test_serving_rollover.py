"""Rollover: the model the service follows moves to a new version; the service builds that version's
index from the collection by itself, catches it up, and switches model and index together, with no
failed request and /readyz 200 throughout; moving back switches back from the kept index.

Runs after the other serving tests (it changes the served model, then puts it back).  The model URI
is a plain checkpoint path, whose version is the file's hash; the registry's ``champion`` resolves
the same way through ``resolve_model`` (tests/serving/test_lifecycle.py follows a real alias).
"""
from __future__ import annotations

import re
import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from support import png_bytes, wait_until

pytestmark = [pytest.mark.slow, pytest.mark.serve, pytest.mark.cluster, pytest.mark.timeout(420)]


class Poller:
    """A client calling tag, keyword search and similar-item every ~100 ms, recording every answer."""

    def __init__(self, served, png: bytes):
        self.served, self.png = served, png
        self.stop = threading.Event()
        self.answers: list[tuple[str, int, dict]] = []
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _one(self, what: str) -> tuple[str, int, dict]:
        s = self.served
        try:
            if what == "tag":
                r = s.post("/v1/tag", files={"images": ("q.png", self.png)})
            elif what == "search":
                r = s.get("/v1/search", params={"q": "three", "k": 5})
            elif what == "similar":
                r = s.get("/v1/items/scene-000003/similar", params={"k": 5})
            else:
                r = s.get("/readyz")
            return what, r.status_code, r.json()
        except (requests.RequestException, ValueError) as e:
            return what, 0, {"error": str(e)}

    def _run(self) -> None:
        with ThreadPoolExecutor(4) as pool:
            while not self.stop.is_set():
                self.answers += pool.map(self._one, ["tag", "search", "similar", "readyz"])
                time.sleep(0.1)

    def __enter__(self) -> Poller:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(30)

    def check(self) -> set[str]:
        """Every answer 2xx, each naming a model version and an index of that same version; the versions seen."""
        bad = [(w, c, b) for w, c, b in self.answers if not 200 <= c < 300]
        assert not bad, bad[:5]
        seen = set()
        for what, _, body in self.answers:
            if what in ("search", "similar"):
                assert body["index"]["model_version"] == body["model"]["version"], body
            seen.add(body["model"]["version"])
        return seen


def test_new_version_rolls_over_with_no_failed_request_and_back(served):
    import torch
    from ray import serve

    from deepindex.checkpoint import load_model, save_checkpoint
    from deepindex.index.store import find_index
    from deepindex.tracking.registry import resolve_model

    lm = load_model(served.trained)
    with torch.no_grad():
        lm.model.head.bias.add_(0.5)  # another version: other weights, other hash
    staged = served.model_path.parent.parent / "next" / "checkpoint.pt"
    save_checkpoint(staged.parent, model=lm.model, config=lm.config, stats=lm.stats, concepts=lm.concepts,
                    multilabel=lm.multilabel, epoch=lm.epoch)
    new = resolve_model(str(staged)).version
    assert new != served.version and find_index(served.collection_dir, "local", new) is None

    def status() -> dict:
        return served.get("/v1/status").json()

    with Poller(served, png_bytes(served.images[0])) as poll:
        wait_until(lambda: len(poll.answers) >= 8, 60, what="the poller's first answers")
        start = time.monotonic()
        shutil.copy(staged, served.model_path)  # the followed URI now names the new version
        phases = set()

        def switched() -> bool:
            st = status()
            phases.add(st["rollover"]["phase"])
            return st["rollover"]["serving"] == new and st["rollover"]["phase"] == "idle"

        wait_until(switched, 300, every=0.2, what=f"serving version {new}")
        switch_s = time.monotonic() - start
        wait_until(lambda: served.get("/readyz").json()["model"]["version"] == new, 30, what="model replicas on it")
        wait_until(lambda: any(b.get("model", {}).get("version") == new for w, _, b in poll.answers[-8:]
                               if w == "search"), 30, what="searches answered by the new pair")
    seen = poll.check()
    st = status()
    print(f"rollover {served.version} -> {new}: {switch_s:.1f}s, phases {sorted(phases)}, "
          f"{len(poll.answers)} answers all 2xx, last switch {st['rollover']['last_switch']}")
    assert seen == {served.version, new}  # both pairs answered, never mixed
    assert "building" in phases  # the service built the new version's index itself
    assert find_index(served.collection_dir, "local", new) is not None
    assert st["index"]["model_version"] == new and st["items"] == st["index"]["count"]

    # Back to the first version: its index is kept, so only a catch-up stands between.  Meanwhile a
    # model replica lags: it goes on answering with the version being left (as one still loading the
    # next version from a remote registry does, for minutes), so that version's index must stay loaded.
    index = serve.get_deployment_handle("IndexService", "deepindex")
    lag_stop = threading.Event()

    def lagging_replica() -> None:
        while not lag_stop.is_set():
            index.report_model.remote("lagging-replica", new).result(timeout_s=30)
            lag_stop.wait(0.2)

    lag = threading.Thread(target=lagging_replica, daemon=True)
    lag.start()
    try:
        with Poller(served, png_bytes(served.images[0])) as poll:
            shutil.copy(served.trained / "checkpoint.pt", served.model_path)
            start = time.monotonic()
            wait_until(lambda: status()["rollover"]["serving"] == served.version, 120, every=0.2,
                       what="back on the first version")
            back_s = time.monotonic() - start
            wait_until(lambda: served.get("/readyz").json()["model"]["version"] == served.version, 30,
                       what="model replicas back")
        poll.check()
        print(f"rollback to {served.version}: {back_s:.1f}s")
        # The real replica reports its move at its next poll; the lagging one holds the switch open.
        wait_until(lambda: re.search(r"; 1 of \d+ still on an older one$", status()["rollover"]["message"]), 30,
                   what="only the lagging replica left on the old version")
        assert status()["rollover"]["phase"] == "switching"
        assert index.info.remote(new).result(timeout_s=30)["loaded"]  # the lagging replica's index answers
    finally:
        lag_stop.set()
        lag.join(30)
    wait_until(lambda: status()["rollover"]["phase"] == "idle", 60, what="the rollover settled")
    assert not index.info.remote(new).result(timeout_s=30)["loaded"]  # unloaded once nobody used it
