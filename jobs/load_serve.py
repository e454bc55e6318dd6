"""Load run: N concurrent clients for T seconds against a running service.  JSON on stdout.

``python jobs/load_serve.py --url http://127.0.0.1:8000 [--clients 32] [--seconds 60] [--warmup 5]
[--ops tag,search,similar] [--client aiohttp|threads] [--records requests.jsonl]``

Each client loops over a mix of ``POST /v1/tag`` (one PNG), ``GET /v1/search`` (keywords) and
``GET /v1/items/{id}/similar`` (ids found by a first search), one request at a time (a closed
loop: by Little's law, latency = clients / throughput).  ``--ops`` narrows the mix.  Reported:
requests, errors (any non-2xx or transport failure), p50/p99 latency overall and per endpoint,
throughput (``--records``: also every request's start, end and status, to see when the slow ones
happened), and the resident memory (VmRSS) of every replica of the application at the end of
the warm-up and at the end of the run (found through Ray's actor table when this process can
join the cluster: ``--ray-address``, ``RAY_ADDRESS`` or the test's own ``ray.init``).

The clients are asyncio tasks on aiohttp keep-alive connections by default (one thread, no
thread switch a request: ``jobs/bench_search.py`` measured the load process at ~0.5 ms of CPU a
request, 0.2 of a core at ~400 req/s); ``--client threads`` is one thread and ``requests`` session
each.
``tests/serving`` runs the same code for a few seconds; this job is the full-size run, and
``jobs/bench_search.py`` runs it against each serving layout.
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import io
import json
import logging
import random
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
log = logging.getLogger("load_serve")

WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
OPS = ("tag", "search", "similar")
CLIENTS = ("aiohttp", "threads")


@dataclass
class Record:
    op: str
    start: float  # time.monotonic()
    end: float
    status: int  # 0: no HTTP answer (connection refused, reset, timeout)
    error: str = ""


class _Mix:
    """One client's sequence of requests: the operations in turn (each client starts on a
    different one, so the mix is even from the first second), random words, ids and images."""

    def __init__(self, c: int, work: Workload, ops: tuple[str, ...]) -> None:
        self.rng, self.i, self.work, self.ops = random.Random(c), c, work, ops

    def next(self) -> tuple[str, str, dict[str, Any] | None, bytes | None]:
        """(operation, path, query parameters, PNG to upload)."""
        op = self.ops[self.i % len(self.ops)]
        self.i += 1
        rng, work = self.rng, self.work
        if op == "tag":
            return op, "/v1/tag", None, rng.choice(work.pngs)
        if op == "search":
            q = " ".join(rng.sample(work.words, rng.choice((1, 2))))
            return op, "/v1/search", {"q": q, "k": 10, "mode": rng.choice(("all", "any"))}, None
        return op, f"/v1/items/{rng.choice(work.ids)}/similar", {"k": 10}, None


@dataclass
class Workload:
    pngs: list[bytes]
    ids: list[str]
    words: list[str] = field(default_factory=lambda: list(WORDS))


def _png(unit: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.clip(np.rint(unit.reshape(unit.shape[-2:]) * 255), 0, 255).astype(np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def prepare(url: str, n_images: int = 16, timeout: float = 60.0) -> Workload:
    """Query images (digit scenes, not indexed) and item ids that the service holds."""
    import requests

    from deepindex.index.collection import digit_gallery

    g = digit_gallery(n_images, seed=123)
    ids: list[str] = []
    for w in WORDS:
        r = requests.get(f"{url}/v1/search", params={"q": w, "k": 20}, timeout=timeout)
        r.raise_for_status()
        ids += [h["id"] for h in r.json()["results"]]
    if not ids:
        raise RuntimeError(f"{url}: the index returned no items; is it loaded (/readyz)?")
    return Workload([_png(im) for im in g.images], sorted(set(ids)))


def drive(url: str, work: Workload, clients: int, seconds: float, timeout: float = 30.0,
          stop: threading.Event | None = None, ops: tuple[str, ...] = OPS) -> list[Record]:
    """``clients`` threads, each one request at a time, for ``seconds``; every request recorded."""
    import requests

    records: list[list[Record]] = [[] for _ in range(clients)]
    deadline = time.monotonic() + seconds
    stop = stop or threading.Event()

    def client(c: int) -> None:
        mix, out = _Mix(c, work, ops), records[c]
        with requests.Session() as s:
            while time.monotonic() < deadline and not stop.is_set():
                op, path, params, png = mix.next()
                t0 = time.monotonic()
                try:
                    if png is not None:
                        r = s.post(url + path, files={"images": ("q.png", png)}, timeout=timeout)
                    else:
                        r = s.get(url + path, params=params, timeout=timeout)
                    status, err = r.status_code, "" if r.status_code < 400 else r.text[:200]
                except requests.RequestException as e:
                    status, err = 0, f"{type(e).__name__}: {e}"[:200]
                out.append(Record(op, t0, time.monotonic(), status, err))

    threads = [threading.Thread(target=client, args=(c,), daemon=True, name=f"load-{c}") for c in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(seconds + timeout + 30)
    return sorted((r for rs in records for r in rs), key=lambda r: r.start)


async def _drive_async(url: str, work: Workload, clients: int, seconds: float, timeout: float,
                       ops: tuple[str, ...]) -> list[Record]:
    import asyncio

    import aiohttp

    records: list[Record] = []
    deadline = time.monotonic() + seconds

    async def client(session: aiohttp.ClientSession, c: int) -> None:
        mix = _Mix(c, work, ops)
        while time.monotonic() < deadline:
            op, path, params, png = mix.next()
            t0 = time.monotonic()
            try:
                if png is not None:
                    form = aiohttp.FormData()
                    form.add_field("images", png, filename="q.png", content_type="image/png")
                    request = session.post(url + path, data=form)
                else:
                    request = session.get(url + path, params=params)
                async with request as r:
                    body = await r.read()
                    status, err = r.status, "" if r.status < 400 else body[:200].decode(errors="replace")
            except (TimeoutError, aiohttp.ClientError) as e:
                status, err = 0, f"{type(e).__name__}: {e}"[:200]
            records.append(Record(op, t0, time.monotonic(), status, err))

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=clients),
                                     timeout=aiohttp.ClientTimeout(total=timeout)) as session:
        await asyncio.gather(*(client(session, c) for c in range(clients)))
    return sorted(records, key=lambda r: r.start)


def drive_async(url: str, work: Workload, clients: int, seconds: float, timeout: float = 30.0,
                ops: tuple[str, ...] = OPS) -> list[Record]:
    """As :func:`drive`, with ``clients`` asyncio tasks on aiohttp keep-alive connections."""
    import asyncio

    return asyncio.run(_drive_async(url, work, clients, seconds, timeout, ops))


# ---- replica memory ------------------------------------------------------------------------
def _vmrss_kb(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def replicas(app: str = "deepindex") -> list[dict[str, Any]]:
    """Live Serve replicas of ``app``: deployment, pid, node id (Ray's actor table, read from the GCS).

    ``ray._private.state`` because the public ``ray.util.state`` needs the dashboard, which the
    test cluster does not start.  [] when this process is not connected to Ray.
    """
    import ray

    if not ray.is_initialized():
        return []
    from ray._private import state

    prefix = f"ServeReplica:{app}:"
    return [{"deployment": a["ActorClassName"][len(prefix):], "pid": a["Pid"], "node_id": a["Address"]["NodeID"],
             "actor_id": a["ActorID"]}
            for a in state.actors().values() if a["ActorClassName"].startswith(prefix) and a["State"] == "ALIVE"]


def replica_rss_kb(reps: list[dict[str, Any]]) -> dict[str, int | None]:
    """VmRSS per replica ("Deployment/pid"): read from /proc here, or by a 0-CPU task on the replica's node."""
    import ray

    if not reps:
        return {}
    here = ray.get_runtime_context().get_node_id()
    remote_rss = None
    out: dict[str, int | None] = {}
    for r in reps:
        key = f"{r['deployment']}/{r['pid']}"
        if r["node_id"] == here:
            out[key] = _vmrss_kb(r["pid"])
            continue
        if remote_rss is None:
            from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

            remote_rss = (ray.remote(num_cpus=0)(_vmrss_kb), NodeAffinitySchedulingStrategy)
        fn, strategy = remote_rss
        out[key] = ray.get(fn.options(scheduling_strategy=strategy(r["node_id"], soft=False)).remote(r["pid"]))
    return out


# ---- the run -----------------------------------------------------------------------------
def _pct(xs: list[float], q: float) -> float | None:
    return round(float(np.percentile(xs, q)) * 1000, 2) if xs else None


def summarize(records: list[Record], t0: float) -> dict[str, Any]:
    """Counts, errors and latency percentiles (ms) of the records that started at or after ``t0``."""
    rs = [r for r in records if r.start >= t0]
    span = (max(r.end for r in rs) - t0) if rs else 0.0
    errors = [r for r in rs if not 200 <= r.status < 300]
    lat = [r.end - r.start for r in rs]
    per_op = {op: {"requests": len(x := [r for r in rs if r.op == op]),
                   "errors": sum(not 200 <= r.status < 300 for r in x),
                   "p50_ms": _pct([r.end - r.start for r in x], 50), "p99_ms": _pct([r.end - r.start for r in x], 99)}
              for op in OPS if any(r.op == op for r in rs)}
    return {"requests": len(rs), "errors": len(errors),
            "error_samples": [(r.op, r.status, r.error) for r in errors[:5]],
            "throughput_rps": round(len(rs) / span, 1) if span else 0.0,
            "p50_ms": _pct(lat, 50), "p99_ms": _pct(lat, 99), "per_endpoint": per_op}


@contextlib.contextmanager
def _frozen_gc(every_s: float = 1.0) -> Iterator[list[tuple[float, float]]]:
    """This process's garbage collector kept from pausing the clients: what exists is frozen every
    ``every_s`` (out of every later collection), so a collection looks at the last second's objects
    only.  Without it, full collections over the growing list of records stopped every client for up
    to 130 ms mid-run, and the pause counted as the service's latency.  Yields the collections that
    still ran, as (monotonic start, seconds): what of the latencies is this process's own pause."""
    pauses: list[tuple[float, float]] = []
    began: list[float] = []

    def timed(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            began[:] = [time.perf_counter(), time.monotonic()]
        elif began:
            pauses.append((began[1], time.perf_counter() - began[0]))

    stop = threading.Event()

    def freeze() -> None:
        while not stop.wait(every_s):
            gc.freeze()

    t = threading.Thread(target=freeze, name="gc-freeze", daemon=True)
    gc.freeze()
    gc.callbacks.append(timed)
    t.start()
    try:
        yield pauses
    finally:
        stop.set()
        t.join()
        gc.callbacks.remove(timed)
        gc.unfreeze()


def run_load(url: str, clients: int = 32, seconds: float = 60.0, warmup: float = 5.0,
             timeout: float = 30.0, on_warm: Callable[[], None] | None = None, ops: tuple[str, ...] = OPS,
             client: str = "threads", records_out: Path | None = None) -> dict[str, Any]:
    """Warm up, then measure: latency, errors, and replica RSS at the end of warm-up and at the end.
    ``client``: ``threads`` (:func:`drive`) or ``aiohttp`` (:func:`drive_async`).  ``records_out``: also
    write every measured request there, one JSON line each (op, start and end in seconds from the end of
    the warm-up, HTTP status), to see when the slow ones happened."""
    if client not in CLIENTS:
        raise ValueError(f"client: {client!r} is not one of {', '.join(CLIENTS)}")
    unknown = [op for op in ops if op not in OPS]
    if unknown or not ops:
        raise ValueError(f"ops: {', '.join(unknown) or 'none given'}; choose from {', '.join(OPS)}")
    url = url.rstrip("/")
    work = prepare(url)
    result: dict[str, Any] = {"url": url, "clients": clients, "client": client, "ops": list(ops),
                              "seconds": seconds, "warmup_s": warmup}
    start = time.monotonic()
    rss: dict[str, dict[str, int | None]] = {}
    reps: list[dict[str, Any]] = []

    def sample_after_warmup() -> None:
        time.sleep(warmup)
        reps.extend(replicas())
        rss["warm"] = replica_rss_kb(reps)
        if on_warm is not None:
            on_warm()

    sampler = threading.Thread(target=sample_after_warmup, daemon=True)
    sampler.start()
    with _frozen_gc() as pauses:
        records = (drive_async(url, work, clients, warmup + seconds, timeout, ops) if client == "aiohttp"
                   else drive(url, work, clients, warmup + seconds, timeout, ops=ops))
    measured = [s for at, s in pauses if at >= start + warmup]
    result["client_gc"] = {"collections": len(measured), "max_ms": round(1000 * max(measured, default=0.0), 2),
                           "total_ms": round(1000 * sum(measured), 1)}
    sampler.join(60)
    rss["end"] = replica_rss_kb(reps)
    result.update(summarize(records, start + warmup))
    if records_out is not None:
        t0 = start + warmup
        result["records_t0_unix"] = round(time.time() - (time.monotonic() - t0), 6)  # the records' time 0
        with records_out.open("w") as f:
            for r in records:
                if r.start >= t0:
                    f.write(json.dumps({"op": r.op, "start": round(r.start - t0, 6), "end": round(r.end - t0, 6),
                                        "status": r.status}) + "\n")
    growth = {k: (rss["end"].get(k) or 0) - v for k, v in rss.get("warm", {}).items() if v is not None}
    result["rss_kb"] = {k: {"warm": v, "end": rss["end"].get(k), "growth": growth.get(k)}
                        for k, v in rss.get("warm", {}).items()}
    result["rss_growth_kb_max"] = max(growth.values()) if growth else None
    result["rss_growth_pct_max"] = (round(max(100.0 * growth[k] / rss["warm"][k] for k in growth), 2)
                                    if growth else None)
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--url", default="http://127.0.0.1:8000")
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--warmup", type=float, default=5.0)
    ap.add_argument("--ops", default=",".join(OPS), help="the mix, in turn: " + ", ".join(OPS))
    ap.add_argument("--client", default="aiohttp", choices=CLIENTS,
                    help="asyncio tasks on aiohttp (default), or a thread and requests session each")
    ap.add_argument("--ray-address", default=None, help="join this cluster to read the replicas' memory")
    ap.add_argument("--out", default=None, help="also write the JSON here")
    ap.add_argument("--records", default=None, help="also write every measured request here (JSON lines)")
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    import os

    from deepindex.localplatform import running_service

    if a.ray_address:
        os.environ["RAY_ADDRESS"] = a.ray_address
    # Join the service's cluster only: connect() would otherwise start a fresh, empty one.
    if os.environ.get("RAY_ADDRESS") or running_service("ray") is not None:
        from deepindex.cluster import connect

        try:
            connect(log_to_driver=False)
        except Exception as e:  # noqa: BLE001 - memory is optional; latency and errors are the result
            log.warning("not connected to Ray (%s): replica memory is not measured", e)
    else:
        log.warning("no Ray address (--ray-address, RAY_ADDRESS or `deepindex up`): replica memory is not measured")
    ops = tuple(x for x in a.ops.split(",") if x)
    try:
        out = run_load(a.url, a.clients, a.seconds, a.warmup, ops=ops, client=a.client,
                       records_out=Path(a.records) if a.records else None)
    except ValueError as e:
        print(f"load_serve: {e}", file=sys.stderr)
        return 2
    text = json.dumps(out, indent=2)
    print(text)
    if a.out:
        Path(a.out).write_text(text)
    return 0 if out["errors"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
