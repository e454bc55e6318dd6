"""A job that does not fit in what the cluster has free: said at once, and on a cluster of this
machine (which no autoscaler grows) a one-line error instead of a job that never starts.

Seen by hand: with `deepindex serve` holding 1.5 of the local platform's 2 CPUs, `deepindex tune`
printed nothing for 12 minutes, its trial's Train workers queued behind the service while Ray
Train's controller retried the worker group's start every 60 s, forever.
"""
from __future__ import annotations

from collections.abc import Iterator

import pytest

from deepindex import cluster
from deepindex.cli import main
from support import ConsoleEvents, cpus_held

pytestmark = [pytest.mark.timeout(120), pytest.mark.usefixtures("ray_local")]

LEFT = 0.5  # CPUs the holder leaves free


@pytest.fixture
def held() -> Iterator[object]:
    """An actor holding all but LEFT of the free CPUs (a running service, as far as Ray can tell)."""
    with cpus_held(LEFT) as holder:
        yield holder


@pytest.fixture
def lines() -> Iterator[ConsoleEvents]:
    with ConsoleEvents() as h:
        yield h


def test_the_session_cluster_is_one_that_never_grows():
    assert cluster.fixed_size()


def test_a_job_the_free_cpus_cannot_hold_waits_says_so_then_fails_with_the_numbers(held, lines):
    with pytest.raises(cluster.ClusterBusy) as e:
        cluster.wait_for_resources({"CPU": 1.0}, "a test job", wait_s=2)
    msg = str(e.value)
    assert msg.startswith(f"a test job needs 1 CPU and this machine's cluster still has {LEFT:g} of ")
    assert "CPUs free after 2s" in msg and "deepindex up --num-cpus" in msg and "\n" not in msg
    assert lines.lines == [f"a test job waits for 1 CPU (the cluster has {LEFT:g} of 4 CPUs free; a running "
                           "service, training or sweep holds the rest)"]


def test_a_job_goes_on_once_the_cpus_it_waits_for_are_freed(held, lines):
    import ray

    lines.then = lambda: ray.kill(held)  # the "service" stops once the job says it waits
    free = cluster.wait_for_resources({"CPU": 1.0}, "a test job", wait_s=60)
    assert free["CPU"] >= 1.0 and len(lines.lines) == 1


def test_a_job_larger_than_the_whole_cluster_fails_at_once(lines):
    with pytest.raises(cluster.ClusterBusy, match=r"^a big job needs 64 CPU and this machine's cluster has 4 CPUs "
                                                  r"in all: ask for less \(ray.num_workers"):
        cluster.wait_for_resources({"CPU": 64.0}, "a big job", wait_s=60)
    assert lines.lines == []


def test_a_cluster_that_may_grow_is_left_to_ray_after_the_line(held, lines, monkeypatch):
    """A remote cluster (an autoscaler may add a node for the job): say it, then let Ray queue it."""
    monkeypatch.setattr(cluster, "_fixed_cluster", None)
    free = cluster.wait_for_resources({"CPU": 1.0}, "a test job", wait_s=60)
    assert free["CPU"] <= LEFT + 1e-6 and len(lines.lines) == 1 and "waits for 1 CPU" in lines.lines[0]


@pytest.mark.parametrize("argv, what", [
    (["train", "ray.num_workers=2", "ray.cpus_per_worker=0.5"], "training (2 worker(s) x 0.5 CPU)"),
    (["tune", "--space", "smoke"], "a trial of this sweep (0.5 CPU for its driver, 1 worker(s) x 0.5)"),
])
def test_the_cli_says_in_one_line_why_the_job_cannot_start(held, capsys, monkeypatch, argv, what):
    monkeypatch.setattr(cluster, "RESOURCE_WAIT_S", 1.0)
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"deepindex {argv[0]}: error: {what} needs 1 CPU and this machine's cluster still "
                              f"has {LEFT:g} of 4 CPUs free after 1s: stop what holds them")
    assert "Traceback" not in "\n".join(err)


def test_serve_says_in_one_line_why_the_service_cannot_start(held, small_model, tmp_path, capsys, monkeypatch):
    """A new application whose replicas the free CPUs cannot hold: Serve would wait for them forever."""
    import yaml

    from deepindex.net import free_port
    from serving.schemas import HERE

    cfg = yaml.safe_load((HERE / "config.yaml").read_text())
    cfg["applications"] = cfg["applications"][:1]
    cfg["applications"][0]["name"] = "resource-wait-test"  # never an application another test runs
    (tmp_path / "serve.yaml").write_text(yaml.safe_dump(cfg))
    monkeypatch.setattr(cluster, "RESOURCE_WAIT_S", 1.0)
    assert main(["serve", "--config", str(tmp_path / "serve.yaml"), "--model", str(small_model),
                 "--port", str(free_port()), "--detach"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("deepindex serve: error: the service (1.5 CPU for its replicas) needs 1.5 CPU and "
                              f"this machine's cluster still has {LEFT:g} of 4 CPUs free after 1s")


def test_a_services_cpus_are_its_replicas_at_their_starting_size():
    from serving.schemas import ServeArgs

    assert ServeArgs().cpus() == 1.5  # one ingress replica (0.5) and one model replica (1)
    assert ServeArgs(model_in_ingress=True, ingress_replicas=2).cpus() == 3.0
    assert ServeArgs(ingress_replicas=2, model_autoscaling={"min_replicas": 2, "max_replicas": 4}).cpus() == 3.0
    assert ServeArgs(model_autoscaling={"min_replicas": 0, "initial_replicas": 3}).cpus() == 3.5


def test_up_and_a_fresh_local_cluster_default_to_the_same_cpus(monkeypatch):
    monkeypatch.delenv("DEEPINDEX_NUM_CPUS", raising=False)
    assert cluster.default_num_cpus() >= 4
    monkeypatch.setenv("DEEPINDEX_NUM_CPUS", "6")
    assert cluster.default_num_cpus() == 6
    monkeypatch.setenv("DEEPINDEX_NUM_CPUS", "")
    assert cluster.default_num_cpus() >= 4  # empty: the default, as `up` reads it
    for bad in ("abc", "-2", "0"):  # `int()`'s own words, naming no variable, or a negative count for ray.init
        monkeypatch.setenv("DEEPINDEX_NUM_CPUS", bad)
        with pytest.raises(ValueError, match=rf"^DEEPINDEX_NUM_CPUS: must be a whole number >= 1 .*not '{bad}'$"):
            cluster.default_num_cpus()
