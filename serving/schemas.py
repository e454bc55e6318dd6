"""Pydantic types of the HTTP API (``/v1``) and of the application's arguments."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

HERE = Path(__file__).resolve().parent

# Every deployment's health-check period.  Serve notices a replica process that died (SIGKILL, OOM)
# only at its next check: every 2 s, not Serve's default 10, so a dead replica is replaced sooner
# (the checks are cheap calls).  An ingress's check also pushes its metrics to the hub: how stale
# the other replicas' numbers in a scrape may be.
HEALTH_S = 2.0


class ServeArgs(BaseModel):
    """``build_app`` arguments (the ``args`` of ``serving/config.yaml``); unknown keys are an error."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())
    model: str = "models:/deepindex@champion"  # registry URI or a checkpoint path: the version followed
    tracking_uri: str | None = None
    # The collection served (its catalogue and image store: deepindex.collection; unset = the
    # state folder's SQLite catalogue and blob folder, or DEEPINDEX_CATALOGUE_URL / DEEPINDEX_BLOBS_URL).
    collection: str = "digit-scenes"
    catalogue_url: str | None = None
    blobs_url: str | None = None
    # The collection's index folder (one index per model version); unset: <state>/indexes/<collection>.
    index_dir: str | None = None
    # Descriptors a new index holds, beside the concept probabilities every index keeps (queryable as
    # feature=probs with no second copy); default: penultimate.  Each one costs 4 x dim bytes per item.
    features: list[str] | None = None
    build_workers: int | None = Field(None, ge=1)  # embedding actors of an index build (default: sized to free CPUs)
    keep_indexes: int = Field(3, ge=1)  # index folders kept per collection (rollback is fast to these)
    # Ingress replicas answer searches from their own copy of the served index where they share the
    # index replica's disk (serving/reads.py); false: every search goes to the index replica.
    local_reads: bool = True
    vocabulary: str | None = str(HERE / "vocabulary.yaml")
    reload_interval_s: float = Field(30.0, ge=0)  # poll the model URI for a new version; 0 = never
    # Writes (POST/DELETE /v1/items) need `Authorization: Bearer <token>` when the service has one:
    # the token in this file (mode 0600; `deepindex serve` makes one under the state folder), else
    # the DEEPINDEX_API_TOKEN environment variable (k8s: from a Secret).  auth_reads: reads too.
    api_token_file: str | None = None
    # The token's sha256 (hex), for a token the replicas' processes do not hold: `deepindex serve`
    # passes its own DEEPINDEX_API_TOKEN so, since a cluster started before it (`deepindex up`, a
    # RAY_ADDRESS) gives its replicas another environment, where writes were open (found on review).
    api_token_sha256: str | None = Field(None, pattern=r"^[0-9a-f]{64}$")
    auth_reads: bool = False
    # Limits on client input: beyond them a request gets a 4xx, never a 500.
    max_image_bytes: int = Field(8_000_000, ge=1)
    max_image_pixels: int = Field(16_000_000, ge=1)  # decompression bombs stop at the header
    max_images_per_request: int = Field(16, ge=1)
    max_k: int = Field(100, ge=1)
    max_query_chars: int = Field(512, ge=1)  # keyword query length (GET /v1/search?q=)
    # Batching and scaling.
    max_batch_size: int = Field(32, ge=1)
    # 0 (greedy): a batch is whatever queued while the previous batch ran: full batches under load,
    # no added latency when idle.  A wait > 0 trades latency for fuller batches at middling load.
    batch_wait_timeout_s: float = Field(0.0, ge=0)
    # The batches a model replica forms, at most max_batch_size.  0: measured when a version loads,
    # the size with the least time per image (serving/model.py fastest_batch): on a CPU, ResNet-18
    # at 224 px is faster per image in small batches than in batches of 32.
    forward_batch_size: int = Field(0, ge=0)
    model_replicas: int = Field(1, ge=1)
    model_autoscaling: dict[str, Any] | None = None  # Serve autoscaling_config; replaces model_replicas
    model_num_cpus: float = Field(1.0, ge=0)
    model_threads: int = Field(0, ge=0)  # torch threads per model replica; 0 = the replica's CPUs
    ingress_replicas: int = Field(1, ge=1)
    ingress_autoscaling: dict[str, Any] | None = None
    ingress_num_cpus: float = Field(0.5, ge=0)
    # Each ingress replica holds the model itself (it then asks for ingress_num_cpus + model_num_cpus, and
    # model_replicas/model_autoscaling do not apply): no hop to a model replica per image, at the cost of
    # the model's memory in every ingress replica.  Off: model replicas of their own scale apart.
    model_in_ingress: bool = False

    def ingress_cpus(self) -> float:
        """An ingress replica's CPUs: with ``model_in_ingress`` it holds the model's too."""
        return self.ingress_num_cpus + (self.model_num_cpus if self.model_in_ingress else 0.0)

    @field_validator("features")
    @classmethod
    def _feature_names(cls, v: list[str] | None) -> list[str] | None:
        """output and last_but_one are probs's and penultimate's other names."""
        from deepindex.index.vectors import feature_name

        return None if v is None else [feature_name(f) for f in v]

    def cpus(self) -> float:
        """The CPUs the application holds at its starting size (index replica and metrics hub: none)."""
        def start(replicas: int, autoscaling: dict[str, Any] | None) -> int:
            if not autoscaling:
                return replicas
            return max(1, int(autoscaling.get("initial_replicas") or autoscaling.get("min_replicas", 1)))

        ingress = start(self.ingress_replicas, self.ingress_autoscaling) * self.ingress_cpus()
        if self.model_in_ingress:
            return ingress
        return ingress + start(self.model_replicas, self.model_autoscaling) * self.model_num_cpus

    def model_threads_or_cpus(self) -> int:
        """Torch threads for the model: ``model_threads``, else the model's CPUs (at least 1)."""
        return self.model_threads or max(1, int(self.model_num_cpus))

    def resolved(self) -> ServeArgs:
        """Relative paths made absolute against the repository root (the folder holding ``serving/``), and
        the state folder's defaults decided here: replicas run in Ray's worker directories, not where
        ``serve run`` or ``deepindex serve`` was typed, and see neither that shell's environment nor its
        state folder."""
        from deepindex.collection.catalogue import default_catalogue_url
        from deepindex.index.build import collection_dir

        root = HERE.parent

        def fix(p: str | None) -> str | None:
            return p if p is None or Path(p).is_absolute() or "://" in p else str(root / p)

        model = self.model if self.model.startswith("models:/") else fix(self.model)
        assert model is not None
        tracking_uri = self.tracking_uri
        if tracking_uri is None and model.startswith("models:/"):
            from deepindex.tracking.uri import resolve_tracking_uri

            tracking_uri = resolve_tracking_uri(warn=False)
        index_dir = fix(self.index_dir) or str(collection_dir(self.collection))
        return self.model_copy(update={
            "model": model, "tracking_uri": tracking_uri, "index_dir": index_dir,
            "catalogue_url": self.catalogue_url or default_catalogue_url(),
            # None: the collection's own blob store, the one it recorded (a default folder here would be
            # another store for a collection imported with --blobs: the service's adds were refused).
            "blobs_url": fix(self.blobs_url) or os.environ.get("DEEPINDEX_BLOBS_URL") or None,
            "vocabulary": fix(self.vocabulary),
            "api_token_file": fix(self.api_token_file)})

    def api_token_digest(self) -> str | None:
        """The write token's sha256 (hex): the file's token, else ``api_token_sha256``, else this process's
        DEEPINDEX_API_TOKEN's; None: writes are open."""
        import os

        if self.api_token_file:
            p = Path(self.api_token_file)
            if not p.is_file():
                raise ValueError(f"api_token_file: no such file {p}")
            return token_digest(p.read_text())
        if self.api_token_sha256:
            return self.api_token_sha256
        return token_digest(os.environ.get("DEEPINDEX_API_TOKEN") or "")


def token_digest(token: str) -> str | None:
    """sha256 (hex) of a bearer token as sent (surrounding whitespace dropped); None for an empty one."""
    import hashlib

    token = token.strip()
    return hashlib.sha256(token.encode()).hexdigest() if token else None


class ErrorBody(BaseModel):
    code: str
    message: str


class ErrorResponse(BaseModel):
    error: ErrorBody


class ModelRef(BaseModel):
    model_config = ConfigDict(protected_namespaces=())
    name: str
    version: str


class IndexRef(BaseModel):
    """The index an answer came from: the collection's index for ``model_version``, as of change ``seq``."""

    collection: str
    model_version: str
    seq: int
    count: int


class Base64Image(BaseModel):
    # An unknown key is refused, not dropped: a misspelt "tagz" stored the item without its tags (found on
    # review).  Which of these an operation takes: serving.contract.IMAGE_BODIES.
    model_config = ConfigDict(extra="forbid")
    id: str | None = Field(None, max_length=256)
    data: str = Field(..., description="the image file's bytes, base64")
    tags: list[str] = Field(default_factory=list, description="known labels of the item (POST /v1/items)")


class ImagesJSON(BaseModel):
    model_config = ConfigDict(extra="forbid")
    images: list[Base64Image]


class ConceptScore(BaseModel):
    concept: str
    probability: float


class TagResult(BaseModel):
    index: int
    id: str | None = None
    concepts: list[ConceptScore]


class TagResponse(BaseModel):
    model: ModelRef
    results: list[TagResult]


class SearchHit(BaseModel):
    id: str
    score: float
    labels: list[str] | None = None
    image_url: str


class KeywordSearchResponse(BaseModel):
    """``/v1/search``: keywords, and optionally an example and concept filters, fused; one page."""

    query: str | None = None  # the keywords (None: an example only)
    mode: Literal["all", "any"]
    concepts: list[str]
    matched: dict[str, str]
    unmatched: list[str]
    corrected: dict[str, str] = {}  # typed word -> the vocabulary word it was read as
    suggestions: dict[str, list[str]] = {}  # unmatched word -> "did you mean" phrases
    scoring: str
    example: dict[str, str] | None = None  # {"id": item} or {"upload": sha256 prefix of the image}
    feature: str | None = None  # the example's descriptor and metric
    metric: str | None = None
    min_prob: dict[str, float] = {}
    fusion: str | None = None  # the rule, when two signals were fused
    weights: dict[str, float] = {}
    model: ModelRef
    index: IndexRef
    results: list[SearchHit]
    next_cursor: str | None = None  # pass as cursor= with the same parameters for the next page


class SimilarResponse(BaseModel):
    feature: str
    metric: str
    model: ModelRef
    index: IndexRef
    query_id: str | None = None
    min_prob: dict[str, float] = {}
    results: list[SearchHit]
    next_cursor: str | None = None


class ItemResponse(BaseModel):
    id: str
    concepts: list[ConceptScore]
    labels: list[str] | None = None
    meta: dict[str, Any] = {}
    image_url: str
    model: ModelRef
    index: IndexRef


class AddItemsResponse(BaseModel):
    added: list[str]  # new items
    existing: list[str] = []  # re-posted with the same bytes: already there, unchanged
    seq: int  # the collection's last change
    count: int  # live items in the collection
    index: IndexRef | None = None


class DeleteItemResponse(BaseModel):
    deleted: str
    seq: int
    count: int
    index: IndexRef | None = None


class RolloverStatus(BaseModel):
    phase: str  # starting | idle | building | loading | catching_up | switching | retrying
    serving: str | None = None  # the model version served with its index
    serving_name: str | None = None  # the name of that model (versions restart at 1 for every name)
    target: str | None = None  # the version being prepared
    target_name: str | None = None  # the name of that model
    progress: float | None = None
    message: str = ""
    since: float
    attempt: int = 0
    last_error: str | None = None
    last_switch: dict[str, Any] | None = None


class StatusResponse(BaseModel):
    collection: str
    model: ModelRef | None = None
    index: IndexRef | None = None
    rollover: RolloverStatus
    items: int
    head: int


class QbeFigure(BaseModel):
    """Query by example with one descriptor and metric, over the report's gallery."""

    descriptor: str
    metric: str
    map_at_k: float
    precision_at_k: float


class FusionFigure(BaseModel):
    """'Items with concept c like this one': one signal, or a fusion of keywords and an example."""

    signal: str
    map_at_k: float
    precision_at_k: float


class RetrievalSummary(BaseModel):
    """The served version's retrieval report (``deepindex evaluate-retrieval --attach``), in figures."""

    collection: str
    size: int  # items in the labelled gallery it was measured on
    k: int
    keyword_map: float
    keyword_precision_at_k: float
    qbe: list[QbeFigure]
    best: QbeFigure
    chance_precision_at_k: float  # what a random ranking scores
    fusion: list[FusionFigure]


class AboutResponse(BaseModel):
    model_config = ConfigDict(protected_namespaces=())
    model: ModelRef
    retrieval: RetrievalSummary | None = None  # None: this version has no report attached


class Alive(BaseModel):
    """``/healthz``: the ingress answers (liveness); whether a model and an index serve is ``/readyz``'s."""
    status: str


class Health(BaseModel):
    status: str
    model: dict[str, Any] | None = None
    index: dict[str, Any] | None = None
    reasons: list[str] = []
