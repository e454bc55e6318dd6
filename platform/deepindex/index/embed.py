"""One model pass -> concept probabilities and embeddings; the Ray Data actor that runs it.

Probabilities are sigmoids for multi-label models and a softmax for single-label ones, so
"presence probability" means what the model was trained to output.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch

from deepindex.checkpoint import LoadedModel, load_model
from deepindex.data.transforms import normalize

if TYPE_CHECKING:
    from ray import ObjectRef

    from deepindex.index.collection import Collection


@torch.inference_mode()
def infer_unit(lm: LoadedModel, unit: torch.Tensor | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(B, C, S, S) in [0, 1] -> probabilities (B, K) and embeddings (B, D), float32 numpy."""
    x = torch.as_tensor(unit, dtype=torch.float32)
    logits, emb = lm.model.forward_with_embedding(normalize(x, lm.stats))  # (B, K), (B, D)
    probs = torch.sigmoid(logits) if lm.multilabel else torch.softmax(logits, dim=1)
    return probs.numpy().astype(np.float32), emb.numpy().astype(np.float32)


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


def to_thumb(unit: np.ndarray) -> np.ndarray:
    """(B, C, S, S) in [0, 1] -> uint8: what the index keeps to show an item."""
    return np.clip(np.rint(unit * 255.0), 0, 255).astype(np.uint8)


class EmbedActor:
    """Ray Data ``map_batches`` actor: holds the model once, embeds row batches.

    Rows come in as ``{"id": (B,) int}`` (``ray.data.range``); the collection travels once per
    actor through the object store, and files are read by the actor that embeds them.
    """

    def __init__(self, checkpoint: str, collection_ref: list[ObjectRef[Collection]], threads: int = 1) -> None:
        import ray

        torch.set_num_threads(max(1, threads))
        self.lm = load_model(checkpoint)
        self.collection: Collection = ray.get(collection_ref[0])  # wrapped in a list so Ray does not resolve it early

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        rows = np.asarray(batch["id"], dtype=np.int64)
        unit = self.collection.unit_images(rows)  # (B, C, S, S)
        probs, emb = infer_unit(self.lm, unit)
        return {"row": rows, "probs": probs, "embedding": emb, "thumb": to_thumb(unit)}
