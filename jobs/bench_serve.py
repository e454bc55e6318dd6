"""Benchmark: Serve end to end vs the bare model.  JSON on stdout.

``python jobs/bench_serve.py [--profiles small,resnet18-224] [--model CKPT_OR_URI] [--out bench.json]``

``POST /v1/tag`` (one image per request) at concurrency 1, 8 and 32 through Ray Serve over HTTP, each
   level for at least ``--seconds`` (5 s; a fixed 400 requests made a level of the small model 0.4 s
   long, its 32 clients still in step: batches of 27 against 5 over 5 s), in each layout (``--layouts``:
   model replicas of their own, ``model_in_ingress``, and that in 2 ingress replicas), against the
   bare model forward at batch 1, 8 and 32 in this process with as many torch threads
   as the model replica has CPUs.  Quoted as ratios: throughput at 32 / bare batched throughput
   (target >= 0.9, issue 15's), and the p50 overhead over the bare forward (reported).  Two model
   profiles by default, because the ratio is a property of the model as much as of the service:
   ``small``, the digit-scenes ConvNet the tests and the demo serve (1x32x32 PNGs, ~0.5 ms an
   image), and ``resnet18-224``, torchvision's ResNet-18 on 3x224x224 JPEGs (weights left at
   their random initialisation: the cost of a forward does not depend on them).  ``--model``
   benchmarks one given checkpoint or registry URI instead.

The same model, request bodies (multipart and base64 JSON) and CPU budget are served by the stacks a
user would pick instead (``--peers``, ``jobs/serve_peers.py``: a bare FastAPI + uvicorn app, and
LitServe from the ``bench`` extra), each in its own process group, killed after its levels; the
report gives deepindex's throughput and p50 against each and whether the targets hold.  LitServe
batches up to deepindex's ``max_batch_size`` (32; ``--serve-arg max_batch_size=8`` sets both).
deepindex serves the model's optimized graph (``deepindex.index.embed.optimized_forward``); the peers
and the bare model call the same one by default, so the stacks are compared and not the model code
(``--peer-forward eager``: the peers call the plain model, as their users would write it; the bare
model is timed both ways).

(Similar-item search, FAISS vs brute force: ``jobs/bench_index.py``.)  Both sides of each comparison run in
the same process on the same machine; absolute times from a shared CPU box are noise, the ratios are the
result.  The HTTP load comes from a separate process
(aiohttp, keep-alive connections), so the client's CPU is not charged to the service's GIL.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import multiprocessing
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

PROFILES = ("small", "resnet18-224")


def _say(who: str, clients: int, body: str, row: dict[str, float]) -> None:
    """One console line per measured level: what a reader of the run waits for."""
    from deepindex import console

    console.event("%s, %d client%s, %s: %.1f img/s, p50 %.1f ms, p99 %.1f ms%s", who, clients, "s" * (clients != 1),
                  body, row["images_per_s"], row["p50_ms"], row["p99_ms"],
                  f", mean batch {row['mean_batch_size']:.1f}" if "mean_batch_size" in row else "")


def _pct(xs, q) -> float:
    return float(np.percentile(np.asarray(xs), q)) if len(xs) else float("nan")



# ---- models and inputs -------------------------------------------------------------------------
def make_model(profile: str, out: Path) -> Path:
    """A checkpoint folder for a profile (see the module docstring)."""
    if profile == "small":
        from deepindex.index.tiny import train_small

        return train_small(out)[0].parent
    if profile == "resnet18-224":
        from deepindex.checkpoint import save_checkpoint
        from deepindex.config import load_config
        from deepindex.data.transforms import NormStats
        from deepindex.models import build_model

        cfg = load_config(None, ["model.name=resnet18", "data.image_size=224", "data.channels=3"])
        concepts = [str(d) for d in range(10)]
        model = build_model(cfg.model, len(concepts), 3)
        stats = NormStats((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
        return save_checkpoint(out, model=model, config=cfg, stats=stats, concepts=concepts, multilabel=True,
                               epoch=0).parent
    raise ValueError(f"profile {profile!r}: one of {', '.join(PROFILES)}")


def make_requests(model_path: str, n: int = 64) -> tuple[list[bytes], str]:
    """Encoded images at the model's input size, as a client would send them: PNG for the
    grayscale digit models, JPEG for RGB ones (digit scenes scaled up to the input size)."""
    from PIL import Image

    from deepindex.checkpoint import load_model
    from deepindex.index.collection import digit_gallery
    from deepindex.tracking.registry import resolve_model

    d = load_model(resolve_model(model_path).checkpoint_path).config.data
    fmt = "PNG" if d.channels == 1 else "JPEG"
    out = []
    for im in digit_gallery(n, seed=3).images:
        pil = Image.fromarray((im[0] * 255).astype(np.uint8))
        if d.channels == 3:
            pil = pil.convert("RGB")
        if pil.size != (d.image_size, d.image_size):
            pil = pil.resize((d.image_size, d.image_size), Image.BILINEAR)
        buf = io.BytesIO()
        pil.save(buf, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
        out.append(buf.getvalue())
    return out, f"image/{fmt.lower()}"


# ---- the two sides -----------------------------------------------------------------------------
def bench_bare(model_path: str, batch_sizes: list[int], threads: int, seconds: float = 2.0,
               forward: str = "served") -> dict:
    """The model alone in this process: the forward deepindex serves (``served``) or the eager one."""
    import torch

    from deepindex.checkpoint import load_model
    from deepindex.data.transforms import uint8_to_unit
    from deepindex.index.embed import optimized_forward
    from deepindex.tracking.registry import resolve_model

    torch.set_num_threads(threads)
    lm = load_model(resolve_model(model_path).checkpoint_path)
    call = optimized_forward(lm, ("probs",), optimize=forward == "served")[0]
    d = lm.config.data
    out = {}
    for b in batch_sizes:
        x = np.random.default_rng(0).integers(0, 256, (b, d.channels, d.image_size, d.image_size), dtype=np.uint8)
        for _ in range(3):
            call(uint8_to_unit(x))
        times = []
        end = time.perf_counter() + seconds
        while time.perf_counter() < end or len(times) < 5:
            t = time.perf_counter()
            call(uint8_to_unit(x))  # the replica's call: to [0, 1], normalise, forward, probabilities
            times.append(time.perf_counter() - t)
        out[str(b)] = {"p50_ms": 1e3 * _pct(times, 50), "p99_ms": 1e3 * _pct(times, 99),
                       "images_per_s": b / float(np.mean(times))}
    return out


async def _load_async(url: str, bodies: list[bytes], ctype: str, concurrency: int, n: int,
                      body: str = "multipart", seconds: float = 0.0) -> tuple[list[float], float]:
    import base64

    import aiohttp

    encoded = [base64.b64encode(b).decode() for b in bodies] if body == "json" else []

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency),
                                     timeout=aiohttp.ClientTimeout(total=120)) as session:
        async def one(i: int) -> float:
            t = time.perf_counter()
            if not bodies:  # a GET: the service's floor, no body and no work
                request = session.get(url)
            elif body == "json":  # {"images": [{"data": <base64>}]}
                request = session.post(url, json={"images": [{"data": encoded[i % len(encoded)]}]})
            else:
                form = aiohttp.FormData()
                form.add_field("images", bodies[i % len(bodies)], filename="image", content_type=ctype)
                request = session.post(url, data=form)
            async with request as r:
                await r.read()
                if r.status != 200:
                    raise RuntimeError(f"{url}: HTTP {r.status}")
            return time.perf_counter() - t

        async def client(k: int, count: int, lat: list[float], until: float = 0.0) -> None:
            j = 0
            while j < count or time.perf_counter() < until:
                lat.append(await one(k + j * concurrency))
                j += 1

        await asyncio.gather(*[client(k, 2, []) for k in range(concurrency)])  # warm-up: connections, batching
        lat: list[float] = []
        start = time.perf_counter()
        # Every client sends its share of n, and goes on until `seconds` have passed: a level of a
        # fast server lasts long enough for its clients to fall out of step (see the docstring).
        await asyncio.gather(*[client(k, n // concurrency, lat, start + seconds) for k in range(concurrency)])
        return lat, time.perf_counter() - start


def _load_process(url, bodies, ctype, concurrency, n, body, seconds, queue) -> None:
    try:
        queue.put(asyncio.run(_load_async(url, bodies, ctype, concurrency, n, body, seconds)))
    except Exception as e:  # noqa: BLE001 - reported to the parent, which fails the benchmark
        queue.put(e)


def http_load(url: str, bodies: list[bytes], ctype: str, concurrency: int, n: int, body: str = "multipart",
              seconds: float = 0.0) -> tuple[list[float], float]:
    """``concurrency`` clients sending at least ``n`` requests in all, for at least ``seconds`` (``body``:
    multipart files or base64 JSON), from a separate process: (each request's latency, wall time)."""
    ctx = multiprocessing.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=_load_process, args=(url, bodies, ctype, concurrency, n, body, seconds, q))
    p.start()
    res = q.get(timeout=600)
    p.join(30)
    if isinstance(res, Exception):
        raise res
    return res


def _batch_totals(url: str) -> tuple[float, float]:
    """(sum, count) of the service's deepindex_model_batch_size histogram."""
    import requests
    from prometheus_client.parser import text_string_to_metric_families

    totals = {}
    for fam in text_string_to_metric_families(requests.get(f"{url}/metrics", timeout=30).text):
        for sample in fam.samples:
            totals[sample.name] = sample.value
    return totals.get("deepindex_model_batch_size_sum", 0.0), totals.get("deepindex_model_batch_size_count", 0.0)


# The Serve application's arguments per layout: model replicas of their own (the default); the model
# in the ingress replica; the same in as many ingress replicas as this machine has cores (2 here), which
# the Python work of a request (HTTP, multipart, decoding: ~1.6 ms of one core for the small model)
# needs once requests come faster than one process parses them.
LAYOUTS: dict[str, dict[str, object]] = {"replicas": {"model_in_ingress": False},
                                         "in-ingress": {"model_in_ingress": True},
                                         "in-ingress-2": {"model_in_ingress": True, "ingress_replicas": 2}}


def layout_serve_args(layout: str, extra: dict | None = None) -> dict:
    """The Serve application's arguments of ``layout``, then ``--serve-arg``'s."""
    return {**LAYOUTS[layout], **(extra or {})}


def add_layout_args(p: argparse.ArgumentParser) -> None:
    """``--layouts`` and ``--serve-arg`` (this job's and ``jobs/bench_search.py``'s)."""
    p.add_argument("--layouts", default=",".join(LAYOUTS),
                   help="deepindex layouts: replicas (model replicas of their own), in-ingress (model_in_ingress), "
                        "in-ingress-2 (the same in 2 ingress replicas)")
    p.add_argument("--serve-arg", action="append", default=[], metavar="KEY=VALUE",
                   help="another argument of the Serve application (serving/schemas.py ServeArgs), e.g. "
                        "ingress_replicas=2; repeatable")


def layout_args(p: argparse.ArgumentParser, args: argparse.Namespace) -> tuple[list[str], dict]:
    """(layouts, extra Serve arguments) from :func:`add_layout_args`'s flags; a bad one is a usage error."""
    import yaml

    layouts = [x for x in args.layouts.split(",") if x]
    bad = [x for x in layouts if x not in LAYOUTS] + [x for x in args.serve_arg if "=" not in x]
    if bad or not layouts:
        p.error(f"--layouts/--serve-arg: {', '.join(bad) or 'no layout'} (layouts: {', '.join(LAYOUTS)}; KEY=VALUE)")
    return layouts, {k: yaml.safe_load(v) for k, v in (x.split("=", 1) for x in args.serve_arg)}


def bench_serve(model_path: str, concurrencies: list[int], per_level: int, threads: int,
                layout: str = "replicas", extra: dict | None = None, seconds: float = 0.0) -> dict:
    from ray import serve

    from deepindex import console
    from deepindex.cluster import own_cluster
    from deepindex.localplatform import free_port
    from serving.app import build_app

    console.adopt_library_loggers()  # Serve's logger installs its console handler on import: to the log file
    own_cluster()  # a fresh local cluster gets deepindex.cluster.serve_env (HAProxy + direct ingress)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    # An empty collection of the benchmark's own (tagging needs no index), gone with the run.
    scratch = tempfile.mkdtemp(prefix="deepindex-bench-serve-")
    serve.run(build_app({"model": model_path, "collection": "bench", "index_dir": f"{scratch}/indexes",
                         "catalogue_url": f"sqlite:///{scratch}/catalogue.db", "blobs_url": f"{scratch}/blobs",
                         "reload_interval_s": 0, "model_num_cpus": threads, "model_threads": threads,
                         **layout_serve_args(layout, extra)}),
              name="bench", route_prefix="/")
    bodies, ctype = make_requests(model_path)
    out: dict = {"request_bytes": int(np.mean([len(b) for b in bodies])), "levels": {}}
    url = f"http://127.0.0.1:{port}"
    try:
        for c in concurrencies:
            before = _batch_totals(url)
            row = _level(f"{url}/v1/tag", bodies, ctype, c, per_level, "multipart", seconds)
            after = _batch_totals(url)
            # images per model batch over the level (warm-up included), from /metrics
            row["mean_batch_size"] = (after[0] - before[0]) / max(after[1] - before[1], 1)
            out["levels"][str(c)] = row
            _say(f"deepindex ({layout})", c, "multipart", row)
        out["json_levels"] = _levels(f"{url}/v1/tag", bodies, ctype, concurrencies, per_level, "json", seconds)
        c = max(concurrencies)
        _say(f"deepindex ({layout})", c, "JSON", out["json_levels"][str(c)])
        # The ceiling of the data plane itself: GET /healthz (no body, no model) at the top level.
        lat, wall = http_load(f"{url}/healthz", [], "", c, max(per_level, 4 * c) // c * c, seconds=seconds)
        out["healthz_at_max_concurrency"] = {"requests_per_s": len(lat) / wall, "p50_ms": 1e3 * _pct(lat, 50)}
        out["replica_rss_gb"] = replica_rss_gb()
        console.event("deepindex (%s): resident memory per replica, GB: %s", layout, out["replica_rss_gb"])
    finally:
        serve.delete("bench")
        serve.shutdown()
        shutil.rmtree(scratch, ignore_errors=True)
    return out


def replica_rss_gb() -> dict[str, float]:
    """Resident memory of the benchmark application's replicas, by deployment (GB; the largest replica)."""
    import psutil

    out: dict[str, float] = {}
    for proc in psutil.process_iter(["cmdline", "memory_info"]):
        title = " ".join(proc.info.get("cmdline") or [])
        for deployment in ("Ingress", "ConceptModel", "IndexService", "MetricsHub"):
            if f"ServeReplica:bench:{deployment}" in title and proc.info.get("memory_info") is not None:
                rss = proc.info["memory_info"].rss / 1e9
                out[deployment] = round(max(out.get(deployment, 0.0), rss), 3)
    return out


def _level(url: str, bodies: list[bytes], ctype: str, c: int, per_level: int, body: str, seconds: float = 0.0
           ) -> dict[str, float]:
    """One concurrency level: ``c`` clients, at least ``per_level`` requests (4 per client) and ``seconds``."""
    n = max(per_level, 4 * c) // c * c
    lat, wall = http_load(url, bodies, ctype, c, n, body, seconds)
    return {"requests": len(lat), "seconds": wall, "images_per_s": len(lat) / wall, "p50_ms": 1e3 * _pct(lat, 50),
            "p99_ms": 1e3 * _pct(lat, 99)}


def _levels(url: str, bodies: list[bytes], ctype: str, concurrencies: list[int], per_level: int, body: str,
            seconds: float = 0.0) -> dict[str, dict[str, float]]:
    return {str(c): _level(url, bodies, ctype, c, per_level, body, seconds) for c in concurrencies}


def bench_peer(stack: str, model_path: str, concurrencies: list[int], per_level: int, threads: int,
               max_batch_size: int = 32, forward: str = "served", seconds: float = 0.0) -> dict:
    """``jobs/serve_peers.py STACK`` in its own process group (killed with it), both request bodies."""
    import os
    import signal
    import subprocess

    import requests

    from deepindex.net import free_port

    port = free_port()
    cmd = [sys.executable, str(Path(__file__).with_name("serve_peers.py")), stack, "--model", model_path,
           "--port", str(port), "--threads", str(threads), "--max-batch-size", str(max_batch_size),
           "--forward", forward]
    log_path = Path(tempfile.mkdtemp(prefix=f"bench-{stack}-")) / "server.log"
    with log_path.open("wb") as logf:
        proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, start_new_session=True,
                                env={**os.environ, "OMP_NUM_THREADS": str(threads)})
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                if requests.get(f"{url}/healthz", timeout=2).status_code == 200:
                    break
            except requests.RequestException:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{stack} did not come up; see {log_path}")
            time.sleep(0.5)
        bodies, ctype = make_requests(model_path)
        probe = requests.post(f"{url}/v1/tag", files={"images": ("image", bodies[0], ctype)}, timeout=60)
        if probe.status_code != 200 or proc.poll() is not None:
            raise RuntimeError(f"{stack} on {url}: HTTP {probe.status_code} {probe.text[:300]}; see {log_path}")
        out = {body: _levels(f"{url}/v1/tag", bodies, ctype, concurrencies, per_level, body, seconds)
               for body in ("multipart", "json")}
        top = max(concurrencies)
        for body in out:
            _say(stack, top, body, out[body][str(top)])
        return out
    finally:
        with contextlib.suppress(ProcessLookupError):  # the whole group: uvicorn's or LitServe's workers too
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)


def bench_tag(model: str, levels: list[int], per_level: int, threads: int, peers: list[str],
              layouts: list[str], extra: dict | None = None, peer_forward: str = "served",
              seconds: float = 0.0) -> dict:
    from deepindex import console

    bare = bench_bare(model, levels, threads)
    bare_eager = bench_bare(model, levels, threads, forward="eager")
    console.event("%s: the bare model, batches of %d: %.1f img/s (eager %.1f)", model, max(levels),
                  bare[str(max(levels))]["images_per_s"], bare_eager[str(max(levels))]["images_per_s"])
    served = {layout: bench_serve(model, levels, per_level, threads, layout, extra, seconds) for layout in layouts}
    top, one = str(max(levels)), str(min(levels))
    max_batch = int((extra or {}).get("max_batch_size", 32))  # the peers batch as deepindex does
    peer = {stack: bench_peer(stack, model, levels, per_level, threads, max_batch, peer_forward, seconds)
            for stack in peers}
    vs: dict = {}
    targets: dict = {}
    for layout, ours in served.items():
        bodies = {"multipart": ours["levels"], "json": ours["json_levels"]}
        for stack, got in peer.items():
            for body in ("multipart", "json"):
                vs[f"{layout}.{stack}.{body}"] = {
                    "throughput_ratio_at_max_concurrency": (bodies[body][top]["images_per_s"]
                                                            / got[body][top]["images_per_s"]),
                    "p50_ms_difference_at_concurrency_1": bodies[body][one]["p50_ms"] - got[body][one]["p50_ms"]}
        if "litserve" in peer:
            lit = vs[f"{layout}.litserve.multipart"]
            targets[f"{layout}: /v1/tag at {top} >= 1.0x LitServe"] = lit["throughput_ratio_at_max_concurrency"] >= 1.0
            targets[f"{layout}: p50 at {one} <= LitServe's + 3 ms"] = lit["p50_ms_difference_at_concurrency_1"] <= 3.0
        targets[f"{layout}: /v1/tag at {top} >= 0.9x the bare batched model"] = (
            ours["levels"][top]["images_per_s"] >= 0.9 * bare[top]["images_per_s"])
    return {
        "model": model, "serve": served, "bare_model": bare, "bare_model_eager": bare_eager,
        "peers_forward": peer_forward, "peers": peer, "deepindex_over_peers": vs,
        "targets_held": targets,
        "throughput_ratio_at_max_concurrency": {layout: ours["levels"][top]["images_per_s"] / bare[top]["images_per_s"]
                                                for layout, ours in served.items()},
        # What an endpoint doing no work at all would score: the bound the data plane puts on the ratio.
        "healthz_ratio_at_max_concurrency": {
            layout: ours["healthz_at_max_concurrency"]["requests_per_s"] / bare[top]["images_per_s"]
            for layout, ours in served.items()},
        "p50_overhead_ms": {layout: {c: v["p50_ms"] - bare[c]["p50_ms"] for c, v in ours["levels"].items()}
                            for layout, ours in served.items()},
        # What targets_held checks (issue 15); it said >= 0.7 and <= 10 ms here, from an older issue (found on review).
        "targets": {"throughput_ratio_at_max_concurrency": ">= 0.9", "litserve_throughput_ratio": ">= 1.0",
                    "p50_ms_over_litserve_at_concurrency_1": "<= 3"},
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", help="benchmark this checkpoint path or models:/ URI instead of the profiles")
    p.add_argument("--profiles", default=",".join(PROFILES), help=f"models to build and serve: {', '.join(PROFILES)}")
    p.add_argument("--concurrency", default="1,8,32")
    p.add_argument("--requests", type=int, default=0,
                   help="at least this many requests per concurrency level (and at least 4 per client)")
    p.add_argument("--seconds", type=float, default=5.0,
                   help="each concurrency level sends requests for at least this long")
    p.add_argument("--threads", type=int, default=1, help="CPUs/torch threads of the model replica and the bare model")
    p.add_argument("--peers", default="fastapi,litserve",
                   help="stacks to serve the same model beside deepindex (jobs/serve_peers.py); '' for none")
    p.add_argument("--peer-forward", choices=["served", "eager"], default="served",
                   help="the peers' model call: the optimized graph deepindex serves, or the plain model")
    add_layout_args(p)
    p.add_argument("--out", help="also write the JSON here")
    p.add_argument("-v", "--verbose", action="store_true", help="Ray's own output on the console too")
    args = p.parse_args(argv)
    layouts, extra = layout_args(p, args)

    from deepindex import console

    log_file = console.setup("bench-serve", args.verbose)  # Ray's internals go to the log file
    console.event("Ray's own output: %s", log_file)

    tmp = Path(tempfile.mkdtemp(prefix="bench-serve-"))  # the profiles' models (43 MB for ResNet-18)
    levels = [int(c) for c in args.concurrency.split(",")]
    report: dict = {"threads": args.threads, "serve_args": extra, "seconds_per_level": args.seconds, "tag": {}}
    try:
        models = {"given": args.model} if args.model else {
            prof: str(make_model(prof, tmp / prof)) for prof in args.profiles.split(",") if prof}
        for name, model in models.items():
            report["tag"][name] = bench_tag(model, levels, args.requests, args.threads,
                                            [x for x in args.peers.split(",") if x],
                                            layouts, extra, args.peer_forward, args.seconds)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    console.report(report, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
