"""serving/fastpath.py without a cluster: which routes it answers, and which queries it leaves to FastAPI.
(tests/serving/test_serving_search.py checks both ways answer the same over real HTTP.)"""
from __future__ import annotations

import inspect

import pytest
from fastapi import Query, Request

from serving.fastpath import FastRoute, _bindable, bind, fast_routes


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
    assert bind(search, b"q=red+car&k=20&mode=any&min_prob.7=0.5") == {"q": "red car", "k": 20, "mode": "any"}
    assert bind(search, b"q=%C3%A9t%C3%A9") == {"q": "\u00e9t\u00e9"}  # percent-encoded UTF-8, as Starlette reads it
    assert bind(similar, b"k=0&cursor=abc") == {"k": 0, "cursor": "abc"}  # 0 is the endpoint's to refuse
    assert bind(similar, b"") == {}


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


def test_a_parameter_of_another_type_or_read_by_an_alias_is_left_to_fastapi():
    def endpoint(self, request: Request, item: str, q: str = Query(), k: int = 10, w: float | None = None,
                 tag: str | None = Query(None, alias="tag-name"), n: int | None = None): ...

    params = _bindable(inspect.signature(endpoint, eval_str=True), path_params={"item"})
    assert {name: (p.kind, p.required) for name, p in params.items()} == {"q": (str, True), "k": (int, False)}
