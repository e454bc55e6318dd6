"""GPU check: one script a machine with a GPU runs as is; prints images/s for each step.

``python jobs/gpu_check.py`` (or ``ray job submit --working-dir . -- python jobs/gpu_check.py``):

1. writes the example photo collection (600 colour JPEGs) to a temp folder;
2. trains the ConvNet on it with Ray Train, ``ray.use_gpu=true``, 1-2 workers (one per GPU),
   ``train.amp=bf16`` (fp16 + GradScaler where the GPU has no bf16), ``train.channels_last``,
   pinned memory and non-blocking copies; prints the workers' training images/s and test mAP;
3. builds an index of the collection in-process on the GPU (decode on CPU, forward with
   autocast, FAISS index written by :class:`deepindex.index.store.IndexStore`): prints its
   images/s, and the bare forward's images/s on a fixed batch;
4. prints one JSON line with every figure, and exits 0.

On a machine without a GPU it prints "no GPU: ..." and exits 0 at once.  ``--device cpu``
runs the same steps on CPU (with ``--smoke``: a small collection and one epoch), which is how
the tests keep this script working where no GPU is lent.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

log = logging.getLogger("gpu_check")


def _amp(device: torch.device) -> str:
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        return "fp16"
    return "bf16"


def train_step(root: Path, work: Path, device: torch.device, workers: int, epochs: int, image_size: int,
               smoke: bool) -> dict:
    from deepindex.config import load_config
    from deepindex.train.trainer import train

    gpu = device.type == "cuda"
    overrides = [
        "data.dataset=manifest", f"data.root={root}", f"data.image_size={image_size}", "data.augment=flip,crop",
        f"data.num_workers={0 if smoke else 3}", f"train.amp={_amp(device)}", "train.channels_last=true",
        f"train.epochs={epochs}", f"train.batch_size={32 if smoke else 128}", "schedule.policy=cosine",
        "optim.name=adamw", "optim.lr=0.003", "regularization.l2=0.0", f"ray.num_workers={workers}",
        f"ray.use_gpu={'true' if gpu else 'false'}", f"ray.cpus_per_worker={4 if gpu else 1}",
        f"ray.storage_path={work / 'ray_results'}", "ray.max_failures=0",
    ]
    cfg = load_config(None, overrides)
    start = time.perf_counter()
    out = train(cfg, name="gpu-check")
    return {"workers": workers, "amp": cfg.train.amp, "epochs": epochs, "wall_s": round(time.perf_counter() - start, 1),
            "train_images_per_s": round(float(out.metrics.get("images_per_s", 0.0)), 1),
            "test_map": round(float(out.test_metrics.get("test_map", float("nan"))), 4), "checkpoint": out.checkpoint}


def index_step(checkpoint: str, root: Path, work: Path, device: torch.device, bare_reps: int,
               batch_size: int = 256) -> dict:
    from deepindex.checkpoint import load_model
    from deepindex.data.transforms import normalize
    from deepindex.index.collection import load_collection
    from deepindex.index.store import IndexStore
    from deepindex.index.vectors import VectorConfig
    from deepindex.train.precision import Precision

    lm = load_model(checkpoint)
    d = lm.config.data
    precision = Precision(device, _amp(device), channels_last=True)
    model = precision.prepare_model(lm.model.to(device)).eval()
    coll = load_collection("manifest", image_size=d.image_size, channels=d.channels, concepts=lm.concepts,
                           root=str(root), manifest=str(root / "tags.csv"), preset=d.preset, split="all")
    probs, embs = [], []
    forward_s = 0.0
    start = time.perf_counter()
    with torch.inference_mode():
        for s in range(0, len(coll), batch_size):
            unit = coll.unit_images(np.arange(s, min(s + batch_size, len(coll))))  # (B, C, S, S) decoded on CPU
            x = torch.from_numpy(unit)
            if device.type == "cuda":
                x = x.pin_memory()
            t = time.perf_counter()
            x = normalize(precision.to_device(x), lm.stats)
            with precision.autocast():
                logits, emb = model.forward_with_embedding(x)  # (B, K), (B, D)
            p = torch.sigmoid(logits.float()) if lm.multilabel else torch.softmax(logits.float(), 1)
            probs.append(p.cpu().numpy())
            embs.append(emb.float().cpu().numpy())
            forward_s += time.perf_counter() - t
    labels = coll.labels or [[] for _ in coll.ids]
    store = IndexStore.create(
        model={"uri": checkpoint, "name": "gpu-check", "version": "0"}, collection=coll.name, seq=0,
        concepts=lm.concepts, ids=coll.ids, labels=labels, probs=np.concatenate(probs),
        features={"penultimate": np.concatenate(embs)}, vector_cfg=VectorConfig(), default_feature="penultimate",
        image_size=lm.image_size, channels=lm.channels, multilabel=lm.multilabel, preset=lm.preset)
    store.save(work / "index")
    total_s = time.perf_counter() - start
    # The bare forward on one resident batch (at most the collection's size): the model's own rate,
    # without decoding or copies.
    bare_batch = min(batch_size, len(coll))
    x = torch.randn(bare_batch, d.channels, d.image_size, d.image_size, device=device)
    x = precision.to_device(x)
    with torch.inference_mode(), precision.autocast():
        for _ in range(2):
            model(x)
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(bare_reps):
            model(x)
        if device.type == "cuda":
            torch.cuda.synchronize()
        bare = bare_reps * bare_batch / (time.perf_counter() - t)
    return {"items": len(store), "index_images_per_s": round(len(coll) / total_s, 1),
            "index_forward_images_per_s": round(len(coll) / forward_s, 1), "bare_forward_images_per_s": round(bare, 1),
            "input": [d.channels, d.image_size, d.image_size], "preset": d.preset}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="cpu: the same path without a GPU")
    ap.add_argument("--workers", type=int, default=0, help="Train workers (default: one per GPU, at most 2)")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--image-size", type=int, default=96)
    ap.add_argument("--smoke", action="store_true", help="a small collection and one epoch (tests)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.device == "cuda" and not torch.cuda.is_available():
        print(f"no GPU: torch.cuda.is_available() is False (torch {torch.__version__}, CUDA build "
              f"{torch.version.cuda or 'none'}); nothing to check here (--device cpu runs the same steps on CPU)")
        return 0
    device = torch.device(args.device)
    workers = args.workers or (min(2, torch.cuda.device_count()) if device.type == "cuda" else 1)
    epochs = 1 if args.smoke else args.epochs
    from deepindex.data.photos import make_photo_collection

    with tempfile.TemporaryDirectory(prefix="deepindex-gpu-check-") as tmp:
        work = Path(tmp)
        coll = make_photo_collection(work / "photos", n=60 if args.smoke else 600, size=128 if args.smoke else 160)
        result = {"device": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu"}
        result["train"] = train_step(coll.root, work, device, workers, epochs, 64 if args.smoke else args.image_size,
                                     args.smoke)
        print(f"train: {workers} Ray Train worker(s) on {args.device}, {result['train']['amp']}, channels_last: "
              f"{result['train']['train_images_per_s']} images/s, test mAP {result['train']['test_map']}", flush=True)
        # --smoke: the bare forward only has to run (on CPU, 12 bf16 batches of 256 took 47 s here).
        result["index"] = index_step(result["train"].pop("checkpoint"), coll.root, work, device,
                                     bare_reps=2 if args.smoke else 10)
        print(f"index build in-process on {args.device}: {result['index']['index_images_per_s']} images/s end to end, "
              f"{result['index']['index_forward_images_per_s']} images/s in the forward, bare forward "
              f"{result['index']['bare_forward_images_per_s']} images/s", flush=True)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
