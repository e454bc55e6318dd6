"""Benchmark: the Ray Train loop (N workers, DDP) against a plain single-process PyTorch loop.

Same model, data, global batch and total threads, measured in the same run; prints JSON with
both throughputs (images/s over the epochs after the first, which warms up), their ratio,
and Ray's start-up time to the first batch.

    python jobs/bench_train.py [--epochs 3] [key=value ...]
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import torch


def plain_loop(cfg, epochs: int, threads: int) -> list[float]:
    from deepindex.train.engine import local_training

    torch.set_num_threads(threads)
    run = local_training(cfg)
    return [run.epoch(e)["images_per_s"] for e in range(epochs)]


def ray_loop(cfg, epochs: int) -> tuple[list[float], float, float]:
    import ray

    from deepindex.cluster import connect
    from deepindex.train.trainer import build_trainer

    t0 = time.time()
    connect()
    init_s = time.time() - t0
    result = build_trainer(cfg, name=f"bench-{int(t0)}").fit()
    history = result.return_value or []
    first_batch_s = history[0]["epoch_start_time"] - t0 if history else float("nan")
    ray.shutdown()
    return [h["images_per_s"] for h in history], init_s, first_batch_s


def _steady(xs: list[float]) -> float:
    rest = xs[1:] if len(xs) > 1 else xs
    return sum(rest) / len(rest)


def main(argv: list[str] | None = None) -> dict:
    from deepindex.config import load_config

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("overrides", nargs="*", metavar="key=value")
    args = ap.parse_args(argv)
    # No validation-heavy defaults: the benchmark is about the training loop.
    cfg = load_config(None, ["data.train_size=8000", "data.val_size=500", "data.test_size=100",
                             f"train.epochs={args.epochs}", "ray.num_workers=2", "train.threads=1",
                             "ray.max_failures=0", *args.overrides])
    total_threads = cfg.ray.num_workers * (cfg.train.threads or max(1, int(cfg.ray.cpus_per_worker)))
    ray_ips, init_s, first_batch_s = ray_loop(cfg, args.epochs)
    plain_ips = plain_loop(cfg, args.epochs, total_threads)
    out = {
        "model": cfg.model.name, "dataset": cfg.data.dataset, "train_images": cfg.data.train_size,
        "global_batch": cfg.train.batch_size, "workers": cfg.ray.num_workers, "total_threads": total_threads,
        "plain_images_per_s": round(_steady(plain_ips), 1),
        "ray_images_per_s": round(_steady(ray_ips), 1),
        "ratio_ray_over_plain": round(_steady(ray_ips) / _steady(plain_ips), 3),
        "ray_init_s": round(init_s, 2),
        "ray_start_to_first_batch_s": round(first_batch_s, 2),
        "per_epoch": {"plain": [round(x, 1) for x in plain_ips], "ray": [round(x, 1) for x in ray_ips]},
    }
    print(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    main(sys.argv[1:])
