"""A model that is not there is refused before anything deploys; an application that cannot start
says why in one line (what `deepindex serve` prints), on a real Serve beside the package's
application, which keeps serving."""
from __future__ import annotations

import pytest


@pytest.mark.parametrize(("argv", "error"), [
    (["--arg", "max_k=abc"], "args.max_k: Input should be a valid integer"),
    (["--arg", "bogus=1"], "args.bogus: unknown key"),
    (["--arg", "ingress_replicas=0"], "args.ingress_replicas: Input should be greater than or equal to 1"),
    (["--port", "99999"], "port: 99999 is not a TCP port (1-65535)"),
])
def test_serve_command_refuses_bad_args_in_one_line_naming_them(argv, error, capsys):
    from deepindex.cli import main

    assert main(["serve", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"deepindex serve: error: {error}" or err.startswith(f"deepindex serve: error: {error},"), err


def test_detach_with_no_cluster_that_outlives_the_command_is_refused_before_anything_starts(tmp_path, monkeypatch):
    """Without `deepindex up` or RAY_ADDRESS, serve starts a cluster of its own, which ends with the
    command: `--detach` would print "service ready" for a service already gone.  The command as a user
    runs it, in a process of its own (this one may be connected to the session's cluster)."""
    import os
    import subprocess
    import sys

    from deepindex.cluster import lasting_cluster

    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    out = subprocess.run([sys.executable, "-m", "deepindex.cli", "serve", "--detach"], capture_output=True, text=True,
                         env={**env, "DEEPINDEX_HOME": str(tmp_path / "home")}, timeout=120)
    assert out.returncode == 2 and out.stderr == (
        "deepindex serve: error: --detach: no cluster outlives this command (the local platform is not up and "
        "RAY_ADDRESS is not set), so the service would stop as it returns: start the platform first (deepindex up), "
        "or leave --detach out to serve until Ctrl-C\n"), out.stderr
    assert not (tmp_path / "home" / "serving").exists()  # refused before anything, the API token included
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.7:6379")  # a cluster somewhere else outlives the command
    assert lasting_cluster() == "10.0.0.7:6379"


def test_the_descriptors_to_index_take_the_missions_names():
    from serving.schemas import ServeArgs

    assert ServeArgs(features=["last_but_one", "output", "last_but_two"]).features == ["penultimate", "probs",
                                                                                      "last_but_two"]
    assert ServeArgs().features is None  # the index's default


def test_serve_reads_the_packaged_config_wherever_it_runs(tmp_path, monkeypatch, capsys):
    """A user's own folder has no serving/config.yaml: the default is the installed package's."""
    import yaml

    from deepindex.cli import build_parser, main
    from deepindex.commands.serve import _app_args
    from serving.schemas import HERE

    monkeypatch.chdir(tmp_path)
    app_args, http, name = _app_args(build_parser().parse_args(["serve", "--collection", "photos"]))
    packaged = yaml.safe_load((HERE / "config.yaml").read_text())
    assert name == "deepindex" and http == packaged["http_options"]
    assert app_args == {**packaged["applications"][0]["args"], "collection": "photos"}
    assert main(["serve", "--config", "mine.yaml"]) == 2
    assert capsys.readouterr().err == "deepindex serve: error: config: no such file mine.yaml\n"


def test_serving_a_collection_that_does_not_exist_says_so_before_it_is_created_empty():
    """`deepindex serve --collection photo` when the catalogue holds `photos`: a warning names both."""
    from deepindex.collection import CollectionStore
    from deepindex.commands.serve import collection_note

    assert collection_note({"collection": "photos"}) == ("collection photos does not exist yet: the service creates "
                                                         "it empty and serves what is added over HTTP (collections: "
                                                         "none yet; import images with: deepindex collection import "
                                                         "photos ...)")
    CollectionStore.open("photos")
    assert collection_note({"collection": "photos"}) is None
    note = collection_note({"collection": "photo"}) or ""
    assert note.startswith("collection photo does not exist yet") and "(collections: photos;" in note, note
    assert (collection_note({}) or "").startswith("collection digit-scenes does not")  # the default name


def test_a_checkpoint_path_that_is_not_there_is_refused_before_anything_deploys(tmp_path):
    from serving.app import build_app

    with pytest.raises(FileNotFoundError, match=f"model: no checkpoint at {tmp_path}/nope.pt"):
        build_app({"model": str(tmp_path / "nope.pt"), "api_token_file": None})
    # A file that is there but no checkpoint (a glob of checkpoint_* picks Ray Train's snapshot .json):
    # refused here, where it used to fail in every model replica once deployed.
    snapshot = tmp_path / "checkpoint_manager_snapshot.json"
    snapshot.write_text('{"latest_checkpoint_result": null}')
    with pytest.raises(ValueError, match=f"^model: {snapshot} is not a deepindex checkpoint"):
        build_app({"model": str(snapshot), "api_token_file": None})
    # A training run's folder (the name `deepindex train` prints): the message names its latest checkpoint.
    for stamp in ("2026-12-06_06-02-32.539691", "2026-12-06_06-02-40.320739"):
        (tmp_path / f"checkpoint_{stamp}").mkdir()
        (tmp_path / f"checkpoint_{stamp}" / "checkpoint.pt").write_bytes(b"PK")
    with pytest.raises(FileNotFoundError, match=f"^model: {tmp_path} is a training run's folder, not a checkpoint: "
                                                f"give one of its checkpoints \\(the latest is "
                                                f"{tmp_path}/checkpoint_2026-12-06_06-02-40.320739; "):
        build_app({"model": str(tmp_path), "api_token_file": None})


@pytest.mark.timeout(300)
def test_an_app_that_cannot_start_says_why_in_one_line(served):
    """What `deepindex serve` prints when Serve gives up on a deployment: its replica's error, one
    line.  A one-replica deployment whose constructor raises as a model replica does on a checkpoint
    it cannot load (one attempt: each costs a worker process)."""
    from ray import serve

    from deepindex.commands.serve import why_not_running

    @serve.deployment(max_constructor_retry_count=1, ray_actor_options={"num_cpus": 0})
    class ConceptModel:
        def __init__(self) -> None:
            raise ValueError("checkpoint: /m/checkpoint.pt is not a loadable deepindex checkpoint "
                             "(Unsupported operand 103)")

    try:
        with pytest.raises(RuntimeError, match="Deploying application broken failed"):
            serve.run(ConceptModel.bind(), name="broken", route_prefix="/broken")
        why = why_not_running("broken")
    finally:
        serve.delete("broken")
    assert why == ("broken did not start; ConceptModel: ValueError: checkpoint: /m/checkpoint.pt is not a "
                   "loadable deepindex checkpoint (Unsupported operand 103)"), why
    assert served.get("/healthz").status_code == 200  # the package's application is untouched
    assert why_not_running("no-such-app") == ""


def test_an_address_serve_cannot_take_is_refused_and_a_configured_one_gives_way(served):
    """serve.start keeps a running Serve's address and only logs that new http_options do not apply:
    `deepindex serve --port 8001` on a cluster whose Serve listened on 8000 deployed there, then waited a
    minute for 8001 and failed (found on review).  Asked for on the command line: one line, before the
    deploy; from the config file: the running address is used."""
    from ray.serve.context import _get_global_client

    from deepindex.commands.serve import serve_address

    cfg = _get_global_client().http_config
    host, port = str(cfg.host), int(cfg.port)
    other = port + 1
    assert serve_address(host, port, None, port) == (host, port)
    assert serve_address(host, other, None, None) == (host, port)  # the config file's port gives way
    with pytest.raises(ValueError, match=rf"^--port: Serve runs on this cluster already, at {host}:{port}, and keeps "
                                         rf"its address: leave --port {other} out to serve there, or shut Serve down "
                                         r"first \(`serve shutdown`\)$"):
        serve_address(host, other, None, other)
    with pytest.raises(ValueError, match=r"^--host: .* leave --host 0\.0\.0\.0 out"):
        serve_address("0.0.0.0", port, "0.0.0.0", None)
