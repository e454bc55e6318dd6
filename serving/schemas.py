"""Pydantic types of the HTTP API (``/v1``) and of the application's arguments."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

HERE = Path(__file__).resolve().parent


class ServeArgs(BaseModel):
    """``build_app`` arguments (the ``args`` of ``serving/config.yaml``); unknown keys are an error."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())
    model: str = "models:/deepindex@champion"  # registry URI or a checkpoint path
    tracking_uri: str | None = None
    index_dir: str | None = None  # an index folder, or a collection folder holding one per model version
    vocabulary: str | None = str(HERE / "vocabulary.yaml")
    reload_interval_s: float = Field(30.0, ge=0)  # poll the registry for a new champion; 0 = never
    persist_added: bool = True  # write the index again (atomically) after POST /v1/items
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
    model_replicas: int = Field(1, ge=1)
    model_autoscaling: dict[str, Any] | None = None  # Serve autoscaling_config; replaces model_replicas
    model_num_cpus: float = Field(1.0, ge=0)
    model_threads: int = Field(0, ge=0)  # torch threads per model replica; 0 = the replica's CPUs
    ingress_replicas: int = Field(1, ge=1)
    ingress_autoscaling: dict[str, Any] | None = None
    ingress_num_cpus: float = Field(0.5, ge=0)


    def resolved(self) -> ServeArgs:
        """Relative paths made absolute against the repository root (the folder holding ``serving/``):
        replicas run in Ray's worker directories, not where ``serve run`` was typed."""
        root = HERE.parent

        def fix(p: str | None) -> str | None:
            return p if p is None or Path(p).is_absolute() else str(root / p)

        registry = self.model.startswith("models:/")
        model = self.model if registry else fix(self.model)
        tracking_uri = self.tracking_uri
        if tracking_uri is None and registry:
            # Decided where the app is built (`deepindex serve`, `serve run`, the RayService's
            # build): replicas run in Ray's worker folders, where neither that shell's
            # MLFLOW_TRACKING_URI nor the local platform's state folder can be found.
            from deepindex.tracking.uri import resolve_tracking_uri

            tracking_uri = resolve_tracking_uri(warn=False)
        return self.model_copy(update={"model": model, "tracking_uri": tracking_uri, "index_dir": fix(self.index_dir),
                                       "vocabulary": fix(self.vocabulary)})


class ErrorBody(BaseModel):
    code: str
    message: str


class ErrorResponse(BaseModel):
    error: ErrorBody


class ModelRef(BaseModel):
    model_config = ConfigDict(protected_namespaces=())
    name: str
    version: str


class Base64Image(BaseModel):
    id: str | None = Field(None, max_length=256)
    data: str = Field(..., description="the image file's bytes, base64")


class ImagesJSON(BaseModel):
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
    query: str
    mode: Literal["all", "any"]
    concepts: list[str]
    matched: dict[str, str]
    unmatched: list[str]
    scoring: str
    model: ModelRef
    results: list[SearchHit]


class SimilarResponse(BaseModel):
    metric: str
    model: ModelRef
    query_id: str | None = None
    results: list[SearchHit]


class ItemResponse(BaseModel):
    id: str
    concepts: list[ConceptScore]
    labels: list[str] | None = None
    meta: dict[str, Any] = {}
    image_url: str


class AddItemsResponse(BaseModel):
    added: list[str]
    count: int
    model: ModelRef


class Health(BaseModel):
    status: str
    model: dict[str, Any] | None = None
    index: dict[str, Any] | None = None
    reasons: list[str] = []
