"""The serving stacks a user would pick instead of deepindex, for ``jobs/bench_serve.py``.

Each serves ``POST /v1/tag`` with the same request bodies as deepindex (multipart ``images`` files,
or JSON ``{"images": [{"data": <base64>}]}``) and the same work per image as deepindex's model
replica: :class:`Tagger` (decode with deepindex's limits, resize to the model's input, the batched
forward, top concepts).  The forward is the one deepindex serves (``--forward served``: the traced
graph of :func:`deepindex.index.embed.optimized_forward`), or the eager model call a user of these
stacks would write (``--forward eager``: :func:`deepindex.index.embed.infer_unit`).  One process,
``--threads`` torch threads, as deepindex's model replica:

- ``fastapi``: a bare FastAPI app under uvicorn (one worker), one forward per request;
- ``litserve``: LitServe (``pip install -e '.[bench]'``), ``max_batch_size=32`` (``--max-batch-size``),
  ``batch_timeout=0``, one worker: requests that arrive together are batched, as Ray Serve's ``@serve.batch`` does.

    python jobs/serve_peers.py {fastapi,litserve} --model CKPT --port PORT [--threads 1] [--max-batch-size 32]
                               [--forward served|eager]

The benchmark starts each in its own process group and kills the group when done.
"""

import argparse
import base64
import sys
from typing import Any

import numpy as np
from fastapi import Request

MAX_IMAGE_BYTES = 10 << 20  # deepindex's defaults (serving/config.yaml)
MAX_IMAGE_PIXELS = 40_000_000
TOP_K = 10


class Tagger:
    """A checkpoint and the per-image work of ``/v1/tag``."""

    def __init__(self, model: str, threads: int, forward: str = "served") -> None:
        import torch

        from deepindex.checkpoint import load_model
        from deepindex.index.embed import optimized_forward
        from deepindex.tracking.registry import resolve_model

        torch.set_num_threads(threads)
        self.lm = load_model(resolve_model(model).checkpoint_path)
        d = self.lm.config.data
        self.size, self.channels, self.preset = d.image_size, d.channels, d.preset
        self.forward = optimized_forward(self.lm, ("probs",), optimize=forward == "served")[0]

    def pixels(self, data: bytes) -> np.ndarray:
        """Encoded image -> (C, S, S) uint8, as deepindex's ingress prepares it."""
        from deepindex.data.transforms import pil_to_uint8
        from serving.decode import decode_image

        im = decode_image(data, "image", MAX_IMAGE_BYTES, MAX_IMAGE_PIXELS)
        return pil_to_uint8(im, self.size, self.channels, self.preset)

    def probs(self, batch: list[np.ndarray]) -> np.ndarray:
        """(B, K) probabilities: deepindex's model replica's call."""
        from deepindex.data.transforms import uint8_to_unit

        return np.asarray(self.forward(uint8_to_unit(np.stack(batch)))["probs"])

    def answer(self, probs: np.ndarray) -> dict[str, Any]:
        order = np.argsort(-probs, kind="stable")[:TOP_K]
        return {"concepts": [{"concept": self.lm.concepts[i], "probability": float(probs[i])} for i in order]}


def _bodies(form_or_json: Any) -> list[bytes]:
    """The encoded images of a request: multipart files or base64 JSON."""
    if isinstance(form_or_json, dict):
        return [base64.b64decode(im["data"]) for im in form_or_json["images"]]
    return [f.file.read() if hasattr(f, "file") else bytes(f) for f in form_or_json.getlist("images")]


def run_fastapi(tagger: Tagger, port: int) -> None:
    import uvicorn
    from fastapi import FastAPI
    from fastapi.responses import JSONResponse

    app = FastAPI()

    # Plain routes (the handler takes the request itself): no dependency analysis of annotations.
    async def tag(request: Request) -> JSONResponse:
        if request.headers.get("content-type", "").startswith("multipart/form-data"):
            form = await request.form()
            datas = [await f.read() for f in form.getlist("images") if not isinstance(f, str)]
        else:
            datas = _bodies(await request.json())
        probs = tagger.probs([tagger.pixels(d) for d in datas])
        return JSONResponse({"results": [tagger.answer(p) for p in probs]})

    async def healthz(request: Request) -> JSONResponse:
        return JSONResponse({"status": "ok"})

    app.add_route("/v1/tag", tag, methods=["POST"])
    app.add_route("/healthz", healthz, methods=["GET"])
    uvicorn.run(app, host="127.0.0.1", port=port, workers=1, log_level="warning")


try:  # the bench extra; the FastAPI peer and the tests that only read Tagger need none of it
    import litserve as ls

    _LitAPI: type = ls.LitAPI
except ImportError:
    ls = None
    _LitAPI = object


class TagAPI(_LitAPI):  # type: ignore[misc,valid-type]
    """LitServe's API for the same work (module level: LitServe pickles it into its worker process)."""

    model_path = ""
    threads = 1
    forward = "served"

    def setup(self, device: str) -> None:
        self.tagger = Tagger(self.model_path, self.threads, self.forward)

    # LitServe types its endpoint's parameter with this annotation: Request makes it hand over the
    # parsed form (multipart) or JSON body; any other type would be read as a query parameter.
    def decode_request(self, request: Request) -> np.ndarray:
        return self.tagger.pixels(_bodies(request)[0])  # one image per request, as the benchmark sends

    def batch(self, inputs: list[np.ndarray]) -> list[np.ndarray]:
        return inputs

    def predict(self, x: list[np.ndarray]) -> np.ndarray:
        return self.tagger.probs(x)

    def unbatch(self, output: np.ndarray) -> list[np.ndarray]:
        return list(output)

    def encode_response(self, output: np.ndarray) -> dict[str, Any]:
        return {"results": [self.tagger.answer(output)]}


def run_litserve(model: str, threads: int, port: int, max_batch_size: int = 32, forward: str = "served") -> None:
    if ls is None:
        raise SystemExit("litserve is not installed: pip install -e '.[bench]'")
    api = TagAPI(max_batch_size=max_batch_size, batch_timeout=0.0, api_path="/v1/tag")
    api.model_path, api.threads, api.forward = model, threads, forward
    server = ls.LitServer(api, accelerator="cpu", workers_per_device=1, healthcheck_path="/healthz", timeout=120)
    server.run(host="127.0.0.1", port=port, num_api_servers=1, generate_client_file=False)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("stack", choices=["fastapi", "litserve"])
    p.add_argument("--model", required=True, help="checkpoint path or models:/ URI")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--max-batch-size", type=int, default=32, help="litserve: the largest batch")
    p.add_argument("--forward", choices=["served", "eager"], default="served",
                   help="the model call: deepindex's optimized graph (served) or the plain model (eager)")
    args = p.parse_args(argv)
    if args.stack == "fastapi":
        run_fastapi(Tagger(args.model, args.threads, args.forward), args.port)
    else:
        run_litserve(args.model, args.threads, args.port, args.max_batch_size, args.forward)
    return 0


if __name__ == "__main__":
    sys.exit(main())
