"""Where the CPU of a ``POST /v1/tag`` (or of a search) goes: per process, and inside the replicas.

Serves the small digit-scenes model as ``jobs/bench_serve.py`` does, drives ``--concurrency``
clients from a separate process for ``--seconds``, and reports

- CPU milliseconds per request of every process on the machine that used CPU meanwhile (HAProxy,
  the Serve proxy, the ingress and model replicas, Ray's own processes, the load generator), from
  ``/proc/<pid>/stat`` before and after: on 2 cores, throughput is bounded by their sum;
- with ``py-spy`` installed (``pip install py-spy``), the ingress and model replicas' hottest
  functions over the same window (own time, by function), sampled at 100 Hz.

With ``--searches``, the requests are keyword and similar-item searches in turn (``jobs/load_serve.py``,
as ``jobs/bench_search.py`` drives them) on a 2,000-item collection, answered in the ingress from its
copy of the index; the ingress's samples are also split by what they were doing (HTTP stack, the query
itself, the rest of our handler, ...).

    python jobs/profile_serve.py [--concurrency 32] [--seconds 15] [--model-in-ingress] [--searches]
                                 [--out profile.json] [--stacks-dir DIR]
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

TICK = os.sysconf("SC_CLK_TCK")


def _cpu_ticks() -> dict[int, tuple[str, int]]:
    """pid -> (name, user + system ticks) of every process."""
    out = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
            cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        comm = stat[stat.index("(") + 1 : stat.rindex(")")]
        out[int(d.name)] = (cmd[:120] or comm, int(fields[11]) + int(fields[12]))
    return out


def _role(name: str) -> str:
    for key, role in (("ServeReplica:bench:Ingress", "ingress replica"), ("ConceptModel", "model replica"),
                      ("IndexService", "index replica"), ("MetricsHub", "metrics hub"), ("haproxy", "HAProxy"),
                      ("ProxyActor", "Serve proxy"), ("ServeController", "Serve controller"), ("raylet", "raylet"),
                      ("gcs_server", "GCS"), ("dashboard", "Ray dashboard/agents"), ("_load_process", "load generator"),
                      ("multiprocessing.spawn", "load generator"), ("log_monitor", "Ray log monitor"),
                      ("monitor.py", "Ray autoscaler monitor"), ("runtime_env", "Ray runtime env agent"),
                      ("profile_serve", "this script")):
        if key in name:
            return role
    return "other: " + name.split(" ")[0].rsplit("/", 1)[-1]


def _pids(marker: str) -> list[int]:
    return [pid for pid, (name, _) in _cpu_ticks().items() if marker in name]


def _spy(pid: int, seconds: float, out: Path) -> subprocess.Popen[bytes] | None:
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(spy).exists():
        return None
    return subprocess.Popen([spy, "record", "--pid", str(pid), "--duration", str(int(seconds)), "--rate", "100",
                             "--format", "raw", "--output", str(out), "--nonblocking"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _stacks(raw: Path) -> Iterator[tuple[list[str], int]]:
    """py-spy's raw (collapsed) output -> (frames, outermost first; samples) per stack."""
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if stack:
            yield stack.split(";"), int(count)


def _top_functions(raw: Path, n: int = 15) -> list[dict[str, Any]]:
    """py-spy's raw stacks -> the functions with the most own samples."""
    own: collections.Counter[str] = collections.Counter()
    for frames, count in _stacks(raw):
        own[frames[-1]] += count
    total = sum(own.values())
    return [{"function": f, "share": round(c / total, 3)} for f, c in own.most_common(n)] if total else []


# What an ingress sample was doing for a search: the first group any frame of its stack matches,
# in this order (innermost first: the query inside our handler inside the HTTP stack).
SEARCH_GROUPS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("the query itself (deepindex.index.query.run)", ("run (deepindex/index/query.py",)),
    ("following the index's writer (delta, manifest, writer and serving files)",
     ("IndexStore.follow", "LocalReads._writer_here", "_Cached.get")),
    ("the rest of our handler (checks, options, vocabulary, hits)", ("Ingress.", "reads.py")),
    ("metrics (ours and Serve's)", ("prometheus_client", "metrics.py", "_record_errors_and_metrics")),
    ("response validation and JSON (FastAPI, pydantic)", ("serialize_response", "TypeAdapter", "jsonable_encoder")),
    ("HTTP: uvicorn, Starlette, FastAPI routing and middleware, Serve's ASGI wrapper",
     ("uvicorn", "starlette", "fastapi", "http_util.py", "replica.py", "ObserveMiddleware", "asyncio")),
)


# The same for a POST /v1/tag with the model in the ingress.
TAG_GROUPS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("the model's forward (torch)", ("torch/nn/", "torch/_", "infer_unit", "embed.py")),
    ("decoding and preprocessing (PIL, pil_to_uint8, normalize)", ("PIL/", "decode.py", "transforms.py")),
    ("reading the multipart body", ("_read_images", "multipart", "formparsers", "tempfile.py")),
    ("batching (@serve.batch, the forward's thread)", ("batching.py", "ServedModel.", "concurrent/futures")),
    ("metrics (ours and Serve's)", ("prometheus_client", "metrics.py", "_record_errors_and_metrics")),
    ("response validation and JSON (FastAPI, pydantic)", ("serialize_response", "TypeAdapter", "jsonable_encoder")),
    ("the rest of our handler", ("Ingress.",)),
    ("HTTP: uvicorn, Starlette, FastAPI routing and middleware, Serve's ASGI wrapper",
     ("uvicorn", "starlette", "fastapi", "http_util.py", "replica.py", "ObserveMiddleware", "asyncio")),
)


def split_samples(raw: Path, groups: tuple[tuple[str, tuple[str, ...]], ...] = SEARCH_GROUPS) -> dict[str, float]:
    """py-spy's raw stacks -> share of the samples per group (the rest by their innermost function)."""
    per: collections.Counter[str] = collections.Counter()
    for frames, count in _stacks(raw):
        name = next((g for g, keys in groups if any(k in f for f in frames for k in keys)),
                    "other: " + frames[-1].split(" (")[0])
        per[name] += count
    total = sum(per.values())
    return {g: round(c / total, 3) for g, c in per.most_common(12)} if total else {}


def _search_load(url: str, concurrency: int, seconds: float, tmp: Path) -> tuple[int, float]:
    """Keyword and similar-item searches in turn from jobs/load_serve.py (its own process group):
    (requests answered, requests a second)."""
    from bench_search import load

    res = load(url, "search,similar", concurrency, seconds, 0.5, tmp)
    if res["errors"]:
        raise RuntimeError(f"{res['errors']} searches failed, e.g. {res['error_samples']}")
    return res["requests"], res["throughput_rps"]


def main(argv: list[str] | None = None) -> int:
    from bench_serve import http_load, make_model, make_requests

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--seconds", type=float, default=15.0)
    p.add_argument("--model-in-ingress", action="store_true", help="profile the model_in_ingress layout")
    p.add_argument("--searches", action="store_true",
                   help="profile keyword and similar-item searches on a 2,000-item collection instead of tagging")
    p.add_argument("--out", help="also write the JSON here")
    p.add_argument("--stacks-dir", help="also keep py-spy's collapsed stacks here (<role>.txt), for a flame graph "
                                        "or inclusive shares")
    args = p.parse_args(argv)

    from ray import serve

    from deepindex.cluster import own_cluster
    from deepindex.net import free_port
    from serving.app import build_app

    tmp = Path(tempfile.mkdtemp(prefix="profile-serve-"))
    model = str(make_model("small", tmp / "model"))
    if args.searches:
        from bench_search import _collection, _served

        coll = _collection(2000, tmp)
    else:
        coll = {"collection": "bench", "index_dir": f"{tmp}/indexes", "catalogue_url": f"sqlite:///{tmp}/catalogue.db",
                "blobs_url": f"{tmp}/blobs"}
    own_cluster()
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app({"model": model, **coll, "reload_interval_s": 0, "model_num_cpus": 1, "model_threads": 1,
                         "model_in_ingress": args.model_in_ingress}),
              name="bench", route_prefix="/")
    base = f"http://127.0.0.1:{port}"
    try:
        if args.searches:
            _served(base, 2000)
            _search_load(base, args.concurrency, 3.0, tmp)  # warm-up
        else:
            bodies, ctype = make_requests(model)
            http_load(base + "/v1/tag", bodies, ctype, args.concurrency, 4 * args.concurrency)  # warm-up
        spies = {}
        for role, marker in (("ingress replica", "ServeReplica:bench:Ingress"), ("model replica", "ConceptModel")):
            for pid in _pids(marker)[:1]:
                spies[role] = (_spy(pid, args.seconds, tmp / f"{pid}.txt"), tmp / f"{pid}.txt")
        before, t0 = _cpu_ticks(), time.monotonic()
        children = resource.getrusage(resource.RUSAGE_CHILDREN)
        if args.searches:
            n, rate = _search_load(base, args.concurrency, args.seconds, tmp)
        else:
            n = int(args.seconds * 250) // args.concurrency * args.concurrency  # ~the seconds at ~250 req/s
            lat, wall = http_load(base + "/v1/tag", bodies, ctype, args.concurrency, n)
            n, rate = len(lat), len(lat) / wall
        after, elapsed = _cpu_ticks(), time.monotonic() - t0
        per_role: collections.Counter[str] = collections.Counter()
        for pid, (name, ticks) in after.items():
            used = ticks - before.get(pid, (name, 0))[1]  # a process born meanwhile: all its ticks
            if used > 0:
                per_role[_role(name)] += used
        # The load process has exited (and been reaped) by now, /v1/tag's as the searches': its CPU from this
        # process's reaped children (the tag load's was left out: found on review).  py-spy is not reaped yet.
        done = resource.getrusage(resource.RUSAGE_CHILDREN)
        per_role["load generator"] += round(TICK * (done.ru_utime + done.ru_stime
                                                    - children.ru_utime - children.ru_stime))
        report: dict[str, Any] = {
            "requests": "keyword and similar-item searches" if args.searches else "POST /v1/tag, one image",
            "concurrency": args.concurrency, "count": n, "per_s": round(rate, 1),
            "cpu_ms_per_request": {r: round(1000 * t / TICK / n, 2) for r, t in per_role.most_common()},
            "cpu_seconds_total": round(sum(per_role.values()) / TICK, 1), "wall_seconds": round(elapsed, 1),
        }
        for role, (proc, raw) in spies.items():
            if proc is not None:
                proc.wait(timeout=120)
                if raw.exists():
                    if args.stacks_dir:
                        Path(args.stacks_dir).mkdir(parents=True, exist_ok=True)
                        shutil.copy(raw, Path(args.stacks_dir) / f"{role.replace(' ', '-')}.txt")
                    report[f"{role} hottest functions (own samples)"] = _top_functions(raw)
                    if role == "ingress replica" and (args.searches or args.model_in_ingress):
                        groups = SEARCH_GROUPS if args.searches else TAG_GROUPS
                        report["ingress replica samples by activity"] = split_samples(raw, groups)
    finally:
        serve.shutdown()
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
