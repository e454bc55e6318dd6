"""Image collections users already have: an image folder, a tag manifest, CIFAR on disk.

- image folder: ``root/<class>/*.png|jpg|...`` (single-label, classes sorted by name);
- tag manifest: CSV (``path,tags`` with tags separated by ``;`` or ``|``) or JSONL
  (``{"path": ..., "tags": [...]}``), paths relative to ``root``, plus a concept list file
  (multi-label);
- CIFAR-10/100: torchvision's files when they are on disk (never downloaded).

A bad manifest line (missing file, unknown tag, path escaping the root, unreadable image)
is a :class:`ManifestError` naming the file and the line number.
"""
from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image, UnidentifiedImageError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


class ManifestError(ValueError):
    """A manifest problem; the message names the manifest file and line."""


@dataclass(frozen=True)
class FileItems:
    paths: list[Path]
    targets: torch.Tensor  # (N,) int64 or (N, K) float32 multi-hot
    concepts: list[str]
    ids: list[str]  # stable item ids: the path relative to the root


def resolve_inside(root: Path, rel: str) -> Path:
    """``root / rel``, refusing absolute paths and ``..`` escapes (symlinks resolved)."""
    if not rel or "\x00" in rel or Path(rel).is_absolute():
        raise ValueError(f"path {rel!r} must be a relative path under the root")
    root_r = root.resolve()
    p = (root_r / rel).resolve()
    if p != root_r and root_r not in p.parents:
        raise ValueError(f"path {rel!r} escapes the root {root}")
    return p


def read_image_folder(root: str | Path) -> FileItems:
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"data.root: no such folder {root}")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    if not classes:
        raise ValueError(f"data.root: {root} holds no class folders (root/<class>/<image>)")
    paths, targets, ids = [], [], []
    for ci, c in enumerate(classes):
        for f in sorted((root / c).rglob("*")):
            if f.suffix.lower() in IMAGE_SUFFIXES and f.is_file():
                paths.append(f)
                targets.append(ci)
                ids.append(str(f.relative_to(root)))
    if not paths:
        raise ValueError(f"data.root: no images under {root}")
    return FileItems(paths, torch.tensor(targets, dtype=torch.int64), classes, ids)


def read_concepts(path: str | Path) -> list[str]:
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"data.concepts: no such file {p}")
    concepts = [line.strip() for line in _read_text(p, "the concept list").splitlines()
                if line.strip() and not line.startswith("#")]
    if not concepts:
        raise ValueError(f"data.concepts: {p} lists no concepts")
    if len(set(concepts)) != len(concepts):
        raise ValueError(f"data.concepts: {p} lists a concept twice")
    return concepts


def _read_text(path: Path, what: str) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ManifestError(f"{path}: {what} is not UTF-8 text (byte {e.start})") from None


def _manifest_rows(path: Path) -> Iterator[tuple[int, str, list[str]]]:
    """Yield (line number, relative path, tags) from a CSV or JSONL manifest."""
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
                tags = [t for t in tags.replace("|", ";").split(";")]
            if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):
                raise ManifestError(f"{path}:{n}: 'tags' must be a list of strings")
            if not isinstance(row["path"], str):
                raise ManifestError(f"{path}:{n}: 'path' must be a string")
            yield n, row["path"], [t.strip() for t in tags if t.strip()]
    else:
        reader = csv.DictReader(io.StringIO(text, newline=""))
        try:
            if reader.fieldnames is None or not {"path", "tags"} <= set(reader.fieldnames):
                raise ManifestError(f"{path}:1: the CSV header must name 'path' and 'tags'")
            for row in reader:
                n = reader.line_num
                rel, tags = row.get("path"), row.get("tags")
                if not isinstance(rel, str) or not isinstance(tags, (str, type(None))):
                    raise ManifestError(f"{path}:{n}: expected the columns path,tags")
                tags_list = (tags or "").replace("|", ";").split(";")
                yield n, rel, [t.strip() for t in tags_list if t.strip()]
        except csv.Error as e:
            raise ManifestError(f"{path}:{reader.line_num}: not valid CSV ({e})") from None


def read_manifest(manifest: str | Path, root: str | Path, concepts: list[str], check_images: bool = True) -> FileItems:
    manifest, root = Path(manifest), Path(root)
    if not manifest.is_file():
        raise FileNotFoundError(f"data.manifest: no such file {manifest}")
    index = {c: i for i, c in enumerate(concepts)}
    paths, rows, ids = [], [], []
    for n, rel, tags in _manifest_rows(manifest):
        try:
            p = resolve_inside(root, rel)
        except ValueError as e:
            raise ManifestError(f"{manifest}:{n}: {e}") from None
        if not p.is_file():
            raise ManifestError(f"{manifest}:{n}: missing file {rel}")
        unknown = [t for t in tags if t not in index]
        if unknown:
            raise ManifestError(f"{manifest}:{n}: unknown tag {unknown[0]!r} (not in the concept list)")
        if check_images:
            try:
                with Image.open(p) as im:
                    im.verify()
            except (UnidentifiedImageError, OSError, SyntaxError) as e:
                raise ManifestError(f"{manifest}:{n}: unreadable image {rel} ({e.__class__.__name__})") from None
        y = torch.zeros(len(concepts))
        for t in tags:
            y[index[t]] = 1.0
        paths.append(p)
        rows.append(y)
        ids.append(rel)
    if not paths:
        raise ManifestError(f"{manifest}: no items")
    return FileItems(paths, torch.stack(rows), list(concepts), ids)


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
