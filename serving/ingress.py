"""The HTTP ingress: FastAPI on Ray Serve, under ``/v1``, OpenAPI at ``/docs``.

Client input is decoded and checked here (limits, formats) so a bad request never reaches
the model; each image then goes to the model deployment as one call, and ``@serve.batch``
there gathers concurrent calls into batches.  Index work goes to the single index replica.
Every error a client can cause is a 4xx ``{"error": {"code", "message"}}``.
"""
# No `from __future__ import annotations`: FastAPI must see real types (Request) on Serve's methods.
import asyncio
import hmac
import io
import logging
import re
import time
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from ray import serve
from ray.serve.handle import DeploymentHandle
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from serving.errors import ApiError
from serving.schemas import (
    HERE,
    AddItemsResponse,
    DeleteItemResponse,
    ErrorResponse,
    Health,
    ImagesJSON,
    ItemResponse,
    KeywordSearchResponse,
    ServeArgs,
    SimilarResponse,
    StatusResponse,
    TagResponse,
)

if TYPE_CHECKING:  # quoted where used: this module's annotations are evaluated (no __future__ import)
    from PIL import Image

    from deepindex.index.keywords import Vocabulary
    from serving.index import IndexServer
    from serving.metrics import MetricsHub
    from serving.model import ModelServer

log = logging.getLogger(__name__)

SPEC_TTL_S = 1.0  # how stale the ingress's view of the served model version may get
ITEM_ID = re.compile(r"^[A-Za-z0-9._:@/+-]{1,200}$")
SCORING = {"all": "product of the query concepts' presence probabilities (all present, independence assumed)",
           "any": "1 - product of (1 - presence probability): noisy-or, at least one present"}
_ERRORS: dict[int | str, dict[str, Any]] = {c: {"model": ErrorResponse} for c in (400, 404, 409, 413, 415, 422, 503)}
_WRITE_ERRORS: dict[int | str, dict[str, Any]] = {**_ERRORS, **{c: {"model": ErrorResponse} for c in (401, 403)}}
_IMAGES_BODY = {"requestBody": {"required": True, "content": {
    "multipart/form-data": {"schema": {"type": "object", "properties": {
        "images": {"type": "array", "items": {"type": "string", "format": "binary"}},
        "id": {"type": "array", "items": {"type": "string"}, "description": "item ids, in file order"},
        "tags": {"type": "array", "items": {"type": "string"},
                 "description": "POST /v1/items: each image's known labels, comma-separated, in file order"}}}},
    "application/json": {"schema": ImagesJSON.model_json_schema()}}}}

app = FastAPI(title="deepindex", version="1.0",
              description="Image concept tagging, keyword search and query by example.", docs_url="/docs")


# ---- errors and metrics ----------------------------------------------------------------------
@app.exception_handler(ApiError)
async def _api_error(request: Request, e: ApiError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status)


@app.exception_handler(RequestValidationError)
async def _validation_error(request: Request, e: RequestValidationError) -> JSONResponse:
    first = e.errors()[0] if e.errors() else {"loc": (), "msg": "invalid request"}
    where = ".".join(str(p) for p in first.get("loc", ()) if p not in ("query", "body", "path"))
    return JSONResponse({"error": {"code": "invalid_request", "message": f"{where}: {first['msg']}"}}, status_code=422)


@app.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
    codes = {404: "not_found", 405: "method_not_allowed", 400: "bad_request", 413: "request_too_large"}
    return JSONResponse({"error": {"code": codes.get(e.status_code, "http_error"), "message": str(e.detail)}},
                        status_code=e.status_code)


class ObserveMiddleware:
    """Requests by endpoint (the route template, not the raw path) and status; latency; body limit.

    A plain ASGI middleware: Starlette's ``@app.middleware("http")`` (BaseHTTPMiddleware) wraps every
    response in a stream and a task group, which cost more CPU per request than the rest of a tag.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        # The state of the app serving this request: in a Serve replica that is not the object this
        # module's `app` names here (reading `app.state` found no metrics there).
        state = scope["app"].state
        start = time.perf_counter()
        status = 500
        started = False

        async def send_observed(message: Message) -> None:
            nonlocal status, started
            if message["type"] == "http.response.start":
                status, started = message["status"], True
            await send(message)

        limit = getattr(state, "max_body", None)
        size = dict(scope.get("headers") or ()).get(b"content-length", b"")
        if limit and size.isdigit() and int(size) > limit:
            await JSONResponse({"error": {"code": "request_too_large",
                                          "message": f"request body of {size.decode()} bytes, the limit is {limit}"}},
                               status_code=413)(scope, receive, send_observed)
        else:
            try:
                await self.app(scope, receive, send_observed)
            except Exception:  # a bug, not the client: logged, answered 500, and the replica keeps serving
                log.exception("unhandled error on %s", scope.get("path"))
                if not started:
                    await JSONResponse({"error": {"code": "internal", "message": "internal error"}},
                                       status_code=500)(scope, receive, send_observed)
        m = getattr(state, "metrics", None)
        if m is not None:
            # The route template bounds label cardinality; a path no route matched is "unmatched".
            endpoint = (getattr(scope.get("route"), "path", None)
                        or (scope.get("path", "") if status < 400 else "unmatched"))
            m.requests.labels(endpoint=endpoint, method=scope.get("method", ""), status=str(status)).inc()
            m.latency.labels(endpoint=endpoint).observe(time.perf_counter() - start)


app.add_middleware(ObserveMiddleware)


# A replica that died under a call (killed, OOM, node lost): Serve starts a replacement and routes
# the next call there, so an idempotent call is simply sent again.
RETRIES = 4


def _replica_lost() -> tuple[type[BaseException], ...]:
    from ray.exceptions import ActorUnavailableError, RayActorError
    from ray.serve.exceptions import ReplicaUnavailableError

    return (RayActorError, ActorUnavailableError, ReplicaUnavailableError)


async def _call(method: DeploymentHandle[Any], *args: Any, idempotent: bool = True) -> dict[str, Any]:
    """``await method.remote(*args)``; retried when the replica died (idempotent calls), else a 503."""
    lost = _replica_lost()
    for attempt in range(RETRIES + 1 if idempotent else 1):
        try:
            return await method.remote(*args)
        except lost as e:
            log.warning("replica lost during a call (attempt %d): %s", attempt + 1, type(e).__name__)
            await asyncio.sleep(0.1 * 2 ** attempt)  # let the controller notice the death
    raise ApiError(503, "replica_unavailable", "a service replica was lost during the request; retry")


def _check(res: dict[str, Any]) -> dict[str, Any]:
    if "error" in res:
        raise ApiError(res["status"], res["error"]["code"], res["error"]["message"])
    return res


def _image_url(item_id: str) -> str:
    return f"/v1/items/{quote(item_id, safe='/')}/image"


def _hits(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{**h, "image_url": _image_url(h["id"])} for h in results]


# Serve's health check also pushes this replica's metrics to the hub: how stale the other
# replicas' numbers in a scrape may be.
HEALTH_S = 5.0


@serve.deployment(name="Ingress", health_check_period_s=HEALTH_S)
@serve.ingress(app)
class Ingress:
    def __init__(self, model: "DeploymentHandle[ModelServer]", index: "DeploymentHandle[IndexServer]",
                 args: dict[str, Any], hub: "DeploymentHandle[MetricsHub]") -> None:
        from PIL import Image

        from serving.logs import adopt_serve_logging
        from serving.metrics import ServeMetrics

        adopt_serve_logging()
        self.args = ServeArgs.model_validate(args)
        self.model, self.index, self.hub = model, index, hub
        self.serve_metrics = ServeMetrics()
        self._replica = serve.get_replica_context().replica_id.unique_id
        app.state.metrics = self.serve_metrics
        # base64 inflates by 4/3; one spare megabyte for the rest of the body.
        app.state.max_body = int(self.args.max_images_per_request * self.args.max_image_bytes * 4 / 3) + (1 << 20)
        Image.MAX_IMAGE_PIXELS = self.args.max_image_pixels  # PIL's own bomb guard, as a backstop
        self._spec: dict[str, Any] | None = None
        self._spec_at = 0.0
        self._vocab: dict[tuple[str, ...], Vocabulary] = {}
        self._page = (HERE / "static" / "index.html").read_text()
        self._token = self.args.api_token()

    # ---- helpers ---------------------------------------------------------------------------
    async def _model_spec(self, refresh: bool = False) -> dict[str, Any]:
        if refresh or self._spec is None or time.monotonic() - self._spec_at > SPEC_TTL_S:
            self._spec = await _call(self.model.info)
            self._spec_at = time.monotonic()
            self.serve_metrics.set_model(self._spec["name"], self._spec["version"])
        return self._spec

    def _vocabulary(self, concepts: list[str]) -> "Vocabulary":
        from deepindex.index.keywords import Vocabulary

        key = tuple(concepts)
        if key not in self._vocab:
            self._vocab[key] = Vocabulary.from_file(self.args.vocabulary, concepts)
        return self._vocab[key]

    def _authorize(self, request: Request, write: bool) -> None:
        """Writes need the service's bearer token when it has one (reads too with ``auth_reads``)."""
        if self._token is None or not (write or self.args.auth_reads):
            return
        header = request.headers.get("authorization", "")
        scheme, _, given = header.partition(" ")
        if scheme.lower() != "bearer" or not given:
            raise ApiError(401, "unauthorized", "this endpoint needs `Authorization: Bearer <token>` "
                                                "(the service's API token)")
        if not hmac.compare_digest(given.strip().encode(), self._token.encode()):
            raise ApiError(403, "forbidden", "the bearer token is not this service's API token")

    def _k(self, k: int, name: str = "k") -> int:
        if not 1 <= k <= self.args.max_k:
            raise ApiError(422, f"{name}_out_of_range", f"{name}={k}: must be between 1 and {self.args.max_k}")
        return k

    async def _read_images(self, request: Request) -> list[tuple[str | None, bytes, str, list[str]]]:
        """(id or None, bytes, name for messages, tags) per image, from multipart files or base64 JSON."""
        a = self.args
        ctype = request.headers.get("content-type", "")
        out: list[tuple[str | None, bytes, str, list[str]]] = []
        if ctype.startswith("multipart/form-data"):
            try:
                form = await request.form(max_files=a.max_images_per_request + 1, max_fields=1000)
            except StarletteHTTPException as e:
                if "too many files" in str(e.detail).lower():
                    raise ApiError(413, "too_many_images",
                                   f"at most {a.max_images_per_request} images per request") from None
                raise ApiError(400, "bad_multipart", f"multipart body: {e.detail}") from None
            files = [v for _, v in form.multi_items() if isinstance(v, UploadFile)]
            ids = [str(v) for k, v in form.multi_items() if k == "id" and not isinstance(v, UploadFile)]
            tags = [str(v) for k, v in form.multi_items() if k == "tags" and not isinstance(v, UploadFile)]
            if len(files) > a.max_images_per_request:
                raise ApiError(413, "too_many_images",
                               f"{len(files)} images; at most {a.max_images_per_request} per request")
            if ids and len(ids) != len(files):
                raise ApiError(400, "bad_ids", f"{len(ids)} ids for {len(files)} images")
            if tags and len(tags) != len(files):
                raise ApiError(400, "bad_tags", f"{len(tags)} tags fields for {len(files)} images")
            for i, f in enumerate(files):
                data = await f.read(a.max_image_bytes + 1)  # one byte over is enough to refuse
                item_tags = [t.strip() for t in tags[i].split(",") if t.strip()] if tags else []
                out.append((ids[i] if ids else None, data, f.filename or f"image {i}", item_tags))
        elif ctype.startswith("application/json"):
            try:
                body = ImagesJSON.model_validate(await request.json())
            except Exception as e:  # noqa: BLE001 - whatever makes the body unreadable, it is the client's: a 400
                raise ApiError(400, "bad_json", f"expected {{\"images\": [{{\"data\": <base64>}}]}}: "
                                                f"{str(e).splitlines()[0]}") from None
            if len(body.images) > a.max_images_per_request:
                raise ApiError(413, "too_many_images",
                               f"{len(body.images)} images; at most {a.max_images_per_request} per request")
            from serving.decode import b64_bytes

            for i, im in enumerate(body.images):
                what = f"images[{i}]"
                out.append((im.id, b64_bytes(im.data, what), what, list(im.tags)))
        else:
            raise ApiError(415, "unsupported_media_type",
                           "send multipart/form-data files or application/json base64 images")
        if not out:
            raise ApiError(400, "no_images", "the request holds no image")
        return out

    def _decode(self, raw: list[tuple[str | None, bytes, str, list[str]]]) -> "list[Image.Image]":
        from serving.decode import decode_image

        return [decode_image(data, what, self.args.max_image_bytes, self.args.max_image_pixels)
                for _, data, what, _ in raw]

    async def _infer(self, images: "list[Image.Image]", endpoint: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        """Images -> (model spec, per image {probs, embedding, version, batch_size}) via the batched model."""
        from deepindex.data.transforms import pil_to_uint8

        for attempt in range(2):
            spec = await self._model_spec(refresh=attempt > 0)
            # (C, S, S) uint8 each
            pixels = [pil_to_uint8(im, spec["image_size"], spec["channels"], spec.get("preset")) for im in images]
            results = await asyncio.gather(*[_call(self.model.infer, u) for u in pixels])
            # A reload between the spec and the call: refresh the spec once and redo the request.
            if all("error" not in r and r["version"] == spec["version"] for r in results):
                break
        else:
            raise ApiError(503, "model_changing", "the model version changed during the request; retry")
        for r in results:
            self.serve_metrics.batch_size.observe(r["batch_size"])
        self.serve_metrics.images.labels(endpoint=endpoint).inc(len(results))
        return spec, results

    @staticmethod
    def _top(probs: np.ndarray, concepts: list[str], top_k: int, threshold: float) -> list[dict[str, Any]]:
        order = np.argsort(-probs, kind="stable")
        kept = [{"concept": concepts[i], "probability": float(probs[i])} for i in order if probs[i] >= threshold]
        return kept[:top_k]

    # ---- health, metrics, page -------------------------------------------------------------
    @app.get("/healthz", response_model=Health)
    async def healthz(self) -> dict[str, Any]:
        return {"status": "ok"}

    @app.get("/readyz", response_model=Health, responses={503: {"model": Health}})
    async def readyz(self) -> JSONResponse:
        reasons: list[str] = []
        try:
            spec = await self._model_spec(refresh=True)
        except Exception as e:  # noqa: BLE001 - a model that cannot answer, whatever the cause, is not ready
            return JSONResponse({"status": "not ready", "reasons": [f"model: {e}"]}, status_code=503)
        index = await _call(self.index.info, spec["version"])
        self.serve_metrics.index_items.set(index.get("count", 0))
        if not index.get("loaded"):
            reasons.append(f"index: {index.get('problem')}")
        elif index["model"]["version"] != spec["version"]:  # never: the index replica answers for that version
            reasons.append(f"index: built for version {index['model']['version']}, the model is {spec['version']}")
        model = {k: spec[k] for k in ("name", "version", "uri", "reloads", "last_error")}
        body = {"status": "ready" if not reasons else "not ready", "model": model, "index": index, "reasons": reasons}
        return JSONResponse(body, status_code=200 if not reasons else 503)

    @app.get("/metrics", include_in_schema=False)
    async def metrics(self) -> Response:
        """The whole application's metrics, whichever ingress replica answers (serving/metrics.py)."""
        from prometheus_client import CONTENT_TYPE_LATEST

        try:
            spec = await self._model_spec()
            info = await _call(self.index.info, spec["version"])
            self.serve_metrics.index_items.set(info.get("count", 0))
        except Exception as e:  # noqa: BLE001 - a scrape still answers with what the replicas know
            log.warning("metrics: model/index info unavailable: %s", e)
        try:
            text = await asyncio.wait_for(self.hub.merged.remote(self._replica, self.serve_metrics.snapshot()), 10.0)
        except Exception as e:  # noqa: BLE001 - one replica's numbers would read as counter resets
            log.warning("metrics: the metrics hub is unavailable: %s", e)
            raise ApiError(503, "metrics_unavailable", "the metrics hub is restarting; scrape again") from None
        return Response(text, media_type=CONTENT_TYPE_LATEST)

    async def check_health(self) -> None:
        """Serve's periodic health check (every HEALTH_S): also hands this replica's numbers to the hub."""
        try:
            await asyncio.wait_for(self.hub.push.remote(self._replica, self.serve_metrics.snapshot()), 5.0)
        except Exception as e:  # noqa: BLE001 - the hub's health is not this replica's
            log.debug("metrics: push to the hub failed: %s", e)

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page(self) -> HTMLResponse:
        return HTMLResponse(self._page)

    # ---- tagging ----------------------------------------------------------------------------
    @app.post("/v1/tag", response_model=TagResponse, responses=_ERRORS, openapi_extra=_IMAGES_BODY)
    async def tag(self, request: Request, top_k: int = 10, threshold: float = 0.0) -> dict[str, Any]:
        """Concept probabilities per image, sorted, at most ``top_k``, at least ``threshold``."""
        self._authorize(request, write=False)
        if not 0.0 <= threshold <= 1.0:
            raise ApiError(422, "threshold_out_of_range", f"threshold={threshold}: must be between 0 and 1")
        self._k(top_k, "top_k")
        raw = await self._read_images(request)
        spec, results = await self._infer(self._decode(raw), "/v1/tag")
        return {"model": {"name": spec["name"], "version": spec["version"]},
                "results": [{"index": i, "id": raw[i][0],
                             "concepts": self._top(r["probs"], spec["concepts"], top_k, threshold)}
                            for i, r in enumerate(results)]}

    # ---- search ----------------------------------------------------------------------------
    @app.get("/v1/search", response_model=KeywordSearchResponse, responses=_ERRORS)
    async def search(self, request: Request, q: str = "", k: int = 10, mode: str = "all") -> dict[str, Any]:
        """Keywords -> concepts (vocabulary with synonyms) -> items ranked by those concepts' probabilities."""
        self._authorize(request, write=False)
        if not q.strip():
            raise ApiError(400, "empty_query", "q: give one or more keywords")
        if len(q) > self.args.max_query_chars:
            raise ApiError(422, "query_too_long", f"q: {len(q)} characters, the limit is {self.args.max_query_chars}")
        if mode not in SCORING:
            raise ApiError(422, "bad_mode", f"mode={mode!r}: 'all' or 'any'")
        self._k(k)
        spec = await self._model_spec()
        parsed = self._vocabulary(spec["concepts"]).parse(q)
        res = _check(await _call(self.index.keywords, parsed.concepts, mode, k, spec["name"], spec["version"]))
        return {"query": q, "mode": mode, "concepts": parsed.concepts, "matched": parsed.matched,
                "unmatched": parsed.unmatched, "corrected": parsed.corrected, "suggestions": parsed.suggestions,
                "scoring": SCORING[mode], "model": {"name": spec["name"], "version": spec["version"]},
                "index": res["index"], "results": _hits(res["results"]) if parsed.concepts else []}

    @app.post("/v1/search/similar", response_model=SimilarResponse, responses=_ERRORS, openapi_extra=_IMAGES_BODY)
    async def similar_image(self, request: Request, k: int = 10) -> dict[str, Any]:
        """The k indexed items nearest to one uploaded image (query by example)."""
        self._authorize(request, write=False)
        self._k(k)
        raw = await self._read_images(request)
        if len(raw) != 1:
            raise ApiError(400, "one_image", f"send exactly one image, got {len(raw)}")
        _, results = await self._infer(self._decode(raw), "/v1/search/similar")
        r = results[0]
        # The index of the very version that embedded the query: model and index always match.
        res = _check(await _call(self.index.similar_vector, r["embedding"], k, r["name"], r["version"]))
        return {"metric": res["metric"], "model": {"name": r["name"], "version": r["version"]}, "index": res["index"],
                "results": _hits(res["results"])}

    # ---- items (the suffixed routes first: ids may hold '/') -----------------------------------
    @app.get("/v1/items/{item_id:path}/similar", response_model=SimilarResponse, responses=_ERRORS)
    async def similar_item(self, request: Request, item_id: str, k: int = 10) -> dict[str, Any]:
        """The k items nearest to an indexed item (itself excluded)."""
        self._authorize(request, write=False)
        self._k(k)
        spec = await self._model_spec()
        res = _check(await _call(self.index.similar_item, item_id, k, spec["name"], spec["version"]))
        return {"metric": res["metric"], "model": {"name": spec["name"], "version": spec["version"]},
                "index": res["index"], "query_id": item_id, "results": _hits(res["results"])}

    @app.get("/v1/items/{item_id:path}/image",
             responses={200: {"content": {"image/png": {}, "image/jpeg": {}, "application/octet-stream": {}}},
                        **_ERRORS})
    async def item_image(self, request: Request, item_id: str, size: int | None = None) -> Response:
        """The item's original image, as it was added; ``size``: a thumbnail at most that many pixels a side (PNG)."""
        self._authorize(request, write=False)
        if size is not None and not 8 <= size <= 1024:
            raise ApiError(422, "size_out_of_range", f"size={size}: must be between 8 and 1024")
        res = _check(await _call(self.index.image, item_id))
        data = res["bytes"]
        from PIL import Image

        try:
            with Image.open(io.BytesIO(data)) as im:
                fmt = (im.format or "").upper()
                if size is None:
                    return Response(data, media_type=Image.MIME.get(fmt, "application/octet-stream"))
                im.thumbnail((size, size))
                buf = io.BytesIO()
                im.save(buf, format="PNG")
        except OSError:  # bytes PIL cannot read (stored as they came): sent as they are
            return Response(data, media_type="application/octet-stream")
        return Response(buf.getvalue(), media_type="image/png")

    @app.get("/v1/items/{item_id:path}", response_model=ItemResponse, responses=_ERRORS)
    async def get_item(self, request: Request, item_id: str, top_k: int = 10) -> dict[str, Any]:
        self._authorize(request, write=False)
        self._k(top_k, "top_k")
        spec = await self._model_spec()
        res = _check(await _call(self.index.get, item_id, spec["name"], spec["version"]))
        return {"id": item_id, "concepts": self._top(res["probs"], res["concepts"], top_k, 0.0),
                "labels": res["labels"], "meta": res["meta"], "image_url": _image_url(item_id),
                "model": {"name": spec["name"], "version": spec["version"]}, "index": res["index"]}

    @app.post("/v1/items", response_model=AddItemsResponse, status_code=201, responses=_WRITE_ERRORS,
              openapi_extra=_IMAGES_BODY)
    async def add_items(self, request: Request) -> JSONResponse:
        """Add images with ids (and known tags) to the collection: durable before the answer, then in the
        served index (and a rollover's next one), so searches see them at once.  Re-posting an id with
        the same bytes changes nothing (200); with other bytes it is a 409."""
        self._authorize(request, write=True)
        raw = await self._read_images(request)
        for item_id, _, what, _ in raw:
            if not item_id or not ITEM_ID.match(item_id):
                raise ApiError(400, "bad_id", f"{what}: an item id of 1-200 characters [A-Za-z0-9._:@/+-] is required")
        ids = [r[0] for r in raw]
        if len(set(ids)) != len(ids):
            raise ApiError(400, "bad_id", "the same id twice in one request")
        self._decode(raw)  # refuse what the service could never index (limits, formats, damage) before storing it
        # Not re-sent when the index replica dies mid-call: it may have committed; re-posting is idempotent.
        res = _check(await _call(self.index.add, [(i, data, tags) for i, data, _, tags in raw], idempotent=False))
        self.serve_metrics.index_items.set(res["count"])
        return JSONResponse(res, status_code=201 if res["added"] else 200)

    @app.delete("/v1/items/{item_id:path}", response_model=DeleteItemResponse, responses=_WRITE_ERRORS)
    async def delete_item(self, request: Request, item_id: str) -> dict[str, Any]:
        """Remove an item: tombstoned in the collection, gone from search at once."""
        self._authorize(request, write=True)
        return _check(await _call(self.index.delete, item_id, idempotent=False))

    @app.get("/v1/status", response_model=StatusResponse, responses=_ERRORS)
    async def status(self, request: Request) -> dict[str, Any]:
        """The pair a request gets now (the model replicas' version and its index) and the rollover to a new
        model version, with its progress.  During a switch the index replica has chosen the new version
        (``rollover.serving``) a moment before the model replicas load it: requests, and this answer,
        keep the old pair until they have."""
        self._authorize(request, write=False)
        spec = await self._model_spec(refresh=True)
        info = await _call(self.index.info, spec["version"])
        model = {"name": spec["name"], "version": spec["version"]}
        return {"collection": info["collection"], "model": model, "index": info.get("index"),
                "rollover": info["rollover"], "items": info["items"], "head": info["head"]}
