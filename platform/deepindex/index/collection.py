"""The collections an index is built from.

- ``digit-scenes``: the default gallery, ``n`` scenes drawn from the *test* glyphs (handwriting
  the model never saw), labels known, so retrieval quality can be measured;
- ``image-folder``: ``root/<class>/<image>``, ids are paths relative to the root;
- ``manifest``: a CSV/JSONL tag manifest (paths relative to ``root``), tags read against the
  model's concept list;
- any other name: that collection of the catalogue (:mod:`deepindex.collection`, what ``deepindex
  serve --collection NAME`` indexes), its live items with their stored bytes and tags.

A collection yields model-ready unit images ``(C, S, S)`` in [0, 1] by row, lazily for files,
so a Ray Data actor can load only its own rows.
"""
from __future__ import annotations

import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from deepindex.data.transforms import decode_file, uint8_to_unit

if TYPE_CHECKING:
    from deepindex.collection.blobs import BlobStore

KINDS = ("digit-scenes", "image-folder", "manifest")


@dataclass
class Collection:
    name: str
    ids: list[str]
    image_size: int
    channels: int
    images: np.ndarray | None = None  # (N, C, S, S) float32 in [0, 1], in memory
    paths: list[str] | None = None  # or files read on demand
    hashes: list[str] | None = None  # or stored bytes (a catalogue collection's), read on demand ...
    blobs: BlobStore | None = None  # ... from here
    labels: list[list[str]] | None = None  # known tags per item (metadata, and relevance for metrics)
    meta: dict[str, Any] = field(default_factory=dict)
    preset: str | None = None  # the model's eval preset (deepindex.data.transforms.PRESETS)

    def __len__(self) -> int:
        return len(self.ids)

    def unit_images(self, rows: np.ndarray) -> np.ndarray:
        """(B, C, S, S) float32 in [0, 1] for the given rows: the eval preset before normalising."""
        if self.images is not None:
            return self.images[rows]
        out = np.empty((len(rows), self.channels, self.image_size, self.image_size), dtype=np.float32)
        for j, r in enumerate(rows):
            out[j] = uint8_to_unit(decode_file(self._source(int(r)), self.image_size, self.channels, self.preset))
        return out

    def _source(self, row: int) -> str | io.BytesIO:
        if self.paths is not None:
            return self.paths[row]
        assert self.hashes is not None and self.blobs is not None, "a collection holds its images, paths or hashes"
        return io.BytesIO(self.blobs.get(self.hashes[row]))

    def item_meta(self, row: int) -> dict[str, Any]:
        m: dict[str, Any] = {}
        if self.labels is not None:
            m["labels"] = self.labels[row]
        if self.paths is not None:
            m["path"] = self.paths[row]
        if self.hashes is not None:
            m["content_hash"] = self.hashes[row]
        return m


def digit_gallery(n: int, image_size: int = 32, max_digits: int = 4, seed: int = 0) -> Collection:
    """``n`` digit-scenes from the test glyphs; ids ``scene-000000``..."""
    from deepindex.data.digits import make_scenes

    s = make_scenes("test", n, image_size=image_size, max_digits=max_digits, multilabel=True, seed=seed)
    labels = [[s.concepts[j] for j in np.flatnonzero(row)] for row in s.targets.numpy()]
    return Collection("digit-scenes", [f"scene-{i:06d}" for i in range(n)], image_size, 1,
                      images=s.images.numpy(), labels=labels, meta={"size": n, "seed": seed})


def _split_rows(splits: list[str | None], split: str, where: str, why_none: str) -> tuple[list[int], str]:
    """The rows of ``split`` (``train``, ``val``, ``test``, ``all``, or ``auto``: the test rows when
    some are marked test, the images no model trained on, else all), and the split taken."""
    found = {s for s in splits if s is not None}
    if split == "auto":
        split = "test" if "test" in found else "all"
    if split != "all" and split not in found:
        raise ValueError(f"split: {where} has no {split!r} rows" + (f" ({why_none})" if not found else ""))
    return [i for i, s in enumerate(splits) if split == "all" or s == split], split


def catalogue_collection(name: str, *, image_size: int, channels: int, preset: str | None = None,
                         split: str = "auto", catalogue_url: str | None = None,
                         blobs_url: str | None = None) -> Collection:
    """The live items of the catalogue's collection ``name`` as of its head now, their tags as labels,
    their stored bytes read on demand.  ``split`` as for a manifest, read from each item's
    ``meta["split"]`` (imports of a manifest with a split column and of digit-scenes record it)."""
    from deepindex.collection import CollectionStore
    from deepindex.collection.catalogue import public_url

    try:
        store = CollectionStore.open(name, catalogue_url, blobs_url, create=False)
    except ValueError as e:
        raise ValueError(f"{e}; or a kind of collection: {', '.join(KINDS)}") from None
    head = store.head()
    items = list(store.snapshot(head))
    if not items:
        raise ValueError(f"collection: {name} has no items")
    meta_splits = [it.meta.get("split") if isinstance(it.meta.get("split"), str) else None for it in items]
    keep, split = _split_rows(meta_splits, split, f"collection {name}", "its items record none")
    items = [items[i] for i in keep]
    return Collection(name, [it.id for it in items], image_size, channels, hashes=[it.content_hash for it in items],
                      blobs=store.blobs, labels=[list(it.tags) for it in items], preset=preset,
                      meta={"catalogue": public_url(store.catalogue_url), "head": head, "split": split})


def load_collection(kind: str, *, image_size: int, channels: int, concepts: list[str], size: int = 5000,
                    root: str | None = None, manifest: str | None = None, seed: int = 0,
                    max_digits: int = 4, preset: str | None = None, split: str = "auto",
                    catalogue_url: str | None = None, blobs_url: str | None = None) -> Collection:
    """The collection named by ``kind`` at the model's input size and channels: one of :data:`KINDS`,
    else the name of a catalogue collection (:func:`catalogue_collection`).

    A manifest's paths are relative to ``root`` (default: the manifest's folder).  ``split``: the
    rows of a manifest's split column to keep (``train``, ``val``, ``test``), ``all``, or ``auto``:
    the test rows when the column has some (the images no model trained on), else all."""
    if kind == "digit-scenes":
        if channels != 1:
            raise ValueError("collection: digit-scenes is grayscale; the model expects 3 channels")
        return digit_gallery(size, image_size, max_digits, seed)
    if kind == "image-folder":
        from deepindex.data.files import read_image_folder

        if not root:
            raise ValueError("collection: an image folder needs --root")
        items = read_image_folder(root)
        labels = [[items.concepts[int(t)]] for t in items.targets]
        return Collection(Path(root).name, items.ids, image_size, channels, paths=[str(p) for p in items.paths],
                          labels=labels, meta={"root": str(root)}, preset=preset)
    if kind == "manifest":
        from deepindex.data.files import read_manifest

        if not manifest:
            raise ValueError("manifest: a manifest collection needs --manifest")
        root = root or str(Path(manifest).parent)
        items = read_manifest(manifest, root, concepts)
        keep, split = _split_rows(items.splits or [None] * len(items.ids), split, str(manifest), "no split column")
        targets = items.targets.numpy()
        labels = [[concepts[j] for j in np.flatnonzero(targets[i])] for i in keep]
        return Collection(Path(manifest).stem, [items.ids[i] for i in keep], image_size, channels,
                          paths=[str(items.paths[i]) for i in keep], labels=labels,
                          meta={"root": str(root), "manifest": str(manifest), "split": split}, preset=preset)
    return catalogue_collection(kind, image_size=image_size, channels=channels, preset=preset, split=split,
                                catalogue_url=catalogue_url, blobs_url=blobs_url)
