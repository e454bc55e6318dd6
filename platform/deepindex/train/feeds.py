"""What a Train worker trains and validates on: batches of (x normalised (B, C, S, S), target).

- :class:`LocalFeed` (``data.pipeline=local``, and the in-memory digit datasets and CIFAR): every
  worker builds the splits itself (:func:`deepindex.data.build_splits`) and reads its part of each
  epoch through a ``DistributedSampler`` reshuffled per epoch;
- :class:`RayDataFeed` (``data.pipeline=ray``): the worker's shard of the decoded cache, from
  ``ray.train.get_dataset_shard`` (:mod:`deepindex.data.ingest` built the datasets on the driver),
  iterated with ``iter_torch_batches``: a local shuffle buffer seeded by (train.seed, epoch, rank),
  then augmentation (``data.augment``) on the uint8 images and normalisation, in the worker.

Either way a rank validates a strided 1/world of the validation split; the worker gathers the rest.
"""
from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import torch
from ray.data.collate_fn import NumpyBatchCollateFn
from torch.utils.data import DataLoader, DistributedSampler, Subset

from deepindex.data.transforms import NormStats, normalize

if TYPE_CHECKING:
    from ray.data import DataIterator

    from deepindex.config import Config
    from deepindex.data.augment import Transform
    from deepindex.train.precision import Precision

Batch = tuple[torch.Tensor, torch.Tensor]  # x (B, C, S, S) normalised, target (B,) | (B, K)
_Collated = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # x, target, item index (B,)
_SHUFFLE_BYTES = 128 << 20  # pixel bytes a worker's local shuffle buffer may hold
_VAL_BATCH = 256


class Feed:
    """The data a worker needs: the dataset's description, training batches per epoch, validation batches."""

    concepts: list[str]
    multilabel: bool
    stats: NormStats
    channels: int
    report: str | None = None  # the import report's summary (unknown tags, duplicates)
    rows_read: np.ndarray | None = None  # train item indices this rank trained on in its last epoch

    def train_batches(self, epoch: int) -> Iterable[Batch]:
        raise NotImplementedError

    def val_batches(self) -> Iterable[Batch]:
        raise NotImplementedError


class LocalFeed(Feed):
    """The splits built in the worker; a DistributedSampler shards and reshuffles each epoch."""

    def __init__(self, cfg: Config, rank: int, world: int, precision: Precision) -> None:
        from deepindex.data import build_splits, split_len

        splits = build_splits(cfg.data)
        self.concepts, self.multilabel, self.stats = splits.concepts, splits.multilabel, splits.stats
        self.channels = splits.channels
        self.report = splits.report.summary() if splits.report is not None else None
        per_worker_batch = max(1, cfg.train.batch_size // world)  # the global batch is split
        self.sampler: DistributedSampler[int] = DistributedSampler(splits.train, num_replicas=world, rank=rank,
                                                                   shuffle=True, seed=cfg.train.seed)
        self.train_loader = DataLoader(splits.train, batch_size=per_worker_batch, sampler=self.sampler,
                                       num_workers=cfg.data.num_workers, drop_last=True,
                                       pin_memory=precision.pin_memory)
        # Each rank scores a strided shard of the validation split; all_gather puts it back together.
        self.val_loader = DataLoader(Subset(splits.val, range(rank, split_len(splits.val), world)),
                                     batch_size=_VAL_BATCH, pin_memory=precision.pin_memory)

    def train_batches(self, epoch: int) -> Iterable[Batch]:
        self.sampler.set_epoch(epoch)  # a new shuffle every epoch, the same on every rank
        return self.train_loader

    def val_batches(self) -> Iterable[Batch]:
        return self.val_loader


class UInt8Collate(NumpyBatchCollateFn):
    """A Ray Data batch {index, image (B, C, S, S) uint8, label} -> (x normalised, label, index).

    ``transform`` (train-time augmentation) runs image by image on uint8, as the local path's
    datasets do; ``stride=(rank, world)`` keeps the items whose index is rank modulo world.
    """

    def __init__(self, stats: NormStats, transform: Transform | None = None,
                 stride: tuple[int, int] | None = None) -> None:
        self.stats, self.transform, self.stride = stats, transform, stride

    # Any: NumpyBatchCollateFn declares its result as an unbound type variable.
    def __call__(self, batch: dict[str, np.ndarray]) -> Any:
        index, images, labels = batch["index"], batch["image"], batch["label"]
        if self.stride is not None:
            rank, world = self.stride
            m = index % world == rank
            index, images, labels = index[m], images[m], labels[m]
        u8 = torch.from_numpy(np.array(images, dtype=np.uint8))  # (B, C, S, S); a copy: Arrow's buffers are read-only
        if self.transform is not None:
            u8 = torch.stack([self.transform(im) for im in u8]) if len(u8) else u8
        x = normalize(u8.float().div_(255.0), self.stats)  # the [0, 1] pixels of uint8_to_unit, normalised
        return x, torch.from_numpy(np.array(labels)), torch.from_numpy(np.array(index, dtype=np.int64))


class RayDataFeed(Feed):
    """A worker's shard of the decoded cache (``plan`` from :func:`deepindex.data.ingest.prepare_ingest`)."""

    def __init__(self, plan: dict[str, Any], cfg: Config, rank: int, world: int, precision: Precision,
                 train: DataIterator, val: DataIterator) -> None:
        from deepindex.data.augment import build_augment

        self.concepts, self.multilabel = list(plan["concepts"]), bool(plan["multilabel"])
        self.stats, self.channels = NormStats.from_dict(plan["stats"]), int(plan["channels"])
        self.report = plan.get("report")
        self.rank, self.world, self.seed = rank, world, cfg.train.seed
        self.train_it, self.val_it = train, val
        self.batch = max(1, cfg.train.batch_size // world)  # the global batch is split
        image_bytes = int(plan["channels"]) * int(plan["image_size"]) ** 2
        shard = max(1, int(plan["train_rows"]) // world)
        self.shuffle_buffer = max(self.batch, min(shard, _SHUFFLE_BYTES // image_bytes))
        self.pin_memory = precision.pin_memory
        self.train_collate = UInt8Collate(self.stats, build_augment(cfg.data.augment, cfg.data.augment_strength,
                                                                    int(plan["image_size"])))
        self.val_collate = UInt8Collate(self.stats, None, (rank, world))

    def train_batches(self, epoch: int) -> Iterator[Batch]:
        # Blocks come in a new random order every epoch (the dataset's randomize_block_order); rows are
        # shuffled within a buffer, seeded by (seed, epoch, rank): reproducible, different every epoch.
        seed = int(np.random.SeedSequence([self.seed, epoch, self.rank]).generate_state(1)[0])
        read: list[torch.Tensor] = []
        # drop_last: the shards hold equal row counts, so every rank takes the same number of steps (DDP).
        for batch in self.train_it.iter_torch_batches(
                batch_size=self.batch, drop_last=True, collate_fn=self.train_collate, device="cpu",
                local_shuffle_buffer_size=self.shuffle_buffer, local_shuffle_seed=seed, pin_memory=self.pin_memory):
            x, y, index = cast(_Collated, batch)
            read.append(index)
            yield x, y
        self.rows_read = torch.cat(read).numpy() if read else np.zeros(0, dtype=np.int64)

    def val_batches(self) -> Iterator[Batch]:
        for batch in self.val_it.iter_torch_batches(batch_size=_VAL_BATCH, collate_fn=self.val_collate,
                                                    device="cpu", pin_memory=self.pin_memory):
            x, y, _ = cast(_Collated, batch)
            if len(x):
                yield x, y
