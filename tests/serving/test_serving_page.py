"""The demo page in headless Chromium (Debian's ``chromium``), driven over the DevTools protocol
against the real service, clicking through every endpoint a new user meets: an upload's concept
probabilities as bars with the threshold, keyword search with thumbnails, "more like this" from a
result, adding the upload to the collection with the API token (401 and 403 shown first), deleting
it, the model and index in use, and the API's own error messages.

Every wait is on a DOM condition (polled), never a fixed sleep, and a condition not reached fails
the test at that step.  What the page shows is checked against the same request made over HTTP, so
a page that draws the wrong thing, or the right thing from the wrong endpoint, fails."""
from __future__ import annotations

import asyncio
import json
import secrets
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from support import png_bytes
from tests.serving.cdp import Browser

pytestmark = [pytest.mark.slow, pytest.mark.serve, pytest.mark.cluster, pytest.mark.timeout(300)]

THUMB = 128  # the page's thumbnail size (?size= of /v1/items/{id}/image)
K = 12  # the page's results per search
THRESHOLD = 0.5  # the page's default threshold
STATUS = "document.getElementById('status')"

# Script errors the page raises after it loaded (event handlers, promises): a test ends with none.
CATCH_ERRORS = """window.__errors = [];
addEventListener('error', e => __errors.push(String(e.message)));
addEventListener('unhandledrejection', e => __errors.push(String(e.reason)));"""

BARS = """[...document.querySelectorAll('#bars .bar')].map(b => {
  const track = b.querySelector('.track').getBoundingClientRect();
  const fill = b.querySelector('.fill').getBoundingClientRect();
  const mark = b.querySelector('.threshold').getBoundingClientRect();
  return {concept: b.dataset.concept, probability: parseFloat(b.dataset.probability),
          above: b.classList.contains('above'), width: fill.width / track.width,
          mark: (mark.left - track.left) / track.width, text: b.textContent};
})"""


def _js(value: Any) -> str:
    """A Python value as a JS literal (strings escaped)."""
    return json.dumps(value)


def _hits(grid: str) -> str:
    """JS: the ids of a grid's result cards."""
    return f"[...document.querySelectorAll('#{grid} .hit')].map(h => h.dataset.id)"


def _thumbs_loaded(grid: str) -> str:
    """JS: every thumbnail of a grid asked at the page's size, and loaded."""
    return (f"(() => {{ const im = [...document.querySelectorAll('#{grid} .hit img')]; return im.length > 0 &&"
            f" im.every(i => i.complete && i.naturalWidth > 0 && i.src.endsWith('size={THUMB}')); }})()")


def _text_with(element_id: str, part: str) -> str:
    """JS: the element's text once it holds ``part``."""
    return (f"(() => {{ const t = document.getElementById({_js(element_id)}).textContent;"
            f" return t.includes({_js(part)}) && t; }})()")


class Page:
    """The demo page in a fresh headless Chromium (its own process group, ended by ``close``)."""

    def __init__(self, url: str):
        self.url, self.b = url, Browser()

    async def open(self) -> None:
        await self.b.start()
        await self.b.page("Page.enable")
        await self.b.page("DOM.enable")
        await self.b.page("Page.navigate", {"url": self.url + "/"})
        await self.loaded()

    async def loaded(self) -> None:
        await self.need("document.readyState === 'complete' && !!document.getElementById('file')", "the page loaded")
        await self.b.eval(CATCH_ERRORS)

    async def close(self) -> None:
        await self.b.close()

    async def need(self, expression: str, what: str, timeout: float = 30.0) -> Any:
        """Poll until ``expression`` is truthy and return it; fail naming ``what`` if it never is."""
        value = await self.b.wait(expression, timeout)
        assert value, f"the page never showed {what} within {timeout:.0f}s (last: {value!r})"
        return value

    async def eval(self, expression: str) -> Any:
        return await self.b.eval(expression)

    async def choose_file(self, path: Path) -> None:
        doc = await self.b.page("DOM.getDocument")
        node = await self.b.page("DOM.querySelector", {"nodeId": doc["root"]["nodeId"], "selector": "#file"})
        await self.b.page("DOM.setFileInputFiles", {"nodeId": node["nodeId"], "files": [str(path)]})
        await self.need("document.getElementById('file').files.length === 1", "the chosen file")

    async def type(self, element_id: str, value: str) -> None:
        """Set an input's value as typing would: the page listens to `input` events."""
        await self.eval(f"(() => {{ const e = document.getElementById({_js(element_id)}); e.value = {_js(value)};"
                        " e.dispatchEvent(new Event('input', {bubbles: true})); })()")

    async def click(self, selector: str) -> None:
        clicked = await self.eval(f"(() => {{ const e = document.querySelector({_js(selector)});"
                                  " if (!e) return false; e.click(); return true; })()")
        assert clicked, f"nothing to click at {selector}"

    async def errors(self) -> list[str]:
        return await self.eval("window.__errors")


def test_page_tags_searches_and_finds_more_like_this(served, chromium, tmp_path):
    i = 5
    image = tmp_path / "query.png"
    image.write_bytes(png_bytes(served.images[i]))
    # The same requests over HTTP: what the page must show.
    tag = served.post("/v1/tag?top_k=100&threshold=0", files={"images": ("q.png", image.read_bytes())}).json()
    every = tag["results"][0]["concepts"]  # every concept of the model (top_k is over their number)
    status = served.get("/v1/status").json()

    async def drive() -> dict[str, Any]:
        p = Page(served.url)
        seen: dict[str, Any] = {}
        try:
            await p.open()
            # The model and index in use, from /v1/status.
            seen["version"] = await p.need(f"{STATUS}.dataset.version", "the served model version")
            seen["count"] = await p.eval(f"{STATUS}.dataset.count")
            seen["status"] = await p.eval(f"{STATUS}.textContent")
            # About: the served version's retrieval figures, from /v1/about.
            await p.click("#about summary")
            seen["about"] = await p.need("document.querySelectorAll('#about table').length === 2 && "
                                         "document.getElementById('about-body').innerText", "the retrieval figures")
            seen["about_rows"] = await p.eval("[...document.querySelectorAll('#about table')].map(t => "
                                              "[...t.querySelectorAll('tr')].map(r => [...r.children]"
                                              ".map(c => c.textContent)))")
            seen["about_best"] = await p.eval("[...document.querySelectorAll('#about tr.best td')]"
                                              ".map(c => c.textContent)")
            # Upload: concept probabilities as bars, the threshold marked on each.
            await p.choose_file(image)
            await p.click("#upload")
            seen["bars"] = await p.need(BARS, "the concept bars")
            seen["tag_status"] = await p.need("document.getElementById('tag-status').textContent", "the tag summary")
            seen["add_tags"] = await p.eval("document.getElementById('add-tags').value")
            # A lower threshold: more bars over it, redrawn without asking the service again.
            await p.type("threshold", "0.05")
            moved = f"(() => {{ const r = {BARS}; return r.every(x => x.mark < 0.1) && r; }})()"
            seen["bars_low"] = await p.need(moved, "the threshold moved to 0.05")
            seen["similar"] = await p.need(_hits("similar"), "the upload's similar items")
            seen["similar_loaded"] = await p.need(_thumbs_loaded("similar"), "the similar items' thumbnails")
            # Keyword search through the form: thumbnails.
            await p.type("q", "three zebra")
            await p.click("#search")
            seen["search_status"] = await p.need("document.getElementById('search-status').textContent",
                                                 "the search summary")
            seen["results"] = await p.need(_hits("results"), "the keyword results")
            seen["results_loaded"] = await p.need(_thumbs_loaded("results"), "the keyword results' thumbnails")
            # "More like this" under the second result.
            seen["query"] = seen["results"][1]
            await p.click("#results .hit:nth-child(2) button.more")
            more = "document.getElementById('more-status')"
            seen["more_for"] = await p.need(f"{more}.dataset.query === {_js(seen['query'])} && {more}.textContent",
                                            "more like the second result")
            seen["more"] = await p.need(_hits("more"), "the more-like-this results")
            seen["more_loaded"] = await p.need(_thumbs_loaded("more"), "the more-like-this thumbnails")
            # A client error: the API's own message on the page, and the old results gone.
            await p.type("q", "")
            await p.click("#search")
            seen["error"] = await p.need("document.getElementById('search-status').className === 'error' && "
                                         "document.getElementById('results').children.length === 0 && "
                                         "document.getElementById('search-status').textContent",
                                         "the empty query's error")
            seen["errors"] = await p.errors()
            return seen
        finally:
            await p.close()

    out = asyncio.run(drive())
    assert out["errors"] == []
    # Status panel: the served model version and its index.
    assert out["version"] == served.version and served.version in out["status"]
    assert out["count"] == str(status["index"]["count"]) and f"{status['index']['count']} items" in out["status"]
    # About: the keyword figures and one row per descriptor x metric and per fusion signal, as /v1/about
    # gives them, the best query-by-example row marked.
    about = served.get("/v1/about").json()["retrieval"]
    assert f"mAP {about['keyword_map']:.3f}" in out["about"] and f"{about['size']} held-out items" in out["about"]
    qbe, fusion = out["about_rows"]
    assert qbe[1:] == [[q["descriptor"], q["metric"], f"{q['map_at_k']:.3f}", f"{q['precision_at_k']:.3f}"]
                       for q in about["qbe"]]
    assert [r[0] for r in fusion[1:]] == [f["signal"] for f in about["fusion"]]
    assert out["about_best"][:2] == [about["best"]["descriptor"], about["best"]["metric"]]
    # One bar per concept of the model, in the service's order, at its probabilities.
    bars = out["bars"]
    assert [b["concept"] for b in bars] == [c["concept"] for c in every] and 1 < len(bars) < 20
    for b, c in zip(bars, every, strict=True):
        assert b["probability"] == pytest.approx(c["probability"], abs=1e-6)
        assert b["width"] == pytest.approx(c["probability"], abs=0.01)  # drawn to scale
        assert b["above"] == (c["probability"] >= THRESHOLD) and b["mark"] == pytest.approx(THRESHOLD, abs=0.01)
        assert f"{c['probability']:.3f}" in b["text"]
    above = [c["concept"] for c in every if c["probability"] >= THRESHOLD]
    assert above and bars[0]["concept"] in served.labels[i]
    assert out["add_tags"] == ",".join(above)  # the tags an add would carry
    assert f"{len(above)} of {len(every)}" in out["tag_status"] and served.version in out["tag_status"]
    low = [b["concept"] for b in out["bars_low"] if b["above"]]
    assert low == [c["concept"] for c in every if c["probability"] >= 0.05] and len(low) >= len(above)
    # The upload's nearest items: the very scene first.
    assert out["similar"][0] == f"scene-{i:06d}" and out["similar_loaded"] is True
    # Keyword search: the matched concept and the unmatched word said, K thumbnails.
    assert "concepts: 3" in out["search_status"] and "zebra" in out["search_status"]
    assert len(out["results"]) == K and out["results_loaded"] is True
    # More like this: what GET /v1/items/{id}/similar answers, the item itself excluded.
    ref = served.get(f"/v1/items/{out['query']}/similar?k={K}").json()
    assert out["more"] == [h["id"] for h in ref["results"]] and out["query"] not in out["more"]
    assert out["query"] in out["more_for"] and out["more_loaded"] is True
    # The error the service gives for an empty query, as the service words it.
    err = served.get(f"/v1/search?k={K}&mode=all&q=").json()["error"]
    assert err["message"] in out["error"] and err["code"] in out["error"]


def test_page_adds_and_deletes_an_item_with_the_token(served, chromium, tmp_path):
    # An image the collection does not hold (a mirrored scene), under an id with a '/' in it.
    image = tmp_path / "mine.png"
    image.write_bytes(png_bytes(np.ascontiguousarray(served.images[7][..., ::-1])))
    # "401"/"403" in the id: the add's answers must be told from its "adding ID..." line.
    item_id = f"page/upload-401-403-{secrets.token_hex(4)}"
    before = served.get("/v1/status").json()["index"]["count"]

    async def add(p: Page, expect: str) -> str:
        await p.eval("document.getElementById('add-status').textContent = ''")
        await p.click("#add")
        # The answer, not the "adding ID..." line (which holds the id).
        return await p.need("(() => { const s = document.getElementById('add-status');"
                            f" return s.className !== 'muted' && s.textContent.includes({_js(expect)})"
                            " && s.textContent; })()", f"the add's answer with {expect!r}")

    async def count(p: Page, n: int) -> str:
        return await p.need(f"{STATUS}.dataset.count === {_js(str(n))} && {STATUS}.textContent",
                            f"{n} items in the status panel")

    async def drive() -> dict[str, Any]:
        p = Page(served.url)
        seen: dict[str, Any] = {}
        try:
            await p.open()
            seen["status_before"] = await count(p, before)
            seen["token_type"] = await p.eval("document.getElementById('token').type")
            await p.choose_file(image)
            seen["default_id"] = await p.need("document.getElementById('add-id').value", "an id from the file name")
            await p.type("add-id", item_id)
            await p.type("add-tags", "3, 7")
            # No token, then a wrong one: the service's 401 and 403, said on the page.
            seen["no_token"] = await add(p, "401")
            seen["no_token_class"] = await p.eval("document.getElementById('add-status').className")
            seen["after_401"] = served.get(f"/v1/items/{item_id}").status_code
            await p.type("token", "not-the-token")
            seen["wrong_token"] = await add(p, "403")
            # The right token: kept for the tab in sessionStorage, and the add goes through.
            await p.type("token", served.token)
            seen["stored"] = await p.eval("sessionStorage.getItem('deepindex.token')")
            seen["added"] = await add(p, "added")
            seen["added_class"] = await p.eval("document.getElementById('add-status').className")
            seen["added_card"] = await p.need(_hits("added"), "the added item's card")
            seen["added_loaded"] = await p.need(_thumbs_loaded("added"), "the added item's thumbnail")
            seen["added_labels"] = await p.eval("document.querySelector('#added .hit .id').textContent")
            seen["item_http"] = served.get(f"/v1/items/{item_id}").json()
            seen["status_added"] = await count(p, before + 1)
            # More like this from the added item: its '/' survives the trip.
            await p.click("#added .hit button.more")
            seen["more"] = await p.need(f"document.getElementById('more-status').dataset.query === {_js(item_id)}"
                                        f" && {_hits('more')}", "more like the added item")
            seen["errors_before_reload"] = await p.errors()
            # A reload of the tab keeps the token (sessionStorage), so the delete needs no retyping.
            await p.b.page("Page.reload")
            await p.loaded()
            seen["token_after_reload"] = await p.need("document.getElementById('token').value", "the kept token")
            await p.choose_file(image)
            await p.type("add-id", item_id)
            seen["again"] = await add(p, "already")  # same id, same bytes: nothing new
            seen["again_card"] = await p.need(_hits("added"), "the item's card again")
            # Delete: the first click arms the button, the second deletes.
            await p.click("#added .hit button.delete")
            seen["armed"] = await p.need("!!document.querySelector('#added .hit button.delete.armed')", "armed")
            seen["notice_before"] = await p.eval("document.getElementById('notice').textContent")
            await p.click("#added .hit button.delete")
            seen["deleted"] = await p.need(_text_with("notice", "deleted"), "the delete's answer")
            seen["deleted_class"] = await p.eval("document.getElementById('notice').className")
            seen["card_gone"] = await p.need("document.querySelectorAll('#added .hit').length === 0", "no card")
            seen["status_after"] = await count(p, before)
            seen["errors"] = await p.errors()
            return seen
        finally:
            await p.close()
            served.delete(f"/v1/items/{item_id}", headers=served.auth)  # however the test ended

    out = asyncio.run(drive())
    assert out["errors_before_reload"] == [] and out["errors"] == []
    assert out["token_type"] == "password" and f"{before} items" in out["status_before"]
    assert out["default_id"] == "upload-mine"  # from the file name
    assert "unauthorized" in out["no_token"] and "API token" in out["no_token"] and out["no_token_class"] == "error"
    assert out["after_401"] == 404  # refused, so not added
    assert "forbidden" in out["wrong_token"]
    assert out["stored"] == served.token
    assert f"added {item_id}" in out["added"] and out["added_class"] == "ok"
    # Found over HTTP with the tags given, and shown on the page with its thumbnail.
    assert out["item_http"]["id"] == item_id and sorted(out["item_http"]["labels"]) == ["3", "7"]
    assert out["added_card"] == [item_id] and out["added_loaded"] is True and "[3,7]" in out["added_labels"]
    assert f"{before + 1} items" in out["status_added"]
    assert out["more"] and item_id not in out["more"]
    assert out["token_after_reload"] == served.token
    assert item_id in out["again"] and out["again_card"] == [item_id]
    assert item_id not in out["notice_before"]  # the first click deletes nothing
    assert f"deleted {item_id}" in out["deleted"] and out["deleted_class"] == "ok" and out["card_gone"] is True
    assert f"{before} items" in out["status_after"]
    assert served.get(f"/v1/items/{item_id}").status_code == 404
