"""The collections an index is built from.

- ``digit-scenes``: the default gallery, ``n`` scenes drawn from the *test* glyphs (handwriting
  the model never saw), labels known, so retrieval quality can be measured;
- ``image-folder``: ``root/<class>/<image>``, ids are paths relative to the root;
- ``manifest``: a CSV/JSONL tag manifest (paths relative to ``root``), tags read against the
  model's concept list.

A collection yields model-ready unit images ``(C, S, S)`` in [0, 1] by row, lazily for files,
so a Ray Data actor can load only its own rows.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from deepindex.data.transforms import pil_to_unit_tensor

KINDS = ("digit-scenes", "image-folder", "manifest")


@dataclass
class Collection:
    name: str
    ids: list[str]
    image_size: int
    channels: int
    images: np.ndarray | None = None  # (N, C, S, S) float32 in [0, 1], in memory
    paths: list[str] | None = None  # or files read on demand
    labels: list[list[str]] | None = None  # known tags per item (metadata, and relevance for metrics)
    meta: dict[str, Any] = field(default_factory=dict)
    preset: str | None = None  # the model's eval preset (deepindex.data.transforms.PRESETS)

    def __len__(self) -> int:
        return len(self.ids)

    def unit_images(self, rows: np.ndarray) -> np.ndarray:
        """(B, C, S, S) float32 in [0, 1] for the given rows: the eval preset before normalising."""
        if self.images is not None:
            return self.images[rows]
        assert self.paths is not None, "a collection holds its images or their paths"
        out = np.empty((len(rows), self.channels, self.image_size, self.image_size), dtype=np.float32)
        for j, r in enumerate(rows):
            with Image.open(self.paths[int(r)]) as im:
                out[j] = pil_to_unit_tensor(im, self.image_size, self.channels, self.preset).numpy()
        return out

    def item_meta(self, row: int) -> dict[str, Any]:
        m: dict[str, Any] = {}
        if self.labels is not None:
            m["labels"] = self.labels[row]
        if self.paths is not None:
            m["path"] = self.paths[row]
        return m


def digit_gallery(n: int, image_size: int = 32, max_digits: int = 4, seed: int = 0) -> Collection:
    """``n`` digit-scenes from the test glyphs; ids ``scene-000000``..."""
    from deepindex.data.digits import make_scenes

    s = make_scenes("test", n, image_size=image_size, max_digits=max_digits, multilabel=True, seed=seed)
    labels = [[s.concepts[j] for j in np.flatnonzero(row)] for row in s.targets.numpy()]
    return Collection("digit-scenes", [f"scene-{i:06d}" for i in range(n)], image_size, 1,
                      images=s.images.numpy(), labels=labels, meta={"size": n, "seed": seed})


def load_collection(kind: str, *, image_size: int, channels: int, concepts: list[str], size: int = 5000,
                    root: str | None = None, manifest: str | None = None, seed: int = 0,
                    max_digits: int = 4, preset: str | None = None, split: str = "auto") -> Collection:
    """The collection named by ``kind`` at the model's input size and channels.

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
        found = items.splits or []
        if split == "auto":
            split = "test" if "test" in found else "all"
        if split != "all" and split not in found:
            raise ValueError(f"split: {manifest} has no {split!r} rows"
                             + ("" if items.splits else " (no split column)"))
        keep = [i for i in range(len(items.ids)) if split == "all" or found[i] == split]
        targets = items.targets.numpy()
        labels = [[concepts[j] for j in np.flatnonzero(targets[i])] for i in keep]
        return Collection(Path(manifest).stem, [items.ids[i] for i in keep], image_size, channels,
                          paths=[str(items.paths[i]) for i in keep], labels=labels,
                          meta={"root": str(root), "manifest": str(manifest), "split": split}, preset=preset)
    raise ValueError(f"collection: unknown kind {kind!r}; one of {', '.join(KINDS)}")
