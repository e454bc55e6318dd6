"""`make demo`: the platform end to end on the embedded default, on this machine.

up (Ray head + MLflow server under .deepindex/) -> a short sweep (tune_configs/smoke.yaml:
the defaults first, ASHA) -> promote (register the best trial; alias `champion` only if it beats
the current one) -> index the digit-scenes gallery with the champion -> serve it (Ray Serve on
the platform's head) -> a few example requests, scored against the gallery's ground truth.  The
platform and the service stay up, so the sweep can be browsed in the MLflow UI and the API tried;
`deepindex down` stops everything.  The console shows one line per event; Ray's, Tune's and
MLflow's output is in the log file it names (`-v` prints it too).  Extra arguments are dotted
overrides of the sweep's base config (e.g. `train.epochs=6`).
"""
import contextlib
import io
import sys
import time
from typing import Any

from deepindex.cli import main

MODEL = "models:/deepindex@champion"
COLLECTION = "digit-scenes"
URL = "http://127.0.0.1:8000"
QUERY = "three and seven"
# What the demo promises (README): a champion worth serving, and a keyword query that shows it.
MAP_FLOOR = 0.95
PRECISION_FLOOR = 0.9


def _labels(hit: dict[str, Any]) -> list[str]:
    return [str(x) for x in (hit.get("labels") or hit.get("tags") or [])]


def examples() -> float:
    """A keyword search, a tag and a similar-items request; returns the search's precision@10."""
    import requests

    r = requests.get(f"{URL}/v1/search", params={"q": QUERY, "k": 10}, timeout=60)
    r.raise_for_status()
    body = r.json()
    wanted = set(body.get("concepts") or [])
    hits = body.get("results") or []
    right = [wanted <= set(_labels(h)) for h in hits]
    precision = sum(right) / 10
    print(f"GET /v1/search?q={QUERY}&k=10 -> concepts {sorted(wanted)}; a hit is right when its labels hold them all")
    for i, (h, ok) in enumerate(zip(hits, right, strict=True), start=1):
        mark = "right" if ok else "WRONG"
        print(f"  {i:2d}. {h['id']}  score {h['score']:.3f}  labels {' '.join(_labels(h)):<8} {mark}")
    if not hits:
        return 0.0
    first = hits[0]["id"]
    img = requests.get(f"{URL}/v1/items/{first}/image", timeout=60).content
    tag = requests.post(f"{URL}/v1/tag", params={"top_k": 3}, files={"images": ("q.png", img, "image/png")},
                        timeout=60).json()
    top = ", ".join(f"{c['concept']} {c['probability']:.2f}" for c in tag["results"][0]["concepts"])
    print(f"POST /v1/tag (the image of {first}) -> {top}")
    sim = requests.get(f"{URL}/v1/items/{first}/similar", params={"k": 4}, timeout=60).json()
    near = ", ".join(f"{h['id']} ({' '.join(_labels(h))})" for h in sim.get("results", []))
    print(f"GET /v1/items/{first}/similar?k=4 -> {near}")
    return precision


def _quietly(argv: list[str]) -> tuple[int, str]:
    """A deepindex command whose JSON result (stdout) the demo summarises itself."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(argv)
    return code, out.getvalue()


def _token() -> dict[str, str]:
    from deepindex.paths import state_dir

    return {"Authorization": f"Bearer {(state_dir() / 'serving' / 'api_token').read_text().strip()}"}


def _status() -> dict[str, Any]:
    import requests

    r = requests.get(f"{URL}/v1/status", timeout=30)
    r.raise_for_status()
    return r.json()


def wait_serving(version: str, timeout: float = 300.0) -> tuple[float, int]:
    """Poll the service until it serves ``version`` with its index, printing the rollover's progress
    every few seconds, while a search runs every 0.1 s; returns (seconds, non-2xx search answers)."""
    import requests

    from deepindex.console import event

    start = last = time.monotonic()
    failed = 0
    while time.monotonic() - start < timeout:
        try:
            st = _status()
            if (st.get("model") or {}).get("version") == version and st.get("index"):
                return time.monotonic() - start, failed
            ro = st["rollover"]
            if time.monotonic() - last >= 5:
                pct = f" {100 * ro['progress']:.0f}%" if ro.get("progress") is not None else ""
                event("service: %s%s %s", ro["phase"], pct, ro.get("message", ""))
                last = time.monotonic()
        except requests.RequestException:
            pass  # the service is still starting
        try:
            ok = requests.get(f"{URL}/v1/search", params={"q": QUERY, "k": 5}, timeout=30).ok
        except requests.RequestException:
            ok = False
        failed += 0 if ok else 1
        time.sleep(0.1)
    raise TimeoutError(f"the service did not serve version {version} within {timeout:.0f}s")


def add_items(n: int = 3) -> list[str]:
    """POST n new scenes (never-seen glyphs) to the collection, with their known tags."""
    import requests

    from deepindex.collection.imports import png_bytes
    from deepindex.index.collection import digit_gallery

    g = digit_gallery(n, seed=4242)
    ids = [f"demo-added-{i + 1}" for i in range(n)]
    files = [("images", (f"{i}.png", png_bytes(g.images[j]), "image/png")) for j, i in enumerate(ids)]
    data = [("id", i) for i in ids] + [("tags", ",".join(g.labels[j])) for j in range(n)]
    r = requests.post(f"{URL}/v1/items", files=files, data=data, headers=_token(), timeout=60)
    r.raise_for_status()
    return ids


def demo(args: list[str]) -> int:
    from deepindex import console
    from deepindex.config import ConfigError
    from deepindex.localplatform import platform_urls
    from deepindex.tune.main import tune_main
    from deepindex.workflows import promote_main

    start = time.monotonic()
    verbose = any(a in ("-v", "--verbose") for a in args)
    overrides = [a for a in args if a not in ("-v", "--verbose")]
    log_file = console.setup("demo", verbose)
    console.event("make demo: one line per event; Ray's, Tune's and MLflow's output is in %s", log_file)
    # 4 logical CPUs: on a 2-core laptop Train workers and Tune trial drivers must overlap.
    if main(["up", "--num-cpus", "4"]) != 0:
        return 1
    # The collection: the embedded gallery's 2,000 scenes (again: nothing new; ids are stable).
    code, _ = _quietly(["collection", "import", COLLECTION, "--digit-scenes", "--size", "2000"])
    if code != 0:
        return 1
    console.event("collection %s: the digit-scenes gallery's 2000 scenes (ids scene-000000...)", COLLECTION)
    name = time.strftime("demo-%Y%m%d-%H%M%S")
    try:
        summary = tune_main("smoke", overrides, name=name, promote=False, show=False)
        if summary["best"] is None:
            print("demo: the sweep produced no result", file=sys.stderr)
            return 1
        # A normal day in two promotions: the sweep's weakest finished trial goes live first, then
        # the best one arrives and the service rolls over to it (model and index together).
        ranked = [t for t in summary["trials_ranked"] if t["mlflow_run_id"] and t[summary["metric"]] is not None]
        first = promote_main(run_id=ranked[-1]["mlflow_run_id"], show=False)
    except (ConfigError, ValueError) as e:
        print(f"demo: error: {e}", file=sys.stderr)
        return 2
    v1 = first["version"] if first["promoted"] else first["champion_version"]
    code, _ = _quietly(["serve", "--detach", "--model", MODEL, "--collection", COLLECTION, "--host", "127.0.0.1",
                        "--port", "8000"])
    if code != 0:
        return 1
    secs, _ = wait_serving(v1)
    ready_s = time.monotonic() - start
    st = _status()
    console.event("serving version %s with its index of %d items (built by the service in %.0fs)", v1,
                  st["index"]["count"], secs)

    # The lifecycle: items added over HTTP, then the better model promoted while searches run.
    added = add_items()
    console.event("added %d items over HTTP (POST /v1/items): %s", len(added), ", ".join(added))
    decision = promote_main(run_id=ranked[0]["mlflow_run_id"], show=False)
    champion_version = decision["version"] if decision["promoted"] else decision["champion_version"]
    champion_map = decision["candidate"] if decision["promoted"] else decision["champion"]
    rollover = ""
    if decision["promoted"] and champion_version != v1:
        secs, failed = wait_serving(champion_version)
        st = _status()
        missing = [i for i in added if not requests_ok(f"{URL}/v1/items/{i}")]
        rollover = (f"rollover: version {v1} -> {champion_version} in {secs:.0f}s after the promotion, "
                    f"{st['index']['count']} items carried over ({len(added) - len(missing)} of {len(added)} "
                    f"added over HTTP), {failed} non-2xx search answers meanwhile")
        console.event(rollover)
    else:
        console.event("promotion: version %s stays champion (%s); no rollover", champion_version,
                      decision.get("reason", "not better"))
    about = attach_retrieval()
    print()
    precision = examples()
    urls = platform_urls()
    print()
    print(f"champion: deepindex version {champion_version}, test mAP {champion_map:.4f} "
          f"(digit-scenes test split, unseen handwriting)")
    print(f"keyword query {QUERY!r}: precision@10 {precision:.2f}")
    if rollover:
        print(rollover)
    if about:
        print(about)
    print(f"MLflow: {summary['mlflow_ui']}  (the sweep's run: its description links each trial, and "
          "'Compare the N trials' opens the parallel coordinates)")
    print(f"Ray dashboard: {urls.get('dashboard', '-')}   service: {URL}/  (API docs {URL}/docs)")
    print(f"demo: {ready_s:.0f}s to a ready service, {time.monotonic() - start:.0f}s in all; "
          "`eval $(.venv/bin/deepindex env)` points ray/mlflow at this platform; `.venv/bin/deepindex down` stops it")
    if champion_map < MAP_FLOOR or precision < PRECISION_FLOOR:
        print(f"demo: below the promised floors (test mAP >= {MAP_FLOOR}, precision@10 >= {PRECISION_FLOOR}); "
              "tune_configs/smoke.yaml needs more budget on this machine", file=sys.stderr)
        return 1
    return 0


def attach_retrieval(size: int = 1000) -> str:
    """Measure the champion's retrieval on held-out scenes and keep the report with its version (the
    page's "About this model" panel, GET /v1/about); returns the line that sums it up."""
    import json
    import tempfile
    from pathlib import Path

    from deepindex.console import event

    with tempfile.TemporaryDirectory() as d:  # the report as measured, not read back from MLflow
        out = Path(d) / "report.json"
        code, _ = _quietly(["evaluate-retrieval", "--model", MODEL, "--size", str(size), "--attach",
                            "--json", str(out)])
        report = json.loads(out.read_text()) if code == 0 and out.exists() else None
    if report is None:
        event("retrieval figures: not measured (see the log file)")
        return ""
    k, best = report["k"], report["qbe_best"]
    line = (f"retrieval (version {report['model']['version']}, {size} held-out scenes): keyword mAP "
            f"{report['keyword']['map']:.3f}; more like this, best {best['descriptor']}/{best['metric']} "
            f"mAP@{k} {best[f'map_at_{k}']:.3f}; on the page under 'About this model'")
    event(line)
    return line


def requests_ok(url: str) -> bool:
    import requests

    return requests.get(url, timeout=30).ok


if __name__ == "__main__":
    sys.exit(demo(sys.argv[1:]))
