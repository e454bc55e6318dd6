"""``deepindex index build`` and ``deepindex index info``."""
from __future__ import annotations

import argparse
import json

from deepindex.commands import positive_int
from deepindex.console import ProgressLine


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("index", help="build and inspect retrieval indexes (FAISS + concept probabilities)")
    isub = p.add_subparsers(dest="index_command", required=True, metavar="ACTION")

    b = isub.add_parser("build", help="embed a collection with a model on the cluster and write its index")
    b.add_argument("--model", default="models:/deepindex@champion",
                   help="models:/NAME@champion, models:/NAME/VERSION or a checkpoint path")
    b.add_argument("--tracking-uri", help="MLflow tracking URI (default: the local platform's)")
    b.add_argument("--collection", default="digit-scenes",
                   help="the collection to index (deepindex collection import NAME ...)")
    b.add_argument("--out", help="index folder (default: <state>/indexes/<collection>/<model>-<version>)")
    b.add_argument("--features", default="penultimate",
                   help="descriptors to index, comma-separated (the first is the default for queries)")
    b.add_argument("--kind", default="auto", choices=["auto", "flat", "hnsw", "ivf"],
                   help="auto: exact up to --exact-max items, IVF above")
    b.add_argument("--metric", default="ip", choices=["ip", "l2"],
                   help="what the index is built to compare by: ip (the dot product; cosine with the default "
                        "normalisation) or l2 (the Euclidean distance)")
    b.add_argument("--no-normalize", action="store_true", help="keep raw embeddings (default: L2-normalised)")
    # Bad numbers are argparse's one-line error naming the option (exit 2), before anything starts.
    b.add_argument("--exact-max", type=positive_int, default=100_000)
    b.add_argument("--workers", type=positive_int, help="embedding actors (default: sized to the cluster's free CPUs)")
    b.add_argument("--batch-size", type=positive_int, default=256)
    b.add_argument("--local", action="store_true", help="embed in this process, without Ray")
    b.set_defaults(func=run_build)

    i = isub.add_parser("info", help="print an index's manifest")
    i.add_argument("path")
    i.set_defaults(func=run_info)


def run_build(args: argparse.Namespace) -> int:
    from deepindex.index.build import build_index
    from deepindex.index.vectors import VectorConfig

    cfg = VectorConfig(kind=args.kind, metric=args.metric, normalize=not args.no_normalize, exact_max=args.exact_max)
    # What a user can get wrong is refused in one line before Ray starts or is joined (as train, tune
    # and serve do): the model is there (looked up, not downloaded) and so is the collection.
    from deepindex.collection import CollectionStore
    from deepindex.index.store import check_index_target
    from deepindex.tracking.registry import require_model

    if args.out:
        check_index_target(args.out)
    require_model(args.model, args.tracking_uri)
    CollectionStore.open(args.collection, create=False)
    if not args.local:
        from deepindex.cluster import connect

        connect()
    features = [f.strip() for f in args.features.split(",") if f.strip()]
    r = build_index(args.model, collection=args.collection, out=args.out, vector_cfg=cfg, features=features,
                    use_ray=not args.local, workers=args.workers, batch_size=args.batch_size,
                    tracking_uri=args.tracking_uri,
                    progress=ProgressLine("embedding", "starting the embedding workers"))
    print(json.dumps({"path": str(r.path), "model": r.model.name, "version": r.model.version, "items": r.count,
                      "seq": r.seq, "features": r.features, "kind": r.kind, "metric": r.metric,
                      "skipped": r.skipped, "seconds": round(r.seconds, 2)}, indent=2))
    return 0


def run_info(args: argparse.Namespace) -> int:
    from deepindex.index.store import read_manifest

    print(read_manifest(args.path).model_dump_json(indent=2))
    return 0
