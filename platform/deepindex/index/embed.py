"""One model pass -> concept probabilities and embeddings; the Ray Data actor that runs it.

Probabilities are sigmoids for multi-label models and a softmax for single-label ones, so
"presence probability" means what the model was trained to output.
"""
from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, overload

import numpy as np
import torch

from deepindex.checkpoint import LoadedModel, load_model
from deepindex.data.transforms import UNDECODABLE, normalize

if TYPE_CHECKING:
    from deepindex.console import Progress
    from deepindex.index.collection import Collection

log = logging.getLogger(__name__)


@overload
def infer_unit(lm: LoadedModel, unit: torch.Tensor | np.ndarray, features: None = None
               ) -> tuple[np.ndarray, np.ndarray]: ...
@overload
def infer_unit(lm: LoadedModel, unit: torch.Tensor | np.ndarray, features: Sequence[str]) -> dict[str, np.ndarray]: ...


@torch.inference_mode()
def infer_unit(lm: LoadedModel, unit: torch.Tensor | np.ndarray, features: Sequence[str] | None = None
               ) -> tuple[np.ndarray, np.ndarray] | dict[str, np.ndarray]:
    """(B, C, S, S) in [0, 1] -> probabilities (B, K) and embeddings (B, D), float32 numpy.

    With ``features`` (names from ``lm.model.feature_points()``): ``{name: (B, D_name)}``
    instead, from the same single pass.
    """
    x = torch.as_tensor(unit, dtype=torch.float32)
    if features is not None:
        out = lm.model.features(normalize(x, lm.stats), features, multilabel=lm.multilabel)
        return {k: v.numpy().astype(np.float32) for k, v in out.items()}
    logits, emb = lm.model.forward_with_embedding(normalize(x, lm.stats))  # (B, K), (B, D)
    probs = torch.sigmoid(logits) if lm.multilabel else torch.softmax(logits, dim=1)
    return probs.numpy().astype(np.float32), emb.numpy().astype(np.float32)


class _Features(torch.nn.Module):
    """``normalize`` then ``model.features(names)`` as a tuple: the graph :func:`optimized_forward` traces."""

    def __init__(self, lm: LoadedModel, names: tuple[str, ...]) -> None:
        super().__init__()
        self.model, self.stats, self.names, self.multilabel = lm.model, lm.stats, names, lm.multilabel

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = self.model.features(normalize(x, self.stats), self.names, multilabel=self.multilabel)
        return tuple(out[n] for n in self.names)


Forward = Callable[[np.ndarray], dict[str, np.ndarray]]


def optimized_forward(lm: LoadedModel, names: Sequence[str], atol: float = 1e-4, optimize: bool = True
                      ) -> tuple[Forward, bool]:
    """:func:`infer_unit` for fixed feature ``names`` as one TorchScript graph: traced, frozen and
    optimized for inference (batch norm folded into the convolutions, oneDNN kernels); returns
    (the forward, whether it is the optimized one).  ``optimize=False``: the eager forward with the
    same signature (what the benchmarks compare the graph with).

    Why: an eager forward takes and drops the GIL at every layer, so beside a busy event loop (a
    serving replica's HTTP requests) it waits up to a switch interval (5 ms) per layer; the graph
    runs without the GIL from input to output.  On this machine's 2 cores, 1 torch thread, the
    small ConvNet's batch of 16 went from 0.25 to 0.11 ms per image alone, and beside a busy Python
    thread from 7.6 to 0.7 ms per image of wall time; ResNet-18 at 224 px from 33 to 23 ms per image.
    The graph is checked against the eager forward on two batch sizes it was not traced with; a
    model that does not trace, or answers otherwise, keeps the eager forward (logged)."""
    names = tuple(dict.fromkeys(names))

    def eager(unit: np.ndarray) -> dict[str, np.ndarray]:
        return infer_unit(lm, unit, names)

    if not optimize:
        return eager, False
    shape = (lm.channels, lm.image_size, lm.image_size)
    gen = torch.Generator().manual_seed(0)
    try:
        module = _Features(lm, names).eval()
        with torch.inference_mode(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the tracer's notes on constants (the normalisation's mean/std)
            graph = torch.jit.optimize_for_inference(
                torch.jit.trace(module, torch.rand((4, *shape), generator=gen), check_trace=False))
            for b in (1, 7):
                x = torch.rand((b, *shape), generator=gen)
                want, got = module(x), graph(x)
                if len(got) != len(want) or not all(g.shape == w.shape and torch.allclose(g, w, atol=atol, rtol=1e-3)
                                                    for g, w in zip(got, want, strict=True)):
                    raise ValueError(f"the traced graph answers otherwise than the model at batch size {b}")
    except Exception as e:  # noqa: BLE001 - any model the tracer cannot take still serves, eagerly
        log.warning("model forward: not optimized (%s: %s); the eager forward serves", type(e).__name__, e)
        return eager, False

    def run(unit: np.ndarray) -> dict[str, np.ndarray]:
        with torch.inference_mode():
            out = graph(torch.as_tensor(unit, dtype=torch.float32))
        return {n: v.numpy().astype(np.float32) for n, v in zip(names, out, strict=True)}

    return run, True


def embed_collection_local(lm: LoadedModel, collection: Collection, batch_size: int = 256
                           ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """In-process embedding (no Ray): probabilities, embeddings and uint8 thumbnails."""
    probs, embs, thumbs = [], [], []
    for start in range(0, len(collection), batch_size):
        rows = np.arange(start, min(start + batch_size, len(collection)))
        unit = collection.unit_images(rows)  # (B, C, S, S)
        p, e = infer_unit(lm, unit)
        probs.append(p)
        embs.append(e)
        thumbs.append(to_thumb(unit))
    return np.concatenate(probs), np.concatenate(embs), np.concatenate(thumbs)


def embed_features_local(lm: LoadedModel, collection: Collection, features: Sequence[str], batch_size: int = 256,
                         progress: Progress | None = None) -> dict[str, np.ndarray]:
    """In-process (no Ray): ``{name: (N, D_name)}`` float32 for every item of ``collection``;
    ``progress(done, total)`` after each batch (and ``(0, total)`` first)."""
    parts: dict[str, list[np.ndarray]] = {f: [] for f in features}
    n = len(collection)
    if progress is not None:
        progress(0, n)
    for start in range(0, n, batch_size):
        unit = collection.unit_images(np.arange(start, min(start + batch_size, n)))  # (B, C, S, S)
        for name, v in infer_unit(lm, unit, features).items():
            parts[name].append(v)
        if progress is not None:
            progress(min(start + batch_size, n), n)
    return {name: np.concatenate(v) for name, v in parts.items()}


def to_thumb(unit: np.ndarray) -> np.ndarray:
    """(B, C, S, S) in [0, 1] -> uint8: what the index keeps to show an item."""
    return np.clip(np.rint(unit * 255.0), 0, 255).astype(np.uint8)


def image_bytes_to_unit(data: bytes, image_size: int, channels: int, preset: str | None = None) -> np.ndarray:
    """Stored image bytes -> the model's input (C, S, S) uint8 through the eval preset (EXIF orientation
    applied): what indexing a collection and catching an index up both feed the model."""
    import io

    from deepindex.data.transforms import decode_file

    return decode_file(io.BytesIO(data), image_size, channels, preset)


class PixelEmbedder:
    """uint8 model inputs (B, C, S, S) -> ``{"probs": (B, K), feature: (B, D)}`` from one pass of the
    model's optimized graph (:func:`optimized_forward`: the forward the serving replicas run, so an
    indexed item and the same image sent as a query get the same vectors)."""

    def __init__(self, lm: LoadedModel, features: Sequence[str]) -> None:
        self.forward = optimized_forward(lm, ["probs", *features])[0]

    def __call__(self, pixels: np.ndarray) -> dict[str, np.ndarray]:
        from deepindex.data.transforms import uint8_to_unit

        return self.forward(uint8_to_unit(pixels))


class ItemEmbedActor:
    """Ray Data ``map_batches`` actor: holds the model once; embeds a batch of collection items.

    Rows come in as ``{"row": (B,) int, "hash": (B,) str}``; the actor reads each item's original
    bytes from the collection's blob store itself (no image travels through the driver).  An item
    whose bytes do not decode gets ``ok=False`` and zero vectors: the build reports and skips it.
    """

    def __init__(self, checkpoint: str, blobs_url: str, features: Sequence[str], threads: int = 1):
        from deepindex.collection.blobs import BlobStore

        torch.set_num_threads(max(1, threads))
        self.lm = load_model(checkpoint)
        self.blobs = BlobStore(blobs_url)
        self.embed = PixelEmbedder(self.lm, features)
        self.shape = (self.lm.channels, self.lm.image_size, self.lm.image_size)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        hashes = [str(h) for h in batch["hash"]]
        pixels = np.zeros((len(hashes), *self.shape), dtype=np.uint8)
        ok = np.ones(len(hashes), dtype=bool)
        for j, h in enumerate(hashes):
            data = self.blobs.get(h)  # a blob store that fails to answer fails the build (catchup.py says why)
            try:
                pixels[j] = image_bytes_to_unit(data, self.shape[1], self.shape[0], self.lm.preset)
            except UNDECODABLE as e:  # a blob PIL cannot read: skipped, not fatal
                ok[j] = False
                log.warning("item with content %s does not decode (%s); skipped", h, e)
        out = self.embed(pixels)
        return {"row": np.asarray(batch["row"], dtype=np.int64), "ok": ok, **out}
