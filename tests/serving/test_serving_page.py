"""The demo page in headless Chromium (Debian's ``chromium``), driven over the DevTools protocol:
a real upload through the page's file input shows the image's tags and similar items."""
from __future__ import annotations

import asyncio

import pytest

from support import png_bytes
from tests.serving.cdp import Browser

pytestmark = [pytest.mark.slow, pytest.mark.serve, pytest.mark.cluster, pytest.mark.timeout(300)]


def test_page_upload_shows_tags_and_similar(served, chromium, tmp_path):
    i = 5
    image = tmp_path / "query.png"
    image.write_bytes(png_bytes(served.images[i]))

    async def drive() -> dict:
        b = Browser()
        try:
            await b.start()
            await b.page("Page.enable")
            await b.page("DOM.enable")
            await b.page("Page.navigate", {"url": served.url + "/"})
            assert await b.wait("document.readyState === 'complete' && !!document.getElementById('file')")
            doc = await b.page("DOM.getDocument")
            node = await b.page("DOM.querySelector", {"nodeId": doc["root"]["nodeId"], "selector": "#file"})
            await b.page("DOM.setFileInputFiles", {"nodeId": node["nodeId"], "files": [str(image)]})
            await b.eval("document.getElementById('upload').click()")
            tags = await b.wait("[...document.querySelectorAll('#tags li')].map(li => li.dataset.concept)")
            similar = await b.wait("[...document.querySelectorAll('#similar .hit .id')].map(e => e.textContent)")
            loaded = await b.wait("[...document.querySelectorAll('#similar img')]"
                                  ".every(i => i.complete && i.naturalWidth > 0)")
            # Keyword search through the form.
            await b.eval("document.getElementById('q').value = 'three zebra'; "
                         "document.getElementById('search').click()")
            status = await b.wait("document.getElementById('search-status').textContent")
            results = await b.wait("document.querySelectorAll('#results .hit').length")
            return {"tags": tags, "similar": similar, "loaded": loaded, "status": status, "results": results}
        finally:
            await b.close()

    out = asyncio.run(drive())
    assert out["tags"] and len(out["tags"]) == 5 and out["tags"][0] in served.labels[i]
    assert out["similar"] and out["similar"][0].startswith(f"scene-{i:06d}")
    assert out["loaded"] is True
    assert "concepts: 3" in out["status"] and "zebra" in out["status"] and out["results"] == 12
