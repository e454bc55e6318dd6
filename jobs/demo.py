"""`make demo`: the platform end to end on the embedded default, on this machine.

up (Ray head + MLflow server under .deepindex/) -> a short sweep (tune_configs/smoke.yaml,
ASHA) -> promote (register the best trial; alias `champion` only if it beats the current one)
-> index the digit-scenes gallery with the champion -> serve it (Ray Serve on the platform's
head) -> a few example requests.  The platform and the service stay up, so the sweep can be
browsed in the MLflow UI and the API tried; `deepindex down` stops everything.  Extra
arguments are dotted overrides of the sweep's base config (e.g. `train.epochs=6`).
"""
import json
import sys
import time

from deepindex.cli import main

MODEL = "models:/deepindex@champion"
URL = "http://127.0.0.1:8000"


def _show(title: str, resp) -> None:
    print(f"--- {title}: HTTP {resp.status_code}")
    print(json.dumps(resp.json(), indent=2)[:700])


def examples() -> None:
    import requests

    item = requests.get(f"{URL}/v1/search", params={"q": "three and seven", "k": 3}, timeout=60)
    _show("GET /v1/search?q=three and seven&k=3", item)
    first = item.json()["results"][0]["id"] if item.ok and item.json().get("results") else None
    if first:
        img = requests.get(f"{URL}/v1/items/{first}/image", timeout=60).content
        _show(f"POST /v1/tag (the image of {first})",
              requests.post(f"{URL}/v1/tag", params={"top_k": 3}, files={"images": ("q.png", img, "image/png")},
                            timeout=60))
        _show(f"GET /v1/items/{first}/similar?k=3",
              requests.get(f"{URL}/v1/items/{first}/similar", params={"k": 3}, timeout=60))
    _show("GET /readyz", requests.get(f"{URL}/readyz", timeout=60))


def demo(overrides: list[str]) -> int:
    from deepindex.config import ConfigError
    from deepindex.paths import state_dir
    from deepindex.tune.main import tune_main
    from deepindex.workflows import promote_main

    # 4 logical CPUs: on a 2-core laptop Train workers and Tune trial drivers must overlap.
    if main(["up", "--num-cpus", "4"]) != 0:
        return 1
    name = time.strftime("demo-%Y%m%d-%H%M%S")
    try:
        summary = tune_main("tune_configs/smoke.yaml", overrides, name=name, promote=False)
        if summary["best"] is None:
            print("demo: the sweep produced no result", file=sys.stderr)
            return 1
        decision = promote_main(sweep=name)
    except (ConfigError, ValueError) as e:
        print(f"demo: error: {e}", file=sys.stderr)
        return 2
    best = summary["best"]
    if main(["index", "build", "--model", MODEL, "--size", "2000"]) != 0:
        return 1
    gallery = str(state_dir() / "indexes" / "digit-scenes")  # one index per model version inside
    if main(["serve", "--detach", "--model", MODEL, "--index", gallery, "--host", "127.0.0.1", "--port", "8000"]) != 0:
        return 1
    examples()
    print(f"\nsweep {name}: {summary['trials']} trials in {summary['wall_s']:.0f}s, "
          f"{summary['stopped_early']} stopped early by ASHA")
    print(f"best trial {best['trial_id']}: {summary['metric']} = {best[summary['metric']]:.4f} "
          f"after {best['epochs']} epochs; params {best['params']}")
    print(f"promotion: {decision['reason']} -> "
          f"{'champion = version ' + decision['version'] if decision['promoted'] else 'champion unchanged'}")
    print(f"MLflow UI: {summary['mlflow_ui']}  (experiment 'deepindex', parent run {summary['mlflow_parent_run_id']})")
    print(f"service: {URL}/ (API docs {URL}/docs)")
    print("stop everything with: .venv/bin/deepindex down")
    return 0


if __name__ == "__main__":
    sys.exit(demo(sys.argv[1:]))
