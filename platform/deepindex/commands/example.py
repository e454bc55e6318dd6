"""``deepindex example photos DIR``: write the example colour photo collection."""
from __future__ import annotations

import argparse
import json
from pathlib import Path


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("example", help="write an example collection to try the platform on")
    kinds = p.add_subparsers(dest="kind", required=True, metavar="KIND")
    ph = kinds.add_parser("photos", help="colour photos with coloured shapes: JPEGs + tags.csv (split column) "
                                         "+ concepts.txt")
    ph.add_argument("dir", help="folder to write (created; must be empty unless --force)")
    ph.add_argument("--n", type=int, default=600, help="number of images (default 600)")
    ph.add_argument("--size", type=int, default=160, help="image side in px, 128-224 (default 160)")
    ph.add_argument("--seed", type=int, default=0)
    ph.add_argument("--concepts", help="comma-separated: colours, shapes, colour_shape "
                                       "(default red,green,blue,circle,square,triangle,red_circle,blue_square)")
    ph.add_argument("--force", action="store_true", help="write into a folder that is not empty")
    ph.set_defaults(func=run_photos)


def run_photos(args: argparse.Namespace) -> int:
    from deepindex.data.photos import DEFAULT_CONCEPTS, make_photo_collection

    out = Path(args.dir)
    if out.exists() and not out.is_dir():
        raise FileNotFoundError(f"dir: {out} is a file, not a folder")
    if out.is_dir() and any(out.iterdir()) and not args.force:
        raise ValueError(f"dir: {out} is not empty (--force writes into it anyway)")
    concepts = [c.strip() for c in args.concepts.split(",") if c.strip()] if args.concepts else list(DEFAULT_CONCEPTS)
    coll = make_photo_collection(out, n=args.n, size=args.size, seed=args.seed, concepts=concepts)
    print(json.dumps({"root": str(coll.root), "manifest": str(coll.manifest), "concepts": coll.concepts,
                      "splits": coll.counts,
                      "train": f"deepindex train --config {coll.train_config}"}, indent=2))
    return 0
