"""serving/fastpath.py without a cluster: which routes it answers, and which queries it leaves to FastAPI.
(tests/serving/test_serving_search.py checks both ways answer the same over real HTTP.)"""
from __future__ import annotations

from typing import Any

import pytest
from fastapi import Cookie, Depends, FastAPI, Header, Query, Request

from serving.fastpath import FastRoute, bind, fast_routes


@pytest.fixture(scope="module")
def routes() -> dict[str, FastRoute]:
    from serving.ingress import app

    return {f.route.path: f for f in fast_routes(app)}


def test_the_fast_routes_are_fastapis_own_with_the_endpoints_plain_parameters(routes):
    assert set(routes) == {"/v1/search", "/v1/items/{item_id:path}/similar"}
    search, similar = routes["/v1/search"], routes["/v1/items/{item_id:path}/similar"]
    assert {n: (p.kind, p.required) for n, p in search.params.items()} == {
        "q": (str, True), "k": (int, False), "mode": (str, False), "cursor": (str, False),
        "example_id": (str, False), "feature": (str, False), "metric": (str, False), "fusion": (str, False)}
    assert set(similar.params) == {"k", "cursor", "feature", "metric"}  # item_id is the path's
    assert search.filters and similar.filters


def test_a_plain_query_is_bound_here(routes):
    search, similar = routes["/v1/search"], routes["/v1/items/{item_id:path}/similar"]
    # An absent optional parameter gets its default, as FastAPI fills it in (float weights included).
    assert search.defaults == {"k": 10, "mode": "all", "cursor": None, "example_id": None, "feature": None,
                               "metric": None, "fusion": "weighted", "weight_keywords": None, "weight_example": None}
    assert bind(search, b"q=red+car&k=20&mode=any&min_prob.7=0.5") == {
        **search.defaults, "q": "red car", "k": 20, "mode": "any"}
    assert bind(search, b"q=%C3%A9t%C3%A9") == {**search.defaults, "q": "\u00e9t\u00e9"}  # percent-encoded UTF-8
    assert bind(similar, b"k=0&cursor=abc") == {**similar.defaults, "k": 0, "cursor": "abc"}  # 0: the endpoint's 422
    assert bind(similar, b"") == similar.defaults


@pytest.mark.parametrize("query", [
    b"k=5",  # q is required: FastAPI's 422 names it
    b"q=a&q=b",  # a repeated parameter: FastAPI reads the last one
    b"q=a&k=05", b"q=a&k=+5", b"q=a&k=5.0", b"q=a&k=-1", b"q=a&k=", b"q=a&k=1234567890",  # not canonical digits
    b"q=",  # empty
    b"q=a&weight_keywords=2",  # a float: FastAPI's to bind
    b"q=a&kk=3",  # unknown: FastAPI's route names it
    b"q=a&min_prob.7=0.1&min_prob.7=0.2",  # repeated filters: the endpoint's own rule, through FastAPI
])
def test_anything_else_is_left_to_fastapi(routes, query):
    assert bind(routes["/v1/search"], query) is None


def test_a_path_parameter_given_in_the_query_is_left_to_fastapi(routes):
    assert bind(routes["/v1/items/{item_id:path}/similar"], b"item_id=x&k=3") is None


def _route(endpoint: Any, **route_args: Any) -> FastRoute | None:
    """``endpoint`` as GET /v1/search of a fresh app, as the fast path sees it (None: not answered here)."""
    app = FastAPI()
    app.get("/v1/search", operation_id="search", **route_args)(endpoint)
    found = fast_routes(app)
    return found[0] if found else None


def _instance() -> object:  # stands for Serve's self=Depends(get_current_servable_instance)
    return object()


def test_a_parameter_of_another_type_read_by_an_alias_or_constrained_is_left_to_fastapi():
    async def endpoint(self=Depends(_instance), *, request: Request, q: str = Query(), k: int = 10,  # noqa: B008
                       w: float | None = None, tag: str | None = Query(None, alias="tag-name"), n: int | None = None,
                       short: str | None = Query(None, max_length=3), top: int = Query(10, le=100)) -> dict: ...

    fast = _route(endpoint)
    assert fast is not None and fast.request == "request"
    assert {name: (p.kind, p.required) for name, p in fast.params.items()} == {"q": (str, True), "k": (int, False)}
    assert fast.defaults == {"k": 10, "w": None, "tag": None, "n": None, "short": None, "top": 10}
    # top=Query(10) absent: the endpoint gets 10, not the Query marker; present, or constrained ones: FastAPI's.
    assert bind(fast, b"q=a") == {"q": "a", **{k: v for k, v in fast.defaults.items()}}
    assert bind(fast, b"q=a&top=500") is None and bind(fast, b"q=a&short=abcdef") is None


def test_routes_that_read_headers_cookies_or_dependencies_are_fastapis_alone():
    """Found on review: binding from the signature took every str/int parameter from the query string, so a
    cookie, a header or a dependency's value could be set by a query key (a dependency that authorises would
    have been skipped), and a required parameter it does not bind was never checked.  Such routes are
    FastAPI's alone."""
    async def cookie(self=Depends(_instance), *, q: str = Query(), session: str | None = Cookie(None)) -> dict: ...  # noqa: B008
    async def header(self=Depends(_instance), *, q: str = Query(), x_token: str | None = Header(None)) -> dict: ...  # noqa: B008
    async def depends(self=Depends(_instance), *, q: str = Query(), user: str = Depends(lambda: "alice")) -> dict: ...  # noqa: B008
    async def required_float(self=Depends(_instance), *, q: str = Query(), w: float = Query()) -> dict: ...  # noqa: B008
    async def plain(self=Depends(_instance), *, q: str = Query()) -> dict: ...  # noqa: B008

    for endpoint in (cookie, header, depends, required_float):
        assert _route(endpoint) is None, endpoint.__name__
    assert _route(plain, dependencies=[Depends(lambda: None)]) is None  # a route-level dependency
    assert _route(plain) is not None


def test_errors_go_to_the_handler_starlette_would_pick():
    """Found on review (read in the code): the fast path looked handlers up by class only and awaited them.
    Starlette tries an HTTP exception's status code first, leaves ``Exception`` to its outermost middleware,
    and runs a plain-function handler in a thread."""
    import asyncio

    from fastapi import HTTPException
    from fastapi.responses import PlainTextResponse

    from serving.fastpath import FastReads

    app = FastAPI()

    @app.get("/v1/search", operation_id="search")
    async def search(self=Depends(_instance), *, q: str = Query()) -> dict:  # noqa: B008
        if q == "gone":
            raise HTTPException(404, "nothing")
        if q == "value":
            raise ValueError("bad")
        raise RuntimeError("bug")

    app.add_exception_handler(404, lambda request, e: PlainTextResponse("by status", 404))  # a plain function
    app.add_exception_handler(HTTPException, lambda request, e: PlainTextResponse("by class", e.status_code))
    app.add_exception_handler(ValueError, lambda request, e: PlainTextResponse("value", 400))
    app.add_exception_handler(Exception, lambda request, e: PlainTextResponse("outermost", 500))

    def answer(q: str) -> tuple[int, bytes] | str:
        scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "GET", "scheme": "http",
                 "path": "/v1/search", "raw_path": b"/v1/search", "root_path": "", "query_string": f"q={q}".encode(),
                 "headers": [(b"host", b"t")], "server": ("t", 80), "client": ("c", 1), "app": app}
        out: list[dict] = []

        async def receive() -> dict:
            return {"type": "http.request", "body": b"", "more_body": False}

        async def send(m: dict) -> None:
            out.append(m)

        async def go() -> tuple[int, bytes] | str:
            try:
                assert await FastReads(app, object())(scope, receive, send)
            except RuntimeError as e:
                return f"raised {e}"
            return out[0]["status"], b"".join(m.get("body", b"") for m in out[1:])

        return asyncio.run(go())

    assert answer("gone") == (404, b"by status")
    assert answer("value") == (400, b"value")
    assert answer("bug") == "raised bug"  # to the outermost middleware, as through FastAPI
