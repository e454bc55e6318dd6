"""Edge cases of the ingress's handlers found on review, without a cluster: thumbnails of 16/32-bit and float
greyscale images, crafted cursors, ``max_k`` below the default ``k``, an image part sent without a filename,
and the metric label of a request refused for its declared size.  The handlers run on a bare ``Ingress``
(no replica) whose model spec and index replica are stand-ins."""
from __future__ import annotations

import asyncio
import base64
import io
import json
import time
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
from PIL import Image
from starlette.requests import Request

from serving.errors import ApiError
from serving.schemas import ServeArgs

pytestmark = pytest.mark.timeout(120)

CONCEPTS = [str(d) for d in range(10)]


class _Remote:
    """A replica method as the ingress calls it: ``await handle.method.remote(*args)``."""

    def __init__(self, answer: Any) -> None:
        self.answer = answer

    async def remote(self, *args: Any) -> Any:
        return self.answer(*args)


def _ingress(**args: Any) -> Any:
    from serving.ingress import Ingress
    from serving.metrics import ServeMetrics

    class Bare(Ingress.func_or_class):  # type: ignore[name-defined]
        def __del__(self) -> None:  # Serve's wrapper shuts its ASGI app down here: none was started
            pass

    ing = object.__new__(Bare)  # no replica: only the fields the handlers under test use
    ing.args = ServeArgs(**args)
    ing._token = None
    ing.serve_metrics = ServeMetrics()
    ing._spec = {"name": "m", "version": "1", "concepts": CONCEPTS}
    ing._spec_at, ing._spec_refresh, ing._tasks = time.monotonic() + 3600, None, set()  # fresh: never asked
    ing._reads, ing._heap = None, None
    ing.index = SimpleNamespace()
    return ing


def _request(path: str, query: bytes = b"", method: str = "GET", body: bytes = b"",
             headers: list[tuple[bytes, bytes]] | None = None) -> Request:
    sent = False

    async def receive() -> dict[str, Any]:
        nonlocal sent
        if sent:
            return {"type": "http.disconnect"}
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    scope = {"type": "http", "method": method, "path": path, "query_string": query, "root_path": "",
             "headers": headers or []}
    return Request(scope, receive)


# ---- 1. thumbnails of images PNG cannot hold as they are ------------------------------------------
def _saved(im: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt)
    return buf.getvalue()


def _deep_images() -> dict[str, tuple[bytes, int]]:
    """name -> (file bytes, the grey level a uniform half-scale image of that kind should show, 0..255)."""
    half16 = np.full((300, 200), 32768, dtype=np.uint16)
    i16b = Image.frombytes("I;16B", (200, 300), half16.astype(">u2").tobytes())
    i32 = np.full((300, 200), 32768, dtype=np.int32)
    i32[0, 0] = 65535  # over 255: read as 16-bit, as the model's input is
    return {"I;16 PNG": (_saved(Image.fromarray(half16), "PNG"), 128),
            "I;16B TIFF": (_saved(i16b, "TIFF"), 128),
            "I TIFF": (_saved(Image.fromarray(i32), "TIFF"), 128),
            "F TIFF (0..1)": (_saved(Image.fromarray(np.full((300, 200), 0.5, dtype=np.float32)), "TIFF"), 127)}


def _item_image(ing: Any, data: bytes, size: int | None) -> Any:
    ing.index.image = _Remote(lambda item_id: {"bytes": data})
    return asyncio.run(ing.item_image(_request("/v1/items/a/image"), "a", size=size))


@pytest.mark.parametrize("kind", list(_deep_images()))
@pytest.mark.parametrize("size", [8, 128])
def test_a_deep_greyscale_image_gets_an_8_bit_grey_png_thumbnail_scaled_as_the_model_reads_it(kind, size):
    data, level = _deep_images()[kind]
    from serving.decode import decode_image

    assert decode_image(data, kind, 8_000_000, 16_000_000).mode in ("I;16", "I;16B", "I", "F")  # accepted on upload
    res = _item_image(_ingress(), data, size)
    assert res.status_code == 200 and res.media_type == "image/png"
    with Image.open(io.BytesIO(res.body)) as thumb:
        assert thumb.format == "PNG" and thumb.mode == "L" and max(thumb.size) == size
        grey = np.asarray(thumb)
    # Scaled, not clipped: half of 16-bit range is mid-grey (convert("L") clips it to 255, a float 0.5 to 0).
    assert abs(int(np.median(grey)) - level) <= 1


def test_thumbnails_of_other_modes_and_unreadable_bytes_are_as_before():
    ing = _ingress()
    cases = [(Image.new("RGB", (40, 30), (9, 8, 7)), "PNG", "RGB"), (Image.new("CMYK", (40, 30)), "JPEG", "RGB"),
             (Image.new("P", (40, 30)), "GIF", "P"), (Image.new("LA", (40, 30)), "PNG", "LA")]
    for data, mode in ((_saved(im, fmt), mode) for im, fmt, mode in cases):
        res = _item_image(ing, data, 16)
        assert res.status_code == 200 and res.media_type == "image/png"
        with Image.open(io.BytesIO(res.body)) as thumb:
            assert thumb.mode == mode and thumb.size == (16, 12)
    png = _saved(Image.new("RGB", (64, 64)), "PNG")
    for bad in (b"not an image at all", png[: len(png) // 2]):  # unreadable: the bytes as they were stored
        res = _item_image(ing, bad, 16)
        assert res.status_code == 200 and res.media_type == "application/octet-stream" and res.body == bad


def test_a_thumbnail_that_cannot_be_written_is_a_422_not_the_original(monkeypatch):
    data = _deep_images()["I;16 PNG"][0]

    def fail(self: Image.Image, *args: Any, **kwargs: Any) -> None:
        raise OSError("cannot write mode X as PNG")

    monkeypatch.setattr(Image.Image, "save", fail)
    with pytest.raises(ApiError) as e:  # read fine, so not "bytes PIL cannot read" (those go back as stored)
        _item_image(_ingress(), data, 16)
    assert e.value.status == 422 and e.value.code == "no_thumbnail" and "without size" in e.value.message


# ---- 2. crafted cursors: the bad cursor error (the service's 404 unknown_cursor), never a 500 ---------
def _cursor(d: Any) -> str:
    return base64.urlsafe_b64encode(json.dumps(d).encode()).decode().rstrip("=")


CRAFTED = {
    "score past float's range": _cursor({"s": "0x1p99999", "id": "a", "q": "k"}),
    "JSON nested past the parser's depth": base64.urlsafe_b64encode(b"[" * 1536).decode().rstrip("="),
    "a cursor's fields, then JSON nested past that depth": base64.urlsafe_b64encode(
        b'{"s":"0x1p0","id":"a","q":"k","x":' + b"[" * 1400).decode().rstrip("="),
}


@pytest.mark.parametrize("name", list(CRAFTED))
def test_a_crafted_cursor_is_not_a_cursor_this_service_issued(name):
    import re

    from deepindex.index.fusion import cursor_state, decode_cursor
    from serving import contract
    from serving.reads import _code

    cursor = CRAFTED[name]
    assert re.fullmatch(contract.CURSOR_PATTERN, cursor)  # past the ingress's pattern, to the index
    for decode in (decode_cursor, cursor_state):
        with pytest.raises(ValueError, match=r"^cursor: not a cursor this service issued") as e:
            decode(cursor, "k")
        assert _code(str(e.value)) == "bad_cursor"  # which the ingress answers 404 unknown_cursor


def test_a_crafted_fusion_bound_is_not_a_cursor_this_service_issued():
    from deepindex.index.query import Query, _fusion_state

    for bound in ("0x1p99999", "-0x1p99999"):
        cursor = _cursor({"s": "0x1p0", "id": "a", "q": "k", "x": {"b": {"keywords": [bound, "0x1p0"]}}})
        with pytest.raises(ValueError, match=r"^cursor: not a cursor this service issued"):
            _fusion_state(None, Query(k=3, key="k", cursor=cursor, fusion="weighted"), {})  # type: ignore[arg-type]
    good = _cursor({"s": "0x1p0", "id": "a", "q": "k", "x": {"b": {"keywords": ["0x0p0", "0x1p0"]}}})
    assert _fusion_state(None, Query(k=3, key="k", cursor=good, fusion="weighted"), {}) == {  # type: ignore[arg-type]
        "b": {"keywords": ["0x0p0", "0x1p0"]}}


# ---- 3. max_k below the default k ------------------------------------------------------------------
def _get_item(ing: Any, query: bytes) -> dict[str, Any]:
    probs = np.linspace(1.0, 0.1, len(CONCEPTS), dtype=np.float32)
    ing.index.get = _Remote(lambda item_id, name, version: {
        "probs": probs, "concepts": CONCEPTS, "labels": [], "meta": {}, "index": {}})
    # The endpoint's default (10) comes with or without top_k in the query, as both FastAPI and the fast
    # path bind it: the query tells them apart.
    top_k = int(query.split(b"=")[1]) if query else 10
    return asyncio.run(ing.get_item(_request("/v1/items/a", query), "a", top_k=top_k))


def test_a_request_without_k_gets_at_most_max_k_and_an_explicit_k_over_it_is_still_a_422():
    small = _ingress(max_k=5)
    assert len(_get_item(small, b"")["concepts"]) == 5
    assert len(_get_item(small, b"top_k=3")["concepts"]) == 3
    with pytest.raises(ApiError) as e:
        _get_item(small, b"top_k=10")
    assert e.value.status == 422 and e.value.code == "top_k_out_of_range"
    assert len(_get_item(_ingress(), b"")["concepts"]) == 10  # max_k 100: the default as before


def test_both_bindings_hand_the_endpoint_10_and_the_query_says_whether_k_was_given():
    from serving.fastpath import bind, fast_routes
    from serving.ingress import app, page_size

    search = next(f for f in fast_routes(app) if f.route.path == "/v1/search")
    assert bind(search, b"q=a")["k"] == 10  # the fast path's default is the signature's, as FastAPI's
    ing = _ingress(max_k=5)
    assert ing._k(_request("/v1/search", b"q=a"), 10) == 5
    assert ing._k(_request("/v1/search", b"q=a&k=4"), 4) == 4
    with pytest.raises(ApiError):
        ing._k(_request("/v1/search", b"q=a&k=10"), 10)
    assert page_size(10, 100, given=False) == 10 and page_size(7, 100, given=True) == 7


@pytest.mark.parametrize("max_k", [1, 5, 10, 100])
def test_the_contract_publishes_a_default_k_within_max_k(max_k):
    from fastapi.openapi.utils import get_openapi

    from serving.contract import contract
    from serving.ingress import DESCRIPTION, app

    base = get_openapi(title=app.title, version=app.version, description=DESCRIPTION, routes=app.routes)
    doc = contract(base, max_k=max_k, max_query_chars=64, max_images=4,
                   features={"penultimate": ["cosine"], "probs": ["cosine"]}, concepts=CONCEPTS, auth_reads=False,
                   write_token=False)
    seen = 0
    for item in doc["paths"].values():
        for op in item.values():
            for p in op.get("parameters", []):
                if p["name"] in ("k", "top_k"):
                    seen += 1
                    s = p["schema"]
                    assert s["minimum"] <= s["default"] <= s["maximum"] == max_k
                    assert s["default"] == min(10, max_k)
    assert seen == 6  # tag, search (GET and POST), similar image and item, get item


# ---- 4. an image part without a filename -------------------------------------------------------------
def _multipart(*parts: tuple[str, bytes, str | None]) -> bytes:
    out = b""
    for name, payload, filename in parts:
        disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
        out += (f"--X\r\nContent-Disposition: {disposition}\r\nContent-Type: "
                f"{'image/png' if name == 'images' else 'text/plain'}\r\n\r\n").encode() + payload + b"\r\n"
    return out + b"--X--\r\n"


def _read(ing: Any, body: bytes) -> Any:
    headers = [(b"content-type", b"multipart/form-data; boundary=X"), (b"content-length", str(len(body)).encode())]
    return asyncio.run(ing._read_images(_request("/v1/tag", method="POST", body=body, headers=headers)))


def test_an_image_part_without_a_filename_is_named_in_the_400():
    ing, png = _ingress(), _saved(Image.new("RGB", (8, 8)), "PNG")
    with pytest.raises(ApiError) as e:
        _read(ing, _multipart(("images", png, None)))
    assert e.value.status == 400 and e.value.code == "no_images"
    assert "without a filename" in e.value.message and "filename=" in e.value.message
    # Beside a file part it is not dropped silently (one image answered for two sent).
    with pytest.raises(ApiError) as e:
        _read(ing, _multipart(("images", png, "a.png"), ("images", png, None)))
    assert e.value.status == 400 and "without a filename" in e.value.message
    got = _read(ing, _multipart(("images", png, "a.png"), ("id", b"x", None)))  # as before
    assert [(i, data, what) for i, data, what, _ in got] == [("x", png, "a.png")]
    with pytest.raises(ApiError) as e:  # no image part at all: the message as before
        _read(ing, _multipart(("note", b"x", None)))
    assert e.value.code == "no_images" and e.value.message == "the request holds no image"


# ---- 5. the metric label of a body refused for its declared length ---------------------------------------
@pytest.mark.parametrize(("method", "path", "label"), [
    ("POST", "/v1/tag", "/v1/tag"),
    ("POST", "/v1/items", "/v1/items"),
    ("POST", "/v1/search/similar", "/v1/search/similar"),
    ("POST", "/v1/items/a/image", "/v1/items/{item_id:path}/image"),  # a 405's route, as the router labels it
    ("POST", "/no/such/path", "unmatched"),
])
def test_a_request_refused_for_its_declared_length_is_labelled_by_its_route(method, path, label):
    from serving.ingress import ObserveMiddleware, app
    from serving.metrics import ServeMetrics

    metrics = ServeMetrics()
    state = SimpleNamespace(max_body=1000, metrics=metrics)

    async def never(scope: Any, receive: Any, send: Any) -> None:
        raise AssertionError("answered before routing")

    sent: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    scope = {"type": "http", "method": method, "path": path, "root_path": "", "query_string": b"",
             "headers": [(b"content-length", b"5000")], "app": SimpleNamespace(state=state, routes=app.routes)}
    asyncio.run(ObserveMiddleware(never)(scope, receive, send))
    assert sent[0]["status"] == 413
    assert metrics.registry.get_sample_value(
        "deepindex_requests_total", {"endpoint": label, "method": method, "status": "413"}) == 1.0


# ---- 6. the write token of `deepindex serve`'s environment reaches replicas without it ---------------
def test_the_serving_environments_token_guards_writes_in_replicas_that_lack_it(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Any) -> None:
    """`deepindex serve` with DEEPINDEX_API_TOKEN set, on a cluster started before it (`deepindex up`): the
    replicas' processes have another environment, without the variable, and writes were open.  The
    command now hands them the token's sha256; a replica checks the sent token against it."""
    from deepindex.commands.serve import write_token

    monkeypatch.setenv("DEEPINDEX_HOME", str(tmp_path))
    monkeypatch.setenv("DEEPINDEX_API_TOKEN", "s3cret-token\n")
    app_args: dict[str, Any] = {"model": "unused"}
    write_token(app_args)
    assert "api_token_file" not in app_args and "s3cret" not in json.dumps(app_args)
    monkeypatch.delenv("DEEPINDEX_API_TOKEN")  # the replica's process
    ing = _ingress(**app_args)
    ing._token = ing.args.api_token_digest()
    assert ing._token == app_args["api_token_sha256"]
    for header, status in ((None, 401), (b"Bearer wrong", 403)):
        with pytest.raises(ApiError) as e:
            ing._authorize_token(_request("/v1/items", method="POST",
                                          headers=[(b"authorization", header)] if header else []), write=True)
        assert e.value.status == status
    ing._authorize_token(_request("/v1/items", method="POST", headers=[(b"authorization", b"Bearer s3cret-token")]),
                         write=True)
    ing._authorize_token(_request("/v1/search"), write=False)  # reads stay open (auth_reads: false)

    # Without the variable, the command makes (or reuses) the token file, as before.
    app_args = {"model": "unused"}
    write_token(app_args)
    assert "api_token_sha256" not in app_args and (tmp_path / "serving" / "api_token").is_file()
    assert ServeArgs(**app_args).api_token_digest() is not None


# ---- 7. a thumbnail of a stored image over the service's pixel limit ------------------------------------
def test_a_thumbnail_of_an_image_over_the_pixel_limit_is_a_422_and_one_at_the_limit_is_made(monkeypatch):
    """PIL's guard (Image.MAX_IMAGE_PIXELS, which a replica sets to max_image_pixels) stops only at twice its
    limit; between the two it warns and decodes, and thumbnails of stored images up to twice the service's
    limit were decoded (found on review).  The limit is read from the header, as an upload's is."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # as the Ingress replica sets it
    ing = _ingress(max_image_pixels=100)
    with pytest.raises(ApiError) as e:
        _item_image(ing, _saved(Image.new("RGB", (101, 1)), "PNG"), 16)  # one pixel over
    assert e.value.status == 422 and e.value.code == "no_thumbnail"
    assert e.value.message == "a: the image has more pixels than the service decodes (100); fetch it without size"
    res = _item_image(ing, _saved(Image.new("RGB", (10, 10)), "PNG"), 8)  # at the limit
    assert res.status_code == 200 and res.media_type == "image/png"
    res = _item_image(ing, over := _saved(Image.new("RGB", (101, 1)), "PNG"), None)  # the original: never decoded
    assert res.status_code == 200 and res.body == over


# ---- 8. the same version of another model ------------------------------------------------------------
COLOURS = ["red", "green", "blue"]


def _two_models(ing: Any) -> tuple[dict[str, str], list[tuple[str, str, str]]]:
    """The index replica of a switch from deepindex version 1 to photos version 1, both loaded: a call that
    names the model gets that model's; one that names the version alone, the served model's.  Returns
    the served model's name (to switch) and the searches asked for: (model, version, cursor key)."""
    served = {"name": "deepindex"}
    concepts = {"deepindex": CONCEPTS, "photos": COLOURS}
    searches: list[tuple[str, str, str]] = []

    def query_info(version: str, name: str | None = None) -> dict[str, Any]:
        return {"name": name or served["name"], "version": version, "features": {"penultimate": ["cosine"]},
                "default_feature": "penultimate", "concepts": concepts[name or served["name"]], "multilabel": False}

    def query(version: str, spec: dict[str, Any], name: str | None = None) -> dict[str, Any]:
        searches.append((name or served["name"], version, spec["key"]))
        return {"results": [], "next_cursor": None, "feature": "penultimate", "metric": "cosine",
                "signals": ["keywords"], "index": {"collection": "c", "model_version": version, "seq": 0, "count": 0}}

    ing.index.query_info, ing.index.query = _Remote(query_info), _Remote(query)
    ing._qinfo, ing._vocab = {}, {}
    return served, searches


def _search(ing: Any, q: str, query: bytes = b"") -> dict[str, Any]:
    return asyncio.run(ing.search(_request("/v1/search", query), q=q, k=10, mode="all", cursor=None, example_id=None,
                                  feature=None, metric=None, fusion="weighted", weight_keywords=None,
                                  weight_example=None))


def test_after_a_switch_to_the_same_version_of_another_model_the_ingress_asks_that_models_index():
    """Registry versions restart at 1 for every name.  The ingress cached the index's query info per version:
    after deepindex version 1 -> photos version 1 it checked photos' filters against deepindex's concepts
    (``min_prob.red``: 422 "unknown concept; the model has 0, 1, 2 ... 9"), asked the index replica for
    version 1 alone, and bound its cursors to the version alone (found on review)."""
    ing = _ingress(vocabulary=None)
    served, searches = _two_models(ing)
    ing._spec = {"name": "deepindex", "version": "1", "concepts": CONCEPTS}
    assert _search(ing, "3", b"min_prob.3=0.5")["model"] == {"name": "deepindex", "version": "1"}
    _search(ing, "3")
    served["name"] = "photos"  # the index replica switched; this replica's model spec follows
    ing._spec = {"name": "photos", "version": "1", "concepts": COLOURS}
    got = _search(ing, "3", b"min_prob.red=0.5")
    assert got["model"] == {"name": "photos", "version": "1"} and got["min_prob"] == {"red": 0.5}
    _search(ing, "3")
    with pytest.raises(ApiError) as e:  # and deepindex's concepts are photos' no more
        _search(ing, "3", b"min_prob.3=0.5")
    assert e.value.code == "bad_min_prob"
    assert e.value.message == "min_prob.3: unknown concept; the model has red, green, blue"
    assert [(n, v) for n, v, _ in searches] == [("deepindex", "1")] * 2 + [("photos", "1")] * 2
    assert searches[1][2] != searches[3][2]  # the same query of another model: a cursor of one is not the other's


def test_readyz_checks_the_index_of_the_model_the_model_replicas_serve():
    """/readyz asked the index replica for the model replicas' version alone: with deepindex version 1 still
    on the model replicas and photos version 1 served by the index replica, it answered with photos' index
    as the model's (found on review)."""
    ing = _ingress()
    spec = {"name": "deepindex", "version": "1", "concepts": CONCEPTS, "uri": "models:/deepindex@champion",
            "batch_size": 8, "reloads": 0, "last_error": None}
    ing.model = SimpleNamespace(info=_Remote(lambda: spec))

    def readyz(index_model: Any) -> tuple[int, dict[str, Any]]:
        ing.index.info = _Remote(lambda version, name=None: {"loaded": True, "count": 3, "model": {
            "name": index_model(name), "version": version}})
        res = asyncio.run(ing.readyz())
        return res.status_code, json.loads(res.body)

    status, body = readyz(lambda name: name or "photos")  # both loaded; the version alone gets the served one
    assert status == 200 and body["index"]["model"] == {"name": "deepindex", "version": "1"} and not body["reasons"]
    status, body = readyz(lambda name: "photos")  # an index of another model than the model replicas' (never)
    assert status == 503 and body["reasons"] == ["index: built for photos version 1, the model is deepindex version 1"]


def test_local_reads_answer_only_for_the_model_the_writer_serves_by_name_and_version(tmp_path):
    """The ingress's copy of the served index (serving/reads.py) was matched to a search by version alone:
    a model replica still on deepindex version 1 had its searches answered from photos version 1's copy."""
    from deepindex.index.store import index_dir_name
    from index.test_index_units import make_store
    from serving.reads import SERVING_FILE, WRITER_FILE, LocalReads
    from support import wait_until

    make_store(20, version="1", name="photos").save(tmp_path / index_dir_name("photos", "1"))
    (tmp_path / WRITER_FILE).write_text(json.dumps({"nonce": "n1"}))
    (tmp_path / SERVING_FILE).write_text(json.dumps({"name": "photos", "version": "1", "ref": "models:/photos/1"}))
    spec = {"k": 5, "key": "k", "cursor": None, "concepts": None, "mode": "all", "vector": None, "item": "i1",
            "feature": None, "metric": None, "min_prob": {}, "fusion": "weighted", "weights": {}}
    reads = LocalReads(ttl_s=30)
    reads.confirm({"nonce": "n1", "dir": str(tmp_path)})
    wait_until(lambda: reads.search("1", spec, "photos"), 20, every=0.02, what="the local copy of photos' index")
    assert reads.loaded("1", "photos") and reads.loaded("1") and not reads.loaded("1", "deepindex")
    assert reads.search("1", spec, "deepindex") is None  # another model's version 1: the index replica answers
    assert reads.search("1", spec) is not None  # a caller naming the version alone: the writer's, as before
