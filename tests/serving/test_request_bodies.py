"""What an image endpoint's body may hold, found on review, without a cluster (a bare ``Ingress``, as in
test_handler_edges.py) and once over real HTTP: a part, field or key an endpoint does not take is a 400
naming it, never dropped (``-F tag=3`` or JSON ``"tagz"`` stored the item without its tags, ``-F photo=@a.png``
was taken for the image), and the contract says the same (``additionalProperties: false``).  And a
thumbnail is upright as the image's EXIF orientation says, as the model sees it."""
from __future__ import annotations

import asyncio
import base64
import io
import json
from typing import Any

import pytest
from PIL import Image

from serving.errors import ApiError
from tests.serving.test_handler_edges import _ingress, _item_image, _multipart, _Remote, _request, _saved

pytestmark = pytest.mark.timeout(120)

PATHS = {"tag": "/v1/tag", "add_items": "/v1/items", "similar_image": "/v1/search/similar",
         "search_by_upload": "/v1/search"}


def _png() -> bytes:
    return _saved(Image.new("RGB", (8, 8), (200, 10, 10)), "PNG")


def _form(op: str, *parts: tuple[str, bytes, str | None]) -> Any:
    body = _multipart(*parts)
    headers = [(b"content-type", b"multipart/form-data; boundary=X"), (b"content-length", str(len(body)).encode())]
    return _request(PATHS[op], method="POST", body=body, headers=headers)


def _json(op: str, doc: Any) -> Any:
    body = json.dumps(doc).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    return _request(PATHS[op], method="POST", body=body, headers=headers)


def _refused(ing: Any, request: Any, op: str) -> ApiError:
    with pytest.raises(ApiError) as e:
        asyncio.run(ing._read_images(request, op))
    return e.value


def _store(ing: Any) -> list[Any]:
    """The index replica's add, recording what reached it."""
    added: list[Any] = []
    ing.index.add = _Remote(lambda items: added.append(items) or {"added": [], "existing": [], "count": 0})
    return added


def test_a_misspelt_multipart_field_is_a_400_naming_it_and_nothing_is_stored():
    """`curl -F images=@a.png -F id=x -F tag=3 .../v1/items`: 201 with no labels, the tags lost."""
    ing, png = _ingress(), _png()
    added = _store(ing)
    with pytest.raises(ApiError) as e:
        asyncio.run(ing.add_items(_form("add_items", ("images", png, "a.png"), ("id", b"x", None),
                                        ("tag", b"3", None))))
    assert (e.value.status, e.value.code) == (400, "bad_multipart")
    assert e.value.message == "tag: not a field of POST /v1/items (it takes images, id, tags)"
    assert added == []
    # The same form spelt right is read, its tags with it.
    got = asyncio.run(ing._read_images(_form("add_items", ("images", png, "a.png"), ("id", b"x", None),
                                             ("tags", b"3;5", None)), "add_items"))
    assert [(i, data, tags) for i, data, _, tags in got] == [("x", png, ["3", "5"])]


@pytest.mark.parametrize(("op", "parts", "message"), [
    # A file part of another name was taken for the image.
    ("tag", [("photo", b"PNG", "a.png")], "photo: not a part of POST /v1/tag (it takes images, id): send each image "
                                          "file as a part named images"),
    ("add_items", [("images", b"PNG", "a.png"), ("id", b"PNG", "x.txt")],
     "id: a file part ('x.txt'), not text: send id as a text field, the image files as parts named images"),
    # Fields another endpoint takes, dropped here: tags are stored by POST /v1/items only, ids echoed by /v1/tag.
    ("tag", [("images", b"PNG", "a.png"), ("tags", b"3", None)],
     "tags: not a field of POST /v1/tag (it takes images, id)"),
    ("similar_image", [("images", b"PNG", "a.png"), ("id", b"x", None)],
     "id: not a field of POST /v1/search/similar (it takes images)"),
    ("search_by_upload", [("image", b"PNG", "a.png"), ("k", b"3", None)],
     "k: not a field of POST /v1/search (it takes images)"),
])
def test_a_part_the_endpoint_does_not_take_is_a_400_naming_it(op, parts, message):
    png = _png()
    e = _refused(_ingress(), _form(op, *[(n, png if p == b"PNG" else p, f) for n, p, f in parts]), op)
    assert (e.status, e.code, e.message) == (400, "bad_multipart", message)


def test_the_parts_each_endpoint_takes_are_read_as_before():
    ing, png = _ingress(), _png()
    tagged = asyncio.run(ing._read_images(_form("tag", ("images", png, "a.png"), ("id", b"x", None)), "tag"))
    assert [(i, data) for i, data, _, _ in tagged] == [("x", png)]
    for op in ("similar_image", "search_by_upload"):  # `image`: the one-image spelling this repository's clients send
        for name in ("images", "image"):
            got = asyncio.run(ing._read_images(_form(op, (name, png, "q.png")), op))
            assert [(i, data) for i, data, _, _ in got] == [(None, png)]


def test_an_unknown_json_key_is_a_400_naming_it_and_nothing_is_stored():
    """`{"images": [{"id": .., "data": .., "tagz": [..]}]}` to POST /v1/items: 201, the tags lost."""
    ing, png = _ingress(), _png()
    added = _store(ing)
    b64 = base64.b64encode(png).decode()
    with pytest.raises(ApiError) as e:
        asyncio.run(ing.add_items(_json("add_items", {"images": [{"id": "x", "data": b64, "tagz": ["3"]}]})))
    assert (e.value.status, e.value.code) == (400, "bad_json")
    assert e.value.message == ("images.0.tagz: not a field of the POST /v1/items body (it takes images, each with "
                               "id, data, tags)")
    assert added == []
    e2 = _refused(ing, _json("add_items", {"images": [{"id": "x", "data": b64}], "tags": ["3"]}), "add_items")
    assert (e2.code, e2.message.split(":")[0]) == ("bad_json", "tags")
    # Tags sent to POST /v1/tag are no labels of anything: refused too, as the contract says.
    e3 = _refused(ing, _json("tag", {"images": [{"data": b64, "tags": ["3"]}]}), "tag")
    assert (e3.code, e3.message) == ("bad_json", "images.0.tags: not a field of the POST /v1/tag body (it takes "
                                                 "images, each with id, data)")
    got = asyncio.run(ing._read_images(_json("add_items", {"images": [{"id": "x", "data": b64, "tags": ["3"]}]}),
                                       "add_items"))
    assert [(i, data, tags) for i, data, _, tags in got] == [("x", png, ["3"])]


def test_the_contract_states_exactly_the_parts_and_keys_the_handlers_take():
    from fastapi.openapi.utils import get_openapi

    from serving.contract import IMAGE_BODIES, contract, form_fields, image_keys
    from serving.ingress import DESCRIPTION, app

    base = get_openapi(title=app.title, version=app.version, description=DESCRIPTION, routes=app.routes)
    doc = contract(base, max_k=10, max_query_chars=64, max_images=4,
                   features={"penultimate": ["cosine"], "probs": ["cosine"]}, concepts=["3", "5"], auth_reads=False,
                   write_token=False)
    ops = {op["operationId"]: op for item in doc["paths"].values() for op in item.values()}
    for oid, takes in IMAGE_BODIES.items():
        content = ops[oid]["requestBody"]["content"]
        form = content["multipart/form-data"]["schema"]
        assert form["additionalProperties"] is False and list(form["properties"]) == ["images", *form_fields(**takes)]
        js = content["application/json"]["schema"]
        image = js["properties"]["images"]["items"]
        assert js["additionalProperties"] is False and image["additionalProperties"] is False
        assert sorted(image["properties"]) == sorted(image_keys(takes["tags"])), oid


def test_a_thumbnail_is_upright_as_the_exif_orientation_says():
    """A 60x20 JPEG, left third red and right third blue, stored with EXIF Orientation 6 (rotate 90
    clockwise to show: what phones write): its thumbnail is 20x60, the red (left) strip on top, as
    the model reads the image (deepindex.data.transforms.to_model_mode); it was 60x20, on its side."""
    from deepindex.data.transforms import to_model_mode
    from serving.ingress import thumbnail_png

    im = Image.new("RGB", (60, 20), (255, 0, 0))
    im.paste((0, 0, 255), (40, 0, 60, 20))
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation
    buf = io.BytesIO()
    im.save(buf, format="JPEG", exif=exif.tobytes())
    data = buf.getvalue()
    with Image.open(io.BytesIO(data)) as opened:
        model = to_model_mode(opened, channels=3)
    assert model.size == (20, 60)
    for size, thumb_bytes in ((128, thumbnail_png(data, 128)), (30, _item_image(_ingress(), data, 30).body)):
        assert thumb_bytes is not None
        with Image.open(io.BytesIO(thumb_bytes)) as thumb:
            assert thumb.size == ((20, 60) if size == 128 else (10, 30))
            w, h = thumb.size
            top, bottom = thumb.convert("RGB").getpixel((w // 2, 1)), thumb.convert("RGB").getpixel((w // 2, h - 2))
        assert top[0] > 200 and top[2] < 60 and bottom[2] > 200 and bottom[0] < 60, (size, top, bottom)
        assert model.getpixel((10, 1))[0] > 200  # the model's view: the same strip on top


@pytest.mark.slow
@pytest.mark.serve
@pytest.mark.cluster
@pytest.mark.timeout(1500)  # the first test of a run to use `served` builds it (training the session's model)
def test_over_http_a_misnamed_field_or_key_is_a_400_and_the_collection_is_unchanged(served):
    from support import png_bytes

    png = png_bytes(served.images[0])
    store = served.store()
    head = store.head()
    r = served.post("/v1/items", files={"images": ("a.png", png)}, data={"id": "bodies/x", "tag": "3"},
                    headers=served.auth)
    assert r.status_code == 400 and r.json()["error"] == {
        "code": "bad_multipart", "message": "tag: not a field of POST /v1/items (it takes images, id, tags)"}, r.text
    r = served.post("/v1/items", json={"images": [{"id": "bodies/x", "data": base64.b64encode(png).decode(),
                                                   "tagz": ["3"]}]}, headers=served.auth)
    assert r.status_code == 400 and r.json()["error"]["code"] == "bad_json", r.text
    assert r.json()["error"]["message"].startswith("images.0.tagz: not a field of the POST /v1/items body"), r.text
    r = served.post("/v1/tag", files={"photo": ("a.png", png)})
    assert r.status_code == 400 and r.json()["error"]["message"].startswith("photo: not a part of POST /v1/tag"), r.text
    assert store.head() == head and store.get("bodies/x") is None
    # Spelt right, as the demo page and jobs/ send them: read, as before.
    assert served.post("/v1/tag", files={"images": ("a.png", png)}, data={"id": "q"}).json()["results"][0]["id"] == "q"
    assert served.post("/v1/search/similar?k=1", files={"image": ("q.png", png)}).status_code == 200
