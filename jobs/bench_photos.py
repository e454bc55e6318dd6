"""Benchmark: the example photo collection, colour vs grayscale, and transfer vs scratch.

``python jobs/bench_photos.py [--what floor,gray,transfer] [--out results.json]`` prints JSON.
Everything trains in-process with the same epoch functions Ray Train's workers run
(``deepindex.train.engine``), on CPU, with fixed seeds:

- ``floor``: the ConvNet at 64 px on the example collection (600 images, 160 px), augmented,
  scored on the held-out ``test`` split (the floor the tests assert: mAP >= 0.93);
- ``gray``: the same run with ``data.channels=1`` (the colour concepts cannot be learnt);
- ``transfer``: a ConvNet trained on a source collection (colour and shape concepts) is
  fine-tuned on a small target set (48 training images, the nine colour_shape bindings, other
  images) and compared with the same model from scratch and with a linear probe.
"""
from __future__ import annotations

import argparse
import csv
import logging
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from deepindex.config import load_config
from deepindex.data.photos import COLOURS, SHAPES, make_photo_collection
from deepindex.data.photos import RECIPE as PHOTO_RECIPE

RECIPE = list(PHOTO_RECIPE)  # what the floor test runs (tests/train/test_photo_floor.py)


def run_local(overrides: list[str], log_every: bool = False) -> dict:
    """Train in-process; the test split's metrics and the training time (data loading included)."""
    from deepindex.train.engine import evaluate, local_training

    cfg = load_config(None, overrides)
    run = local_training(cfg)
    start, cpu = time.perf_counter(), time.process_time()
    for epoch in range(cfg.train.epochs):
        m = run.epoch(epoch)
        if log_every:
            val = evaluate(run.model, DataLoader(run.splits.val, batch_size=256), True)
            logging.info("epoch %d: loss %.4f val mAP %.4f", epoch, m["train_loss"], val["val_map"])
    train_s, cpu_s = time.perf_counter() - start, time.process_time() - cpu
    test = evaluate(run.model, DataLoader(run.splits.test, batch_size=256), run.splits.multilabel, prefix="test_")
    return {"test_map": round(test["test_map"], 4), "train_s": round(train_s, 1), "train_cpu_s": round(cpu_s, 1),
            "epochs": cfg.train.epochs,
            "train_images": len(run.splits.train), "test_images": len(run.splits.test),
            "test_ap": dict(zip(run.splits.concepts, [None if a is None else round(a, 3) for a in test["test_ap"]],
                                strict=True)),
            "model": run.model, "config": run.config, "splits": run.splits}


def _public(r: dict) -> dict:
    return {k: v for k, v in r.items() if k not in ("model", "config", "splits")}


def _keep_train_rows(manifest: Path, n_train: int) -> None:
    """Keep the first ``n_train`` training rows of a manifest (val and test rows untouched)."""
    rows = list(csv.DictReader(manifest.open(newline="")))
    kept, seen = [], 0
    for r in rows:
        if r["split"] == "train":
            seen += 1
            if seen > n_train:
                continue
        kept.append(r)
    with manifest.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["path", "tags", "split"])
        w.writeheader()
        w.writerows(kept)


def transfer(work: Path, n_target_train: int = 48, epochs: int = 15) -> dict:
    from deepindex.checkpoint import save_checkpoint

    source = make_photo_collection(work / "source", n=600, seed=0, concepts=list(COLOURS) + list(SHAPES))
    src = run_local([*RECIPE, f"data.root={source.root}"])
    ckpt = save_checkpoint(work / "source_ckpt", model=src["model"], config=src["config"], stats=src["splits"].stats,
                           concepts=src["splits"].concepts, multilabel=True, epoch=src["epochs"] - 1)
    bindings = [f"{c}_{s}" for c in COLOURS for s in SHAPES]
    target = make_photo_collection(work / "target", n=600, seed=1, concepts=bindings)
    _keep_train_rows(target.manifest, n_target_train)
    base = [*RECIPE, f"data.root={target.root}", f"train.epochs={epochs}"]
    out = {"source": _public(src), "target_train_images": n_target_train}
    out["scratch"] = _public(run_local(base))
    out["fine_tune"] = _public(run_local([*base, f"model.weights={ckpt}"]))
    out["linear_probe"] = _public(run_local([*base, f"model.weights={ckpt}", "model.freeze=backbone"]))
    out["probe_then_fine_tune"] = _public(run_local([*base, f"model.weights={ckpt}", "model.freeze=backbone",
                                                     f"train.unfreeze_epoch={epochs // 3}"]))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--what", default="floor,gray,transfer")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--verbose", action="store_true", help="log the validation mAP of every epoch")
    ap.add_argument("--out")
    ap.add_argument("overrides", nargs="*", metavar="key=value", help="changes to the recipe, e.g. train.epochs=8")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)
    what = set(args.what.split(","))
    results: dict = {"threads": args.threads}
    with tempfile.TemporaryDirectory(prefix="deepindex-photos-") as tmp:
        work = Path(tmp)
        if what & {"floor", "gray"}:
            coll = make_photo_collection(work / "photos", n=600, seed=0)
            base = [*RECIPE, f"data.root={coll.root}", *args.overrides]
            if "floor" in what:
                results["colour"] = _public(run_local(base, args.verbose))
            if "gray" in what:
                results["gray"] = _public(run_local([*base, "data.channels=1"], args.verbose))
        if "transfer" in what:
            results["transfer"] = transfer(work)
    from deepindex.console import report as emit

    emit(results, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
