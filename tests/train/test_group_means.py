"""The epoch's training loss of a data-parallel run is the whole group's, not rank 0's shard's.

Two real gloo processes (torch.distributed, as Ray Train's workers run): each reports its own shard's
mean loss and image count, and every rank ends with the mean over all the images.
"""
from __future__ import annotations

import multiprocessing as mp

import pytest

from deepindex.net import free_port

pytestmark = pytest.mark.timeout(120)

SHARDS = [{"train_loss": 1.0, "train_penalty": 0.5, "train_images": 10.0, "images_per_s": 7.0},
          {"train_loss": 3.0, "train_penalty": 0.0, "train_images": 30.0, "images_per_s": 9.0}]


def _rank(rank: int, port: int, out: mp.Queue) -> None:  # type: ignore[type-arg]
    import torch.distributed as dist

    from deepindex.train.worker import group_train_means

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=len(SHARDS))
    try:
        out.put((rank, group_train_means(SHARDS[rank])))
    finally:
        dist.destroy_process_group()


def test_the_train_loss_is_the_mean_over_every_ranks_images():
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_rank, args=(r, port, out)) for r in range(len(SHARDS))]
    for p in procs:
        p.start()
    try:
        got = dict(out.get(timeout=90) for _ in procs)
    finally:
        for p in procs:
            p.join(30)
            if p.is_alive():
                p.kill()
    for rank in range(len(SHARDS)):
        m = got[rank]
        assert m["train_loss"] == pytest.approx((1.0 * 10 + 3.0 * 30) / 40)  # 2.5, not rank 0's 1.0
        assert m["train_penalty"] == pytest.approx(0.5 * 10 / 40)
        assert m["train_images"] == SHARDS[rank]["train_images"] and m["images_per_s"] == SHARDS[rank]["images_per_s"]
