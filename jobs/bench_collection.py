"""Benchmark: the collection store at 2k and 100k items.  JSON on stdout.

``python jobs/bench_collection.py [--sizes 2000,100000] [--adds 200] [--catalogue URL] [--dir DIR]``

For each size, in a fresh catalogue and blob folder: a bulk import of the digit-scenes gallery
(``--source synthetic``: random bytes of the same size, to skip drawing the scenes), then single
durable ``add`` calls timed one by one (p50/p99: what ``POST /v1/items`` pays), idempotent
re-posts, deletes, a full ``snapshot`` stream (items/s: what an index build reads) and a
``changes`` catch-up read.  Latencies include the fsyncs that make an add durable, so they measure
this machine's disk as much as the code: compare sizes within one run, not across machines.
"""
from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger("bench_collection")


def _pct(xs: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(xs), q)) * 1e3 if xs else float("nan")


def _dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _synthetic(n: int, seed: int) -> Iterator[tuple[str, bytes, Sequence[str], Mapping[str, Any]]]:
    rng = np.random.default_rng(seed)
    for i in range(n):
        yield f"scene-{i:06d}", rng.bytes(int(rng.integers(300, 600))), [str(d) for d in rng.choice(10, 2, False)], {}


def bench_size(n: int, adds: int, source: str, catalogue: str | None, root: Path) -> dict[str, Any]:
    from deepindex.collection import CollectionStore
    from deepindex.collection.catalogue import dispose_engines
    from deepindex.collection.imports import import_digit_scenes

    work = root / f"n{n}"
    work.mkdir(parents=True)
    url = catalogue or f"sqlite:///{work / 'catalogue.db'}"
    store = CollectionStore.open(f"bench-{n}", catalogue_url=url, blobs_url=str(work / "blobs"))
    out: dict[str, Any] = {"items": n, "source": source, "catalogue": url.split(":", 1)[0]}

    t = time.perf_counter()
    if source == "digit-scenes":
        res = import_digit_scenes(store, size=n)
        out["import_s"] = time.perf_counter() - t  # drawing the scenes + PNG + the bulk add
        out["import_store_s"] = res.seconds  # PNG encoding + the bulk add alone
    else:
        res = store.add_bulk(_synthetic(n, 0), source="synthetic", keep_items=False)
        out["import_s"] = out["import_store_s"] = time.perf_counter() - t
    out["import_items_per_s"] = n / out["import_store_s"]
    assert res.added == n, res

    rng = np.random.default_rng(1)
    lat: list[float] = []
    for i in range(adds):  # one durable add at a time, as an upload sees it
        data = rng.bytes(450)
        t = time.perf_counter()
        store.add(f"upload-{i:05d}", data, tags=["1"], source="upload", meta={"filename": f"u{i}.png"})
        lat.append(time.perf_counter() - t)
    out["add_p50_ms"], out["add_p99_ms"], out["add_mean_ms"] = _pct(lat, 50), _pct(lat, 99), 1e3 * float(np.mean(lat))

    re_lat: list[float] = []
    for i in range(min(adds, 50)):  # an idempotent re-post: one read, no write
        data = store.image(f"upload-{i:05d}")
        t = time.perf_counter()
        store.add(f"upload-{i:05d}", data)
        re_lat.append(time.perf_counter() - t)
    out["repost_p50_ms"] = _pct(re_lat, 50)

    del_lat: list[float] = []
    for i in range(min(adds, 50)):
        t = time.perf_counter()
        store.delete(f"upload-{i:05d}")
        del_lat.append(time.perf_counter() - t)
    out["delete_p50_ms"], out["delete_p99_ms"] = _pct(del_lat, 50), _pct(del_lat, 99)

    t = time.perf_counter()
    count = sum(1 for _ in store.snapshot())
    dt = time.perf_counter() - t
    out["snapshot_items"], out["snapshot_s"], out["snapshot_items_per_s"] = count, dt, count / dt

    head = store.head()
    t = time.perf_counter()
    changes = store.changes(max(0, head - 1000))
    out["changes_last_1000_ms"] = 1e3 * (time.perf_counter() - t)
    assert len(changes) == min(head, 1000)

    t = time.perf_counter()
    out["tags"] = len(store.tags())
    out["tags_ms"] = 1e3 * (time.perf_counter() - t)
    t = time.perf_counter()
    info = store.info()
    out["info_ms"] = 1e3 * (time.perf_counter() - t)
    out["image_bytes"] = info["bytes"]
    if url.startswith("sqlite"):
        out["catalogue_bytes"] = sum(p.stat().st_size for p in work.glob("catalogue.db*"))
        out["catalogue_bytes_per_item"] = out["catalogue_bytes"] / info["head"]
    out["blob_folder_bytes"] = _dir_bytes(work / "blobs")
    dispose_engines()
    log.info("%d items: %s", n, out)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="2000,100000", help="comma-separated collection sizes")
    ap.add_argument("--adds", type=int, default=200, help="single adds timed at each size")
    ap.add_argument("--source", default="digit-scenes", choices=["digit-scenes", "synthetic"])
    ap.add_argument("--catalogue", help="a database URL (default: a SQLite file per size under --dir); "
                                        "one database serves every size, as separate collections")
    ap.add_argument("--dir", help="where catalogues and blobs go (default: a temp folder, removed after)")
    ap.add_argument("--out", help="also write the JSON here")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s: %(message)s")

    root = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="bench-collection-"))
    try:
        results = [bench_size(int(n), args.adds, args.source, args.catalogue, root) for n in args.sizes.split(",")]
    finally:
        if not args.dir:
            shutil.rmtree(root, ignore_errors=True)
    doc = {"benchmark": "collection", "cpus": os.cpu_count(), "results": results}
    from deepindex.console import report as emit

    emit(doc, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
