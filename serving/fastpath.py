"""Plain GET searches answered past FastAPI's per-request machinery, with FastAPI's own semantics.

A search answered from the ingress's copy of the index takes ~0.3 ms; around it, FastAPI bound each
query parameter through pydantic, solved the endpoint's dependencies, walked its middleware and
router, and validated the response: ~20 % of the ingress's CPU per search (``python
jobs/profile_serve.py --searches --stacks-dir DIR``), the searches/s it lost on 2 cores.

For the read endpoints named in :data:`FAST` (keyword search, similar items), a request whose query
is *plain* is bound here instead: every parameter once, each one the endpoint declares as ``str`` or
``int`` (an int in canonical digits), plus the ``min_prob.<concept>`` filters, which the endpoint
reads itself.  The route is FastAPI's own (its path pattern, its ``response_model``), the endpoint is
the same method, its errors go through the app's exception handlers, and its answer through
FastAPI's ``serialize_response``.  Anything else (a repeated, empty or non-canonical value, a float
weight, a missing required parameter, an unknown key, another route) goes through FastAPI as before,
so every 422 and the OpenAPI contract stay FastAPI's (``tests/serving/test_serving_search.py``
checks both ways answer byte for byte the same; ``tests/serving/test_fastpath.py`` what is bound).
"""
from __future__ import annotations

import inspect
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl

from fastapi import FastAPI, Request
from fastapi.datastructures import DefaultPlaceholder
from fastapi.responses import Response
from fastapi.routing import APIRoute, iter_route_contexts, serialize_response
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match
from starlette.types import Receive, Scope, Send

from serving import contract

FAST = (("GET", "/v1/search"), ("GET", "/v1/items/{item_id:path}/similar"))
KINDS: dict[Any, type] = {str: str, str | None: str, int: int}
INT = re.compile(r"(0|[1-9][0-9]{0,8})")  # canonical digits: what pydantic reads as the same int


@dataclass(frozen=True)
class _Param:
    kind: type  # str or int
    required: bool


@dataclass(frozen=True)
class FastRoute:
    route: APIRoute
    params: dict[str, _Param]  # the query parameters bound here (name -> kind); any other key: FastAPI
    defaults: dict[str, Any]  # every optional query parameter's default, as FastAPI fills it in when absent
    filters: bool  # min_prob.<concept> keys pass through to the endpoint, which reads them itself
    request: str | None  # the endpoint's parameter that takes the Request


def _bindable(route: APIRoute, instance: str) -> tuple[dict[str, _Param], dict[str, Any]] | None:
    """(the query parameters bound here, the defaults of the optional ones), from FastAPI's own analysis
    of the route (its dependant); None when the route is FastAPI's alone.

    Bound here: a query parameter typed ``str`` or ``int`` (optional or not), read by its own name, with
    no constraint of its own (``max_length``, ``le``, a pattern: FastAPI's to check).  A request that
    carries any other one falls back to FastAPI.  The route is FastAPI's alone when it reads a header, a
    cookie or a body, has a dependency other than Serve's ``instance`` (``self``; a dependency could
    refuse the request or be overridden by a query key), or a required query parameter not bound here
    (only FastAPI can say it is missing)."""
    d = route.dependant
    if d.header_params or d.cookie_params or d.body_params or route.dependencies:
        return None
    for dep in d.dependencies:  # in a replica, Serve's: self=Depends(<the replica's instance>)
        if dep.name != instance or dep.query_params or dep.header_params or dep.cookie_params or dep.body_params \
                or dep.dependencies:
            return None
    params: dict[str, _Param] = {}
    defaults: dict[str, Any] = {}
    for f in d.query_params:
        if f.name == instance:  # self, before Serve makes it a dependency
            continue
        info = f.field_info
        kind = KINDS.get(info.annotation)
        if kind is not None and not info.metadata and f.alias == f.name:
            params[f.name] = _Param(kind, required=info.is_required())
        elif info.is_required():
            return None
        if not info.is_required():
            defaults[f.name] = info.get_default(call_default_factory=True)
    return params, defaults


def fast_routes(app: FastAPI, wanted: tuple[tuple[str, str], ...] = FAST) -> list[FastRoute]:
    """The app's routes of ``wanted`` (method, path template), as FastAPI built them, that this module
    can answer (:func:`_bindable`)."""
    out = []
    for ctx in iter_route_contexts(app.routes):
        route = ctx.original_route
        if not isinstance(route, APIRoute) or not any(
                m in (route.methods or ()) and route.path == p for m, p in wanted):
            continue
        if not isinstance(route.response_class, DefaultPlaceholder) or route.response_field is None:
            continue  # a custom response class: FastAPI's path renders it
        sig = inspect.signature(route.endpoint, eval_str=True)  # real types, were the module to postpone them
        bindable = _bindable(route, next(iter(sig.parameters)))
        if bindable is None:
            continue
        request = next((n for n, p in sig.parameters.items() if p.annotation is Request), None)
        out.append(FastRoute(route, *bindable, filters=contract.takes_min_prob(route.operation_id), request=request))
    return out


def bind(fast: FastRoute, query_string: bytes) -> dict[str, Any] | None:
    """The endpoint's keyword arguments for a plain query (an absent optional parameter: its default), or
    None: FastAPI binds this one."""
    kwargs: dict[str, Any] = {}
    seen: set[str] = set()
    for key, value in parse_qsl(query_string.decode("latin-1"), keep_blank_values=True):  # as Starlette reads it
        if key in seen or not value:
            return None
        seen.add(key)
        p = fast.params.get(key)
        if p is None:
            if fast.filters and key.startswith(contract.MIN_PROB):
                continue
            return None
        if p.kind is int:
            if not INT.fullmatch(value):
                return None
            kwargs[key] = int(value)
        else:
            kwargs[key] = value
    if any(p.required and name not in kwargs for name, p in fast.params.items()):
        return None
    return {**fast.defaults, **kwargs}


class FastReads:
    """Answers the plain requests of :data:`FAST` for ``instance`` (the ingress replica); ``__call__``
    says whether it did."""

    def __init__(self, app: FastAPI, instance: object, counted: Callable[[str], None] | None = None) -> None:
        self._app, self._instance, self._counted = app, instance, counted  # counted(route template) per request
        self._routes = fast_routes(app)

    def _match(self, scope: Scope) -> tuple[FastRoute, Scope] | None:
        if scope["method"] != "GET":
            return None
        for fast in self._routes:
            match, child = fast.route.matches(scope)
            if match == Match.FULL:
                return fast, child
        return None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> bool:
        found = self._match(scope)
        if found is None:
            return False
        fast, child = found
        kwargs = bind(fast, scope.get("query_string", b""))
        if kwargs is None:
            return False
        scope.update(child)  # route, endpoint and path parameters, as Starlette's router sets them
        kwargs.update(scope.get("path_params", {}))
        request = Request(scope, receive)
        if fast.request is not None:
            kwargs[fast.request] = request
        route = fast.route
        if self._counted is not None:
            self._counted(route.path)
        try:
            raw = await route.endpoint(self._instance, **kwargs)
        except Exception as e:  # an error with a handler is answered as FastAPI would answer it
            handler = self._handler(e)
            if handler is None:
                raise
            answer = (await handler(request, e) if inspect.iscoroutinefunction(handler)
                      else await run_in_threadpool(handler, request, e))  # a plain function, as Starlette runs it
            await answer(scope, receive, send)
            return True
        if isinstance(raw, Response):
            await raw(scope, receive, send)
            return True
        content = await serialize_response(
            field=route.response_field, response_content=raw, include=route.response_model_include,
            exclude=route.response_model_exclude, by_alias=route.response_model_by_alias,
            exclude_unset=route.response_model_exclude_unset, exclude_defaults=route.response_model_exclude_defaults,
            exclude_none=route.response_model_exclude_none, is_coroutine=True, dump_json=True)
        await Response(content=content, media_type="application/json", status_code=route.status_code or 200)(
            scope, receive, send)
        return True

    def _handler(self, e: Exception) -> Callable[..., Any] | None:
        """The app's exception handler for ``e``, as Starlette's ExceptionMiddleware looks it up: an HTTP
        exception's status code first, then its class, nearest first; 500 and ``Exception`` are the
        outermost middleware's (a 500 from there), not this one's."""
        handlers = self._app.exception_handlers
        if isinstance(e, StarletteHTTPException) and e.status_code != 500 and e.status_code in handlers:
            return handlers[e.status_code]
        return next((handlers[c] for c in type(e).__mro__ if c in handlers and c is not Exception), None)
