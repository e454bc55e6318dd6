"""``/openapi.json``: exactly what the service accepts, from FastAPI's generated document and the limits.

FastAPI describes the routes, the response models and the parameters' types; what only the
service knows is added here, so the document a client (or schemathesis) reads is the contract
the handlers enforce:

- bounds from the app's arguments: ``k`` and ``top_k`` within ``1..max_k`` (left out:
  :func:`default_k`, 10 or ``max_k`` when that is lower), ``threshold`` within
  ``0..1``, ``size`` within ``8..1024``, ``q`` up to ``max_query_chars`` with a non-blank
  character, weights above 0;
- enums: ``mode``, ``fusion``, ``metric`` and ``feature`` (the served index's descriptors and
  the metrics every one of them answers), one ``min_prob.<concept>`` parameter per concept of
  the served model;
- request bodies: multipart with its required parts (the image as a file whose part names its
  image type; one image per request as documented, several by repeating the parts) or JSON
  base64 images (``format: image``), with the id and tag rules of the collection, and no part,
  field or key besides those (``additionalProperties: false``: the handlers refuse others by name);
- every error status an operation answers, with its JSON body; the bearer scheme on writes;
- links from an added item to reading, searching by and deleting it (stateful clients);
- no ``#/$defs/...`` left inline: nested pydantic definitions are moved under
  ``#/components/schemas`` so every ``$ref`` resolves from the document root.

The handlers check the same rules (``serving/ingress.py``) with the same patterns from here.
"""
from __future__ import annotations

import copy
import re
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from deepindex.index.vectors import FEATURE_ALIAS_OF, QUERY_METRICS, metric_names

# Item ids and tags: the collection's rules (deepindex.collection.store).  An id may hold '/', so a new
# one may not end in /image or /similar: its URL would name the item's image or neighbours instead.
ITEM_ID_PATTERN = r"^[A-Za-z0-9._:@/+-]{1,200}$"
SUBRESOURCE = r"/(image|similar)$"
# Not a URL of another item's (/image, /similar), nor with a "." or ".." path segment (clients resolve
# those in a URL: /v1/items/a/../b/image is b's).
NEW_ITEM_ID_PATTERN = r"^(?!.*/(image|similar)$)(?!(.*/)?\.\.?(/|$))[A-Za-z0-9._:@/+-]{1,200}$"
MAX_TAG = 200
# A tags form field: tags separated by ',', ';' or '|' (tags.csv's separators too), each at most MAX_TAG
# characters (blank ones are dropped).
TAG_SEPARATORS = ",;|"
TAGS_FIELD_PATTERN = rf"^[^,;|]{{0,{MAX_TAG}}}([,;|][^,;|]{{0,{MAX_TAG}}})*$"
# Whitespace as Python's str.isspace() (and so str.strip(), which the collection's tag rules use) reads
# it, spelled out rather than \s (ECMAScript's \s, JSON Schema's, is another set): the schema and the
# handlers call the same text blank.
WHITESPACE = "\t\n\v\f\r\x1c\x1d\x1e\x1f \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000"
NON_BLANK_PATTERN = f"[^{WHITESPACE}]"
# A cursor as issued: URL-safe base64 without padding (deepindex.index.fusion.encode_cursor).
CURSOR_PATTERN = r"^[A-Za-z0-9_-]{1,2048}$"
MAX_WEIGHT = 1000.0
DEFAULT_K = 10  # k and top_k when a request leaves them out, within max_k (default_k)
IMAGE_TYPES = ("image/png", "image/jpeg", "image/gif", "image/bmp", "image/webp", "image/tiff")
IMAGE_FORMAT = "image"  # a string holding an image file base64-encoded (an OpenAPI custom format)
SIZE_MIN, SIZE_MAX = 8, 1024
# A 1x1 grayscale PNG: the request examples' image.
EXAMPLE_PNG = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAAAAAA6fptVAAAACklEQVR4nGOIBwAAYQBgFcFYDgAAAABJRU5ErkJggg=="
EXAMPLES = {"q": "threes and sevn", "mode": "any", "fusion": "rrf", "k": 5}

_ERROR_REF = {"$ref": "#/components/schemas/ErrorResponse"}
_DESCRIPTIONS = {400: "Bad Request", 401: "Unauthorized", 403: "Forbidden", 404: "Not Found", 409: "Conflict",
                 413: "Content Too Large", 415: "Unsupported Media Type", 422: "Unprocessable Content",
                 503: "Service Unavailable"}

# The error statuses each operation answers (401/403 on writes, and on reads with auth_reads).
ERRORS: dict[str, tuple[int, ...]] = {
    "tag": (400, 413, 415, 422, 503),
    "search": (400, 404, 422, 503),
    "search_by_upload": (400, 404, 413, 415, 422, 503),
    "similar_image": (400, 404, 413, 415, 422, 503),
    "similar_item": (404, 422, 503),
    "item_image": (404, 422, 503),
    "get_item": (404, 422, 503),
    "add_items": (400, 401, 403, 409, 413, 415, 422, 503),
    "delete_item": (401, 403, 404, 422, 503),  # 422: a query parameter it does not take
    "status": (422, 503),
    "healthz": (),
    "readyz": (),
}
WRITES = ("add_items", "delete_item")
SEARCHES = ("search", "search_by_upload", "similar_image", "similar_item")
MIN_PROB = "min_prob."  # the searches' filters, one query key per concept: min_prob.<concept>=t


def takes_min_prob(operation_id: str | None) -> bool:
    """Whether the operation takes ``min_prob.<concept>`` filters besides its declared parameters."""
    return operation_id in SEARCHES


def default_k(max_k: int) -> int:
    """``k`` (``top_k``) of a request that leaves it out: :data:`DEFAULT_K`, or ``max_k`` when that is lower
    (found on review: with ``max_k`` below 10 every such request was a 422, and the document's default
    lay above its maximum)."""
    return min(DEFAULT_K, max_k)


# What each image operation's body holds beside its images (image_bodies' ``ids`` and ``tags``).  The contract
# says it (no other property: ``additionalProperties: false``) and the handlers refuse any other part, field
# or key by its name (serving/ingress.py): a misspelt ``tag`` field was dropped, and the item stored without
# its tags (found on review).
IMAGE_BODIES: dict[str, dict[str, Any]] = {"tag": {"ids": "optional", "tags": False},
                                           "add_items": {"ids": "required", "tags": True},
                                           "similar_image": {"ids": "none", "tags": False},
                                           "search_by_upload": {"ids": "none", "tags": False}}
IMAGE_PART = "images"  # the multipart part of an image file (repeated for several)


def form_fields(ids: str, tags: bool) -> tuple[str, ...]:
    """The text parts a multipart body of an image operation takes beside its ``images`` files."""
    return (*(("id",) if ids != "none" else ()), *(("tags",) if tags else ()))


def image_keys(tags: bool) -> tuple[str, ...]:
    """The keys of a JSON body's image (an ``id`` is taken by every image operation: echoed or ignored)."""
    return ("id", "data", *(("tags",) if tags else ()))


def image_bodies(max_images: int, *, ids: str, tags: bool) -> dict[str, Any]:
    """The request body of an image endpoint: multipart files or JSON base64 images.

    ``ids``: ``none`` (ignored), ``optional`` (echoed) or ``required`` (the collection's ids).
    """
    id_schema: dict[str, Any] = ({"type": "string", "pattern": NEW_ITEM_ID_PATTERN} if ids == "required"
                                 else {"type": "string"})
    form: dict[str, Any] = {
        IMAGE_PART: {"type": "string", "format": "binary",
                     "description": f"the image file (one of {', '.join(IMAGE_TYPES)}). Several images: repeat "
                                    f"the part (at most {max_images}), with their ids in the same order"}}
    if "id" in form_fields(ids, tags):
        form["id"] = {**id_schema, "description": "the item's id" if ids == "required" else "a label echoed back"}
    if "tags" in form_fields(ids, tags):
        form["tags"] = {"type": "string", "pattern": TAGS_FIELD_PATTERN,
                        "description": f"the item's known labels, separated by , ; or | (as in a tags.csv), each at "
                                       f"most {MAX_TAG} characters (blank ones dropped)"}
    image: dict[str, Any] = {
        "type": "object", "required": ["data"],
        "properties": {"data": {"type": "string", "format": IMAGE_FORMAT,
                                "description": "the image file's bytes, base64 (a data: URL prefix is allowed)"}}}
    if ids == "required":
        image["required"] = ["id", "data"]
        image["properties"]["id"] = id_schema
    else:
        image["properties"]["id"] = {"anyOf": [{"type": "string", "maxLength": 256}, {"type": "null"}]}
    if "tags" in image_keys(tags):
        image["properties"]["tags"] = {"type": "array", "items": {
            "type": "string", "minLength": 1, "maxLength": MAX_TAG, "pattern": NON_BLANK_PATTERN}}
    image["additionalProperties"] = False
    return {"required": True, "content": {
        "multipart/form-data": {
            "schema": {"type": "object", "required": [IMAGE_PART, *(["id"] if ids == "required" else [])],
                       "properties": form, "additionalProperties": False},
            # Text parts are text/plain (RFC 7578's default), said outright so a client knows.
            "encoding": {IMAGE_PART: {"contentType": ", ".join(IMAGE_TYPES)},
                         **{name: {"contentType": "text/plain"} for name in form if name != IMAGE_PART}}},
        "application/json": {
            "schema": {"type": "object", "required": ["images"], "additionalProperties": False, "properties": {
                "images": {"type": "array", "minItems": 1, "maxItems": max_images, "items": image}}},
            "example": {"images": [{"data": EXAMPLE_PNG,
                                    **({"id": "example-item", "tags": ["3"]} if ids == "required" else {})}]}}}}


def query_parameters(*, max_k: int, max_query_chars: int, features: Mapping[str, Sequence[str]],
                     concepts: Sequence[str]) -> dict[str, dict[str, Any]]:
    """The schema of every query parameter by name (``min_prob.<concept>`` apart: :func:`min_prob_parameters`)."""
    # A metric every feature answers, so any (feature, metric) the document allows is answered.
    metrics = [m for m in QUERY_METRICS if all(m in ms for ms in features.values())] or ["cosine"]
    k = {"type": "integer", "minimum": 1, "maximum": max_k, "default": default_k(max_k)}
    return {
        "k": {**k, "description": "results per page"},
        "top_k": {**k, "description": "concepts per image, best first"},
        "threshold": {"type": "number", "minimum": 0, "maximum": 1, "default": 0.0},
        "size": {"type": "integer", "minimum": SIZE_MIN, "maximum": SIZE_MAX,
                 "description": "a PNG thumbnail at most this many pixels a side"},
        "q": {"type": "string", "minLength": 1, "maxLength": max_query_chars, "pattern": NON_BLANK_PATTERN,
              "description": "keywords (any language the vocabulary holds; plurals and typos are read)"},
        "mode": {"type": "string", "enum": ["all", "any"], "default": "all"},
        "cursor": {"type": "string", "pattern": CURSOR_PATTERN,
                   "description": "next_cursor of the previous page of the same query; a cursor that names no page "
                                  "of this query is a 404"},
        "example_id": {"type": "string", "pattern": ITEM_ID_PATTERN,
                       "description": "an indexed item as the example (fused with the keywords)"},
        "feature": {"type": "string", "enum": [*sorted(features), *(FEATURE_ALIAS_OF[f] for f in sorted(features)
                                                                     if f in FEATURE_ALIAS_OF)],
                    "description": "the descriptor the example is compared by (default: the index's); output is "
                                   "probs's other name, last_but_one penultimate's"},
        "metric": {"type": "string", "enum": metric_names(metrics),
                   "description": "l2 (or euclidean): minus the Euclidean distance; ip (or dot): dot product; "
                                  "cosine: dot product of L2-normalised vectors (default: the feature's)"},
        "fusion": {"type": "string", "enum": ["weighted", "rrf"], "default": "weighted",
                   "description": "weighted: sum of min-max normalised scores times weights; rrf: reciprocal "
                                  "rank fusion, sum of weight / (60 + rank)"},
        "weight_keywords": {"type": "number", "exclusiveMinimum": 0, "maximum": MAX_WEIGHT, "default": 1.0},
        "weight_example": {"type": "number", "exclusiveMinimum": 0, "maximum": MAX_WEIGHT, "default": 1.0},
    }


def min_prob_parameters(concepts: Sequence[str]) -> list[dict[str, Any]]:
    return [{"name": f"{MIN_PROB}{c}", "in": "query", "required": False,
             "schema": {"type": "number", "minimum": 0, "maximum": 1},
             "description": f"keep only items whose probability of {c!r} is at least this"} for c in concepts]


def contract(base: dict[str, Any], *, max_k: int, max_query_chars: int, max_images: int,
             features: Mapping[str, Sequence[str]], concepts: Sequence[str], auth_reads: bool,
             write_token: bool) -> dict[str, Any]:
    """``base`` (FastAPI's document of the routes) made exact; ``base`` itself is left as it was."""
    doc = copy.deepcopy(base)
    hoist_defs(doc)
    params = query_parameters(max_k=max_k, max_query_chars=max_query_chars, features=features, concepts=concepts)
    bodies = {"tag": image_bodies(max_images, **IMAGE_BODIES["tag"]),
              "add_items": image_bodies(max_images, **IMAGE_BODIES["add_items"]),
              "similar_image": image_bodies(1, **IMAGE_BODIES["similar_image"]),
              "search_by_upload": image_bodies(1, **IMAGE_BODIES["search_by_upload"])}
    schemas = doc.setdefault("components", {}).setdefault("schemas", {})
    for item in doc["paths"].values():
        for op in item.values():
            oid = op.get("operationId", "")
            for p in op.get("parameters", []):
                if p["in"] == "query" and p["name"] in params:
                    p["schema"] = params[p["name"]]
                    if p["name"] in EXAMPLES:
                        p["example"] = EXAMPLES[p["name"]]
                elif p["in"] == "path" and p["name"] == "item_id":
                    p["schema"] = {"type": "string", "pattern": ITEM_ID_PATTERN}
            if oid in SEARCHES:
                op["parameters"] = [*op.get("parameters", []), *min_prob_parameters(concepts)]
            if oid in bodies:
                op["requestBody"] = bodies[oid]
            secured = write_token and (oid in WRITES or (auth_reads and oid not in ("healthz", "readyz")))
            errors = [c for c in ERRORS.get(oid, (422, 503)) if secured or c not in (401, 403)]
            if secured:
                op["security"] = [{"bearer": []}]
                errors = sorted({*errors, 401, 403})
            responses = op.setdefault("responses", {})
            for code in [c for c in list(responses) if c.isdigit() and int(c) >= 400]:
                if int(code) not in errors and not (oid == "readyz" and code == "503"):
                    del responses[code]
            for c in errors:
                responses[str(c)] = {"description": _DESCRIPTIONS[c],
                                     "content": {"application/json": {"schema": _ERROR_REF}}}
    if write_token:
        doc["components"]["securitySchemes"] = {"bearer": {
            "type": "http", "scheme": "bearer", "description": "the service's API token (writes; reads too with "
                                                               "auth_reads)"}}
    _links(doc)
    for unused in ("HTTPValidationError", "ValidationError"):
        if unused in schemas and f"#/components/schemas/{unused}" not in str(doc["paths"]):
            del schemas[unused]
    return doc


def _links(doc: dict[str, Any]) -> None:
    """An added item (201: ``added``; 200, re-posted: ``existing``) can be read, searched by and deleted."""
    ops = {op.get("operationId"): op for item in doc["paths"].values() for op in item.values()}
    add = ops.get("add_items")
    if add is None:
        return
    for status, field in (("201", "added"), ("200", "existing")):
        resp = add["responses"].setdefault(status, {"description": "items already there, unchanged",
                                                    "content": copy.deepcopy(add["responses"].get("201", {})
                                                                             .get("content", {}))})
        resp["links"] = {
            name: {"operationId": oid, "parameters": {"item_id": f"$response.body#/{field}/0"}}
            for name, oid in (("GetItem", "get_item"), ("SimilarItem", "similar_item"), ("ItemImage", "item_image"),
                              ("DeleteItem", "delete_item")) if oid in ops}


def hoist_defs(doc: dict[str, Any]) -> None:
    """Move every nested ``$defs`` under ``components/schemas`` and point their ``$ref``s there."""
    schemas = doc.setdefault("components", {}).setdefault("schemas", {})
    for node in list(_walk(doc)):
        defs = node.pop("$defs", None) if isinstance(node, dict) else None
        if defs:
            for name, schema in defs.items():
                schemas.setdefault(name, schema)
    for node in _walk(doc):
        if isinstance(node, dict) and isinstance(node.get("$ref"), str) and node["$ref"].startswith("#/$defs/"):
            node["$ref"] = "#/components/schemas/" + node["$ref"][len("#/$defs/"):]


def _walk(node: Any) -> Iterator[Any]:
    yield node
    if isinstance(node, dict):
        for v in node.values():
            yield from _walk(v)
    elif isinstance(node, list):
        for v in node:
            yield from _walk(v)


def unresolved_refs(doc: dict[str, Any]) -> list[str]:
    """Every ``$ref`` of ``doc`` that does not resolve from its root (``[]`` for a sound document)."""
    bad = []
    for node in _walk(doc):
        if isinstance(node, dict) and isinstance(node.get("$ref"), str):
            ref = node["$ref"]
            target: Any = doc
            if not ref.startswith("#/"):
                bad.append(ref)
                continue
            for part in ref[2:].split("/"):
                part = part.replace("~1", "/").replace("~0", "~")
                if not isinstance(target, dict) or part not in target:
                    bad.append(ref)
                    break
                target = target[part]
    return bad


def non_blank(text: str) -> bool:
    """The handlers' reading of ``NON_BLANK_PATTERN``."""
    return re.search(NON_BLANK_PATTERN, text) is not None
