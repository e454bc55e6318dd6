"""Importers: the embedded digit-scenes gallery, an image folder and a tag manifest into a collection.

Each is one bulk :meth:`CollectionStore.add_bulk` over a lazy stream of items, so an import of any
size holds one batch of bytes in memory, and each is idempotent: ids are stable (the scene number,
the path under the root), so re-running an import finds its items already there and adds nothing.
Nor does it bring back an item deleted since (an id whose latest change is a delete is skipped and
counted; ``readd_deleted`` adds such items again): a re-run to add a folder's new photos brought back
every photo the user had deleted (found on review).  An item already there with other tags (a
corrected manifest) is counted and left as it is, unless ``update_tags``: then its tags are changed, a
delete and an add of the same bytes in the collection's change log, so indexes catch up with them.
Two sources whose ids repeat (a ``train/`` and a ``test/`` folder of the same layout, galleries of two
seeds) go into one collection under an ``id_prefix`` each; without one the second's repeats are skipped.
An item that cannot be imported (an id outside the allowed characters, an unreadable image, the id
already live with other bytes) is skipped and counted, never half-added.  An image is readable when it
decodes whole: one cut short has a readable header, was imported, and then stopped a retrieval
evaluation of the collection and went missing from its indexes (found on review).

A manifest's rows of one path (after normalising: ``./a.jpg`` is ``a.jpg``) are one item with the union
of their tags and the first row's split, as training reads them: one tag per row is a common way to
write a manifest, and the rows after the first were taken for an item already there and their tags
lost (found on review).

The readers are :mod:`deepindex.data.files`' public functions; these importers only turn what they
read into items, so what those readers learn (split columns, tag policies, EXIF) reaches imports.
"""
from __future__ import annotations

import io
import logging
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

import numpy as np

from deepindex.collection.store import AddResult, CollectionStore, check_new_item_id

log = logging.getLogger(__name__)

Entry = tuple[str, bytes, Sequence[str], Mapping[str, Any]]


def _progress(what: str, every: int = 10_000) -> Any:
    state = {"next": every}

    def report(res: AddResult) -> None:
        done = res.added + res.existing + res.skipped
        if done >= state["next"]:
            log.info("%s: %d items (%d added, %d already there, %d skipped), %.1f s",
                     what, done, res.added, res.existing, res.skipped, res.seconds)
            state["next"] = done + every

    return report


def png_bytes(unit: np.ndarray) -> bytes:
    """(S, S) or (1, S, S) in [0, 1] -> 8-bit grayscale PNG (deterministic: same scene, same bytes)."""
    from PIL import Image

    a = np.asarray(unit).reshape(unit.shape[-2:])
    buf = io.BytesIO()
    Image.fromarray(np.clip(np.rint(a * 255), 0, 255).astype(np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def image_meta(data: bytes) -> dict[str, Any]:
    """Width, height and format of an image whose pixels decode whole; else a ValueError.

    The header alone passed an image cut short (a JPEG or PNG that ends early), which a retrieval
    evaluation of the collection then failed on, unnamed, and an index build left out (found on review).
    A JPEG is decoded at 1/8 scale (its DCT's own, fast), as training's manifest check does: every byte
    of it is still read and decoded."""
    from PIL import UnidentifiedImageError

    from deepindex.data.transforms import UNDECODABLE, decode_whole

    try:
        return decode_whole(data)
    except UNDECODABLE as e:  # what the index build skips an item for (UnidentifiedImageError is an OSError)
        # PIL's own words where they say what is wrong ("image file is truncated"), not where they name a BytesIO
        why = e.__class__.__name__ if isinstance(e, UnidentifiedImageError) else f"{e.__class__.__name__}: {e}"
        raise ValueError(f"data: not a readable image ({why[:200]})") from None


@dataclass
class ImportResult(AddResult):
    """An import's counts: :class:`AddResult`'s, and of a file import what happened before the add."""

    unreadable: int = 0  # of the skipped, files that could not be read or decoded as an image
    merged: int = 0  # manifest rows of a path an earlier row named: their tags went to that row's item
    split_conflicts: int = 0  # of the merged rows, those naming another split than the first (the first's holds)


def _finish(store: CollectionStore, what: str, res: AddResult) -> AddResult:
    log.debug("imported %d items into %s from %s (%d already there, %d skipped, %d deleted since, %d retagged) "
              "in %.1f s", res.added, store.name, what, res.existing, res.skipped, res.deleted_since, res.retagged,
              res.seconds)
    for reason in res.skipped_reasons[:5]:
        log.warning("skipped %s", reason)
    return res


def check_id_prefix(prefix: str) -> str:
    """A prefix every imported id starts with: an id's characters, no ``.``/``..`` segment."""
    try:
        check_new_item_id(f"{prefix}x")
    except ValueError:
        raise ValueError(f"id-prefix: {prefix[:80]!r} must be characters of A-Z a-z 0-9 . _ : @ / + - "
                         "with no '.' or '..' segment (e.g. train/)") from None
    return prefix


def _add(store: CollectionStore, entries: Iterator[Entry], source: str, what: str, batch_size: int,
         readd_deleted: bool, update_tags: bool) -> AddResult:
    return store.add_bulk(entries, source=source, batch_size=batch_size, keep_items=False,
                          progress=_progress(f"{what} -> {store.name}"),
                          deleted="readd" if readd_deleted else "skip", retag=update_tags)


def import_digit_scenes(store: CollectionStore, size: int = 5000, seed: int = 0,
                        batch_size: int = 500, id_prefix: str = "", readd_deleted: bool = False,
                        update_tags: bool = False) -> AddResult:
    """The embedded digit-scenes gallery (``digit_gallery(size, seed=seed)``: 32x32 grayscale scenes
    of the test glyphs) as PNG items ``<id_prefix>scene-000000``...; tags are the digits present.

    The gallery is a prefix-stable stream: importing 5,000 after 2,000 adds the 3,000 new scenes.
    """
    from deepindex.index.collection import digit_gallery

    if size < 1:
        raise ValueError("size: must be >= 1")
    if id_prefix:
        check_id_prefix(id_prefix)
    gallery = digit_gallery(size, seed=seed)
    assert gallery.images is not None and gallery.labels is not None
    images, labels = gallery.images, gallery.labels

    def entries() -> Iterator[Entry]:
        for i, item_id in enumerate(gallery.ids):
            meta = {"split": "test", "width": gallery.image_size, "height": gallery.image_size,
                    "format": "PNG", "seed": seed, "index": i}
            yield id_prefix + item_id, png_bytes(images[i]), labels[i], meta

    res = _add(store, entries(), "digit-scenes", "digit-scenes", batch_size, readd_deleted, update_tags)
    return _finish(store, "digit-scenes", res)


def _file_entries(src: FileSource, unreadable: list[str], counts: dict[str, int]) -> Iterator[Entry]:
    """Items from files; a file that cannot be read as an image is counted (``counts["unreadable"]``) and
    its first reasons go to ``unreadable`` instead."""
    splits = src.splits if src.splits is not None else [None] * len(src.ids)
    for path, name, t, split in zip(src.paths, src.ids, src.tags, splits, strict=True):
        item_id = src.id_prefix + name
        try:
            data = path.read_bytes()
            meta: dict[str, Any] = {"filename": name, **image_meta(data)}
        except (OSError, ValueError) as e:
            counts["unreadable"] += 1
            if len(unreadable) < 20:
                unreadable.append(f"{item_id}: {e}")
            continue
        if split is not None:
            meta["split"] = split
        yield item_id, data, t, meta


@dataclass(frozen=True)
class FileSource:
    """Files to import, listed and checked (a missing folder, a bad manifest line) before any
    collection is created or touched."""

    what: str  # for people: the folder or manifest
    source: str  # recorded with every change it makes
    paths: Sequence[Path]
    ids: Sequence[str]  # the names under the root; an item's id is id_prefix + its name
    tags: Sequence[Sequence[str]]
    splits: Sequence[str | None] | None = None  # a manifest's split column (train/val/test), kept in each item's meta
    id_prefix: str = ""
    merged: int = 0  # manifest rows of a path an earlier row named, merged into it
    split_conflicts: int = 0  # of those, rows naming another split than the first row of their path
    unknown_tags: int = 0  # tags not in the concept list, ignored or added (``unknown_policy``)
    unknown_policy: str = "error"

    def prefixed(self, id_prefix: str) -> FileSource:
        return replace(self, id_prefix=check_id_prefix(id_prefix)) if id_prefix else self


def folder_source(root: str | Path) -> FileSource:
    """``root/<class>/<image>``: ids are paths relative to the root, tags ``[class]``."""
    from deepindex.data.files import read_image_folder

    root = Path(root)
    found = read_image_folder(root, dedupe=False)  # every file is an item of the collection
    tags = [[found.concepts[int(t)]] for t in found.targets]
    return FileSource(str(root), f"folder:{root.resolve()}", found.paths, found.ids, tags)


def manifest_source(manifest: str | Path, root: str | Path | None = None,
                    concepts: Sequence[str] | str | Path | None = None, unknown_tags: str = "error") -> FileSource:
    """A CSV/JSONL tag manifest, its paths relative to ``root`` (default: the manifest's folder).
    ``concepts``: a list, or a file with one per line; by default, as training reads a collection,
    ``concepts.txt`` in ``root`` if there is one, else the manifest's own tags.  ``unknown_tags``: a
    tag not in the concept list is an error naming the line (``error``), dropped (``ignore``) or kept
    (``add``), as training's ``data.unknown_tags``.

    Rows of one path are one item: the union of their tags, the first row's split (as training reads
    them).  An image that does not decode is not refused here: the import skips and counts it."""
    from deepindex.data.files import CONCEPTS_NAME, read_concepts, read_manifest

    if not Path(manifest).is_file():
        raise FileNotFoundError(f"manifest: no such file {manifest}")
    root = Path(manifest).parent if root is None else Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"root: no such folder {root}")
    if isinstance(concepts, (str, Path)) and not Path(concepts).is_file():
        raise FileNotFoundError(f"concepts: no such file {concepts}")
    if concepts is None and (root / CONCEPTS_NAME).is_file():
        concepts = root / CONCEPTS_NAME
    concept_list: list[str] | None
    if concepts is None:
        concept_list = None  # the manifest's own tags, sorted
    elif isinstance(concepts, (str, Path)):
        concept_list = read_concepts(concepts)
    else:
        concept_list = list(concepts)
    # Every path is an item: two names for the same bytes are two items of a collection (training merges
    # them; here the second row's id went missing and its tags moved to the first; found on review).
    # Images are checked as they are imported (an unreadable one is skipped and counted, not fatal).
    found = read_manifest(manifest, root, concept_list, check_images=False, unknown_tags=unknown_tags, dedupe=False,
                          unknown_tags_hint="--unknown-tags ignore|add")
    multi_hot = found.targets.numpy() > 0
    first: dict[str, int] = {}  # an id -> its item's index
    keep: list[int] = []  # the rows that are items: the first of each path
    merged = conflicts = 0
    for i, item_id in enumerate(found.ids):
        j = first.setdefault(item_id, i)
        if j == i:
            keep.append(i)
            continue
        multi_hot[j] |= multi_hot[i]  # the same file: every row's tags hold
        merged += 1
        conflicts += found.splits is not None and found.splits[i] is not None and found.splits[i] != found.splits[j]
    tags = [[found.concepts[c] for c in np.flatnonzero(multi_hot[i])] for i in keep]
    report = found.report
    return FileSource(str(manifest), f"manifest:{Path(manifest).resolve()}", [found.paths[i] for i in keep],
                      [found.ids[i] for i in keep], tags,
                      [found.splits[i] for i in keep] if found.splits is not None else None,
                      merged=merged, split_conflicts=conflicts,
                      unknown_tags=report.unknown_tags if report is not None else 0, unknown_policy=unknown_tags)


def import_files(store: CollectionStore, src: FileSource, batch_size: int = 500, readd_deleted: bool = False,
                 update_tags: bool = False) -> ImportResult:
    """``readd_deleted``: add again the items deleted since they were imported (else skipped and
    counted); ``update_tags``: change the tags of items already there with other tags (else counted)."""
    unreadable: list[str] = []
    counts = {"unreadable": 0}
    added = _add(store, _file_entries(src, unreadable, counts), src.source, src.what, batch_size, readd_deleted,
                 update_tags)
    res = ImportResult(**{f.name: getattr(added, f.name) for f in fields(AddResult)},
                       unreadable=counts["unreadable"], merged=src.merged, split_conflicts=src.split_conflicts)
    res.skipped += res.unreadable
    res.skipped_reasons = (unreadable + res.skipped_reasons)[:20]
    _finish(store, src.what, res)
    return res


def import_folder(store: CollectionStore, root: str | Path, batch_size: int = 500, readd_deleted: bool = False,
                  update_tags: bool = False) -> ImportResult:
    return import_files(store, folder_source(root), batch_size, readd_deleted, update_tags)


def import_manifest(store: CollectionStore, manifest: str | Path, root: str | Path | None = None,
                    concepts: Sequence[str] | str | Path | None = None, batch_size: int = 500,
                    unknown_tags: str = "error", readd_deleted: bool = False,
                    update_tags: bool = False) -> ImportResult:
    return import_files(store, manifest_source(manifest, root, concepts, unknown_tags), batch_size, readd_deleted,
                        update_tags)
