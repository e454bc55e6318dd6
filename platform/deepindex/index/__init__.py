"""Indexing a collection with a registered model: concept probabilities + embeddings on disk.

- :mod:`.collection`  the collections to index: the digit-scenes gallery, an image folder, a manifest
- :mod:`.embed`       one model pass -> (probabilities, embeddings); the Ray Data actor that runs it
- :mod:`.vectors`     the FAISS wrapper: exact, HNSW or IVF; L2 or inner product
- :mod:`.store`       the index directory: manifest, arrays, atomic write, items added later
- :mod:`.keywords`    vocabulary with synonyms -> concepts -> ranked items
- :mod:`.metrics`     retrieval quality: precision@k and mAP@k
- :mod:`.fusion`      keyword + example + concept filters fused (weighted or RRF); cursor paging
- :mod:`.evaluate`    retrieval quality of a model: keyword AP, QBE per descriptor x metric, fusion
- :mod:`.build`       the whole build: resolve the model (``deepindex.tracking.registry``), embed in
                      parallel on the cluster, write the index

Nothing here imports Ray or FAISS at import time; each module imports what it needs.
"""
