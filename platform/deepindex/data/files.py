"""Image collections users already have: an image folder, a tag manifest, CIFAR on disk.

- image folder: ``root/<class>/*.png|jpg|...`` (single-label, classes sorted by name);
- tag manifest: CSV (``path,tags[,split]`` with tags separated by ``;`` or ``|``) or JSONL
  (``{"path": ..., "tags": [...], "split": ...}``), paths relative to ``root``, plus a concept
  list file (multi-label).  A flat folder with a sidecar tags file (``root/tags.csv`` or
  ``tags.jsonl``) needs neither ``data.manifest`` nor ``data.concepts``
  (:func:`find_sidecar`); without a concept list the concepts are the tags found, sorted;
- CIFAR-10/100: torchvision's files when they are on disk (never downloaded).

What real collections hold, handled here: an optional ``split`` column (train/val/test; rows
left empty go to train), tags missing from the concept list (``data.unknown_tags``:
error | ignore | add, counted), the same image twice under two names (found by content hash,
kept once with the union of its tags; counted).  EXIF rotation, CMYK, palette and alpha
images are decoded by :func:`deepindex.data.transforms.to_model_mode`.

A bad manifest line (missing file, unknown tag, path escaping the root, unreadable image,
bad split) is a :class:`ManifestError` naming the file and the line number.
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import posixpath
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image, UnidentifiedImageError

from deepindex.data.transforms import UNDECODABLE, decode_whole

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
SIDECAR_NAMES = ("tags.csv", "tags.jsonl", "manifest.csv", "manifest.jsonl")
CONCEPTS_NAME = "concepts.txt"
SPLIT_NAMES = {"train": "train", "training": "train", "val": "val", "valid": "val", "validation": "val",
               "dev": "val", "test": "test", "testing": "test"}
UNKNOWN_TAG_POLICIES = ("error", "ignore", "add")


class ManifestError(ValueError):
    """A manifest problem; the message names the manifest file and line."""


@dataclass
class ImportReport:
    """What an import found and did about it; ``summary()`` is the line a user sees."""

    source: str
    items: int = 0
    unknown_tags: int = 0  # tag occurrences not in the concept list
    unknown_lines: int = 0
    unknown_names: list[str] = field(default_factory=list)  # distinct unknown tags, sorted
    policy: str = "error"
    duplicates: int = 0  # rows dropped because an earlier row holds the same bytes
    merged_rows: int = 0  # rows of a path an earlier row named (./a.jpg is a.jpg): their tags went to its item
    merged_split_conflicts: int = 0  # of those, rows naming another split than the first row of their path
    duplicate_examples: list[tuple[str, str]] = field(default_factory=list)  # (kept, dropped)
    class_conflicts: int = 0  # of the duplicates, copies an image folder files under another class
    unlisted_images: int = 0  # images in a flat folder that the tags file does not list
    concepts_from_tags: bool = False
    split_counts: dict[str, int] = field(default_factory=dict)  # rows pinned by the split column

    def summary(self) -> str:
        parts = [f"{self.source}: {self.items} items"]
        if self.split_counts:
            parts.append("split column " + ", ".join(f"{k} {v}" for k, v in sorted(self.split_counts.items())))
        if self.unknown_tags:
            what = {"ignore": "ignored", "add": "added as concepts"}.get(self.policy, self.policy)
            names = ", ".join(self.unknown_names[:5]) + (", ..." if len(self.unknown_names) > 5 else "")
            parts.append(f"{self.unknown_tags} unknown tags on {self.unknown_lines} lines {what} "
                         f"({len(self.unknown_names)} distinct: {names})")
        if self.merged_rows:  # one file named twice: not two images with equal bytes (the line below)
            n = self.merged_rows
            parts.append(f"{n} row{'s' if n != 1 else ''} merged with an earlier row of the same path"
                         + (f", {self.merged_split_conflicts} of them naming another split (the first row's kept)"
                            if self.merged_split_conflicts else ""))
        if self.duplicates:
            ex = "; ".join(f"{b} = {a}" for a, b in self.duplicate_examples[:3])
            parts.append(f"{self.duplicates} duplicate images kept once ({ex})")
            if self.class_conflicts:
                parts.append(f"{self.class_conflicts} of them under another class than the first copy "
                             "(kept under the first)")
        if self.unlisted_images:
            parts.append(f"{self.unlisted_images} images in the folder are not in the tags file (not used)")
        if self.concepts_from_tags:
            parts.append("concepts = the tags found (no concept list given)")
        return "; ".join(parts)


@dataclass(frozen=True)
class FileItems:
    paths: list[Path]
    targets: torch.Tensor  # (N,) int64 or (N, K) float32 multi-hot
    concepts: list[str]
    ids: list[str]  # stable item ids: the path relative to the root
    splits: list[str | None] | None = None  # per item train/val/test from a split column; None: no column
    report: ImportReport | None = None


def resolve_inside(root: Path, rel: str) -> Path:
    """``root / rel``, refusing absolute paths and ``..`` escapes (symlinks resolved)."""
    if not rel or "\x00" in rel or Path(rel).is_absolute():
        raise ValueError(f"path {rel!r} must be a relative path under the root")
    root_r = root.resolve()
    p = (root_r / rel).resolve()
    if p != root_r and root_r not in p.parents:
        raise ValueError(f"path {rel!r} escapes the root {root}")
    return p


def read_image_folder(root: str | Path, dedupe: bool = True, min_classes: int | None = None) -> FileItems:
    """``root/<class>/<image>``: ids are paths relative to the root, targets the class folders' indices.

    ``dedupe``: an image whose bytes an earlier one holds is kept once, as a manifest's are (a scraped
    folder's ``x.png`` and ``x (copy).png`` were dealt to train and test alike, found on review); a copy
    filed under another class keeps the first class and is counted.  The report (``FileItems.report``)
    is there only when a copy was found.  The bytes it reads are decoded whole too (as a manifest's rows
    are checked): an image that does not decode is a ``ValueError`` naming it, here, where a training
    failed on it inside a Ray Data task without its name (found on review).  A listing (``dedupe=False``)
    reads no image's bytes.

    ``min_classes``: fewer class folders are refused.  By default 2 for a read that dedupes (training's, a
    retrieval evaluation's: one class trained a "perfect" model, loss 0, without a word; found on review)
    and 1 for a listing (``dedupe=False``: a collection import files one folder's images under its name)."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"data.root: no such folder {root}")
    classes = class_folders(root)
    if not classes:
        raise ValueError(f"data.root: {root} holds no class folders (root/<class>/<image>)")
    if min_classes is None:
        min_classes = 2 if dedupe else 1
    if len(classes) < min_classes and split_folders(root, classes) is None:  # a split: its own message below
        raise ValueError(f"data.root: {root} holds {len(classes)} class folder{'s' if len(classes) != 1 else ''} "
                         f"({', '.join(classes)}): an image folder needs at least {min_classes} class folders; for "
                         f"images with no classes write a tags.csv (data.dataset=manifest)")
    split = split_folders(root, classes)
    if split is not None:  # root/{train,val}/<class>/...: read as classes, it trained "train vs val" silently
        raise ValueError(f"data.root: {root} holds {split[0]} folders (a split, not classes): point data.root at "
                         f"{split[1]}, or write a manifest with a split column")
    paths, targets, ids = [], [], []
    for ci, c in enumerate(classes):
        for f in sorted((root / c).rglob("*")):
            # Hidden files and folders are not images of the class: macOS's ._<name> resource forks,
            # .ipynb_checkpoints (found on review: they failed the build with "cannot identify image").
            if any(part.startswith(".") for part in f.relative_to(root / c).parts):
                continue
            if f.suffix.lower() in IMAGE_SUFFIXES and f.is_file():
                paths.append(f)
                targets.append(ci)
                ids.append(str(f.relative_to(root)))
    if not paths:
        raise ValueError(f"data.root: no images under {root}")
    report = None
    if dedupe:
        first: dict[str, int] = {}
        keep: list[int] = []
        dropped: list[tuple[str, str]] = []
        conflicts = 0
        for i, f in enumerate(paths):
            data = _image_bytes(f, ids[i], root)
            j = first.setdefault(hashlib.blake2b(data, digest_size=16).hexdigest(), i)
            if j == i:
                keep.append(i)
                continue
            dropped.append((ids[j], ids[i]))
            conflicts += targets[j] != targets[i]
        if dropped:
            report = ImportReport(str(root), items=len(keep), duplicates=len(dropped), duplicate_examples=dropped[:20],
                                  class_conflicts=conflicts)
            paths, targets, ids = [paths[i] for i in keep], [targets[i] for i in keep], [ids[i] for i in keep]
    return FileItems(paths, torch.tensor(targets, dtype=torch.int64), classes, ids, report=report)


def _image_bytes(path: Path, rel: str, root: Path) -> bytes:
    """The bytes of an image folder's ``path`` (``rel`` under ``root``), once they decode whole."""
    try:
        data = path.read_bytes()
        decode_whole(data)
    except UNDECODABLE as e:
        raise ValueError(f"data.root: unreadable image {rel} in {root} ({e.__class__.__name__}: "
                         f"{_first_line(e)})") from None
    return data


def _first_line(error: BaseException) -> str:
    """The first line of ``error``'s message, without the stream PIL names (``<_io.BytesIO object at 0x..>``)."""
    lines = [ln.strip() for ln in re.sub(r" ?<_io\.\w+ object at 0x[0-9a-fA-F]+>", "", str(error)).splitlines()
             if ln.strip()]
    return lines[0][:200] if lines else ""


def read_concepts(path: str | Path) -> list[str]:
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"data.concepts: no such file {p}")
    concepts = [line.strip() for line in _read_text(p, "the concept list").splitlines() if not _comment(line)]
    if not concepts:
        raise ValueError(f"data.concepts: {p} lists no concepts")
    if len(set(concepts)) != len(concepts):
        raise ValueError(f"data.concepts: {p} lists a concept twice")
    return concepts


def _comment(line: str) -> bool:
    """A blank line, or a comment: ``#`` then a space or nothing (``# my concepts``).  ``#sunset``, a web
    tag, is a concept."""
    text = line.strip()
    return not text or text == "#" or (text[0] == "#" and text[1].isspace())


def _read_text(path: Path, what: str) -> str:
    try:
        # utf-8-sig: a byte-order mark (what Excel's "CSV UTF-8" writes) is not part of the first name.
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise ManifestError(f"{path}: {what} is not UTF-8 text (byte {e.start})") from None


def _split_value(raw: object, path: Path, n: int) -> str | None:
    if raw is None or (isinstance(raw, str) and not raw.strip()):
        return None
    if not isinstance(raw, str) or raw.strip().lower() not in SPLIT_NAMES:
        raise ManifestError(f"{path}:{n}: split {raw!r} must be train, val or test (or empty)")
    return SPLIT_NAMES[raw.strip().lower()]


def _manifest_rows(path: Path) -> Iterator[tuple[int, str, list[str], str | None]]:
    """Yield (line number, relative path, tags, split or None) from a CSV or JSONL manifest."""
    text = _read_text(path, "the manifest")
    if path.suffix.lower() in (".jsonl", ".json"):
        for n, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ManifestError(f"{path}:{n}: not valid JSON ({e.msg})") from None
            if not isinstance(row, dict) or "path" not in row or "tags" not in row:
                raise ManifestError(f"{path}:{n}: expected an object with 'path' and 'tags'")
            tags = row["tags"]
            if isinstance(tags, str):
                if "," in tags:  # "dog,cat" was one concept named "dog,cat" (a CSV's tags refuse it too)
                    raise ManifestError(f"{path}:{n}: tags {tags!r} hold a comma; separate a row's tags with "
                                        "';' or '|', or give them as a list")
                tags = [t for t in tags.replace("|", ";").split(";")]
            if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):
                raise ManifestError(f"{path}:{n}: 'tags' must be a list of strings")
            if not isinstance(row["path"], str):
                raise ManifestError(f"{path}:{n}: 'path' must be a string")
            yield n, row["path"], [t.strip() for t in tags if t.strip()], _split_value(row.get("split"), path, n)
    else:
        reader = csv.DictReader(io.StringIO(text, newline=""))
        try:
            # Column names as a spreadsheet writes them ("Path", " tags", "Split") are the same columns:
            # a "Split" column read as an extra field used to leave every row's split to chance.
            names = [f.strip().lower() for f in reader.fieldnames or []]
            twice = sorted({f for f in names if names.count(f) > 1 and f in ("path", "tags", "split")})
            if twice:
                raise ManifestError(f"{path}:1: the CSV header names {twice[0]!r} twice")
            if not {"path", "tags"} <= set(names):
                raise ManifestError(f"{path}:1: the CSV header must name 'path' and 'tags'")
            reader.fieldnames = names
            for row in reader:
                n = reader.line_num
                if None in row:  # more fields than the header: tags written "a,b" unquoted
                    raise ManifestError(f"{path}:{n}: more fields than the header names; separate a row's "
                                        f"tags with ';' or '|' (a comma ends the field)")
                rel, tags = row.get("path"), row.get("tags")
                if not isinstance(rel, str) or not isinstance(tags, (str, type(None))):
                    raise ManifestError(f"{path}:{n}: expected the columns path,tags")
                if tags and "," in tags:  # quoted "a,b": one tag named "a,b" (pandas' to_csv writes it)
                    raise ManifestError(f"{path}:{n}: tags {tags!r} hold a comma; separate a row's tags with "
                                        "';' or '|'")
                tags_list = (tags or "").replace("|", ";").split(";")
                yield n, rel, [t.strip() for t in tags_list if t.strip()], _split_value(row.get("split"), path, n)
        except csv.Error as e:
            raise ManifestError(f"{path}:{reader.line_num}: not valid CSV ({e})") from None


def find_sidecar(root: str | Path) -> Path:
    """The tags file of a flat folder: ``root/tags.csv`` (or tags.jsonl, manifest.csv/.jsonl)."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"data.root: no such folder {root}")
    found = [root / n for n in SIDECAR_NAMES if (root / n).is_file()]
    if not found:
        msg = f"data.manifest: not given, and {root} holds none of {', '.join(SIDECAR_NAMES)}"
        classes = class_folders(root)
        split = split_folders(root, classes) if classes else None
        if split is not None:
            msg += (f"; its folders of images ({split[0]}) are a split, not classes: data.dataset=image-folder "
                    f"with data.root={split[1]}, or a manifest with a split column")
        elif classes:  # torchvision's ImageFolder layout, the one most collections come in
            shown = ", ".join(classes[:5]) + (f" and {len(classes) - 5} more" if len(classes) > 5 else "")
            msg += (f"; its folders of images ({shown}) read as one class each with "
                    f"data.dataset=image-folder")
        raise FileNotFoundError(msg)
    if len(found) > 1:
        names = " and ".join(p.name for p in found)
        raise ValueError(f"data.manifest: {root} holds {names}; name one with data.manifest")
    return found[0]


def class_folders(root: Path) -> list[str]:
    """The classes of an image folder, sorted: its subfolders that hold images.  A folder of none is no
    class (an output no image trains), nor is a hidden one (``.ipynb_checkpoints``)."""
    return sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")
                  and any(f.suffix.lower() in IMAGE_SUFFIXES and f.is_file()
                          and not any(q.startswith(".") for q in f.relative_to(p).parts)  # as read_image_folder
                          for f in p.rglob("*")))


def split_folders(root: Path, classes: list[str]) -> tuple[str, Path] | None:
    """When every class folder of ``root`` is named for a split (``SPLIT_NAMES``: ``root/train/<class>/...``,
    an image folder per split), (their names joined by ``/``, the folder to read as the image folder: the
    train split's), else None."""
    if not classes or not all(c.lower() in SPLIT_NAMES for c in classes):
        return None
    train = next((c for c in classes if SPLIT_NAMES[c.lower()] == "train"), classes[0])
    return "/".join(classes), root / train


def _unlisted_images(root: Path, listed: set[Path]) -> int:
    """Images directly in ``root`` that no manifest row names (a flat folder's stragglers)."""
    return sum(1 for f in root.iterdir()
               if f.suffix.lower() in IMAGE_SUFFIXES and f.is_file() and f.resolve() not in listed)


def read_manifest(manifest: str | Path, root: str | Path, concepts: list[str] | None, check_images: bool = True,
                  unknown_tags: str = "error", dedupe: bool = True,
                  unknown_tags_hint: str = "data.unknown_tags=ignore|add") -> FileItems:
    """Read a tag manifest against a concept list (``None``: the tags found, sorted).

    ``unknown_tags``: ``error`` (the line is named, and the error names ``unknown_tags_hint``, the
    caller's spelling of the option, as the way to go on), ``ignore`` (dropped, counted) or ``add``
    (appended to the concepts, sorted, counted).  ``dedupe``: rows of a path an earlier row named
    (after normalising: ``./a.jpg`` is ``a.jpg``) are merged into it (the union of their tags, the
    first row's split), and rows whose file bytes equal an earlier row's are dropped and their tags
    merged into it (so one image never sits in two splits); without it every row is listed as it is.
    The counts are in ``FileItems.report``.
    """
    manifest, root = Path(manifest), Path(root)
    if not manifest.is_file():
        raise FileNotFoundError(f"data.manifest: no such file {manifest}")
    if unknown_tags not in UNKNOWN_TAG_POLICIES:
        raise ValueError(f"data.unknown_tags: {unknown_tags!r} is not one of {', '.join(UNKNOWN_TAG_POLICIES)}")
    report = ImportReport(str(manifest), policy=unknown_tags, concepts_from_tags=concepts is None)
    known = set(concepts) if concepts is not None else None
    unknown_seen: set[str] = set()
    rows: list[tuple[Path, str, list[str], str | None]] = []
    first_by_hash: dict[str, int] = {}
    first_by_id: dict[str, int] = {}  # an item id -> its row (dedupe: rows of one path are merged)
    for n, rel, tags, split in _manifest_rows(manifest):
        try:
            p = resolve_inside(root, rel)
        except ValueError as e:
            raise ManifestError(f"{manifest}:{n}: {e}") from None
        if p.is_dir():
            raise ManifestError(f"{manifest}:{n}: {rel} is a folder, not an image file")
        if not p.is_file():
            raise ManifestError(f"{manifest}:{n}: missing file {rel} (no {p})")
        if known is not None:
            unknown = [t for t in tags if t not in known]
            if unknown:
                if unknown_tags == "error":
                    raise ManifestError(f"{manifest}:{n}: unknown tag {unknown[0]!r} (not in the concept list; "
                                        f"{unknown_tags_hint} to go on)")
                report.unknown_tags += len(unknown)
                report.unknown_lines += 1
                unknown_seen.update(unknown)
                if unknown_tags == "ignore":
                    tags = [t for t in tags if t in known]
        # The item's id: its path as the collection names it, whatever spelling the manifest used
        # (`find . -name '*.jpg'` writes ./x.jpg, which a collection refuses as an id; found on review).
        item_id = posixpath.normpath(rel)
        if dedupe and item_id in first_by_id:
            # A row of a path an earlier row named (one tag per row, or ./a.jpg and a.jpg): one item with every
            # row's tags and the first row's split, as `collection import` reads it.  It was read and counted as
            # a copy of itself ("a.jpg = a.jpg"), which is what two names with equal bytes are told.
            kept = rows[first_by_id[item_id]]
            kept[2].extend(t for t in tags if t not in kept[2])
            report.merged_rows += 1
            report.merged_split_conflicts += split is not None and kept[3] is not None and split != kept[3]
            continue
        data = b""  # the file's bytes, read only to check or hash them
        if check_images or dedupe:
            try:
                data = p.read_bytes()
            except OSError as e:
                raise ManifestError(f"{manifest}:{n}: unreadable image {rel} ({e.__class__.__name__})") from None
        if check_images:
            try:
                with Image.open(io.BytesIO(data)) as im:
                    im.verify()
                # verify() reads no pixel of a JPEG: one cut short passed it (found on review) and failed in
                # training without a name.
                decode_whole(data)
            except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
                raise ManifestError(f"{manifest}:{n}: unreadable image {rel} ({e.__class__.__name__})") from None
        if dedupe:
            digest = hashlib.blake2b(data, digest_size=16).hexdigest()
            if digest in first_by_hash:
                kept = rows[first_by_hash[digest]]
                kept[2].extend(t for t in tags if t not in kept[2])  # the same picture: both taggings hold
                report.duplicates += 1
                report.duplicate_examples.append((kept[1], rel))
                first_by_id[item_id] = first_by_hash[digest]  # a later row of this path merges into the same item
                continue
            first_by_hash[digest] = len(rows)
        first_by_id[item_id] = len(rows)
        rows.append((p, item_id, list(tags), split))
    if not rows:
        raise ManifestError(f"{manifest}: no items")
    report.unknown_names = sorted(unknown_seen)
    if concepts is None:
        concepts = sorted({t for _, _, tags, _ in rows for t in tags})
        if not concepts:
            raise ManifestError(f"{manifest}: no tags at all, and no concept list")
    elif unknown_tags == "add":
        concepts = list(concepts) + report.unknown_names
    index = {c: i for i, c in enumerate(concepts)}
    targets = torch.zeros(len(rows), len(concepts))
    for i, (_, _, tags, _) in enumerate(rows):
        for t in tags:
            targets[i, index[t]] = 1.0
    splits = [r[3] for r in rows]
    report.items = len(rows)
    has_column = any(s is not None for s in splits)
    if has_column:
        for s_ in splits:
            key = s_ or "unassigned"
            report.split_counts[key] = report.split_counts.get(key, 0) + 1
    return FileItems([r[0] for r in rows], targets, list(concepts), [r[1] for r in rows],
                     splits if has_column else None, report)


def read_collection(root: str | Path, manifest: str | Path | None = None, concepts: str | Path | None = None,
                    unknown_tags: str = "error", check_images: bool = True, dedupe: bool = True) -> FileItems:
    """A manifest collection as a user has it: the manifest and the concept list are optional.

    Without ``manifest`` the root's sidecar tags file is used (:func:`find_sidecar`); without
    ``concepts`` a ``concepts.txt`` beside it, else the tags found.
    """
    root = Path(root)
    flat = manifest is None
    manifest = find_sidecar(root) if manifest is None else Path(manifest)
    if concepts is None and (root / CONCEPTS_NAME).is_file():
        concepts = root / CONCEPTS_NAME
    concept_list = read_concepts(concepts) if concepts is not None else None
    items = read_manifest(manifest, root, concept_list, check_images=check_images, unknown_tags=unknown_tags,
                          dedupe=dedupe)
    if flat and items.report is not None:
        listed = {p.resolve() for p in items.paths}
        listed |= {resolve_inside(root, dropped) for _, dropped in items.report.duplicate_examples}
        items.report.unlisted_images = _unlisted_images(root, listed)
    return items


def read_cifar(root: str | Path, which: str, train: bool) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """CIFAR-10/100 from torchvision's files on disk; (images (N,3,32,32) in [0,1], labels, classes)."""
    from torchvision import datasets

    cls = datasets.CIFAR10 if which == "cifar10" else datasets.CIFAR100
    try:
        ds = cls(root=str(root), train=train, download=False)
    except RuntimeError as e:  # torchvision says "Dataset not found or corrupted"
        raise FileNotFoundError(
            f"data.root: {which} files not found under {root} (nothing is downloaded): {e}") from None
    images = torch.from_numpy(ds.data).permute(0, 3, 1, 2).float().div_(255.0)
    return images, torch.tensor(ds.targets, dtype=torch.int64), list(ds.classes)
