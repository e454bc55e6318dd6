"""Registry and promotion on a real MLflow server: `champion` moves only to a better model."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.utils.data import DataLoader

from deepindex.checkpoint import load_model, save_checkpoint
from deepindex.config import load_config
from support import TINY

pytestmark = [pytest.mark.mlflow, pytest.mark.timeout(240)]


# A candidate that is better by a wide margin whatever the thread count's rounding: the TINY
# ConvNet at SGD 0.05 is still at 0.80-0.87 top-1 error after 3 epochs (untrained: ~0.87), at
# AdamW 3e-3 after 10 epochs (0.35 s each) at 0.24-0.40.
CANDIDATE = [*TINY, "data.train_size=1000", "optim.name=adamw", "optim.lr=0.003"]
TRAINED_EPOCHS = 10


@pytest.fixture(scope="module")
def splits():
    from deepindex.data import build_splits

    cfg = load_config(None, CANDIDATE)
    return cfg, build_splits(cfg.data)


def _candidate(client, experiment_id, splits, tmp_path, epochs: int, seed: int, overrides: tuple[str, ...] = ()
               ) -> str:
    """A run holding checkpoint/checkpoint.pt of a ConvNet trained ``epochs`` epochs (plain torch); its
    config gets ``overrides`` (what a training run with them would have saved)."""
    from deepindex.models import build_model
    from deepindex.train.engine import train_one_epoch
    from deepindex.train.losses import Penalty, make_loss
    from deepindex.train.optim import build_optimizer

    cfg, sp = splits
    if overrides:
        cfg = load_config(None, [*CANDIDATE, *overrides])
    torch.manual_seed(seed)
    model = build_model(cfg.model, len(sp.concepts), sp.channels)
    opt = build_optimizer(model, cfg.optim)
    for e in range(epochs):
        train_one_epoch(model, DataLoader(sp.train, batch_size=32, shuffle=True), opt, make_loss(sp.multilabel),
                        Penalty(cfg.regularization), e)
    d = tmp_path / (f"ckpt-{epochs}-{seed}" + (f"-o{len(overrides)}" if overrides else ""))
    save_checkpoint(d, model=model, config=cfg, stats=sp.stats, concepts=sp.concepts, multilabel=sp.multilabel,
                    epoch=epochs)
    run = client.create_run(experiment_id, run_name=f"candidate-{epochs}-{seed}")
    client.log_artifact(run.info.run_id, str(d / "checkpoint.pt"), "checkpoint")
    client.set_terminated(run.info.run_id)
    return run.info.run_id


def _registry(mlflow_server, tmp_path, experiment: str, model: str) -> tuple[Any, str, str]:
    """A client of the session's MLflow server, an experiment and a model name of this test's own."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(mlflow_server.uri)
    return client, client.create_experiment(f"{experiment}-{tmp_path.name}"), f"{model}-{tmp_path.name}"


def test_weaker_candidate_keeps_the_champion_better_one_replaces_it(mlflow_server, splits, tmp_path, capsys):
    from deepindex.tracking.registry import resolve_model
    from deepindex.workflows import promote

    client, exp, name = _registry(mlflow_server, tmp_path, "registry", "model")
    untrained = _candidate(client, exp, splits, tmp_path, epochs=0, seed=1)
    trained = _candidate(client, exp, splits, tmp_path, epochs=TRAINED_EPOCHS, seed=2)
    untrained2 = _candidate(client, exp, splits, tmp_path, epochs=0, seed=3)

    first = promote(untrained, name, mlflow_server.uri)
    assert first.promoted and first.champion is None and first.metric == "test_top1_error"
    # Promoted (there is no champion to keep), and said to be a guess: 10 classes, an untrained model.
    assert (f"no champion yet; test_top1_error {first.candidate:.4f}; the candidate learnt next to nothing: "
            f"test top-1 error {first.candidate:.4f}, where always answering the most frequent class errs 0.") \
        in first.reason

    better = promote(trained, name, mlflow_server.uri)
    assert better.promoted, better.reason
    assert "learnt next to nothing" not in better.reason
    assert better.candidate < better.champion  # top-1 error: lower is better
    assert client.get_model_version_by_alias(name, "champion").version == better.version

    weaker = promote(untrained2, name, mlflow_server.uri)
    assert not weaker.promoted, weaker.reason
    assert weaker.candidate > weaker.champion
    assert weaker.champion == pytest.approx(better.candidate)  # the champion re-scored on the same split
    assert client.get_model_version_by_alias(name, "champion").version == better.version
    # The weaker one is registered all the same, and the decision with both figures is on its run.
    assert {mv.version for mv in client.search_model_versions(f"name='{name}'")} == {"1", "2", "3"}
    run = client.get_run(untrained2)
    assert run.data.tags["promotion.decision"] == "not promoted"
    assert run.data.metrics["promotion_candidate_test_top1_error"] == pytest.approx(weaker.candidate)
    assert run.data.metrics["promotion_champion_test_top1_error"] == pytest.approx(weaker.champion)

    # resolve_model: alias, version and a local path all give a loadable checkpoint.
    champ = resolve_model(f"models:/{name}@champion", mlflow_server.uri)
    assert (champ.name, champ.version) == (name, better.version)
    lm = load_model(champ.checkpoint_path)
    assert lm.concepts == splits[1].concepts and lm.epoch == TRAINED_EPOCHS
    by_version = resolve_model(f"models:/{name}/1", mlflow_server.uri)
    assert load_model(by_version.checkpoint_path).epoch == 0
    local = resolve_model(champ.checkpoint_path)
    digest = hashlib.sha256((tmp_path / f"ckpt-{TRAINED_EPOCHS}-2" / "checkpoint.pt").read_bytes()).hexdigest()[:12]
    assert (local.name, local.version) == ("local", "file-" + digest)
    with pytest.raises(ValueError, match="not found in the registry"):
        resolve_model(f"models:/{name}@nobody", mlflow_server.uri)

    # `deepindex evaluate` takes what serve and index take: the champion's figures on its test split.
    from deepindex.cli import main
    from deepindex.train.evaluation import evaluate_checkpoint

    capsys.readouterr()
    assert main(["evaluate", f"models:/{name}@champion", "--tracking-uri", mlflow_server.uri]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == json.loads(json.dumps(evaluate_checkpoint(champ.checkpoint_path)))
    assert printed["test_top1_error"] == pytest.approx(better.candidate)
    assert main(["evaluate", f"models:/{name}@nobody", "--tracking-uri", mlflow_server.uri]) == 2
    assert capsys.readouterr().err.startswith(f"deepindex evaluate: error: model: models:/{name}@nobody not found")


def test_a_champion_moved_while_a_promotion_scores_is_the_one_it_is_compared_with(mlflow_server, splits, tmp_path,
                                                                                 monkeypatch):
    """Two promotions at once (two sweeps ending together): B moves the champion while A is still
    scoring the old one.  A used to compare with the old champion, beat it, and overwrite B's better
    model with its own; A now decides again against B's."""
    from deepindex.train import evaluation
    from deepindex.workflows import promote

    client, exp, name = _registry(mlflow_server, tmp_path, "race", "model")
    weak = _candidate(client, exp, splits, tmp_path, epochs=0, seed=1)
    strong = _candidate(client, exp, splits, tmp_path, epochs=TRAINED_EPOCHS, seed=2)
    medium = _candidate(client, exp, splits, tmp_path, epochs=1, seed=5)
    assert promote(weak, name, mlflow_server.uri).promoted

    real = evaluation.score_checkpoint
    other: list[object] = []

    def scoring_the_champion(path, *args, **kwargs):
        if kwargs.get("data") is not None and not other:  # A scores the old champion: B ends meanwhile
            other.append(None)
            other[0] = promote(strong, name, mlflow_server.uri)
        return real(path, *args, **kwargs)

    monkeypatch.setattr(evaluation, "score_checkpoint", scoring_the_champion)
    a = promote(medium, name, mlflow_server.uri)
    b = other[0]
    assert b.promoted and b.champion_version == "1", b.reason
    assert a.champion_version == b.version and a.champion == pytest.approx(b.candidate), a.reason
    assert a.candidate > b.candidate and not a.promoted, a.reason  # 1 epoch against 10: the weaker one
    assert client.get_model_version_by_alias(name, "champion").version == b.version


def test_a_retrieval_floor_refuses_a_better_candidate_below_it(mlflow_server, splits, tmp_path):
    """tracking.promote_min_qbe_map: beating the champion on the test split is not enough when the
    candidate's query-by-example mAP@10 (held-out gallery: here its digits test split) is below the floor."""
    from deepindex.workflows import promote

    client, exp, name = _registry(mlflow_server, tmp_path, "floor", "floor")
    first = promote(_candidate(client, exp, splits, tmp_path, epochs=0, seed=1), name, mlflow_server.uri)
    assert first.promoted and first.qbe_floor is None and first.qbe_map is None  # no floor: not measured
    # The floor from the candidate's own config (as a sweep's trials carry it).
    trained = _candidate(client, exp, splits, tmp_path, epochs=TRAINED_EPOCHS, seed=2,
                         overrides=("tracking.promote_min_qbe_map=0.9999",))
    refused = promote(trained, name, mlflow_server.uri)
    assert refused.candidate < refused.champion  # better on the test split (top-1 error) ...
    assert not refused.promoted  # ... but below the retrieval floor
    assert refused.qbe_floor == 0.9999 and 0.1 < refused.qbe_map < 0.9999
    assert refused.reason.startswith("refused: ") and "below the floor tracking.promote_min_qbe_map=0.9999" in \
        refused.reason, refused.reason
    assert client.get_model_version_by_alias(name, "champion").version == first.version
    run = client.get_run(trained)
    assert run.data.metrics["promotion_candidate_qbe_map_at_10"] == pytest.approx(refused.qbe_map)
    assert run.data.metrics["retrieval.qbe_best.map_at_10"] == pytest.approx(refused.qbe_map)  # the whole report
    assert run.data.tags["promotion.decision"] == "not promoted" and run.data.tags["promotion.qbe_floor"] == "0.9999"
    # The served version's report (the service's /v1/about): the measured one's, none for the other,
    # until `evaluate-retrieval --attach` gives it one.
    from deepindex.tracking.registry import resolve_model
    from deepindex.tracking.retrieval import attach_report, report_for

    v1 = resolve_model(f"models:/{name}/{first.version}", mlflow_server.uri)
    v2 = resolve_model(f"models:/{name}/{refused.version}", mlflow_server.uri)
    assert report_for(v1, mlflow_server.uri) is None
    measured = report_for(v2, mlflow_server.uri)
    assert measured is not None and measured["qbe_best"]["map_at_10"] == pytest.approx(refused.qbe_map)
    attach_report(v1, measured, mlflow_server.uri)
    again = report_for(v1, mlflow_server.uri)
    assert again is not None and again["model"]["version"] == first.version and again["qbe"] == measured["qbe"]
    # An explicit floor (deepindex promote --min-qbe-map) wins over the config's: at or above it, promoted.
    ok = promote(trained, name, mlflow_server.uri, min_qbe_map=round(refused.qbe_map - 0.05, 4))
    assert ok.promoted and "at or above the floor" in ok.reason, ok.reason
    assert ok.qbe_map == pytest.approx(refused.qbe_map)  # the same model, the same held-out gallery
    assert client.get_model_version_by_alias(name, "champion").version == ok.version == refused.version


def test_a_model_of_another_collection_is_refused_before_anything_is_registered(mlflow_server, splits, tmp_path,
                                                                                capsys, monkeypatch):
    """A champion of the digits (10 single-label classes) and a candidate trained on the example photos
    (8 multi-label concepts): no split scores both (it raised a bare 'not comparable' from the scoring, after
    registering the candidate under the digits' name). One line says what to do; nothing is registered;
    under a name of its own the candidate is promoted."""
    from deepindex.cli import main
    from deepindex.data import build_splits
    from deepindex.data.photos import make_photo_collection
    from deepindex.models import build_model
    from deepindex.workflows import NotComparable, promote

    client, exp, name = _registry(mlflow_server, tmp_path, "collections", "digits")
    assert promote(_candidate(client, exp, splits, tmp_path, epochs=0, seed=1), name, mlflow_server.uri).promoted
    root = make_photo_collection(tmp_path / "photos", n=40, size=128, seed=0).root
    cfg = load_config(None, ["data.dataset=manifest", f"data.root={root}", "data.image_size=32", "data.channels=3",
                             "model.channels=[8]", "model.embed_dim=16",
                             f"tracking.registered_model=photos-{tmp_path.name}"])
    sp = build_splits(cfg.data)
    save_checkpoint(tmp_path / "photo-ckpt", model=build_model(cfg.model, len(sp.concepts), sp.channels), config=cfg,
                    stats=sp.stats, concepts=sp.concepts, multilabel=sp.multilabel, epoch=0)
    run = client.create_run(exp, run_name="photos")
    client.log_artifact(run.info.run_id, str(tmp_path / "photo-ckpt" / "checkpoint.pt"), "checkpoint")
    client.set_terminated(run.info.run_id)
    versions = len(client.search_model_versions(f"name='{name}'"))
    with pytest.raises(NotComparable) as e:
        promote(run.info.run_id, name, mlflow_server.uri)
    assert str(e.value).startswith(f"model: the champion of {name} (version 1) tags 10 concepts (0, 1, 2, 3, ...), "
                                   "single-label; this candidate 8 concepts (red, green, blue, circle, ...), "
                                   "multi-label: a model of another collection"), str(e.value)
    assert len(client.search_model_versions(f"name='{name}'")) == versions
    # The command: the same, in one line.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.uri)
    capsys.readouterr()
    assert main(["promote", "--run", run.info.run_id, "--model", name]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("deepindex promote: error: model: the champion of ") and "\n" not in err, err
    # Without --model the candidate goes where its own config says (it went to `deepindex`, another
    # collection's model, unless the user remembered --model).
    assert main(["promote", "--run", run.info.run_id]) == 0
    out = capsys.readouterr()
    photos = json.loads(out.out)
    assert photos["promoted"] and photos["name"] == f"photos-{tmp_path.name}" and photos["champion"] is None
    assert f"-> photos-{tmp_path.name}@champion = version 1 (run {run.info.run_id})" in out.err, out.err


def test_a_checkpoint_path_resolves_to_its_content_hash(tmp_path, monkeypatch):
    from deepindex.tracking.registry import resolve_model

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    f = tmp_path / "checkpoint.pt"
    f.write_bytes(b"weights")
    r = resolve_model(str(tmp_path))
    assert r.name == "local" and r.version == "file-" + hashlib.sha256(b"weights").hexdigest()[:12]
    assert r.checkpoint_path == str(f) and resolve_model(str(f)) == r
    f.write_bytes(b"other weights")
    assert resolve_model(str(tmp_path)).version != r.version  # the version follows the weights
    with pytest.raises(ValueError, match="no MLflow server"):  # no registry to ask: a clear error
        resolve_model("models:/x@champion")
    with pytest.raises(FileNotFoundError):
        resolve_model(str(tmp_path / "nope"))


def test_a_diverged_candidate_is_not_registered_nor_promoted(mlflow_server, splits, tmp_path):
    """A model whose weights went NaN scores NaN (train.engine): no comparison holds, and with no champion
    yet it was promoted ("no champion yet; test_top1_error nan").  Refused in one line, nothing registered."""
    from deepindex.models import build_model
    from deepindex.workflows import promote

    client, exp, name = _registry(mlflow_server, tmp_path, "diverged", "digits")
    cfg, sp = splits
    model = build_model(cfg.model, len(sp.concepts), sp.channels)
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(float("nan"))
    save_checkpoint(tmp_path / "nan", model=model, config=cfg, stats=sp.stats, concepts=sp.concepts,
                    multilabel=sp.multilabel, epoch=3)
    run = client.create_run(exp, run_name="diverged")
    client.log_artifact(run.info.run_id, str(tmp_path / "nan" / "checkpoint.pt"), "checkpoint")
    client.set_terminated(run.info.run_id)
    with pytest.raises(ValueError, match=rf"^promote: run {run.info.run_id}'s model has no test_top1_error \(NaN: "
                                         r"its training diverged\); nothing registered$"):
        promote(run.info.run_id, name, mlflow_server.uri)
    assert client.search_model_versions(f"name='{name}'") == []


def test_a_champion_that_no_longer_loads_gives_way_to_the_candidate(mlflow_server, splits, tmp_path, caplog):
    """The champion's checkpoint cannot be read any more (here its downloaded copy is corrupt; its artifacts
    deleted from the store read the same): every promotion failed on it, for good, and a sweep's summary with
    it (found on review).  The candidate is registered and takes the alias; the decision says why."""
    from deepindex.paths import state_dir
    from deepindex.workflows import promote

    client, exp, name = _registry(mlflow_server, tmp_path, "unloadable", "digits")
    assert promote(_candidate(client, exp, splits, tmp_path, epochs=0, seed=1), name, mlflow_server.uri).promoted
    from deepindex.tracking.registry import resolve_model

    cached = Path(resolve_model(f"models:/{name}/1", mlflow_server.uri).checkpoint_path)  # downloaded once
    assert cached == state_dir() / "models" / name / "1" / "checkpoint.pt"
    cached.write_bytes(b"not a checkpoint any more")
    with caplog.at_level("WARNING", logger="deepindex.workflows"):
        d = promote(_candidate(client, exp, splits, tmp_path, epochs=0, seed=2), name, mlflow_server.uri)
    assert d.promoted and d.version == "2" and d.champion is None, d
    assert d.reason.startswith("the champion (version 1) cannot be loaded (checkpoint: "), d.reason
    assert any("cannot be loaded" in r.getMessage() for r in caplog.records)
    assert client.get_model_version_by_alias(name, "champion").version == "2"


def test_a_champion_out_of_reach_for_a_moment_fails_the_promotion_not_the_champion(mlflow_server, splits, tmp_path,
                                                                                   monkeypatch):
    """Only a champion gone for good gives way: an outage or a full disk while reading it (an OSError, a server
    error) fails the promotion as before, the alias where it was (found on review of the fix above)."""
    from deepindex.tracking import registry
    from deepindex.workflows import promote

    client, exp, name = _registry(mlflow_server, tmp_path, "outage", "digits")
    assert promote(_candidate(client, exp, splits, tmp_path, epochs=0, seed=1), name, mlflow_server.uri).promoted
    real = registry.resolve_model

    def unreachable(uri: str, tracking_uri: str | None = None):  # the registry's artifact store, down a moment
        if uri == f"models:/{name}/1":
            raise ConnectionError("Connection refused")
        return real(uri, tracking_uri)

    monkeypatch.setattr(registry, "resolve_model", unreachable)
    with pytest.raises(ConnectionError):
        promote(_candidate(client, exp, splits, tmp_path, epochs=0, seed=2), name, mlflow_server.uri)
    assert client.get_model_version_by_alias(name, "champion").version == "1"


@pytest.mark.mlflow
@pytest.mark.timeout(120)
def test_an_audit_report_logged_again_is_fetched_again(mlflow_server, tmp_path, monkeypatch):
    """An audit run again under its name (another audit.filter_by) logs its new report on the same parent
    run and ends it again.  The per-machine copy was keyed by server and run only: a machine that had the
    old one trained on the old suspects (found on review)."""
    import time

    from mlflow.tracking import MlflowClient

    from deepindex.tracking.audit import REPORT_ARTIFACTS, download_report

    monkeypatch.setenv("TMPDIR", str(tmp_path / "tmp"))  # this test's own copies
    (tmp_path / "tmp").mkdir()
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", None)  # read TMPDIR again
    client = MlflowClient(mlflow_server.uri)
    run_id = client.create_run(client.create_experiment(f"audit-cache-{tmp_path.name}")).info.run_id
    report = tmp_path / "report"
    report.mkdir()
    for version in ("first", "second"):
        (report / "suspects.csv").write_text(f"id,{version}\n")
        client.log_artifacts(run_id, str(report), REPORT_ARTIFACTS)
        client.set_terminated(run_id, "FINISHED")
        got = download_report(run_id, mlflow_server.uri)
        assert (got / "suspects.csv").read_text() == f"id,{version}\n"
        time.sleep(0.01)  # the second end is a later millisecond
    with pytest.raises(ValueError, match=r"^cannot fetch the audit report of run nope from "):
        download_report("nope", mlflow_server.uri)


def test_continuing_a_registered_run_trains_on_in_a_new_run_so_the_version_stays(mlflow_server, tmp_path):
    """A registered version is its run's checkpoint/ artifact.  `deepindex train --name t1` again with a larger
    train.epochs continued that run and rewrote its checkpoint, so version 1 became another model that was never
    compared with anything (found on review).  A run with a registered version is continued in a new run that
    names it; a run with none is continued in place, as before."""
    from deepindex.tracking.registry import register_run
    from deepindex.tracking.tracker import RUN_ID_KEY, TAG_CONTINUED_FROM, Tracker

    client, exp, name = _registry(mlflow_server, tmp_path, "continued", "model")
    cfg = load_config(None, list(TINY))

    def start(run_id: str | None) -> str:
        tracker = Tracker(mlflow_server.uri, exp, "t1")
        extra = tracker.start(cfg, {RUN_ID_KEY: run_id} if run_id else {})
        assert not tracker.disabled
        return str(extra[RUN_ID_KEY])

    first = start(None)
    assert start(first) == first  # nothing registered: the same run goes on
    client.set_terminated(first)
    assert register_run(first, name, mlflow_server.uri) == "1"
    second = start(first)
    assert second != first
    assert client.get_run(second).data.tags[TAG_CONTINUED_FROM] == first
    assert client.get_run(first).info.status == "FINISHED"  # the registered run is left as it was
    assert start(second) == second  # the new run has no version: it goes on in place


def test_no_champion_is_told_apart_from_a_registry_that_does_not_answer(mlflow_server, tmp_path):
    """alias_version read every MLflow failure as "no alias": a registry down or answering 5xx looked like a
    model without a champion, and a promotion would hand the alias to a candidate compared with nothing
    (found on review).  Only a missing model or alias is None now."""
    from mlflow.exceptions import MlflowException

    from deepindex.net import free_port
    from deepindex.tracking.registry import alias_version, register_run, set_alias

    client, exp, name = _registry(mlflow_server, tmp_path, "alias", "model")
    assert alias_version(name, tracking_uri=mlflow_server.uri) is None  # no such model
    run = client.create_run(exp).info.run_id
    client.set_terminated(run)
    version = register_run(run, name, mlflow_server.uri)
    assert alias_version(name, tracking_uri=mlflow_server.uri) is None  # a model without the alias
    set_alias(name, version, tracking_uri=mlflow_server.uri)
    assert alias_version(name, tracking_uri=mlflow_server.uri) == version
    with pytest.raises(MlflowException):  # nothing listens there: not "no champion"
        alias_version(name, tracking_uri=f"http://127.0.0.1:{free_port()}")


def test_a_version_of_another_registry_is_not_served_from_the_cache(mlflow_server, splits, tmp_path):
    """Downloaded versions were cached under NAME/VERSION alone: version 1 of `deepindex` on a second server
    (or one deleted and registered again) resolved to the first server's file (found on review).  The folder
    keeps where its version came from; another origin downloads its own."""
    from mlflow.tracking import MlflowClient

    from deepindex.checkpoint import checkpoint_version
    from deepindex.tracking.registry import register_run, resolve_model

    client, exp, name = _registry(mlflow_server, tmp_path, "two-registries", "model")
    other_uri = f"sqlite:///{tmp_path / 'other.db'}"
    other = MlflowClient(other_uri, registry_uri=other_uri)
    other_exp = other.create_experiment("other", artifact_location=str(tmp_path / "other-artifacts"))
    assert register_run(_candidate(client, exp, splits, tmp_path / "a", epochs=0, seed=1), name,
                        mlflow_server.uri) == "1"
    assert register_run(_candidate(other, other_exp, splits, tmp_path / "b", epochs=0, seed=2), name, other_uri) == "1"
    here = resolve_model(f"models:/{name}/1", mlflow_server.uri)
    first = checkpoint_version(here.checkpoint_path)
    there = resolve_model(f"models:/{name}/1", other_uri)
    assert there.checkpoint_path == here.checkpoint_path  # one cache folder per name and version ...
    assert checkpoint_version(there.checkpoint_path) != first  # ... holding the version of the registry asked
    assert checkpoint_version(resolve_model(f"models:/{name}/1", mlflow_server.uri).checkpoint_path) == first


def test_a_run_continued_with_more_epochs_says_what_it_goes_on_with(mlflow_server, tmp_path):
    """MLflow params are written once: a run continued with train.epochs=10 kept train.epochs=5 in its params
    and its config.yaml, the values it no longer ran (found on review).  Each changed key is a tag with its
    value now, and config.yaml is the config the run goes on with."""
    import yaml

    from deepindex.tracking.tracker import RUN_ID_KEY, TAG_RESUMED, Tracker

    client, exp, _ = _registry(mlflow_server, tmp_path, "resumed", "model")
    first = Tracker(mlflow_server.uri, exp, "t1")
    run_id = first.start(load_config(None, [*TINY, "train.epochs=5"]), {})[RUN_ID_KEY]
    again = Tracker(mlflow_server.uri, exp, "t1")
    assert again.start(load_config(None, [*TINY, "train.epochs=10"]), {RUN_ID_KEY: run_id})[RUN_ID_KEY] == run_id
    data = client.get_run(run_id).data
    assert data.params["train.epochs"] == "5"  # written once
    assert {k: v for k, v in data.tags.items() if k.startswith(TAG_RESUMED)} == {f"{TAG_RESUMED}.train.epochs": "10"}
    config = yaml.safe_load(Path(client.download_artifacts(run_id, "config.yaml", str(tmp_path))).read_text())
    assert config["train"]["epochs"] == 10
