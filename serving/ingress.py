"""The HTTP ingress: FastAPI on Ray Serve, under ``/v1``, OpenAPI at ``/docs``.

Client input is decoded and checked here (limits, formats) so a bad request never reaches
the model; each image then goes to the model deployment as one call, and ``@serve.batch``
there gathers concurrent calls into batches (with ``model_in_ingress`` the model is in this
replica and the same batching happens here, the forward in a thread).  Index work goes to the
single index replica.
Every error a client can cause is a 4xx ``{"error": {"code", "message"}}``.
"""
# No `from __future__ import annotations`: FastAPI must see real types (Request) on Serve's methods.
import asyncio
import contextlib
import hashlib
import hmac
import io
import logging
import math
import re
import time
from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

import numpy as np
from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.openapi.utils import get_openapi
from fastapi.responses import HTMLResponse, JSONResponse, Response
from pydantic import ValidationError as PydanticValidationError
from ray import serve
from ray.serve.handle import DeploymentHandle
from starlette.datastructures import FormData, UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from deepindex.index.keywords import SCORING, SCORING_EXCLUSIVE
from deepindex.index.vectors import QUERY_METRICS, feature_name, feature_names, query_metric
from serving import contract
from serving.errors import ApiError
from serving.fastpath import FastReads
from serving.heap import HeapFreezer
from serving.reads import LocalReads
from serving.rollover import ModelKey
from serving.schemas import (
    HEALTH_S,
    HERE,
    AboutResponse,
    AddItemsResponse,
    Alive,
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
    token_digest,
)

if TYPE_CHECKING:  # quoted where used: this module's annotations are evaluated (no __future__ import)
    from PIL import Image

    from deepindex.index.keywords import Vocabulary
    from serving.index import IndexServer
    from serving.metrics import MetricsHub
    from serving.model import ModelServer, ServedModel

log = logging.getLogger(__name__)

SPEC_TTL_S = 1.0  # how stale the ingress's view of the served model version may get (plus one call to the model)
# Older than this (a replica that got no request for a while), a request waits for the fresh spec rather
# than go on with the old one: after a switch, the old version's index stays loaded for at least
# serving.rollover.OLD_GRACE_S, and a request naming a version the index has unloaded is a 503.
SPEC_WAIT_S = 3.0
ITEM_ID = re.compile(contract.ITEM_ID_PATTERN)
NEW_ITEM_ID = re.compile(contract.NEW_ITEM_ID_PATTERN)
SUBRESOURCE = re.compile(contract.SUBRESOURCE)
CURSOR = re.compile(contract.CURSOR_PATTERN)
NUMBER = re.compile(r"-?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?")  # a JSON number, as the schema reads one
FUSION = {"weighted": "sum over signals of weight x min-max normalised score, divided by the sum of the weights",
          "rrf": "reciprocal rank fusion: sum over signals of weight / (60 + rank)"}
# Error bodies: the exact list per operation is serving/contract.py's; FastAPI only needs the model.
_ERRORS: dict[int | str, dict[str, Any]] = {422: {"model": ErrorResponse}}

DESCRIPTION = "Image concept tagging, keyword search, query by example, and both fused."
# The document and its page are the Ingress's own routes: /openapi.json is the exact contract of the
# running service (its limits, its index's descriptors, its model's concepts: serving/contract.py).
app = FastAPI(title="deepindex", version="1.0", description=DESCRIPTION, openapi_url=None, docs_url=None,
              redoc_url=None)


# ---- errors and metrics ----------------------------------------------------------------------
@app.exception_handler(ApiError)
async def _api_error(request: Request, e: ApiError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)


@app.exception_handler(RequestValidationError)
async def _validation_error(request: Request, e: RequestValidationError) -> JSONResponse:
    first = e.errors()[0] if e.errors() else {"loc": (), "msg": "invalid request"}
    where = ".".join(str(p) for p in first.get("loc", ()) if p not in ("query", "body", "path"))
    return JSONResponse({"error": {"code": "invalid_request", "message": f"{where}: {first['msg']}"}}, status_code=422)


@app.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
    codes = {404: "not_found", 405: "method_not_allowed", 400: "bad_request", 413: "request_too_large"}
    headers = dict(e.headers or {})
    message = str(e.detail)
    if e.status_code == 405:
        # RFC 9110: a 405 lists the methods the resource has.  Starlette names those of the first
        # route that matched the path; a path served by several routes (GET and DELETE of an item) has all.
        allow = allowed_methods(request.scope)
        headers["Allow"] = ", ".join(allow)
        message = f"{request.method} is not allowed here; allowed: {headers['Allow']}"
    elif e.status_code == 404 and message == "Not Found":  # no route: say which, and where the routes are
        message = f"{request.method} {request.url.path[:200]}: no such endpoint (the API: /docs, /openapi.json)"
    return JSONResponse({"error": {"code": codes.get(e.status_code, "http_error"), "message": message}},
                        status_code=e.status_code, headers=headers)


def allowed_methods(scope: Scope) -> list[str]:
    """The methods of the resource ``scope``'s path names: every route of the first path template that
    matches it, in route order (FastAPI's routes, as it flattens them).  Item ids may hold '/', so
    ``/v1/items/a/image`` matches ``/v1/items/{item_id}`` too; it names the image (the suffixed routes come
    first), whose only method is GET."""
    from fastapi.routing import iter_route_contexts

    routes = [r for r in iter_route_contexts(scope["app"].routes) if r.path is not None]
    first = next((r.path for r in routes if r.matches(scope)[0] != Match.NONE), None)
    return sorted({m for r in routes if r.path == first for m in (r.methods or ())})


def route_template(scope: Scope) -> str | None:
    """The path template of the route Starlette's router would hand ``scope`` to (the first that matches
    fully, else the first whose path matches, a 405's), as ``scope["route"]`` names it once routed; None
    for a path no route matches.  For a request answered before routing (a declared body over the limit)."""
    from fastapi.routing import iter_route_contexts

    partial = None
    for r in iter_route_contexts(scope["app"].routes):
        match = r.matches(scope)[0]
        if match == Match.FULL:
            return getattr(r.original_route, "path", None)
        if match == Match.PARTIAL and partial is None:
            partial = getattr(r.original_route, "path", None)
    return partial


_MAGIC = ((b"\x89PNG\r\n\x1a\n", "image/png"), (b"\xff\xd8\xff", "image/jpeg"), (b"GIF87a", "image/gif"),
          (b"GIF89a", "image/gif"), (b"BM", "image/bmp"), (b"II*\x00", "image/tiff"), (b"MM\x00*", "image/tiff"))


def sniff_image_type(data: bytes) -> str:
    """The media type of image bytes from their signature (what PIL would open them as), without decoding:
    a stored image of any size is sent as it is (found on review: opening one over PIL's pixel limit, to
    read its format, answered 500)."""
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    return next((mime for magic, mime in _MAGIC if data.startswith(magic)), "application/octet-stream")


# The modes a thumbnail is written in (PNG holds them all); any other is made one of these.
PNG_MODES = ("1", "L", "LA", "P", "RGB", "RGBA")


class NoThumbnail(Exception):
    """An image PIL reads but no PNG thumbnail can be made of; the message says why."""


def thumbnail_png(data: bytes, size: int, max_pixels: int | None = None) -> bytes | None:
    """A PNG at most ``size`` pixels a side of the image ``data``, or None for bytes PIL cannot read (the
    caller sends them as they are).  Raises PIL's ``DecompressionBombError`` (more than ``max_pixels``, read
    from the header before any pixel is decoded, or over PIL's own limit) and :class:`NoThumbnail` (read, but
    not made into a PNG thumbnail): never anything a caller would answer 500.  PIL's own guard stops only at
    twice its limit (between the two it warns, and decodes): images up to twice the service's pixel limit
    were decoded (found on review).

    16-bit, 32-bit and float greyscale (``I;16``, ``I;16B``, ``I``, ``F``) are scaled to 8-bit ``L`` before
    the resize, as the model's input is (:func:`deepindex.data.transforms.to_model_mode`): PIL resizes none
    of the 16-bit modes ("image has wrong mode", a 500) and PNG writes no ``I`` (the original was sent
    instead of a thumbnail; both found on review).  CMYK, YCbCr, LAB and HSV become RGB after the resize.
    """
    from PIL import Image, ImageOps

    from deepindex.data.transforms import to_model_mode

    try:
        with Image.open(io.BytesIO(data)) as opened:
            w, h = opened.size
            if max_pixels is not None and w * h > max_pixels:
                raise Image.DecompressionBombError(f"{w}x{h} pixels, over the limit of {max_pixels}")
            thumb: Image.Image = opened
            if thumb.mode.startswith("I") or thumb.mode == "F":  # deep greyscale: decoded and scaled here
                thumb = to_model_mode(thumb, channels=1)
            thumb.thumbnail((size, size))
            # Upright, as the model sees it (to_model_mode): a phone photo stores "rotate 90" in EXIF, and its
            # thumbnail came out on its side (found on review).  After the resize: fewer pixels to turn, and a
            # JPEG's draft decode stays in use.  A deep greyscale one was turned by to_model_mode already.
            thumb = ImageOps.exif_transpose(thumb)
            if thumb.mode not in PNG_MODES:
                thumb = thumb.convert("RGB")
            buf = io.BytesIO()
            try:
                thumb.save(buf, format="PNG")
            except (OSError, ValueError) as e:  # read fine, but not written: not the reading's failure
                raise NoThumbnail(f"the image (mode {thumb.mode}) cannot be written as a PNG ({e})") from None
    except (Image.DecompressionBombError, NoThumbnail):
        raise
    except (OSError, SyntaxError, EOFError):  # not an image PIL reads, or cut short or damaged
        return None
    except (ValueError, ArithmeticError, MemoryError) as e:  # read, but PIL cannot resize or convert it
        raise NoThumbnail(f"no thumbnail can be made of the image ({type(e).__name__}: {e})") from None
    return buf.getvalue()


def _limited(receive: Receive, limit: int) -> Receive:
    """``receive`` that refuses a body past ``limit`` bytes (a 413, as a declared length over it is): found on
    review, a chunked request's body was read whole, whatever its size."""
    seen = 0

    async def counted() -> Message:
        nonlocal seen
        message = await receive()
        if message["type"] == "http.request":
            seen += len(message.get("body", b""))
            if seen > limit:
                raise ApiError(413, "request_too_large", f"request body over {limit} bytes, the limit")
        return message

    return counted


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
        if limit and not size:
            receive = _limited(receive, limit)  # a chunked body has no length to check up front: counted
        routed: str | None = None  # the route template of a request answered here, before the router
        if limit and size.isdigit() and int(size) > limit:
            # Labelled by its route, as the same body sent chunked is (found on review: "unmatched").
            routed = route_template(scope)
            await JSONResponse({"error": {"code": "request_too_large",
                                          "message": f"request body of {size.decode()} bytes, the limit is {limit}"}},
                               status_code=413)(scope, receive, send_observed)
        else:
            fast = getattr(state, "fast_reads", None)  # plain GET searches skip FastAPI's binding (serving/fastpath.py)
            try:
                if fast is None or not await fast(scope, receive, send_observed):
                    await self.app(scope, receive, send_observed)
            except Exception:  # a bug, not the client: logged, answered 500, and the replica keeps serving
                log.exception("unhandled error on %s", scope.get("path"))
                if not started:
                    await JSONResponse({"error": {"code": "internal", "message": "internal error"}},
                                       status_code=500)(scope, receive, send_observed)
        m = getattr(state, "metrics", None)
        if m is not None:
            # The route template bounds label cardinality; a path no route matched is "unmatched".
            endpoint = (getattr(scope.get("route"), "path", None) or routed
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


def retrieval_summary(report: dict[str, Any]) -> dict[str, Any]:
    """``deepindex.index.evaluate.evaluate_retrieval``'s report -> :class:`serving.schemas.RetrievalSummary`."""
    k = int(report["k"])

    def figure(row: dict[str, Any]) -> dict[str, float]:
        return {"map_at_k": float(row[f"map_at_{k}"]), "precision_at_k": float(row[f"precision_at_{k}"])}

    best = report["qbe_best"]
    fusion = report.get("fusion") or {}
    return {
        "collection": report["collection"]["name"], "size": int(report["collection"]["size"]), "k": k,
        "keyword_map": float(report["keyword"]["map"]),
        "keyword_precision_at_k": float(report["keyword"][f"precision_at_{k}"]),
        "qbe": [{"descriptor": d, "metric": m, **figure(row)} for d, rows in report["qbe"].items()
                for m, row in rows.items()],
        "best": {"descriptor": best["descriptor"], "metric": best["metric"], **figure(best)},
        "chance_precision_at_k": float(report["qbe_chance"]),
        "fusion": [{"signal": name, **figure(row)} for name, row in fusion.items() if isinstance(row, dict)],
    }


def _served_model(args: ServeArgs, index: Any) -> "ServedModel":
    from serving.model import ServedModel

    return ServedModel(args.model, index, args.tracking_uri, args.max_batch_size, args.batch_wait_timeout_s,
                       args.model_threads_or_cpus(), offload=True, batch_size=args.forward_batch_size)


class _InProcess:
    """A :class:`serving.model.ServedModel` in this replica, called like a deployment handle
    (``await obj.method.remote(*args)``), so every call site reads the same either way."""

    def __init__(self, obj: Any) -> None:
        self._obj = obj

    def __getattr__(self, name: str) -> Any:
        return _Remote(getattr(self._obj, name))


class _Remote:
    def __init__(self, fn: Any) -> None:
        self.remote = fn  # an async method: .remote(*args) is the coroutine to await


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


def _known_parameters(request: Request) -> None:
    """A query parameter the endpoint does not take is a 422 naming it: a misspelt ``featur=`` would
    otherwise be dropped silently, and the answer look like what was asked."""
    route = request.scope.get("route")
    dependant = getattr(route, "dependant", None)
    if dependant is None:
        return
    known = {p.alias for p in dependant.query_params} - {"self"}  # Serve's class-based view lists the replica
    searches = contract.takes_min_prob(getattr(route, "operation_id", None))
    for key in request.query_params:
        if key not in known and not (searches and key.startswith(contract.MIN_PROB)):
            takes = ", ".join([*sorted(known), *([f"{contract.MIN_PROB}<concept>"] if searches else [])]) or "none"
            raise ApiError(422, "unknown_parameter", f"{key[:80]}: not a parameter of {request.method} "
                                                     f"{getattr(route, 'path', request.url.path)} (it takes {takes})")


def page_size(k: int, max_k: int, *, given: bool, name: str = "k") -> int:
    """``k`` (or ``top_k``: ``name``) checked against ``1..max_k``; a request that leaves it out (not
    ``given``) gets :func:`serving.contract.default_k`.  The endpoints' signatures say 10 (a default cannot
    come from the replica's arguments there; the fast path binds the same 10), so whether the query holds
    the parameter is what tells a left-out one (found on review: with ``max_k`` below 10, every request
    without ``k`` was a 422)."""
    if not given:
        return contract.default_k(max_k)
    if not 1 <= k <= max_k:
        raise ApiError(422, f"{name}_out_of_range", f"{name}={k}: must be between 1 and {max_k}")
    return k


# The parts an image file may come in: ``images`` (the contract's), and ``image``, the one-image endpoints'
# spelling that clients of this repository send (tests/, a query by example).
IMAGE_PARTS = (contract.IMAGE_PART, "image")


def form_files(form: FormData, fields: tuple[str, ...] = ("id", "tags"), where: str = "this endpoint"
               ) -> list[UploadFile]:
    """The image files of a multipart form, in order.  An ``images`` part without a filename is a 400 naming
    that.  Starlette reads such a part as a text field (decoded, capped at 1 MB): its image was not sent
    as a file, and the request answered "holds no image" (found on review), or dropped that image beside
    file parts.  Its bytes are not recovered: decoded as UTF-8, or Latin-1 where that fails, they cannot be
    told back for sure.

    Any part but the images and the text ``fields`` the endpoint (``where``) takes is a 400 ``bad_multipart``
    naming it: a file part of another name (``photo``) was taken for an image, and a misspelt text field
    (``tag=3``) dropped, the item stored without its tags (found on review).  A form of text fields alone
    holds no image: that is the error then (``no_images``)."""
    items = form.multi_items()
    files = [v for k, v in items if k in IMAGE_PARTS and isinstance(v, UploadFile)]
    texts = sum(1 for k, v in items if k in IMAGE_PARTS and not isinstance(v, UploadFile))
    if texts:
        raise ApiError(400, "bad_multipart" if files else "no_images",
                       f"images: {texts} part(s) without a filename, read as text, not as an image file: send each "
                       f"image as a file part (Content-Disposition: form-data; name=\"images\"; filename=...)")
    takes = f"it takes {', '.join([contract.IMAGE_PART, *fields])}"
    for k, v in items:
        if k in IMAGE_PARTS:
            continue
        if isinstance(v, UploadFile):
            if k in fields:
                name = (v.filename or "")[:80]
                raise ApiError(400, "bad_multipart", f"{k}: a file part ({name!r}), not text: send {k} as a text "
                                                     f"field, the image files as parts named images")
            raise ApiError(400, "bad_multipart", f"{k[:80]}: not a part of {where} ({takes}): send each image "
                                                 f"file as a part named images")
        if k not in fields and files:
            raise ApiError(400, "bad_multipart", f"{k[:80]}: not a field of {where} ({takes})")
    return files


def _model(d: dict[str, Any]) -> ModelKey:
    """The model (name, version) a model spec, a model's answer or an index's info names."""
    return ModelKey(d.get("name"), d["version"])


def _image_url(item_id: str) -> str:
    return f"/v1/items/{quote(item_id, safe='/')}/image"


def _hits(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{**h, "image_url": _image_url(h["id"])} for h in results]


@serve.deployment(name="Ingress", health_check_period_s=HEALTH_S)
@serve.ingress(app)
class Ingress:
    def __init__(self, model: "DeploymentHandle[ModelServer] | None", index: "DeploymentHandle[IndexServer]",
                 args: dict[str, Any], hub: "DeploymentHandle[MetricsHub]") -> None:
        from PIL import Image

        from serving.logs import adopt_serve_logging
        from serving.metrics import ServeMetrics

        adopt_serve_logging()
        self.args = ServeArgs.model_validate(args)
        self.index, self.hub = index, hub
        self._local: ServedModel | None = None
        if model is None:  # model_in_ingress: this replica holds the model (serving/model.py)
            self._local = _served_model(self.args, index)
            self.model: Any = _InProcess(self._local)
        else:
            self.model = model
        self.serve_metrics = ServeMetrics()
        self._replica = serve.get_replica_context().replica_id.unique_id
        app.state.metrics = self.serve_metrics
        app.state.fast_reads = FastReads(app, self, counted=lambda path: self.serve_metrics.fastpath.labels(path).inc())
        # base64 inflates by 4/3; one spare megabyte for the rest of the body.
        app.state.max_body = int(self.args.max_images_per_request * self.args.max_image_bytes * 4 / 3) + (1 << 20)
        Image.MAX_IMAGE_PIXELS = self.args.max_image_pixels  # PIL's own bomb guard, as a backstop
        self._spec: dict[str, Any] | None = None
        self._spec_at = 0.0
        self._spec_refresh: asyncio.Task[dict[str, Any]] | None = None
        self._tasks: set[asyncio.Task[Any]] = set()  # background work in flight (the loop holds weak references)
        self._qinfo: dict[ModelKey, dict[str, Any]] = {}  # model (name, version) -> its index's query info
        self._contracts: dict[str, dict[str, Any]] = {}  # what a contract was built from -> the document
        self._vocab: dict[tuple[str, ...], Vocabulary] = {}
        self._page = (HERE / "static" / "index.html").read_text()
        self._reads = LocalReads(ttl_s=SPEC_TTL_S) if self.args.local_reads else None
        self._heap: HeapFreezer | None = None  # made on the event loop, by the first spec
        self._token = self.args.api_token_digest()  # its sha256: compared with the sent token's

    # ---- helpers ---------------------------------------------------------------------------
    async def _model_spec(self, refresh: bool = False) -> dict[str, Any]:
        """The served model's name, version, concepts and input.  Asked of the model replica again when
        ``refresh`` (a caller found it out of date) or when it is older than ``SPEC_TTL_S``: then one
        request starts the question in the background and every request goes on with the spec it has,
        so no request waits for it (when each request that found it expired asked the model itself, all
        32 of a 32-client load stalled together for 40-100 ms once a second: the search p99).  A spec
        older than ``SPEC_WAIT_S`` (no request for a while) is fetched before the request goes on: after
        a quiet spell across a switch, the old one named a version whose index was gone (503s; found on
        review)."""
        if refresh or self._spec is None:
            return await self._fetch_spec()
        age = time.monotonic() - self._spec_at
        if age > SPEC_TTL_S and self._spec_refresh is None:
            self._spec_refresh = task = self._background(self._fetch_spec(), "model spec")
            task.add_done_callback(self._spec_refreshed)
        if age > SPEC_WAIT_S and self._spec_refresh is not None:  # a quiet spell: wait for that one question
            with contextlib.suppress(Exception):  # it failed: go on with the spec there is (logged)
                return await asyncio.shield(self._spec_refresh)
        return self._spec

    def _spec_refreshed(self, _: "asyncio.Task[Any]") -> None:
        self._spec_refresh = None

    async def _fetch_spec(self) -> dict[str, Any]:
        spec = await _call(self.model.info)
        self._spec, self._spec_at = spec, time.monotonic()
        self.serve_metrics.set_model(spec["name"], spec["version"])
        if self._heap is None:
            self._heap = HeapFreezer(asyncio.get_running_loop().call_later,
                                     ready=self._reads.loaded if self._reads is not None else None)
        self._heap.seen(spec["version"], spec.get("name"))
        return spec

    def _background(self, work: Coroutine[Any, Any, Any], what: str) -> "asyncio.Task[Any]":
        """Run ``work`` on this replica's event loop, holding a reference until it ends; a failure is
        logged (the next request that needs it tries again)."""
        task = asyncio.ensure_future(work)
        self._tasks.add(task)

        def done(t: "asyncio.Task[Any]") -> None:
            self._tasks.discard(t)
            if not t.cancelled() and t.exception() is not None:
                log.warning("%s: refresh in the background failed: %s", what, t.exception())

        task.add_done_callback(done)
        return task

    async def _query_info(self, model: ModelKey) -> dict[str, Any]:
        """The index's features (with their metrics), default feature and concepts: fixed per model (an
        index is never used with another), so asked once per model, by name and version (registry versions
        restart at 1 for every name: cached per version, photos version 1's filters were checked against
        deepindex version 1's concepts, found on review)."""
        if model not in self._qinfo:
            self._qinfo = {model: _check(await _call(self.index.query_info, model.version, model.name))}
        return self._qinfo[model]

    def _vocabulary(self, concepts: list[str]) -> "Vocabulary":
        from deepindex.index.keywords import Vocabulary

        key = tuple(concepts)
        if key not in self._vocab:
            self._vocab[key] = Vocabulary.from_file(self.args.vocabulary, concepts)
        return self._vocab[key]

    def _authorize(self, request: Request, write: bool) -> None:
        """Writes need the service's bearer token when it has one (reads too with ``auth_reads``).
        Every endpoint's first call: then its query parameters are checked too."""
        self._authorize_token(request, write)
        if request.scope.get("query_string"):
            _known_parameters(request)

    def _authorize_token(self, request: Request, write: bool) -> None:
        if self._token is None or not (write or self.args.auth_reads):
            return
        header = request.headers.get("authorization", "")
        scheme, _, given = header.partition(" ")
        if scheme.lower() != "bearer" or not given:
            raise ApiError(401, "unauthorized", "this endpoint needs `Authorization: Bearer <token>` "
                                                "(the service's API token)")
        if not hmac.compare_digest(token_digest(given) or "", self._token):
            raise ApiError(403, "forbidden", "the bearer token is not this service's API token")

    def _k(self, request: Request, k: int, name: str = "k") -> int:
        """The ``k`` (``top_k``) the request asks for, checked: :func:`page_size`."""
        return page_size(k, self.args.max_k, given=name in request.query_params, name=name)

    def _q(self, q: str) -> str:
        if not contract.non_blank(q):
            raise ApiError(400, "empty_query", "q: give one or more keywords")
        if len(q) > self.args.max_query_chars:
            raise ApiError(422, "query_too_long", f"q: {len(q)} characters, the limit is {self.args.max_query_chars}")
        return q

    async def _options(self, request: Request, model: ModelKey, *, mode: str = "all", cursor: str | None = None,
                       feature: str | None = None, metric: str | None = None, fusion: str = "weighted",
                       weights: dict[str, float | None] | None = None) -> dict[str, Any]:
        """The search options every search endpoint shares, checked here (a bad one never reaches the model
        or the index): ``mode``, ``cursor``, ``feature``/``metric`` against the served index, ``fusion``,
        the weights, and the ``min_prob.<concept>`` filters."""
        if mode not in SCORING:
            raise ApiError(422, "bad_mode", f"mode={mode!r}: 'all' or 'any'")
        if cursor is not None and not CURSOR.fullmatch(cursor):
            raise ApiError(422, "bad_cursor", "cursor: not a cursor (pass next_cursor as it came)")
        info = await self._query_info(model)
        if feature is not None:
            given, feature = feature, feature_name(feature)  # output and last_but_one: probs's and penultimate's names
            if feature not in info["features"]:
                raise ApiError(422, "bad_feature", f"feature={given!r}: this index answers "
                                                   f"{feature_names(sorted(info['features']))}; the service indexes "
                                                   f"the model's other descriptors (e.g. last_but_two) that its "
                                                   f"args.features lists")
        if metric is not None:
            try:
                metric = query_metric(metric)  # euclidean and dot are l2's and ip's other names
            except ValueError as e:
                raise ApiError(422, "bad_metric", str(e)) from None
            ok = info["features"][feature or info["default_feature"]]
            if metric not in ok:
                raise ApiError(422, "bad_metric", f"metric={metric}: feature {feature or info['default_feature']} "
                                                  f"of this index answers {', '.join(ok)} only")
        if fusion not in FUSION:
            raise ApiError(422, "bad_fusion", f"fusion={fusion!r}: 'weighted' or 'rrf'")
        w: dict[str, float] = {}
        for name, v in (weights or {}).items():
            if v is None:
                continue
            if not (math.isfinite(v) and 0 < v <= contract.MAX_WEIGHT):
                raise ApiError(422, "bad_weight", f"weight_{name}={v}: must be > 0 and <= {contract.MAX_WEIGHT:g}")
            w[name] = float(v)
        min_prob: dict[str, float] = {}
        for key, value in request.query_params.multi_items():
            if not key.startswith(contract.MIN_PROB):
                continue
            concept = key[len(contract.MIN_PROB):]
            if concept not in info["concepts"]:
                raise ApiError(422, "bad_min_prob", f"{key}: unknown concept; the model has "
                                                    f"{', '.join(info['concepts'][:20])}")
            t = float(value) if NUMBER.fullmatch(value) else math.nan
            if not 0.0 <= t <= 1.0:
                raise ApiError(422, "bad_min_prob", f"{key}={value!r}: a number within [0, 1]")
            min_prob[concept] = max(t, min_prob.get(concept, 0.0))  # a repeated filter: both must hold
        return {"mode": mode, "cursor": cursor, "feature": feature, "metric": metric, "fusion": fusion,
                "weights": w, "min_prob": min_prob, "scoring": (SCORING if info["multilabel"]
                                                                else SCORING_EXCLUSIVE)[mode]}

    async def _query(self, model: ModelKey, endpoint: str, opts: dict[str, Any], k: int, *,
                     concepts: list[str] | None = None, q: str | None = None, vector: np.ndarray | None = None,
                     example: dict[str, str] | None = None) -> dict[str, Any]:
        """Run one search on the index of ``model``: the cursor is bound to every parameter of the query
        (and to the model, name and version: scores of another model are not comparable)."""
        from deepindex.index.fusion import query_key

        key = query_key(endpoint=endpoint, model=model.name, version=model.version, q=q, example=example, **{
            n: opts[n] for n in ("mode", "feature", "metric", "fusion", "weights", "min_prob")})
        spec = {"k": k, "key": key, "cursor": opts["cursor"], "concepts": concepts, "mode": opts["mode"],
                "vector": vector, "item": (example or {}).get("id"), "feature": opts["feature"],
                "metric": opts["metric"], "min_prob": opts["min_prob"], "fusion": opts["fusion"],
                "weights": opts["weights"]}
        res = await self._local_search(model, spec)
        self.serve_metrics.searches.labels("index" if res is None else "local").inc()
        if res is None:
            res = await _call(self.index.query, model.version, spec, model.name)
        if res.get("error", {}).get("code") == "bad_cursor":
            # Well formed, but not a page of this query (another query's, or a version ago): no such page.
            raise ApiError(404, "unknown_cursor", res["error"]["message"])
        return _check(res)

    async def _local_search(self, model: ModelKey, spec: dict[str, Any]) -> dict[str, Any] | None:
        """The search answered from this replica's copy of the served index (serving/reads.py), or None."""
        reads = self._reads
        if reads is None:
            return None
        if reads.due():
            if reads.confirmed():  # still valid: ask again in the background, no search waits for it
                self._background(self._confirm_reads(reads), "local reads")
            else:
                await self._confirm_reads(reads)
        return reads.search(model.version, spec, model.name)

    async def _confirm_reads(self, reads: LocalReads) -> None:
        answer = None
        try:
            answer = await _call(self.index.reader)
        finally:
            reads.confirm(answer)

    async def _read_images(self, request: Request, op: str = "tag"
                           ) -> list[tuple[str | None, bytes, str, list[str]]]:
        """(id or None, bytes, name for messages, tags) per image, from multipart files or base64 JSON, the body
        of operation ``op`` (what it takes beside the images: ``contract.IMAGE_BODIES``; any other part, field
        or key is a 400 naming it)."""
        a = self.args
        ctype = request.headers.get("content-type", "")
        takes = contract.IMAGE_BODIES[op]
        where = f"{request.method} {request.scope.get('path', '')}"
        out: list[tuple[str | None, bytes, str, list[str]]] = []
        if ctype.startswith("multipart/form-data"):
            try:
                form = await request.form(max_files=a.max_images_per_request + 1, max_fields=1000)
            except StarletteHTTPException as e:
                if "too many files" in str(e.detail).lower():
                    raise ApiError(413, "too_many_images",
                                   f"at most {a.max_images_per_request} images per request") from None
                raise ApiError(400, "bad_multipart", f"multipart body: {e.detail}") from None
            files = form_files(form, contract.form_fields(**takes), where)
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
                parts = re.split(f"[{re.escape(contract.TAG_SEPARATORS)}]", tags[i]) if tags else []
                if any(len(t) > contract.MAX_TAG for t in parts):
                    raise ApiError(400, "bad_tags",
                                   f"tags of image {i}: each tag at most {contract.MAX_TAG} characters")
                item_tags = [t.strip() for t in parts if t.strip()]
                out.append((ids[i] if ids else None, data, f.filename or f"image {i}", item_tags))
        elif ctype.startswith("application/json"):
            try:
                body = ImagesJSON.model_validate(await request.json())
            except ApiError:  # the body's size limit (_limited)
                raise
            except PydanticValidationError as e:  # the field at fault named (its first line only said "1 error")
                err = e.errors()[0]
                at = ".".join(str(x) for x in err["loc"]) or "body"
                if err["type"] == "extra_forbidden":  # a misspelt key ("tagz") was dropped (found on review)
                    raise ApiError(400, "bad_json", f"{at[:120]}: not a field of the {where} body ("
                                                    f"{self._json_takes(takes['tags'])})") from None
                raise ApiError(400, "bad_json", f"{at}: {err['msg']}; expected "
                                                f"{{\"images\": [{{\"data\": <base64>}}]}}") from None
            except Exception as e:  # noqa: BLE001 - whatever makes the body unreadable, it is the client's: a 400
                raise ApiError(400, "bad_json", f"expected {{\"images\": [{{\"data\": <base64>}}]}}: "
                                                f"{str(e).splitlines()[0]}") from None
            if len(body.images) > a.max_images_per_request:
                raise ApiError(413, "too_many_images",
                               f"{len(body.images)} images; at most {a.max_images_per_request} per request")
            from serving.decode import b64_bytes

            for i, im in enumerate(body.images):
                what = f"images[{i}]"
                if "tags" in im.model_fields_set and "tags" not in contract.image_keys(takes["tags"]):
                    raise ApiError(400, "bad_json", f"images.{i}.tags: not a field of the {where} body ("
                                                    f"{self._json_takes(takes['tags'])})")
                for t in im.tags:
                    if not (1 <= len(t) <= contract.MAX_TAG and contract.non_blank(t)):
                        raise ApiError(400, "bad_tags", f"{what}.tags: {t[:40]!r} is not a tag of 1-"
                                                        f"{contract.MAX_TAG} characters, not blank")
                out.append((im.id, b64_bytes(im.data, what), what, list(im.tags)))
        else:
            raise ApiError(415, "unsupported_media_type",
                           "send multipart/form-data files or application/json base64 images")
        if not out:
            raise ApiError(400, "no_images", "the request holds no image")
        return out

    @staticmethod
    def _json_takes(tags: bool) -> str:
        """What a JSON body of an image operation holds, for a message."""
        return f"it takes images, each with {', '.join(contract.image_keys(tags))}"

    def _decode(self, raw: list[tuple[str | None, bytes, str, list[str]]]) -> "list[Image.Image]":
        from serving.decode import decode_image

        return [decode_image(data, what, self.args.max_image_bytes, self.args.max_image_pixels)
                for _, data, what, _ in raw]

    async def _infer(self, images: "list[Image.Image]", endpoint: str, features: tuple[str, ...] = ()
                     ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        """Images -> (model spec, per image {probs, features, version, batch_size}) via the batched model;
        ``features``: the feature points each image's answer needs besides ``probs``."""
        from deepindex.data.transforms import pil_to_uint8

        for attempt in range(2):
            spec = await self._model_spec(refresh=attempt > 0)
            # (C, S, S) uint8 each
            pixels = [pil_to_uint8(im, spec["image_size"], spec["channels"], spec.get("preset")) for im in images]
            results = await asyncio.gather(*[_call(self.model.infer, (u, features)) for u in pixels])
            bad = next((r for r in results if r.get("error") == "unknown_feature"), None)
            if bad is not None:
                raise ApiError(422, "bad_feature", bad["message"])
            # A reload between the spec and the call: refresh the spec once and redo the request.
            if all("error" not in r and _model(r) == _model(spec) for r in results):
                break
        else:
            raise ApiError(503, "model_changing", "the model version changed during the request; retry")
        for r in results:
            self.serve_metrics.batch_size.observe(r["batch_size"])
        self.serve_metrics.images.labels(endpoint=endpoint).inc(len(results))
        return spec, results

    async def _example_vector(self, request: Request, endpoint: str, op: str, feature: str | None
                              ) -> tuple[dict[str, Any], np.ndarray, str]:
        """One uploaded image, the body of operation ``op`` -> (its model result, its descriptor for ``feature``,
        sha256 of its bytes)."""
        raw = await self._read_images(request, op)
        if len(raw) != 1:
            raise ApiError(400, "one_image", f"send exactly one image, got {len(raw)}")
        spec = await self._model_spec()
        name = feature or (await self._query_info(_model(spec)))["default_feature"]
        _, results = await self._infer(self._decode(raw), endpoint, () if name == "probs" else (name,))
        r = results[0]
        vector = r["probs"] if name == "probs" else r["features"][name]
        return r, vector, hashlib.sha256(raw[0][1]).hexdigest()[:16]

    @staticmethod
    def _top(probs: np.ndarray, concepts: list[str], top_k: int, threshold: float) -> list[dict[str, Any]]:
        order = np.argsort(-probs, kind="stable")
        kept = [{"concept": concepts[i], "probability": float(probs[i])} for i in order if probs[i] >= threshold]
        return kept[:top_k]

    # ---- health, metrics, page -------------------------------------------------------------
    @app.get("/healthz", response_model=Alive, operation_id="healthz")
    async def healthz(self) -> dict[str, Any]:
        return {"status": "ok"}

    @app.get("/readyz", response_model=Health, responses={503: {"model": Health}}, operation_id="readyz")
    async def readyz(self) -> JSONResponse:
        reasons: list[str] = []
        try:
            spec = await self._model_spec(refresh=True)
        except Exception as e:  # noqa: BLE001 - a model that cannot answer, whatever the cause, is not ready
            return JSONResponse({"status": "not ready", "reasons": [f"model: {e}"]}, status_code=503)
        index = await _call(self.index.info, spec["version"], spec["name"])
        self.serve_metrics.index_items.set(index.get("count", 0))
        if not index.get("loaded"):
            reasons.append(f"index: {index.get('problem')}")
        elif _model(index["model"]) != _model(spec):  # never: the index replica answers for that model
            reasons.append(f"index: built for {_model(index['model'])}, the model is {_model(spec)}")
        model = {k: spec[k] for k in ("name", "version", "uri", "batch_size", "reloads", "last_error")}
        body = {"status": "ready" if not reasons else "not ready", "model": model, "index": index, "reasons": reasons}
        return JSONResponse(body, status_code=200 if not reasons else 503)

    @app.get("/metrics", include_in_schema=False)
    async def metrics(self) -> Response:
        """The whole application's metrics, whichever ingress replica answers (serving/metrics.py)."""
        from prometheus_client import CONTENT_TYPE_LATEST

        try:
            await self._refresh_gauges(fresh=True)
        except Exception as e:  # noqa: BLE001 - a scrape still answers with what the replicas know
            log.warning("metrics: model/index info unavailable: %s", e)
        try:
            text = await asyncio.wait_for(self.hub.merged.remote(self._replica, self.serve_metrics.snapshot()), 10.0)
        except Exception as e:  # noqa: BLE001 - one replica's numbers would read as counter resets
            log.warning("metrics: the metrics hub is unavailable: %s", e)
            raise ApiError(503, "metrics_unavailable", "the metrics hub is restarting; scrape again") from None
        return Response(text, media_type=CONTENT_TYPE_LATEST)

    async def _refresh_gauges(self, fresh: bool = False) -> None:
        """The served model and the index's item count in this replica's gauges (``fresh``: the model
        asked now, for a scrape; else the spec as requests see it)."""
        spec = await self._model_spec(refresh=fresh)
        info = await _call(self.index.info, spec["version"], spec["name"])
        self.serve_metrics.index_items.set(info.get("count", 0))

    async def check_health(self) -> None:
        """Serve's periodic health check (every HEALTH_S): also hands this replica's numbers to the hub,
        its gauges brought up to date first (a replica that serves no request would otherwise report the
        model and item count it last saw, and the scrape showed a rolled-over version as still served;
        found on review)."""
        if self._local is not None:
            self._local.ensure_following()
        try:
            await self._refresh_gauges()
        except Exception as e:  # noqa: BLE001 - the model's or index's health is not this replica's
            log.debug("metrics: could not refresh the model/index gauges: %s", e)
        try:
            await asyncio.wait_for(self.hub.push.remote(self._replica, self.serve_metrics.snapshot()), 5.0)
        except Exception as e:  # noqa: BLE001 - the hub's health is not this replica's
            log.debug("metrics: push to the hub failed: %s", e)

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page(self) -> HTMLResponse:
        return HTMLResponse(self._page)

    @app.get("/openapi.json", include_in_schema=False)
    async def openapi(self, request: Request) -> JSONResponse:
        """The exact contract of this service as it runs (serving/contract.py)."""
        a = self.args
        try:
            spec = await self._model_spec()
            info = await self._query_info(_model(spec))
            features, concepts = info["features"], info["concepts"]
        except ApiError:  # no index yet (a first build): what the configuration promises
            spec = await self._model_spec()
            features = {f: list(QUERY_METRICS) for f in (a.features or ["penultimate"])}
            features["probs"] = list(QUERY_METRICS)
            concepts = list(spec["concepts"])
        key = repr((sorted(features.items()), concepts))
        if key not in self._contracts:
            base = get_openapi(title=app.title, version=app.version, description=DESCRIPTION,
                               routes=request.app.routes)
            self._contracts = {key: contract.contract(
                base, max_k=a.max_k, max_query_chars=a.max_query_chars, max_images=a.max_images_per_request,
                features=features, concepts=concepts, auth_reads=a.auth_reads, write_token=self._token is not None)}
        return JSONResponse(self._contracts[key])

    @app.get("/docs", include_in_schema=False)
    async def docs(self) -> HTMLResponse:
        return get_swagger_ui_html(openapi_url="/openapi.json", title="deepindex API")

    # ---- tagging ----------------------------------------------------------------------------
    @app.post("/v1/tag", response_model=TagResponse, responses=_ERRORS, operation_id="tag")
    async def tag(self, request: Request, top_k: int = 10, threshold: float = 0.0) -> dict[str, Any]:
        """Concept probabilities per image, sorted, at most ``top_k``, at least ``threshold``."""
        self._authorize(request, write=False)
        if not 0.0 <= threshold <= 1.0:
            raise ApiError(422, "threshold_out_of_range", f"threshold={threshold}: must be between 0 and 1")
        top_k = self._k(request, top_k, "top_k")
        raw = await self._read_images(request, "tag")
        spec, results = await self._infer(self._decode(raw), "/v1/tag")
        return {"model": {"name": spec["name"], "version": spec["version"]},
                "results": [{"index": i, "id": raw[i][0],
                             "concepts": self._top(r["probs"], spec["concepts"], top_k, threshold)}
                            for i, r in enumerate(results)]}

    # ---- search ----------------------------------------------------------------------------
    def _search_answer(self, q: str | None, parsed: Any, opts: dict[str, Any], res: dict[str, Any],
                       model: dict[str, str], example: dict[str, str] | None) -> dict[str, Any]:
        fused = len(res["signals"]) > 1
        return {"query": q, "mode": opts["mode"], "concepts": parsed.concepts if parsed else [],
                "matched": parsed.matched if parsed else {}, "unmatched": parsed.unmatched if parsed else [],
                "corrected": parsed.corrected if parsed else {}, "suggestions": parsed.suggestions if parsed else {},
                "scoring": opts["scoring"], "example": example,
                "feature": res["feature"] if example else None, "metric": res["metric"] if example else None,
                "min_prob": opts["min_prob"],
                "fusion": f"{opts['fusion']}: {FUSION[opts['fusion']]}" if fused else None,
                "weights": {s: opts["weights"].get(s, 1.0) for s in res["signals"]} if fused else {},
                "model": model, "index": res["index"], "results": _hits(res["results"]),
                "next_cursor": res["next_cursor"]}

    @app.get("/v1/search", response_model=KeywordSearchResponse, responses=_ERRORS, operation_id="search")
    async def search(self, request: Request, q: str = Query(), k: int = 10, mode: str = "all",
                     cursor: str | None = None, example_id: str | None = None, feature: str | None = None,
                     metric: str | None = None, fusion: str = "weighted", weight_keywords: float | None = None,
                     weight_example: float | None = None) -> dict[str, Any]:
        """Keywords -> concepts (vocabulary, plurals, typos) -> items ranked by those concepts' probabilities;
        with ``example_id``, fused with the similarity to that item; ``min_prob.<concept>=t`` filters; paged
        by ``cursor``."""
        self._authorize(request, write=False)
        self._q(q)
        k = self._k(request, k)
        spec = await self._model_spec()
        opts = await self._options(request, _model(spec), mode=mode, cursor=cursor, feature=feature, metric=metric,
                                   fusion=fusion, weights={"keywords": weight_keywords, "example": weight_example})
        if example_id is not None and not ITEM_ID.fullmatch(example_id):
            raise ApiError(404, "unknown_item", f"no item {example_id!r} in the collection")
        parsed = self._vocabulary(spec["concepts"]).parse(q)
        example = {"id": example_id} if example_id is not None else None
        res = await self._query(_model(spec), "/v1/search", opts, k, concepts=parsed.concepts, q=q,
                                example=example)
        return self._search_answer(q, parsed, opts, res, {"name": spec["name"], "version": spec["version"]}, example)

    @app.post("/v1/search", response_model=KeywordSearchResponse, responses=_ERRORS, operation_id="search_by_upload")
    async def search_by_upload(self, request: Request, q: str | None = None, k: int = 10, mode: str = "all",
                               cursor: str | None = None, feature: str | None = None, metric: str | None = None,
                               fusion: str = "weighted", weight_keywords: float | None = None,
                               weight_example: float | None = None) -> dict[str, Any]:
        """An uploaded image as the example, fused with keywords ``q`` when given; filters and paging as
        ``GET /v1/search``."""
        self._authorize(request, write=False)
        if q is not None:
            self._q(q)
        k = self._k(request, k)
        spec = await self._model_spec()
        opts = await self._options(request, _model(spec), mode=mode, cursor=cursor, feature=feature, metric=metric,
                                   fusion=fusion, weights={"keywords": weight_keywords, "example": weight_example})
        r, vector, digest = await self._example_vector(request, "/v1/search", "search_by_upload",
                                                       opts["feature"])
        parsed = self._vocabulary(spec["concepts"]).parse(q) if q is not None else None
        example = {"upload": digest}
        res = await self._query(_model(r), "/v1/search", opts, k, concepts=parsed.concepts if parsed else None, q=q,
                                vector=vector, example=example)
        return self._search_answer(q, parsed, opts, res, {"name": r["name"], "version": r["version"]}, example)

    @app.post("/v1/search/similar", response_model=SimilarResponse, responses=_ERRORS, operation_id="similar_image")
    async def similar_image(self, request: Request, k: int = 10, cursor: str | None = None,
                            feature: str | None = None, metric: str | None = None) -> dict[str, Any]:
        """The items nearest to one uploaded image (query by example), ``k`` a page."""
        self._authorize(request, write=False)
        k = self._k(request, k)
        spec = await self._model_spec()
        opts = await self._options(request, _model(spec), cursor=cursor, feature=feature, metric=metric)
        r, vector, digest = await self._example_vector(request, "/v1/search/similar", "similar_image",
                                                       opts["feature"])
        # The index of the very model that embedded the query: model and index always match.
        res = await self._query(_model(r), "/v1/search/similar", opts, k, vector=vector,
                                example={"upload": digest})
        return {"feature": res["feature"], "metric": res["metric"],
                "model": {"name": r["name"], "version": r["version"]}, "index": res["index"],
                "min_prob": opts["min_prob"], "results": _hits(res["results"]), "next_cursor": res["next_cursor"]}

    # ---- items (the suffixed routes first: ids may hold '/') -----------------------------------
    @app.get("/v1/items/{item_id:path}/similar", response_model=SimilarResponse, responses=_ERRORS,
             operation_id="similar_item")
    async def similar_item(self, request: Request, item_id: str, k: int = 10, cursor: str | None = None,
                           feature: str | None = None, metric: str | None = None) -> dict[str, Any]:
        """The items nearest to an indexed item (itself excluded), ``k`` a page."""
        self._authorize(request, write=False)
        k = self._k(request, k)
        spec = await self._model_spec()
        opts = await self._options(request, _model(spec), cursor=cursor, feature=feature, metric=metric)
        res = await self._query(_model(spec), "/v1/items/similar", opts, k, example={"id": item_id})
        return {"feature": res["feature"], "metric": res["metric"],
                "model": {"name": spec["name"], "version": spec["version"]}, "index": res["index"],
                "query_id": item_id, "min_prob": opts["min_prob"], "results": _hits(res["results"]),
                "next_cursor": res["next_cursor"]}

    @app.get("/v1/items/{item_id:path}/image",
             responses={200: {"content": {**{t: {"schema": {"type": "string", "format": "binary"}}
                                              for t in contract.IMAGE_TYPES},
                                           "application/octet-stream": {"schema": {"type": "string",
                                                                                   "format": "binary"}}}},
                        **_ERRORS}, operation_id="item_image")
    async def item_image(self, request: Request, item_id: str, size: int | None = None) -> Response:
        """The item's original image, as it was added; ``size``: a thumbnail at most that many pixels a side (PNG)."""
        self._authorize(request, write=False)
        if size is not None and not contract.SIZE_MIN <= size <= contract.SIZE_MAX:
            raise ApiError(422, "size_out_of_range",
                           f"size={size}: must be between {contract.SIZE_MIN} and {contract.SIZE_MAX}")
        res = _check(await _call(self.index.image, item_id))
        data = res["bytes"]
        if size is None:  # the original: its type from its first bytes, never decoded (a huge image is fine)
            return Response(data, media_type=sniff_image_type(data))
        from PIL import Image

        try:
            png = thumbnail_png(data, size, self.args.max_image_pixels)
        except Image.DecompressionBombError:  # stored by an import, which has no pixel limit
            raise ApiError(422, "no_thumbnail", f"{item_id}: the image has more pixels than the service decodes "
                                                   f"({self.args.max_image_pixels:,}); fetch it without size") from None
        except NoThumbnail as e:
            raise ApiError(422, "no_thumbnail", f"{item_id}: {e}; fetch it without size") from None
        if png is None:  # bytes PIL cannot read (stored as they came): sent as they are
            return Response(data, media_type="application/octet-stream")
        return Response(png, media_type="image/png")

    @app.get("/v1/items/{item_id:path}", response_model=ItemResponse, responses=_ERRORS, operation_id="get_item")
    async def get_item(self, request: Request, item_id: str, top_k: int = 10) -> dict[str, Any]:
        self._authorize(request, write=False)
        top_k = self._k(request, top_k, "top_k")
        spec = await self._model_spec()
        res = _check(await _call(self.index.get, item_id, spec["name"], spec["version"]))
        return {"id": item_id, "concepts": self._top(res["probs"], res["concepts"], top_k, 0.0),
                "labels": res["labels"], "meta": res["meta"], "image_url": _image_url(item_id),
                "model": {"name": spec["name"], "version": spec["version"]}, "index": res["index"]}

    @app.post("/v1/items", response_model=AddItemsResponse, status_code=201, responses=_ERRORS,
              operation_id="add_items")
    async def add_items(self, request: Request) -> JSONResponse:
        """Add images with ids (and known tags) to the collection: durable before the answer, then in the
        served index (and a rollover's next one), so searches see them at once.  Re-posting an id with
        the same bytes changes nothing (200); with other bytes it is a 409 (in one request too)."""
        self._authorize(request, write=True)
        raw = await self._read_images(request, "add_items")
        rule = ("1-200 characters [A-Za-z0-9._:@/+-], not ending in /image or /similar (those URLs name an "
                "item's image and neighbours), no '.' or '..' segment (a URL resolves them)")
        for item_id, _, what, _ in raw:
            if not item_id:  # the file's name is not its id: ids are said, one per image
                raise ApiError(400, "bad_id", f"{what}: no id; send an id form field per image, in the images' "
                                              f"order (JSON: each image's \"id\"): {rule}")
            if not NEW_ITEM_ID.fullmatch(item_id):
                raise ApiError(400, "bad_id", f"{item_id[:80]!r} ({what}): not an item id: {rule}")
        first: dict[str, bytes] = {}
        for item_id, data, _, _ in raw:
            if first.setdefault(str(item_id), data) != data:
                raise ApiError(409, "duplicate_item", f"{item_id}: twice in one request with different images")
        # The same id twice with the same bytes is one item (the first's tags), as re-posting it would be.
        raw = [r for i, r in enumerate(raw) if r[0] not in {x[0] for x in raw[:i]}]
        self._decode(raw)  # refuse what the service could never index (limits, formats, damage) before storing it
        # Not re-sent when the index replica dies mid-call: it may have committed; re-posting is idempotent.
        res = _check(await _call(self.index.add, [(i, data, tags) for i, data, _, tags in raw], idempotent=False))
        self.serve_metrics.index_items.set(res["count"])
        return JSONResponse(res, status_code=201 if res["added"] else 200)

    @app.delete("/v1/items/{item_id:path}", response_model=DeleteItemResponse, responses=_ERRORS,
                operation_id="delete_item")
    async def delete_item(self, request: Request, item_id: str) -> dict[str, Any]:
        """Remove an item: tombstoned in the collection, gone from search at once."""
        if SUBRESOURCE.search(item_id):  # /v1/items/{id}/image and /similar are read-only sub-resources
            raise ApiError(405, "method_not_allowed", "DELETE is not allowed here; allowed: GET",
                           headers={"Allow": "GET"})
        self._authorize(request, write=True)
        res = _check(await _call(self.index.delete, item_id, idempotent=False))
        self.serve_metrics.index_items.set(res["count"])
        return res

    @app.get("/v1/about", response_model=AboutResponse, responses=_ERRORS, operation_id="about")
    async def about(self, request: Request) -> dict[str, Any]:
        """The served model version and its retrieval figures (keyword mAP, query by example per
        descriptor and metric, fusion), as ``deepindex evaluate-retrieval --attach`` measured them."""
        self._authorize(request, write=False)
        got = await _call(self.model.retrieval)
        report = got["report"]
        return {"model": {"name": got["name"], "version": got["version"]},
                "retrieval": retrieval_summary(report) if report else None}

    @app.get("/v1/status", response_model=StatusResponse, responses=_ERRORS, operation_id="status")
    async def status(self, request: Request) -> dict[str, Any]:
        """The pair a request gets now (the model replicas' version and its index) and the rollover to a new
        model version, with its progress.  During a switch the index replica has chosen the new version
        (``rollover.serving``) a moment before the model replicas load it: requests, and this answer,
        keep the old pair until they have."""
        self._authorize(request, write=False)
        spec = await self._model_spec(refresh=True)
        info = await _call(self.index.info, spec["version"], spec["name"])
        model = {"name": spec["name"], "version": spec["version"]}
        return {"collection": info["collection"], "model": model, "index": info.get("index"),
                "rollover": info["rollover"], "items": info["items"], "head": info["head"]}
