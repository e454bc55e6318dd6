"""``deepindex collection import|ls|info|add|rm|check``: the collections indexes are built from.

One readable line per event for people; ``--json`` prints one JSON document for machines.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from deepindex.collection import CollectionStore


def register(sub: argparse._SubParsersAction) -> None:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--catalogue", metavar="URL",
                        help="catalogue database URL (default: DEEPINDEX_CATALOGUE_URL, else SQLite under the "
                             "state folder)")
    common.add_argument("--blobs", metavar="URL",
                        help="where image bytes live: a folder or fsspec URL (default: DEEPINDEX_BLOBS_URL, else "
                             "the store the collection was created with, a new one's under the state folder); "
                             "another than a collection's own store is read from, never written to")
    common.add_argument("--json", action="store_true", help="print JSON instead of lines for people")

    p = sub.add_parser("collection", help="collections: the durable items and images indexes are built from")
    csub = p.add_subparsers(dest="collection_command", required=True, metavar="ACTION")

    i = csub.add_parser("import", parents=[common], help="import the digit-scenes gallery, an image folder or a "
                                                          "tag manifest (idempotent: a re-run adds nothing new)")
    i.add_argument("name", help="collection name (created if new)")
    src = i.add_mutually_exclusive_group(required=True)
    src.add_argument("--digit-scenes", action="store_true", help="the embedded digit-scenes gallery")
    src.add_argument("--folder", metavar="DIR", help="an image folder: DIR/<class>/<image>")
    src.add_argument("--manifest", metavar="FILE", help="a CSV or JSONL tag manifest")
    i.add_argument("--size", type=int, default=5000, help="digit-scenes: how many scenes (default 5000)")
    i.add_argument("--seed", type=int, default=0, help="digit-scenes: the gallery's seed")
    i.add_argument("--root", metavar="DIR", help="manifest: the folder its paths are relative to (default: the "
                                                 "manifest's folder)")
    i.add_argument("--concepts", metavar="FILE", help="manifest: the concept list, one per line (default: concepts.txt "
                                                      "in the root if there is one, else the manifest's own tags)")
    i.add_argument("--unknown-tags", choices=("error", "ignore", "add"), default="error",
                   help="manifest: a tag not in the concept list fails the import naming its line (error, the "
                        "default), is dropped (ignore) or kept (add); counted")
    i.add_argument("--id-prefix", default="", metavar="P",
                   help="start every imported id with P (e.g. train/): a second folder or gallery whose ids repeat "
                        "the first's goes in beside it instead of being skipped")
    i.add_argument("--readd-deleted", action="store_true",
                   help="add again the items deleted since an earlier import (by default a re-run skips and "
                        "counts them: it never brings back what was deleted)")
    i.add_argument("--update-tags", action="store_true",
                   help="change the tags and the split of items already there (same bytes) to this import's (by "
                        "default they are counted and left as they are); a delete and an add in the change log, "
                        "so indexes catch up")
    i.add_argument("--batch-size", type=int, default=500, help="items per transaction")
    i.set_defaults(func=run_import)

    ls = csub.add_parser("ls", parents=[common], help="list the collections of the catalogue")
    ls.set_defaults(func=run_ls)

    info = csub.add_parser("info", parents=[common], help="one collection: counts, head, locations, bytes, tags")
    info.add_argument("name")
    info.set_defaults(func=run_info)

    a = csub.add_parser("add", parents=[common], help="add one image (durable when this returns)")
    a.add_argument("name")
    a.add_argument("id", help="item id: 1-200 characters of A-Z a-z 0-9 . _ : @ / + -")
    a.add_argument("file", help="the image file")
    a.add_argument("--tag", action="append", default=[], help="a known label (repeat for several)")
    a.set_defaults(func=run_add)

    rm = csub.add_parser("rm", parents=[common], help="delete an item (a tombstone; gone from search)")
    rm.add_argument("name")
    rm.add_argument("id")
    rm.set_defaults(func=run_rm)

    ck = csub.add_parser("check", parents=[common], help="every item's bytes are there and hash to their name")
    ck.add_argument("name")
    ck.set_defaults(func=run_check)


def _open(args: argparse.Namespace, create: bool = False, writes: bool = False) -> CollectionStore:
    """``writes``: a command that adds bytes; opened with another blob store than the collection's own,
    it is refused (one line naming both) before anything is written."""
    from deepindex.collection import CollectionStore

    return CollectionStore.open(args.name, catalogue_url=args.catalogue, blobs_url=args.blobs, create=create,
                                writes=writes)


def _emit(args: argparse.Namespace, doc: Any, line: str) -> None:
    print(json.dumps(doc, indent=2) if args.json else line)


def _when(t: float) -> str:
    return dt.datetime.fromtimestamp(t).strftime("%Y-%m-%d %H:%M")


def run_import(args: argparse.Namespace) -> int:
    from deepindex.collection import imports

    # Every argument is checked before the collection is opened with create=True: a refused
    # command creates nothing.
    if args.size < 1:
        raise ValueError("size: must be >= 1")
    if args.batch_size < 1:
        raise ValueError("batch-size: must be >= 1")
    if args.id_prefix:
        imports.check_id_prefix(args.id_prefix)
    src = None  # a folder or manifest is read first: a bad one creates no collection
    if args.folder:
        src = imports.folder_source(args.folder).prefixed(args.id_prefix)
    elif args.manifest:
        src = imports.manifest_source(args.manifest, args.root, concepts=args.concepts,
                                      unknown_tags=args.unknown_tags).prefixed(args.id_prefix)
    store = _open(args, create=True, writes=True)
    if src is None:
        what = f"the digit-scenes gallery (size {args.size}, seed {args.seed})"
        res = imports.import_digit_scenes(store, size=args.size, seed=args.seed, batch_size=args.batch_size,
                                          id_prefix=args.id_prefix, readd_deleted=args.readd_deleted,
                                          update_tags=args.update_tags)
    else:
        what = src.what
        res = imports.import_files(store, src, batch_size=args.batch_size, readd_deleted=args.readd_deleted,
                                   update_tags=args.update_tags)
    counts = [f"{res.existing} already there" + (f", {res.skipped} skipped" if res.skipped else "")]
    if res.other_tags:  # same bytes, other tags: not changed, and the user is told so
        counts.append(f"{res.other_tags} of them with other tags: tags not changed, --update-tags changes them")
    if res.retagged:
        counts.append(f"tags updated on {res.retagged} item{'s' if res.retagged != 1 else ''} already there")
    if res.other_split:  # same bytes, another split in this import (a manifest's split column)
        counts.append(f"{res.other_split} of them with another split: split not changed, --update-tags changes it")
    if res.resplit:
        counts.append(f"split updated on {res.resplit} item{'s' if res.resplit != 1 else ''} already there")
    if res.deleted_since:
        counts.append(f"{res.deleted_since} deleted since, not re-added (--readd-deleted adds them)")
    extra: dict[str, Any] = {"deleted_since": res.deleted_since, "other_tags": res.other_tags,
                             "retagged": res.retagged, "other_split": res.other_split, "resplit": res.resplit}
    if isinstance(res, imports.ImportResult):
        if res.unreadable:
            counts[0] += f": {res.unreadable} unreadable image{'s' if res.unreadable != 1 else ''}"
        if res.merged:  # rows of a path already listed: their tags went to its item (not "already there")
            counts.append(f"{res.merged} row{'s' if res.merged != 1 else ''} merged with an earlier row of the same "
                          "path" + (f", {res.split_conflicts} of them naming another split (the first row's kept)"
                                    if res.split_conflicts else ""))
        extra.update(unreadable=res.unreadable, merged=res.merged, split_conflicts=res.split_conflicts)
    if src is not None and src.unknown_tags:
        kept = "dropped" if src.unknown_policy == "ignore" else "kept"
        counts.append(f"{src.unknown_tags} unknown tags {kept} (--unknown-tags {src.unknown_policy})")
        extra["unknown_tags"] = src.unknown_tags
    line = (f"imported {res.added} items into {store.name} from {what} ({'; '.join(counts)}) "
            f"in {res.seconds:.1f} s; {store.name} now holds {store.count()} items")
    _emit(args, {"collection": store.name, "added": res.added, "existing": res.existing, "skipped": res.skipped,
                 **extra, "skipped_reasons": res.skipped_reasons, "seconds": round(res.seconds, 3),
                 "head": store.head(), "count": store.count()}, line)
    if res.skipped and not args.json:
        for reason in res.skipped_reasons[:10]:
            print(f"  skipped {reason}", file=sys.stderr)
        if any("with other bytes" in r for r in res.skipped_reasons):
            print("  (ids that another import holds with other images: --id-prefix, e.g. --id-prefix train/, "
                  "gives this import ids of its own)", file=sys.stderr)
    return 0


def run_ls(args: argparse.Namespace) -> int:
    from deepindex.collection import list_collections

    rows = list_collections(args.catalogue)
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    if not rows:
        print("no collections yet (create one with: deepindex collection import NAME --digit-scenes)")
        return 0
    width = max(len(r["name"]) for r in rows)
    for r in rows:
        print(f"{r['name']:<{width}}  {r['count']:>8} items  {r['deleted']:>6} deleted  head {r['head']:<8} "
              f"created {_when(r['created'])}")
    return 0


def run_info(args: argparse.Namespace) -> int:
    store = _open(args)
    doc = store.info()
    if args.json:
        print(json.dumps(doc, indent=2))
        return 0
    print(f"{doc['name']}: {doc['count']} items ({doc['deleted']} deleted), head {doc['head']}, "
          f"{doc['tags']} tags, {doc['bytes'] / 1e6:.1f} MB of images, created {_when(doc['created'])}")
    print(f"  catalogue: {doc['catalogue']}")
    print(f"  blobs:     {doc['blobs']}")
    return 0


def run_add(args: argparse.Namespace) -> int:
    from deepindex.collection.imports import image_meta
    from deepindex.collection.store import check_data, check_meta, check_new_item_id, check_tags

    # The item is checked as store.add checks it, before the collection is opened with create=True:
    # a refused add creates no collection.
    check_new_item_id(args.id)
    tags = check_tags(args.tag)
    path = Path(args.file)
    if not path.is_file():
        raise FileNotFoundError(f"file: no such file {path}")
    data = check_data(path.read_bytes())
    meta = check_meta({"filename": path.name, **image_meta(data)})
    store = _open(args, create=True, writes=True)
    item, created = store.add(args.id, data, tags=tags, source="cli", meta=meta)
    line = (f"added {item.id} to {store.name} (seq {item.seq}, sha256 {item.content_hash[:12]}, {item.size} bytes)"
            if created else f"{item.id} was already in {store.name} with these bytes (seq {item.seq}): nothing to do")
    _emit(args, {"collection": store.name, "id": item.id, "created": created, "seq": item.seq,
                 "content_hash": item.content_hash, "tags": item.tags}, line)
    return 0


def run_rm(args: argparse.Namespace) -> int:
    from deepindex.collection import UnknownItem

    store = _open(args)
    try:
        item = store.delete(args.id)
    except UnknownItem as e:
        raise ValueError(str(e)) from None
    _emit(args, {"collection": store.name, "id": item.id, "deleted_seq": item.deleted_seq},
          f"deleted {item.id} from {store.name} (seq {item.deleted_seq})")
    return 0


def run_check(args: argparse.Namespace) -> int:
    store = _open(args)
    r = store.verify()
    if r["ok"]:
        line = f"{store.name}: {r['rows']} rows, every blob present and intact, head {r['head']}"
    else:
        line = (f"{store.name}: PROBLEMS: {len(r['missing_blobs'])} missing blobs {r['missing_blobs'][:5]}, "
                f"{len(r['corrupt_blobs'])} corrupt {r['corrupt_blobs'][:5]}, seqs unique {r['seqs_unique']}, "
                f"head is the last change {r['head_is_last']}")
    _emit(args, r, line)
    return 0 if r["ok"] else 1
