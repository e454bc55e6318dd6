"""Collections: the durable source of truth for a user's images and tags.

A catalogue of items (SQLite locally, PostgreSQL on Kubernetes; :mod:`.catalogue`) plus the original
image bytes, content-addressed on a local folder or any fsspec URL (:mod:`.blobs`).  Indexes are
derived from a collection: built from ``snapshot(upto)``, then caught up with ``changes(after)``.
Importers for the digit-scenes gallery, an image folder and a tag manifest are in :mod:`.imports`.
"""
from deepindex.collection.store import (
    AddResult,
    BlobStoreMismatch,
    Change,
    CollectionStore,
    DuplicateItem,
    Item,
    UnknownItem,
    list_collections,
)

__all__ = ["AddResult", "BlobStoreMismatch", "Change", "CollectionStore", "DuplicateItem", "Item", "UnknownItem",
           "list_collections"]
