"""Benchmark: search and mixed traffic on a served collection, in each serving layout.  JSON on stdout.

``python jobs/bench_search.py [--items 2000] [--clients 32] [--seconds 30] [--layouts replicas,in-ingress]
[--serve-arg KEY=VALUE] [--records-dir DIR] [--out bench.json] [-v]``

A scratch collection of ``--items`` digit scenes (``make demo``'s size by default), the small
digit-scenes ConvNet the demo serves, and the service on a fresh local cluster (the index replica
builds the collection's index itself).  Then, per layout, ``jobs/load_serve.py`` in its own process
group (asyncio clients on aiohttp keep-alive connections, each one request at a time, killed with
its group):

- **search**: keyword search and similar-item search in turn, ``--clients`` clients: p50/p99 of
  each (target: p99 <= 50 ms at 32 clients);
- **mixed**: ``POST /v1/tag`` (one PNG), keyword and similar-item search in turn (the mix issue 15
  measured its 87 req/s and 2.5 s search p99 with): throughput (target: >= 3x, 261 req/s) and
  p50/p99 per endpoint (the same p99 target for the searches).

Each run also reports where its searches were answered: by the ingress from its own copy of the
served index (``serving/reads.py``), or by the index replica (``deepindex_searches_total``).

The clients are closed loops: by Little's law the mean latency is clients / throughput, so a p99
target at a given client count is a throughput target too; the report gives both, and the load
process's own CPU (it runs on the same cores as the service).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench_serve import add_layout_args, layout_args, layout_serve_args, replica_rss_gb  # jobs/ beside this script

from deepindex import console

BEFORE_RPS = 87.0  # mixed-load throughput issue 15 measured (jobs/load_serve.py, 32 clients, make demo's service)
P99_TARGET_MS = 50.0
MIXED_TARGET_X = 3.0


HUB_LAG_S = 6.0  # the metrics hub hears from each ingress replica at least every health check (5 s)


def _collection(n: int, root: Path) -> dict[str, str]:
    from deepindex.collection import CollectionStore
    from deepindex.collection.imports import import_digit_scenes

    cat, blobs = f"sqlite:///{root}/catalogue.db", str(root / "blobs")
    t = time.perf_counter()
    import_digit_scenes(CollectionStore.open("bench", cat, blobs), size=n, seed=0)
    console.event("%d digit scenes imported in %.1f s", n, time.perf_counter() - t)
    return {"collection": "bench", "catalogue_url": cat, "blobs_url": blobs, "index_dir": str(root / "indexes")}


def _served(url: str, items: int, timeout: float = 900) -> dict[str, Any]:
    """Wait until the service answers with an index of every item; its /v1/status."""
    import requests

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(requests.RequestException, ValueError):
            st = requests.get(f"{url}/v1/status", timeout=30).json()
            if (st.get("index") or {}).get("count") == items:
                return st
        time.sleep(0.5)
    raise TimeoutError(f"{url}: no index of {items} items served within {timeout:.0f} s")


def load(url: str, ops: str, clients: int, seconds: float, warmup: float, scratch: Path,
         records: Path | None = None) -> dict[str, Any]:
    """``jobs/load_serve.py`` against ``url`` in its own process group; its report, plus its CPU use.
    ``records``: where it also writes every measured request (JSON lines)."""
    out = scratch / f"load-{ops.replace(',', '-')}.json"
    cmd = [sys.executable, str(Path(__file__).with_name("load_serve.py")), "--url", url, "--clients", str(clients),
           "--seconds", str(seconds), "--warmup", str(warmup), "--ops", ops, "--client", "aiohttp",
           "--out", str(out), *(["--records", str(records)] if records else [])]
    # No Ray address: the load process stays off the cluster (replica memory is bench_serve's figure).
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    before = resource.getrusage(resource.RUSAGE_CHILDREN)  # the load process's CPU, once it is reaped
    with (scratch / "load.log").open("ab") as logf:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=logf, start_new_session=True, env=env)
    try:
        proc.wait(timeout=seconds + warmup + 600)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    if not out.exists():
        raise RuntimeError(f"load_serve exited {proc.returncode} without a report; see {scratch / 'load.log'}")
    res: dict[str, Any] = json.loads(out.read_text())
    # Cores the load process used, averaged over its run (its start-up included: an upper bound).
    res["client_cpu_share"] = round(cpu / (seconds + warmup), 2)
    res.pop("rss_kb", None)
    return res


def answered_by(url: str) -> dict[str, float]:
    """deepindex_searches_total so far, by where the searches were answered (the ingress's copy of the
    index, or the index replica; with several ingress replicas the others' counts lag by a few seconds)."""
    import requests
    from prometheus_client.parser import text_string_to_metric_families

    fams = text_string_to_metric_families(requests.get(f"{url}/metrics", timeout=30).text)
    return {s.labels["answered_by"]: s.value for f in fams if f.name == "deepindex_searches"
            for s in f.samples if s.name.endswith("_total")}


def bench_layout(layout: str, model: str, coll: dict[str, str], items: int, clients: int, seconds: float,
                 warmup: float, extra: dict[str, Any], scratch: Path, records_dir: Path | None = None
                 ) -> dict[str, Any]:
    from ray import serve

    from deepindex.net import free_port
    from serving.app import build_app

    console.adopt_library_loggers()  # Serve's logger installs its console handler on import: to the log file
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    url = f"http://127.0.0.1:{port}"
    try:
        t = time.monotonic()
        serve.run(build_app({"model": model, **coll, "reload_interval_s": 0, "api_token_file": None,
                             **layout_serve_args(layout, extra)}), name="bench", route_prefix="/")
        _served(url, items)
        console.event("%s: %d items indexed and served in %.1f s", layout, items, time.monotonic() - t)
        out: dict[str, Any] = {}
        for name, ops in (("search", "search,similar"), ("mixed", "tag,search,similar")):
            before = answered_by(url)
            res = load(url, ops, clients, seconds, warmup, scratch,
                       records_dir / f"{layout}-{name}.jsonl" if records_dir else None)
            time.sleep(HUB_LAG_S)  # every ingress replica's count in the merged /metrics
            after = answered_by(url)
            res["searches_answered_by"] = {k: int(after.get(k, 0) - before.get(k, 0)) for k in ("local", "index")}
            if res["errors"]:
                raise RuntimeError(f"{layout} {name}: {res['errors']} errors, e.g. {res['error_samples']}")
            out[name] = res
            per = ", ".join(f"{op} p50 {v['p50_ms']} / p99 {v['p99_ms']} ms" for op, v in res["per_endpoint"].items())
            console.event("%s %s: %.0f req/s, %s (searches answered by the ingress / the index replica: %s; "
                          "the load process used %.2f cores, its own garbage collections paused it for at "
                          "most %.1f ms)", layout, name, res["throughput_rps"], per,
                          "{local} / {index}".format(**res["searches_answered_by"]), res["client_cpu_share"],
                          res["client_gc"]["max_ms"])
        # The ingress now holds a copy of the served index: its memory after the runs, per deployment.
        out["replica_rss_gb"] = replica_rss_gb()
        console.event("%s: resident memory per replica, GB: %s", layout, out["replica_rss_gb"])
        return out
    finally:
        serve.delete("bench")
        serve.shutdown()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--items", type=int, default=2000, help="items in the collection (make demo: 2,000)")
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--seconds", type=float, default=30.0, help="measured seconds per load run")
    ap.add_argument("--warmup", type=float, default=5.0)
    add_layout_args(ap)
    ap.add_argument("--out", help="also write the JSON here")
    ap.add_argument("--records-dir", help="also write every measured request here, per layout and run "
                                          "(<layout>-<search|mixed>.jsonl)")
    ap.add_argument("-v", "--verbose", action="store_true", help="Ray's own output on the console too")
    a = ap.parse_args(argv)
    layouts, extra = layout_args(ap, a)

    log_file = console.setup("bench-search", a.verbose)  # Ray's internals go to the log file
    console.event("Ray's own output: %s", log_file)
    scratch = Path(tempfile.mkdtemp(prefix="bench-search-"))
    records_dir = Path(a.records_dir) if a.records_dir else None
    if records_dir:
        records_dir.mkdir(parents=True, exist_ok=True)
    try:
        from deepindex.cluster import own_cluster
        from deepindex.index.tiny import train_small

        model = str(train_small(scratch / "model")[0])
        coll = _collection(a.items, scratch)
        own_cluster()  # a fresh local cluster gets the Serve data plane's environment (deepindex.cluster)
        runs = {layout: bench_layout(layout, model, coll, a.items, a.clients, a.seconds, a.warmup, extra, scratch,
                                     records_dir)
                for layout in layouts}
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    targets: dict[str, bool] = {}
    for layout, r in runs.items():
        for run, what in (("search", "searches only"), ("mixed", "mixed load")):
            for op in ("search", "similar"):
                targets[f"{layout}: {op} p99 at {a.clients} clients, {what}, <= {P99_TARGET_MS:.0f} ms"] = (
                    r[run]["per_endpoint"][op]["p99_ms"] <= P99_TARGET_MS)
        targets[f"{layout}: mixed load >= {MIXED_TARGET_X:.0f}x {BEFORE_RPS:.0f} req/s"] = (
            r["mixed"]["throughput_rps"] >= MIXED_TARGET_X * BEFORE_RPS)
    report = {"items": a.items, "clients": a.clients, "seconds": a.seconds, "serve_args": extra, "layouts": runs,
              "mixed_over_before": {layout: round(r["mixed"]["throughput_rps"] / BEFORE_RPS, 2)
                                    for layout, r in runs.items()},
              "targets_held": targets}
    console.report(report, a.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
