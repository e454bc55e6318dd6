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
import json
import sys
import time
from typing import Any

from deepindex.cli import main

MODEL = "models:/deepindex@champion"
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


def demo(args: list[str]) -> int:
    from deepindex import console
    from deepindex.config import ConfigError
    from deepindex.localplatform import platform_urls
    from deepindex.paths import state_dir
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
    name = time.strftime("demo-%Y%m%d-%H%M%S")
    try:
        summary = tune_main("tune_configs/smoke.yaml", overrides, name=name, promote=False, show=False)
        if summary["best"] is None:
            print("demo: the sweep produced no result", file=sys.stderr)
            return 1
        decision = promote_main(sweep=name, show=False)
    except (ConfigError, ValueError) as e:
        print(f"demo: error: {e}", file=sys.stderr)
        return 2
    # The champion's test mAP: the candidate's if it was promoted, else the standing champion's,
    # scored on the same test split.
    champion_map = decision["candidate"] if decision["promoted"] else decision["champion"]
    champion_version = decision["version"] if decision["promoted"] else decision["champion_version"]

    code, built = _quietly(["index", "build", "--model", MODEL, "--size", "2000"])
    if code != 0:
        return 1
    index = json.loads(built)
    console.event("index: %d items with %s version %s (%s, %s) in %.0fs", index["items"], index["model"],
                  index["version"], index["kind"], index["metric"], index["seconds"])
    gallery = str(state_dir() / "indexes" / "digit-scenes")  # one index per model version inside
    code, _ = _quietly(["serve", "--detach", "--model", MODEL, "--index", gallery, "--host", "127.0.0.1",
                        "--port", "8000"])
    if code != 0:
        return 1
    ready_s = time.monotonic() - start
    print()
    precision = examples()
    urls = platform_urls()
    print()
    print(f"champion: deepindex version {champion_version}, test mAP {champion_map:.4f} "
          f"(digit-scenes test split, unseen handwriting)")
    print(f"keyword query {QUERY!r}: precision@10 {precision:.2f}")
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


if __name__ == "__main__":
    sys.exit(demo(sys.argv[1:]))
