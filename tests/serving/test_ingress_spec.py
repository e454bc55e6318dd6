"""The ingress's view of the served model (name, version, concepts), in-process: asked of the model
replica once per SPEC_TTL_S by one request, in the background, so no request waits for it.  The model
replica here is a stand-in that counts calls: the test is about the ingress's side (the Serve path is
tests/serving/test_serving_rollover.py)."""
from __future__ import annotations

import asyncio


class _Model:
    """A model replica's ``info`` as the ingress's handle calls it (``await handle.info.remote()``)."""

    def __init__(self) -> None:
        self.calls, self.version, self.fail = 0, "1", False
        self.gate = asyncio.Event()  # a call returns once the test opens it
        self.info = self

    async def remote(self) -> dict:
        self.calls += 1
        await self.gate.wait()
        if self.fail:
            raise RuntimeError("model replica unreachable")
        return {"name": "m", "version": self.version, "concepts": ["a"]}


def _ingress(model: _Model):
    from serving.ingress import Ingress
    from serving.metrics import ServeMetrics

    class Bare(Ingress.func_or_class):  # type: ignore[name-defined]
        def __del__(self) -> None:  # Serve's wrapper shuts its ASGI app down here: none was started
            pass

    ing = object.__new__(Bare)  # no replica: only the fields _model_spec uses
    ing.model, ing.serve_metrics = model, ServeMetrics()
    ing._spec, ing._spec_at, ing._spec_refresh, ing._tasks = None, 0.0, None, set()
    ing._reads, ing._heap = None, None  # no local reads; the heap freezer is made by the first spec
    return ing


def test_an_expired_spec_is_refreshed_once_in_the_background_while_requests_go_on():
    async def scenario() -> None:
        model = _Model()
        ing = _ingress(model)
        first = asyncio.ensure_future(ing._model_spec())
        await asyncio.sleep(0)
        assert not first.done() and model.calls == 1  # no spec yet: the first request waits for one
        model.gate.set()
        assert (await first)["version"] == "1"
        assert (await ing._model_spec())["version"] == "1" and model.calls == 1  # fresh: nobody asks

        model.gate.clear()
        model.version = "2"
        ing._spec_at -= 2  # expired, under a load that asks every second
        # 32 requests at once; none may wait for the model (its answer is held back meanwhile).
        got = await asyncio.wait_for(asyncio.gather(*(ing._model_spec() for _ in range(32))), 5.0)
        assert [s["version"] for s in got] == ["1"] * 32  # none waited: the spec they had
        await asyncio.sleep(0)
        assert model.calls == 2  # one question to the model, not 32
        model.gate.set()
        await asyncio.sleep(0.01)
        assert (await ing._model_spec())["version"] == "2" and model.calls == 2

        # A caller that found the spec out of date waits for a fresh one.
        model.version = "3"
        assert (await ing._model_spec(refresh=True))["version"] == "3" and model.calls == 3

        # A failed refresh in the background: the spec stays, the next request after it asks again.
        model.fail, model.version = True, "4"
        ing._spec_at -= 2
        assert (await ing._model_spec())["version"] == "3"
        await asyncio.sleep(0.01)
        assert model.calls == 4 and ing._spec_refresh is None and not ing._tasks
        model.fail = False
        assert (await ing._model_spec())["version"] == "3"
        await asyncio.sleep(0.01)
        assert model.calls == 5 and (await ing._model_spec())["version"] == "4"

        # After a quiet spell (no request for longer than SPEC_WAIT_S) the spec may name a version whose
        # index is gone since a switch (found on review: 503s): requests wait for the one question.
        model.gate.clear()
        model.version = "5"
        ing._spec_at -= 10
        waiting = asyncio.gather(*(ing._model_spec() for _ in range(32)))
        await asyncio.sleep(0.01)
        assert not waiting.done() and model.calls == 6  # all of them wait, for one question
        model.gate.set()
        assert [s["version"] for s in await waiting] == ["5"] * 32 and model.calls == 6
        model.gate.clear()
        model.fail = True  # that question failing: they go on with the spec there is
        ing._spec_at -= 10
        waiting = asyncio.gather(*(ing._model_spec() for _ in range(4)))
        await asyncio.sleep(0.01)
        model.gate.set()
        assert [s["version"] for s in await waiting] == ["5"] * 4 and model.calls == 7
        model.fail = False
        # Every new spec's version was handed to the heap freezer (serving/heap.py), none frozen yet
        # (its freeze is due WARM_S after a version is first served).
        assert ing._heap.version == "5" and not ing._heap.frozen

    asyncio.run(scenario())


def test_an_idle_replica_keeps_its_model_and_item_gauges_current_through_its_health_checks():
    """Found on review: the gauges were set only by requests, so a replica serving none went on reporting
    the model it last saw (the scrape showed a rolled-over version as still served) and the item count
    before a delete; its health checks (every 2 s, its push to the metrics hub) now refresh them."""
    from serving.metrics import ServeMetrics

    class Index:  # the index replica's info, and the hub's push: stand-ins, as the model's
        def __init__(self) -> None:
            self.count = 10
            self.info, self.push = self, self

        async def remote(self, *args: object) -> dict:
            return {"count": self.count}

    def gauges(m: ServeMetrics) -> tuple[set[str], float]:
        samples = {s.name: s for f in m.registry.collect() for s in f.samples}
        versions = {s.labels["version"] for f in m.registry.collect() for s in f.samples
                    if s.name == "deepindex_model_info"}
        return versions, samples["deepindex_index_items"].value

    async def scenario() -> None:
        model = _Model()
        model.gate.set()
        ing = _ingress(model)
        ing.index = ing.hub = Index()
        ing._local, ing._replica = None, "r1"
        await ing.check_health()
        assert gauges(ing.serve_metrics) == ({"1"}, 10)
        model.version, ing.index.count = "2", 9  # a rollover and a delete, while this replica serves nothing
        ing._spec_at -= 10
        await ing.check_health()
        await asyncio.sleep(0.01)
        await ing.check_health()
        assert gauges(ing.serve_metrics) == ({"2"}, 9)

    asyncio.run(scenario())
