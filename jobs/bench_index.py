"""Benchmark: similar-item search, FAISS against numpy brute force on the same vectors.  JSON on stdout.

``python jobs/bench_index.py [--model CKPT_OR_URI] [--gallery 10000] [--large 1000000] [--out bench.json]``

Recall@10 and per-query latency (one query at a time, as a request sees it, and batched), at 10k
(a digit model's embeddings of a digit-scenes gallery: exact and HNSW) and 1M (clustered synthetic
vectors, IVF).  Target at 1M: recall@10 >= 0.95 at >= 10x brute-force speed.  Both sides run in
the same process on the same vectors; the ratios are the result.
"""
from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

log = logging.getLogger("bench_index")


def _pct(xs: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(xs), q)) if len(xs) else float("nan")


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
    p.add_argument("--model", help="the checkpoint path or models:/ URI whose embeddings are searched "
                                   "(default: the small digit-scenes model, trained here in seconds)")
    p.add_argument("--gallery", type=int, default=10_000, help="items of the real-embedding search benchmark")
    p.add_argument("--large", type=int, default=1_000_000, help="items of the synthetic search benchmark (0: skip)")
    p.add_argument("--large-queries", type=int, default=100)
    p.add_argument("--out", help="also write the JSON here")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    from deepindex.checkpoint import load_model
    from deepindex.index.collection import digit_gallery
    from deepindex.index.embed import embed_collection_local
    from deepindex.index.tiny import train_small
    from deepindex.index.vectors import VectorConfig
    from deepindex.tracking.registry import resolve_model

    model = args.model or str(train_small(Path(tempfile.mkdtemp(prefix="bench-index-")))[0])
    lm = load_model(resolve_model(model).checkpoint_path)
    d = lm.config.data
    # Similar-item search on a digit model's own embeddings of a digit-scenes gallery.
    _, emb, _ = embed_collection_local(lm, digit_gallery(args.gallery, d.image_size, d.max_digits, seed=0))
    _, q_emb, _ = embed_collection_local(lm, digit_gallery(200, d.image_size, d.max_digits, seed=1))
    report: dict = {"search": {
        "10k_flat": bench_search(emb, q_emb, VectorConfig(kind="flat"), "10k flat"),
        "10k_hnsw": bench_search(emb, q_emb, VectorConfig(kind="hnsw"), "10k hnsw"),
    }}
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
    from deepindex.console import report as emit

    emit(report, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
