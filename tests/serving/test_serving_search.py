"""Search over real HTTP: descriptors and metrics chosen per query, keywords fused with an example,
concept filters, cursor pages past max_k, "did you mean", 405 with Allow, and the contract itself."""
from __future__ import annotations

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from support import png_bytes, wait_until
from tests.serving.conftest import GALLERY, LIMITS

pytestmark = [pytest.mark.slow, pytest.mark.serve, pytest.mark.cluster, pytest.mark.timeout(300)]


def pages(served, path: str, params: dict, method: str = "get", **kw) -> list[dict]:
    """Every page of one query, following next_cursor; each page's hits, in order."""
    out: list[dict] = []
    cursor = None
    for _ in range(500):
        p = {**params, **({"cursor": cursor} if cursor else {})}
        r = (served.get(path, params=p, **kw) if method == "get" else served.post(path, params=p, **kw))
        assert r.status_code == 200, r.text
        body = r.json()
        out += body["results"]
        cursor = body["next_cursor"]
        if cursor is None:
            return out
        assert len(body["results"]) == params["k"]
    raise AssertionError("no last page")


def test_feature_and_metric_per_query_and_clear_422s(served):
    base = served.get("/v1/items/scene-000010/similar", params={"k": 10}).json()
    assert (base["feature"], base["metric"]) == ("penultimate", "cosine")  # the index's default
    for metric in ("l2", "ip", "cosine"):  # an exact index answers every metric, on every descriptor
        for feature in ("penultimate", "probs"):
            body = served.get("/v1/items/scene-000010/similar",
                              params={"k": 10, "feature": feature, "metric": metric}).json()
            assert (body["feature"], body["metric"]) == (feature, metric) and len(body["results"]) == 10
            labels = set(served.labels[10])
            assert sum(bool(labels & set(h["labels"])) for h in body["results"]) >= 8, (feature, metric)
    # The names a user may know them by: the answer says which metric it used, and ranks as that one.
    for alias, metric in (("dot", "ip"), ("euclidean", "l2")):
        body = served.get("/v1/items/scene-000010/similar", params={"k": 10, "metric": alias}).json()
        same = served.get("/v1/items/scene-000010/similar", params={"k": 10, "metric": metric}).json()
        assert body["metric"] == metric and body["results"] == same["results"]
    # The mission's names for the descriptors: output (the probabilities), last_but_one (the embedding).
    for alias, feature in (("output", "probs"), ("last_but_one", "penultimate")):
        body = served.get("/v1/items/scene-000010/similar", params={"k": 10, "feature": alias}).json()
        same = served.get("/v1/items/scene-000010/similar", params={"k": 10, "feature": feature}).json()
        assert body["feature"] == feature and body["results"] == same["results"]
    up = served.post("/v1/search/similar", params={"k": 3, "feature": "output", "metric": "l2"},
                     files={"images": ("q.png", png_bytes(served.images[17]))}).json()
    assert up["feature"] == "probs" and up["results"][0]["id"] == "scene-000017"
    # A misspelt parameter is named, never dropped (the answer would look like what was asked).
    r = served.post("/v1/tag", params={"topk": 3}, files={"images": ("q.png", png_bytes(served.images[17]))})
    assert r.status_code == 422 and r.json()["error"] == {
        "code": "unknown_parameter", "message": "topk: not a parameter of POST /v1/tag (it takes threshold, top_k)"}
    r = served.get("/v1/search", params={"q": "seven", "min_prob.7": "0.5", "cursr": "x"})
    assert r.status_code == 422 and r.json()["error"]["message"] == (
        "cursr: not a parameter of GET /v1/search (it takes cursor, example_id, feature, fusion, k, metric, mode, q, "
        "weight_example, weight_keywords, min_prob.<concept>)")
    r = served.get("/v1/items/scene-000010/similar", params={"k": 5, "feature": "last_but_two"})
    assert r.status_code == 422 and r.json()["error"]["message"] == (
        "feature='last_but_two': this index answers penultimate (last_but_one), probs (output); the service indexes "
        "the model's other descriptors (e.g. last_but_two) that its args.features lists"), r.text
    for params, code, name in (({"feature": "stage9"}, "bad_feature", "feature"),
                               ({"metric": "manhattan"}, "bad_metric", "metric"),
                               ({"min_prob.zebra": "0.5"}, "bad_min_prob", "min_prob.zebra"),
                               ({"min_prob.3": "1.5"}, "bad_min_prob", "min_prob.3"),
                               ({"cursor": "not a cursor!"}, "bad_cursor", "cursor"),
                               ({"featur": "output"}, "unknown_parameter", "featur:")):
        r = served.get("/v1/items/scene-000010/similar", params={"k": 5, **params})
        assert r.status_code == 422 and r.json()["error"]["code"] == code, r.text
        assert name in r.json()["error"]["message"]


def test_keywords_fused_with_an_example_and_filtered(served):
    q = {"q": "seven", "k": 10, "example_id": "scene-000003", "min_prob.7": "0.5"}
    for rule in ("weighted", "rrf"):
        body = served.get("/v1/search", params={**q, "fusion": rule, "weight_example": "2"}).json()
        assert body["fusion"].startswith(rule) and body["weights"] == {"keywords": 1.0, "example": 2.0}
        assert body["example"] == {"id": "scene-000003"} and body["min_prob"] == {"7": 0.5}
        assert len(body["results"]) == 10 and all("7" in h["labels"] for h in body["results"])
        assert "scene-000003" not in [h["id"] for h in body["results"]]  # the example itself left out
    # An uploaded example, with the same keywords and the example weighing most: the image's own item first.
    assert "7" in served.labels[3]
    up = served.post("/v1/search", params={"q": "seven", "k": 5, "weight_example": "5"},
                     files={"images": ("q.png", png_bytes(served.images[3]))}).json()
    assert up["example"]["upload"] and up["concepts"] == ["7"] and up["weights"] == {"keywords": 1.0, "example": 5.0}
    assert up["results"][0]["id"] == "scene-000003"
    # A filter keeps exactly the items at or above the threshold (checked against the item's own probabilities).
    only = served.get("/v1/search", params={"q": "three", "k": 20, "min_prob.3": "0.9", "min_prob.5": "0.9"}).json()
    for h in only["results"]:
        probs = {c["concept"]: c["probability"] for c in served.get(f"/v1/items/{h['id']}?top_k=10").json()["concepts"]}
        assert probs["3"] >= 0.9 and probs["5"] >= 0.9


def test_cursor_pages_go_past_max_k_and_cover_every_item_once(served):
    k = LIMITS["max_k"]
    count = served.get("/readyz").json()["index"]["count"]
    assert count >= GALLERY
    hits = pages(served, "/v1/search", {"q": "three", "k": k, "mode": "any"})
    ids = [h["id"] for h in hits]
    assert len(ids) == len(set(ids)) == count  # every item, once, across 20 pages of 100
    scores = [h["score"] for h in hits]
    assert scores == sorted(scores, reverse=True)
    near = pages(served, "/v1/items/scene-000042/similar", {"k": 70, "min_prob.4": "0.5"})
    nids = [h["id"] for h in near]
    assert len(nids) == len(set(nids)) > 70 and "scene-000042" not in nids
    for h in near[::25]:  # the filter holds deep into the pages
        item = served.get(f"/v1/items/{h['id']}", params={"top_k": 10}).json()
        assert {c["concept"]: c["probability"] for c in item["concepts"]}["4"] >= 0.5
    # A cursor is bound to its query: another query's, or an edited one, names no page of this query.
    first = served.get("/v1/search", params={"q": "three", "k": 5}).json()
    other = served.get("/v1/search", params={"q": "seven", "k": 5, "cursor": first["next_cursor"]})
    assert other.status_code == 404 and other.json()["error"]["code"] == "unknown_cursor"
    second = served.get("/v1/search", params={"q": "three", "k": 5, "cursor": first["next_cursor"]}).json()
    assert not {h["id"] for h in first["results"]} & {h["id"] for h in second["results"]}


def test_did_you_mean_and_inflections(served):
    for q, concepts in (("threes", ["3"]), ("Three", ["3"]), ("3s", ["3"]), ("sevn", ["7"])):
        body = served.get("/v1/search", params={"q": q, "k": 3}).json()
        assert body["concepts"] == concepts, (q, body)
    assert served.get("/v1/search", params={"q": "sevn"}).json()["corrected"] == {"sevn": "seven"}
    odd = served.get("/v1/search", params={"q": "seventeen"}).json()
    assert odd["unmatched"] == ["seventeen"] and "seven" in odd["suggestions"]["seventeen"]


def test_405_names_the_allowed_methods(served):
    for method, path, allow in (("PUT", "/v1/items/scene-000001", "DELETE, GET"),
                                ("PATCH", "/v1/search", "GET, POST"),
                                ("DELETE", "/v1/items/scene-000001/image", "GET"),
                                ("POST", "/v1/items/scene-000001/similar", "GET"),
                                ("GET", "/v1/tag", "POST")):
        r = requests.request(method, served.url + path, timeout=30, headers=served.auth)
        assert r.status_code == 405 and r.headers["Allow"] == allow, (method, path, r.headers, r.text)
        assert r.json()["error"]["code"] == "method_not_allowed"
    assert served.store().get("scene-000001") is not None  # the DELETE above deleted nothing


def test_openapi_states_what_the_service_accepts(served):
    from serving.contract import unresolved_refs

    doc = served.get("/openapi.json").json()
    assert unresolved_refs(doc) == [] and "#/$defs/" not in str(doc)
    search = {p["name"]: p for p in doc["paths"]["/v1/search"]["get"]["parameters"]}
    assert search["q"]["required"] and search["q"]["schema"]["minLength"] == 1
    assert (search["k"]["schema"]["minimum"], search["k"]["schema"]["maximum"]) == (1, LIMITS["max_k"])
    assert search["mode"]["schema"]["enum"] == ["all", "any"]
    assert search["fusion"]["schema"]["enum"] == ["weighted", "rrf"]
    assert search["metric"]["schema"]["enum"] == ["l2", "ip", "cosine", "euclidean", "dot"]  # and their aliases
    assert search["feature"]["schema"]["enum"] == ["penultimate", "probs", "last_but_one", "output"]  # and theirs
    assert {f"min_prob.{d}" for d in "0123456789"} <= set(search)
    tag = {p["name"]: p["schema"] for p in doc["paths"]["/v1/tag"]["post"]["parameters"]}
    assert (tag["threshold"]["minimum"], tag["threshold"]["maximum"]) == (0, 1)
    add = doc["paths"]["/v1/items"]["post"]
    form = add["requestBody"]["content"]["multipart/form-data"]
    assert form["schema"]["required"] == ["images", "id"] and "image/png" in form["encoding"]["images"]["contentType"]
    assert add["security"] == [{"bearer": []}] and {"401", "403", "409", "413"} <= set(add["responses"])
    assert add["responses"]["201"]["links"]["GetItem"]["operationId"] == "get_item"
    size = {p["name"]: p["schema"] for p in doc["paths"]["/v1/items/{item_id}/image"]["get"]["parameters"]}["size"]
    assert (size["minimum"], size["maximum"]) == (8, 1024)
    for path, item in doc["paths"].items():
        for method, op in item.items():
            for code, resp in op["responses"].items():
                if code.startswith("4"):  # every error body is the one JSON shape
                    assert resp["content"]["application/json"]["schema"] == {
                        "$ref": "#/components/schemas/ErrorResponse"}, (method, path, code)


def _searches(served) -> dict[str, float]:
    """deepindex_searches_total by where the searches were answered (the ingress's copy, or the index replica)."""
    fams = text_string_to_metric_families(served.get("/metrics").text)
    return {s.labels["answered_by"]: s.value for f in fams if f.name == "deepindex_searches"
            for s in f.samples if s.name.endswith("_total")}


def test_the_ingress_answers_searches_from_its_copy_and_sees_each_write_at_once(served):
    """Searches are answered by the ingress from its own copy of the served index, which follows the
    index replica's writes (serving/reads.py): every acknowledged add and delete is in the very next
    search, and none of these searches goes to the index replica (the app has one ingress replica)."""
    from deepindex.index.collection import digit_gallery

    wait_until(lambda: served.get("/v1/search", params={"q": "three"}).ok and _searches(served).get("local", 0) > 0,
               30, every=0.2, what="the ingress's copy of the served index")
    before = _searches(served)
    new = digit_gallery(3, seed=11)  # glyph draws not in the collection
    for j in range(3):
        png, item = png_bytes(new.images[j]), f"fresh/{j}"
        r = served.post("/v1/items", files=[("images", ("a.png", png))], data={"id": [item]}, headers=served.auth)
        assert r.status_code == 201, r.text
        top = served.post("/v1/search/similar?k=1", files={"image": ("q.png", png)}).json()["results"]
        assert top[0]["id"] == item, top
        assert served.get(f"/v1/items/{item}/similar", params={"k": 3}).status_code == 200
        assert served.delete(f"/v1/items/{item}", headers=served.auth).status_code == 200
        gone = served.get(f"/v1/items/{item}/similar", params={"k": 3})
        assert gone.status_code == 404 and gone.json()["error"]["code"] == "unknown_item"
        hits = served.post("/v1/search/similar?k=5", files={"image": ("q.png", png)}).json()["results"]
        assert item not in [h["id"] for h in hits]
    after = _searches(served)
    assert after["local"] - before["local"] == 4 * 3
    assert after.get("index", 0) == before.get("index", 0)


def _fastpath(served) -> dict[str, float]:
    """deepindex_fastpath_requests_total by endpoint: GET searches bound past FastAPI (serving/fastpath.py)."""
    fams = text_string_to_metric_families(served.get("/metrics").text)
    return {s.labels["endpoint"]: s.value for f in fams if f.name == "deepindex_fastpath_requests"
            for s in f.samples if s.name.endswith("_total")}


def test_plain_get_searches_skip_fastapi_and_answer_byte_for_byte_as_it_does(served):
    """serving/fastpath.py binds a plain GET search itself.  The same query with one parameter given twice
    goes through FastAPI, which reads the last value: both answer the same status, headers' content type
    and bytes, errors included, and the fast path counts only the plain ones."""
    similar = "/v1/items/{item_id:path}/similar"
    first = served.get("/v1/search", params={"q": "seven", "k": 2}).json()
    queries = [
        ("/v1/search", [("q", "seven"), ("k", "5")]),
        ("/v1/search", [("q", "sevens or three"), ("k", "10"), ("mode", "any")]),
        ("/v1/search", [("q", "seven"), ("k", "3"), ("min_prob.7", "0.2"), ("min_prob.3", "0.01")]),
        ("/v1/search", [("q", "seven"), ("k", "3"), ("example_id", "scene-000010"), ("fusion", "rrf")]),
        ("/v1/search", [("q", "seven"), ("k", "2"), ("cursor", first["next_cursor"])]),
        ("/v1/items/scene-000010/similar", [("k", "10")]),
        ("/v1/items/scene-000010/similar", [("k", "4"), ("feature", "output"), ("metric", "euclidean")]),
        # The endpoint's own refusals, answered by the app's exception handlers either way.
        ("/v1/search", [("q", "seven"), ("k", "0")]),
        ("/v1/search", [("q", "seven"), ("k", "123456789")]),
        ("/v1/search", [("q", "seven"), ("mode", "most")]),
        ("/v1/search", [("q", "seven"), ("cursor", "not a cursor")]),
        ("/v1/search", [("q", "seven"), ("min_prob.7", "2")]),
        ("/v1/search", [("q", "seven"), ("min_prob.no-such-concept", "0.5")]),
        ("/v1/search", [("q", "   ")]),
        ("/v1/search", [("q", "seven"), ("example_id", "no-such-item")]),
        ("/v1/items/no-such-item/similar", [("k", "10")]),
        ("/v1/items/scene-000010/similar", [("k", "10"), ("feature", "colour")]),
        ("/v1/items/scene-000010/similar", [("k", "10"), ("metric", "manhattan")]),
    ]
    before = _fastpath(served)
    for path, params in queries:
        fast = served.get(path, params=params)
        via_fastapi = served.get(path, params=[(params[0][0], "0"), *params])  # the last value is the one read
        assert (fast.status_code, fast.headers["content-type"], fast.content) == (
            via_fastapi.status_code, via_fastapi.headers["content-type"], via_fastapi.content), (path, params)
    n_similar = sum(p.endswith("/similar") for p, _ in queries)
    expected = {"/v1/search": before.get("/v1/search", 0) + len(queries) - n_similar,
                similar: before.get(similar, 0) + n_similar}
    wait_until(lambda: {k: _fastpath(served).get(k, 0) for k in expected} == expected, 10, every=0.2,
               what=f"the fast path's counts {expected}")
    # What it leaves to FastAPI stays FastAPI's: a missing q, a non-canonical k, an unknown key.
    r = served.get("/v1/search", params={"k": "5"})
    assert r.status_code == 422 and r.json()["error"]["message"].startswith("q: "), r.text
    assert served.get("/v1/search", params={"q": "seven", "k": "05"}).json()["results"] == served.get(
        "/v1/search", params={"q": "seven", "k": "5"}).json()["results"]
    r = served.get("/v1/items/scene-000010/similar", params={"k": "3", "kk": "3"})
    assert r.status_code == 422 and r.json()["error"]["code"] == "unknown_parameter", r.text
