"""Benchmark: Serve end to end vs the bare model, and FAISS vs numpy brute force.  JSON on stdout.

``python jobs/bench_serve.py [--model CKPT_OR_URI] [--out bench.json]``

1. ``POST /v1/tag`` (one PNG per request) at concurrency 1, 8 and 32 through Ray Serve over HTTP,
   against the bare model forward at batch 1, 8 and 32 in this process with as many torch threads
   as the model replica has CPUs.  Quoted as ratios: throughput at 32 / bare batched throughput
   (target >= 0.7), and the p50 overhead over the bare forward (target <= 10 ms).
2. Similar-item search: FAISS against numpy brute force on the same vectors: recall@10 and
   per-query latency, at 10k (the model's embeddings of a digit-scenes gallery) and 1M
   (clustered synthetic vectors).  Target at 1M: recall@10 >= 0.95 at >= 10x brute-force speed.

Both sides of each comparison run in the same process on the same machine; absolute times from a
shared CPU box are noise, the ratios are the result.
"""
from __future__ import annotations

import argparse
import json
import logging
import socket
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
log = logging.getLogger("bench_serve")


def _pct(xs, q) -> float:
    return float(np.percentile(np.asarray(xs), q)) if len(xs) else float("nan")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def bench_bare(model_path: str, batch_sizes: list[int], threads: int, seconds: float = 2.0) -> dict:
    import torch

    from deepindex.checkpoint import load_model
    from deepindex.index.embed import infer_unit

    torch.set_num_threads(threads)
    lm = load_model(model_path)
    d = lm.config.data
    out = {}
    for b in batch_sizes:
        x = np.random.default_rng(0).random((b, d.channels, d.image_size, d.image_size), dtype=np.float32)
        for _ in range(5):
            infer_unit(lm, x)
        times = []
        end = time.perf_counter() + seconds
        while time.perf_counter() < end or len(times) < 20:
            t = time.perf_counter()
            infer_unit(lm, x)  # the same call the replica makes: normalise + forward + probabilities
            times.append(time.perf_counter() - t)
        out[str(b)] = {"p50_ms": 1e3 * _pct(times, 50), "p99_ms": 1e3 * _pct(times, 99),
                       "images_per_s": b / float(np.mean(times))}
    return out


def bench_serve(model_path: str, concurrencies: list[int], per_level: int, threads: int) -> dict:
    import requests
    from ray import serve

    from deepindex.cluster import connect
    from deepindex.index.collection import digit_gallery

    sys.path.insert(0, str(REPO))
    from serving.app import build_app

    connect()
    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app({"model": model_path, "index_dir": None, "reload_interval_s": 0, "max_batch_size": 32,
                         "batch_wait_timeout_s": 0.002, "model_num_cpus": threads, "model_threads": threads}),
              name="bench", route_prefix="/")
    url = f"http://127.0.0.1:{port}/v1/tag"
    import io

    from PIL import Image

    g = digit_gallery(64, seed=3)
    pngs = []
    for im in g.images:
        buf = io.BytesIO()
        Image.fromarray((im[0] * 255).astype(np.uint8)).save(buf, format="PNG")
        pngs.append(buf.getvalue())
    out = {}
    try:
        for c in concurrencies:
            n = max(per_level, 4 * c)
            sessions = [requests.Session() for _ in range(c)]

            def one(i: int) -> float:
                t = time.perf_counter()
                r = sessions[i % c].post(url, files={"images": ("a.png", pngs[i % len(pngs)])}, timeout=60)
                r.raise_for_status()
                return time.perf_counter() - t

            with ThreadPoolExecutor(c) as pool:
                list(pool.map(one, range(2 * c)))  # warm-up: connections, replica, batching
                start = time.perf_counter()
                lat = list(pool.map(one, range(n)))
                wall = time.perf_counter() - start
            out[str(c)] = {"requests": n, "images_per_s": n / wall, "p50_ms": 1e3 * _pct(lat, 50),
                           "p99_ms": 1e3 * _pct(lat, 99)}
            log.info("serve concurrency %d: %s", c, out[str(c)])
    finally:
        serve.delete("bench")
        serve.shutdown()
    return out


def bench_search(base: np.ndarray, queries: np.ndarray, cfg, label: str, single: int = 20) -> dict:
    from deepindex.index.metrics import recall_at_k
    from deepindex.index.vectors import VectorIndex, brute_force

    t = time.perf_counter()
    vi = VectorIndex.build(base, cfg)
    build_s = time.perf_counter() - t
    t = time.perf_counter()
    _, truth = brute_force(base, queries, 10, cfg.metric, cfg.normalize)
    brute_batch = (time.perf_counter() - t) / len(queries)
    t = time.perf_counter()
    _, found = vi.search(queries, 10)
    faiss_batch = (time.perf_counter() - t) / len(queries)
    # One query at a time: what a request sees.
    bl, fl = [], []
    for q in queries[:single]:
        t = time.perf_counter()
        brute_force(base, q[None], 10, cfg.metric, cfg.normalize)
        bl.append(time.perf_counter() - t)
        t = time.perf_counter()
        vi.search(q[None], 10)
        fl.append(time.perf_counter() - t)
    res = {"items": len(base), "queries": len(queries), "dim": int(base.shape[1]), "kind": vi.kind,
           "metric": cfg.metric, "build_s": build_s, "recall_at_10": recall_at_k(found, truth, 10),
           "faiss_ms_per_query_batched": 1e3 * faiss_batch, "brute_ms_per_query_batched": 1e3 * brute_batch,
           "faiss_p50_ms_single": 1e3 * _pct(fl, 50), "brute_p50_ms_single": 1e3 * _pct(bl, 50),
           "speedup_batched": brute_batch / faiss_batch, "speedup_single": _pct(bl, 50) / _pct(fl, 50)}
    if vi.kind == "ivf":
        res["ivf_nlist"], res["ivf_nprobe"] = int(vi.index.nlist), int(vi.index.nprobe)
    if vi.kind == "hnsw":
        res["hnsw_m"], res["hnsw_ef_search"] = cfg.hnsw_m, cfg.hnsw_ef_search
    log.info("%s: %s", label, res)
    return res


def clustered(n: int, d: int, centers: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    c = rng.normal(size=(centers, d)).astype(np.float32)
    x = np.empty((n, d), np.float32)
    for s in range(0, n, 100_000):  # in chunks: the noise of 1M x d in float64 at once is large
        m = min(100_000, n - s)
        x[s : s + m] = c[rng.integers(centers, size=m)] + 0.5 * rng.normal(size=(m, d)).astype(np.float32)
    return x


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", help="checkpoint path or models:/ URI (default: train a small model first)")
    p.add_argument("--concurrency", default="1,8,32")
    p.add_argument("--requests", type=int, default=200, help="requests per concurrency level (at least 4x it)")
    p.add_argument("--threads", type=int, default=1, help="CPUs/torch threads of the model replica and the bare model")
    p.add_argument("--gallery", type=int, default=10_000, help="items of the real-embedding search benchmark")
    p.add_argument("--large", type=int, default=1_000_000, help="items of the synthetic search benchmark (0: skip)")
    p.add_argument("--large-queries", type=int, default=100)
    p.add_argument("--skip-serve", action="store_true")
    p.add_argument("--out", help="also write the JSON here")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    from deepindex.index.vectors import VectorConfig

    model = args.model
    if model is None:
        from deepindex.index.tiny import train_small

        model = str(train_small(tempfile.mkdtemp(prefix="bench-model-"))[0].parent)
    levels = [int(c) for c in args.concurrency.split(",")]
    report: dict = {"model": model, "threads": args.threads}

    if not args.skip_serve:
        bare = bench_bare(model, levels, args.threads)
        served = bench_serve(model, levels, args.requests, args.threads)
        top = str(max(levels))
        report["tag"] = {
            "serve": served, "bare_model": bare,
            "throughput_ratio_at_max_concurrency": served[top]["images_per_s"] / bare[top]["images_per_s"],
            "p50_overhead_ms": {c: served[c]["p50_ms"] - bare[c]["p50_ms"] for c in served},
            "targets": {"throughput_ratio_at_32": ">= 0.7", "p50_overhead_ms": "<= 10"},
        }

    # Similar-item search on the model's own embeddings of a digit-scenes gallery.
    from deepindex.checkpoint import load_model
    from deepindex.index.collection import digit_gallery
    from deepindex.index.embed import embed_collection_local
    from deepindex.index.source import resolve_model

    lm = load_model(resolve_model(model).checkpoint_path)
    d = lm.config.data
    _, emb, _ = embed_collection_local(lm, digit_gallery(args.gallery, d.image_size, d.max_digits, seed=0))
    _, q_emb, _ = embed_collection_local(lm, digit_gallery(200, d.image_size, d.max_digits, seed=1))
    report["search"] = {
        "10k_flat": bench_search(emb, q_emb, VectorConfig(kind="flat"), "10k flat"),
        "10k_hnsw": bench_search(emb, q_emb, VectorConfig(kind="hnsw"), "10k hnsw"),
    }
    if args.large:
        dim = emb.shape[1]
        base = clustered(args.large, dim, 1000, seed=0)
        queries = clustered(args.large_queries, dim, 1000, seed=0)[: args.large_queries]  # same centres
        queries += 0.1 * np.random.default_rng(1).normal(size=queries.shape).astype(np.float32)
        cfg = VectorConfig(kind="ivf", ivf_nlist=1024, ivf_nprobe=16)
        r = bench_search(base, queries, cfg, "1M ivf", single=10)
        r["target"] = "recall@10 >= 0.95 at >= 10x brute force"
        r["meets_target"] = bool(r["recall_at_10"] >= 0.95 and r["speedup_single"] >= 10 and r["speedup_batched"] >= 10)
        report["search"]["1M_ivf"] = r
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
