"""Benchmark: the living collection's figures, on a real local cluster and over real HTTP.

For each --items N: a scratch collection of N digit-scenes, the service following a checkpoint
file (the index replica builds the first index itself), then

- add latency: --adds sequential ``POST /v1/items`` of one new image each (bytes and catalogue row
  durable before the answer, then in the live index), p50 / p99;
- rollover: the followed checkpoint replaced by another model (what a promotion does to
  ``models:/NAME@champion``); the seconds until ``/v1/status`` serves the new version with its own
  index of every item, while a client searches every 0.1 s (its non-2xx answers are counted);
- index replica memory: the served index's arrays per item (``IndexService.info``), and the
  replica process's resident memory.

    python jobs/bench_lifecycle.py [--items 2000 20000] [--adds 50] [--out bench.json]
"""
from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger("bench_lifecycle")


def _pct(xs: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(xs), q)) if xs else float("nan")


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _wait(url: str, version: str, timeout: float) -> float:
    import requests

    start = time.monotonic()
    while time.monotonic() - start < timeout:
        try:
            st = requests.get(f"{url}/v1/status", timeout=30).json()
            if (st.get("model") or {}).get("version") == version and st.get("index"):
                return time.monotonic() - start
        except requests.RequestException:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"version {version} not served within {timeout:.0f}s")


def bench_one(n: int, adds: int, models: tuple[Path, Path], scratch: Path) -> dict[str, Any]:
    import requests
    from ray import serve

    from deepindex.checkpoint import checkpoint_version
    from deepindex.collection import CollectionStore
    from deepindex.collection.imports import import_digit_scenes, png_bytes
    from deepindex.index.collection import digit_gallery
    from deepindex.net import free_port
    from serving.app import build_app

    root = scratch / f"n{n}"
    root.mkdir()
    cat, blobs = f"sqlite:///{root}/catalogue.db", str(root / "blobs")
    store = CollectionStore.open("bench", cat, blobs)
    t = time.perf_counter()
    import_digit_scenes(store, size=n, seed=0)
    log.info("%d items imported in %.1fs", n, time.perf_counter() - t)
    followed = root / "model" / "checkpoint.pt"
    followed.parent.mkdir()
    shutil.copy(models[0], followed)
    v1, v2 = checkpoint_version(models[0]), checkpoint_version(models[1])
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    url = f"http://127.0.0.1:{port}"
    t = time.monotonic()
    serve.run(build_app({"model": str(followed), "collection": "bench", "catalogue_url": cat, "blobs_url": blobs,
                         "index_dir": str(root / "indexes"), "reload_interval_s": 1.0, "api_token_file": None}),
              name="bench", route_prefix="/")
    _wait(url, v1, 1800)
    first = time.monotonic() - t  # _wait's own seconds were added to this too: the wait counted twice (found on review)
    out: dict[str, Any] = {"items": n, "first_index_s": round(first, 1)}
    log.info("n=%d: first index built and served in %.1fs", n, first)

    # Adds over HTTP, one image per request.
    g = digit_gallery(adds, seed=777)
    lat = []
    for j in range(adds):
        body = {"images": ("x.png", png_bytes(g.images[j]), "image/png")}
        s = time.perf_counter()
        r = requests.post(f"{url}/v1/items", files=body, data={"id": f"added-{j}", "tags": ",".join(g.labels[j])},
                          timeout=60)
        lat.append(1e3 * (time.perf_counter() - s))
        r.raise_for_status()
    out["add_ms"] = {"p50": round(_pct(lat, 50), 1), "p99": round(_pct(lat, 99), 1), "n": adds}
    log.info("n=%d: add p50 %.1f ms, p99 %.1f ms", n, out["add_ms"]["p50"], out["add_ms"]["p99"])

    # Memory of the index replica.
    info = requests.get(f"{url}/readyz", timeout=60).json()["index"]  # the index replica's info
    out["index_memory"] = {"arrays_bytes_per_item": round(info["memory_bytes"] / max(info["count"], 1), 1),
                           "arrays_mb": round(info["memory_bytes"] / 2**20, 1),
                           "replica_rss_mb": round(_rss_mb(info["pid"]), 1)}

    # The rollover: the followed model replaced, searches every 0.1 s meanwhile.
    stop = threading.Event()
    answers: list[int] = []

    def poll() -> None:
        while not stop.is_set():
            try:
                answers.append(requests.get(f"{url}/v1/search", params={"q": "three", "k": 5}, timeout=30).status_code)
            except requests.RequestException:
                answers.append(0)
            time.sleep(0.1)

    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    tmp = followed.with_suffix(".tmp")
    shutil.copy(models[1], tmp)
    os.replace(tmp, followed)  # what moving the champion alias does to the URI the service follows
    try:
        secs = _wait(url, v2, 1800)
    finally:
        stop.set()
        poller.join()
    st = requests.get(f"{url}/v1/status", timeout=30).json()
    out["rollover"] = {"seconds": round(secs, 1), "items_served": st["index"]["count"],
                       "searches": len(answers), "non_2xx": sum(1 for c in answers if not 200 <= c < 300)}
    log.info("n=%d: rollover in %.1fs, %d items, %d/%d searches non-2xx", n, secs, st["index"]["count"],
             out["rollover"]["non_2xx"], len(answers))
    serve.delete("bench")
    serve.shutdown()
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--items", type=int, nargs="+", default=[2000, 20000])
    ap.add_argument("--adds", type=int, default=50)
    ap.add_argument("--out")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    from deepindex.cluster import own_cluster
    from deepindex.index.tiny import train_small

    scratch = Path(tempfile.mkdtemp(prefix="deepindex-bench-lifecycle-"))
    try:
        a, _ = train_small(scratch / "a", seed=0)
        b, _ = train_small(scratch / "b", seed=1)
        own_cluster(num_cpus=4)
        results = [bench_one(n, args.adds, (a, b), scratch) for n in args.items]
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    from deepindex.console import report

    report(results, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
