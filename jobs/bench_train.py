"""Benchmark: the Ray Train loop (N workers, DDP) against the two loops a user would run instead.

- **plain**: one process, the same model, data and global batch, with all the workers' threads;
- **torchrun**: ``torch.distributed.run`` with N processes, gloo DDP, the same per-worker data feed,
  model, global batch and threads per process (what a user picks for data parallelism without Ray).

Each loop runs ``--runs`` times (median reported), in the same run of this script, the order turning
each round so that no loop always runs first or last.  Steady state is
images/s over the epochs after the first (which warms up).  Start-up is the time from the call that
starts training (``trainer.fit()``; torchrun's launch) to the first batch, with Ray's broken down by
where it goes (worker processes, entry into the training function, data, DDP).  Then the targets of
issue 15 and whether each holds:

    python jobs/bench_train.py [--epochs 3] [--runs 3] [--time-to-quality] [-v] [key=value ...]

Progress goes to stderr, the JSON report to stdout, Ray's own output to the log file it names (``-v``: the
console too).

``--time-to-quality`` also runs ``deepindex train data.dataset=digits`` end to end (command start to
checkpoint, its own test split scored) and reports the seconds and the top-1 error.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

STARTUP_TARGET_S = 10.0  # trainer.fit() to the first batch
STEADY_TARGET = 0.95  # Ray's steady images/s over the faster baseline's
QUALITY_TARGET_S = 60.0  # `deepindex train data.dataset=digits`, command start to checkpoint
QUALITY_FLOOR = 0.015  # top-1 error on the digits test split


def _steady(xs: list[float]) -> float:
    rest = xs[1:] if len(xs) > 1 else xs
    return sum(rest) / len(rest)


# ---- the three loops ---------------------------------------------------------------------------
def plain_loop(cfg: Any, threads: int) -> dict[str, Any]:
    from deepindex.train.engine import local_training

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        t0 = time.time()
        run = local_training(cfg)
        start = time.time() - t0
        ips = [run.epoch(e)["images_per_s"] for e in range(cfg.train.epochs)]
    finally:
        torch.set_num_threads(before)
    return {"per_epoch": ips, "start_to_first_batch_s": start}


def ray_loop(cfg: Any) -> dict[str, Any]:
    from deepindex.train.trainer import build_trainer

    trainer = build_trainer(cfg, name=f"bench-{time.time_ns()}")
    t0 = time.time()
    result = trainer.fit()
    history = result.return_value or []
    if not history:
        raise RuntimeError("bench_train: the Ray run returned no per-epoch history")
    first = history[0]
    # Where fit()'s start-up went, in seconds from fit() (rank 0's worker).
    phases = {
        "worker_process_started": first["process_start_time"] - t0,
        "training_function_entered": first["loop_entry_time"] - t0,
        "data_ready": first["data_ready_time"] - t0,
        "ddp_model_ready": first["model_ready_time"] - t0,
        "first_batch": first["epoch_start_time"] - t0,
    }
    return {"per_epoch": [h["images_per_s"] for h in history], "start_to_first_batch_s": phases["first_batch"],
            "startup_phases_s": phases}


def torchrun_loop(cfg: Any, overrides: list[str]) -> dict[str, Any]:
    """torchrun with ``ray.num_workers`` processes on this machine, in their own process group (killed
    with it, so nothing outlives the measurement)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "torchrun.json"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc-per-node={cfg.ray.num_workers}", __file__, "--torchrun-worker", str(out), *overrides]
        env = {**os.environ, "OMP_NUM_THREADS": str(cfg.train.threads or 1)}
        t0 = time.time()
        proc = subprocess.Popen(cmd, env=env, start_new_session=True, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
        try:
            log, _ = proc.communicate(timeout=1800)
        finally:
            with contextlib.suppress(ProcessLookupError):  # the group may be gone already
                os.killpg(proc.pid, signal.SIGKILL)
        if proc.returncode != 0 or not out.exists():
            raise RuntimeError(f"bench_train: torchrun failed (exit {proc.returncode}):\n{log[-3000:]}")
        history = json.loads(out.read_text())
    return {"per_epoch": [h["images_per_s"] for h in history],
            "start_to_first_batch_s": history[0]["epoch_start_time"] - t0}


def torchrun_worker(cfg: Any, out: str) -> None:
    """One torchrun process: what the Ray worker does per epoch (the same feed, model, DDP, SGD step)."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from deepindex.data.inspect import resolve_config
    from deepindex.models import build_model
    from deepindex.train.engine import train_one_epoch
    from deepindex.train.feeds import LocalFeed
    from deepindex.train.losses import Penalty, make_loss
    from deepindex.train.optim import build_optimizer
    from deepindex.train.precision import Precision

    cfg = resolve_config(cfg)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    dist.init_process_group("gloo")
    torch.manual_seed(cfg.train.seed + rank)
    torch.set_num_threads(cfg.train.threads or 1)
    precision = Precision.from_config(cfg.train, "cpu")
    feed = LocalFeed(cfg, rank, world, precision)
    model = DistributedDataParallel(precision.prepare_model(build_model(cfg.model, len(feed.concepts),
                                                                        feed.channels)))
    optimizer = build_optimizer(model, cfg.optim)
    loss_fn, penalty = make_loss(feed.multilabel, cfg.train), Penalty(cfg.regularization)
    history = []
    for epoch in range(cfg.train.epochs):
        start = time.time()
        m = train_one_epoch(model, feed.train_batches(epoch), optimizer, loss_fn, penalty, epoch)
        history.append({"images_per_s": m["images_per_s"] * world, "epoch_start_time": start})
    if rank == 0:
        Path(out).write_text(json.dumps(history))
    dist.destroy_process_group()


# ---- time to quality ---------------------------------------------------------------------------
def time_to_quality() -> dict[str, Any]:
    """`deepindex train data.dataset=digits` as a user runs it (its own local cluster), timed from the
    command's start to its exit (checkpoint written, test split scored)."""
    with tempfile.TemporaryDirectory() as home:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "MLFLOW_"))}
        env["DEEPINDEX_HOME"] = home
        cmd = [str(Path(sys.executable).parent / "deepindex"), "train", "data.dataset=digits"]
        t0 = time.time()
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800, start_new_session=True)
        seconds = time.time() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"bench_train: `deepindex train` failed:\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
    lines = proc.stdout.splitlines()
    start = max(i for i, line in enumerate(lines) if line == "{")  # the command's result, printed last
    err = float(json.loads("\n".join(lines[start:]))["test"]["test_top1_error"])
    return {"seconds": round(seconds, 1), "test_top1_error": round(err, 4),
            "holds": seconds <= QUALITY_TARGET_S and err <= QUALITY_FLOOR}


# ---- the report --------------------------------------------------------------------------------
def _median(runs: list[dict[str, Any]], key: str) -> float:
    return statistics.median(r[key] for r in runs)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    from deepindex.config import load_config

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--runs", type=int, default=3, help="runs of each loop; medians are reported")
    ap.add_argument("--time-to-quality", action="store_true", help="also time `deepindex train data.dataset=digits`")
    ap.add_argument("--torchrun-worker", metavar="OUT", help=argparse.SUPPRESS)
    ap.add_argument("-v", "--verbose", action="store_true", help="Ray's own output on the console too")
    ap.add_argument("overrides", nargs="*", metavar="key=value")
    args = ap.parse_args(argv)
    # No validation-heavy defaults: the benchmark is about the training loop.
    overrides = ["data.train_size=8000", "data.val_size=500", "data.test_size=100", f"train.epochs={args.epochs}",
                 "ray.num_workers=2", "train.threads=1", "ray.max_failures=0", *args.overrides]
    cfg = load_config(None, overrides)
    if args.torchrun_worker:
        torchrun_worker(cfg, args.torchrun_worker)
        return {}

    import ray

    from deepindex import console
    from deepindex.cluster import own_cluster

    log_file = console.setup("bench-train", args.verbose)  # Ray's internals go to the log file, not the console
    print(f"log: {log_file}", file=sys.stderr, flush=True)
    total_threads = cfg.ray.num_workers * (cfg.train.threads or max(1, int(cfg.ray.cpus_per_worker)))
    t0 = time.time()
    own_cluster()
    init_s = time.time() - t0
    runs: dict[str, list[dict[str, Any]]] = {"ray": [], "torchrun": [], "plain": []}
    loops: dict[str, Callable[[], dict[str, Any]]] = {
        "ray": lambda: ray_loop(cfg), "torchrun": lambda: torchrun_loop(cfg, overrides),
        "plain": lambda: plain_loop(cfg, total_threads)}
    try:
        for i in range(args.runs):
            # The order turns each round (ray first, then torchrun first, then plain first): over 3 runs every
            # loop takes every place once, so a machine that warms up or slows down over the run favours none.
            names = list(runs)
            for name in names[i % len(names):] + names[:i % len(names)]:
                print(f"run {i + 1}/{args.runs}: {name}", file=sys.stderr, flush=True)
                runs[name].append(loops[name]())
    finally:
        ray.shutdown()
    for rs in runs.values():
        for r in rs:
            r["steady"] = _steady(r["per_epoch"])
    steady = {k: _median(rs, "steady") for k, rs in runs.items()}
    startup = {k: _median(rs, "start_to_first_batch_s") for k, rs in runs.items()}
    faster = max(("plain", "torchrun"), key=lambda k: steady[k])
    phases = {p: round(statistics.median(r["startup_phases_s"][p] for r in runs["ray"]), 2)
              for p in runs["ray"][0]["startup_phases_s"]}
    out: dict[str, Any] = {
        "model": cfg.model.name, "dataset": cfg.data.dataset, "train_images": cfg.data.train_size,
        "global_batch": cfg.train.batch_size, "workers": cfg.ray.num_workers, "total_threads": total_threads,
        "runs": args.runs,
        "images_per_s": {k: round(v, 1) for k, v in steady.items()},
        "start_to_first_batch_s": {k: round(v, 2) for k, v in startup.items()},
        "ray_init_s": round(init_s, 2),
        "ray_startup_phases_s": phases,
        "ratio_ray_over_plain": round(steady["ray"] / steady["plain"], 3),
        "ratio_ray_over_torchrun": round(steady["ray"] / steady["torchrun"], 3),
        "targets": {
            f"ray fit() to first batch <= {STARTUP_TARGET_S:.0f} s": startup["ray"] <= STARTUP_TARGET_S,
            f"ray steady >= {STEADY_TARGET}x the faster baseline ({faster})":
                steady["ray"] >= STEADY_TARGET * steady[faster],
        },
        "per_epoch": {k: [[round(x, 1) for x in r["per_epoch"]] for r in rs] for k, rs in runs.items()},
    }
    if args.time_to_quality:
        print("time to quality: deepindex train data.dataset=digits", file=sys.stderr, flush=True)
        ttq = time_to_quality()
        out["time_to_quality"] = ttq
        out["targets"][f"digits to {QUALITY_FLOOR:.1%} top-1 error in <= {QUALITY_TARGET_S:.0f} s"] = ttq["holds"]
    print(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    main(sys.argv[1:])
