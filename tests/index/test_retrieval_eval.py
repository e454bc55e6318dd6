"""Retrieval quality floors on held-out handwriting, and ``deepindex evaluate-retrieval`` end to end."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]
SHIPPED = Path(__file__).resolve().parents[2] / "serving" / "vocabulary.yaml"
GALLERY = 2000  # test-glyph scenes: handwriting the model never saw


@pytest.fixture(scope="module")
def report(small_model):
    from deepindex.checkpoint import load_model
    from deepindex.index.collection import digit_gallery
    from deepindex.index.evaluate import evaluate_retrieval
    from deepindex.index.keywords import Vocabulary

    lm = load_model(small_model)
    return evaluate_retrieval(lm, digit_gallery(GALLERY, seed=0), vocabulary=Vocabulary.from_file(SHIPPED, lm.concepts),
                              k=10, seed=0)


def test_quality_floors_on_the_small_model(report):
    assert report["keyword"]["map"] >= 0.9
    assert report["qbe_best"]["precision_at_10"] >= 0.95
    assert set(report["keyword"]["ap"]) == {str(i) for i in range(10)}  # every concept queried by its name
    assert all(v == [c] for c, v in report["keyword"]["parsed_as"].items())
    for d in ("probs", "penultimate", "last_but_two"):
        for m in ("l2", "ip", "cosine"):
            cell = report["qbe"][d][m]
            assert 0.5 < cell["map_at_10"] <= cell["precision_at_10"] + 1e-9 <= 1 + 1e-9, (d, m)
            assert report["qbe_chance_ndcg"] + 0.2 < cell["ndcg_at_10"] <= 1 + 1e-9, (d, m)  # graded, far above chance
    best = max(c["map_at_10"] for row in report["qbe"].values() for c in row.values())
    assert report["qbe_best"]["map_at_10"] == best
    # "Items with c like this one": the fused ranking beats the example alone.
    f = report["fusion"]
    assert f["queries"] == 200 and f["weighted"]["map_at_10"] > f["example"]["map_at_10"]
    assert f["example+min_prob"]["map_at_10"] > f["example"]["map_at_10"]  # the filter removes items without c


def test_an_untrained_model_fails_the_floors(small_model):
    """The floors measure the model: the same pipeline on random weights stays far below them."""
    import torch

    from deepindex.checkpoint import load_model
    from deepindex.index.collection import digit_gallery
    from deepindex.index.evaluate import evaluate_retrieval
    from deepindex.models import build_model

    lm = load_model(small_model)
    torch.manual_seed(0)
    lm.model.load_state_dict(build_model(lm.config.model, len(lm.concepts), 1).state_dict())
    r = evaluate_retrieval(lm, digit_gallery(600, seed=0), descriptors=["output"], metrics=["cosine"], k=10)
    assert r["keyword"]["map"] < 0.6 and list(r["dims"]) == ["probs"]  # output: the probabilities' other name


def test_attach_keeps_the_report_beside_a_checkpoint_for_its_version_only(small_model, tmp_path, capsys):
    import shutil

    from deepindex.cli import main
    from deepindex.tracking.registry import resolve_model
    from deepindex.tracking.retrieval import report_for

    ckpt = tmp_path / "model" / "checkpoint.pt"
    ckpt.parent.mkdir()
    shutil.copy(small_model, ckpt)  # never write beside the session's shared model
    assert report_for(resolve_model(str(ckpt))) is None
    rc = main(["evaluate-retrieval", "--model", str(ckpt), "--size", "300", "--features", "probs",
               "--metrics", "ip", "--queries-per-concept", "2", "--attach"])
    assert rc == 0 and f"attached the report to {ckpt.parent / 'retrieval' / 'report.json'}" in capsys.readouterr().out
    got = report_for(resolve_model(str(ckpt)))
    assert got is not None and got["model"]["version"] == resolve_model(str(ckpt)).version
    assert set(got["qbe"]) == {"probs"} and got["collection"]["size"] == 300
    ckpt.write_bytes(ckpt.read_bytes() + b"\0")  # another checkpoint in the same place: another version
    assert report_for(resolve_model(str(ckpt))) is None  # the report measured the old one


@pytest.mark.mlflow
def test_command_prints_the_table_writes_json_and_logs_to_mlflow(small_model, mlflow_server, tmp_path, capsys):
    from mlflow.tracking import MlflowClient

    from deepindex.cli import main

    client = MlflowClient(mlflow_server.uri)
    exp = client.create_experiment(f"retrieval-{tmp_path.name}")
    run_id = client.create_run(exp).info.run_id
    out = tmp_path / "report.json"
    rc = main(["evaluate-retrieval", "--model", str(small_model), "--size", "500", "--features", "probs,penultimate",
               "--metrics", "l2,ip", "--queries-per-concept", "5", "--json", str(out), "--log-run", run_id,
               "--tracking-uri", mlflow_server.uri])
    printed = capsys.readouterr().out
    assert rc == 0
    assert "| probs (10) |" in printed and "| penultimate (64) |" in printed and "Keyword" in printed
    rep = json.loads(out.read_text())
    assert rep["collection"]["size"] == 500 and rep["model"]["name"] == "local"
    assert set(rep["qbe"]) == {"probs", "penultimate"} and set(rep["qbe"]["probs"]) == {"l2", "ip"}
    run = client.get_run(run_id)
    m = run.data.metrics
    assert m["retrieval.keyword.map"] == pytest.approx(rep["keyword"]["map"])
    assert m["retrieval.qbe.penultimate.l2.map_at_10"] == pytest.approx(rep["qbe"]["penultimate"]["l2"]["map_at_10"])
    assert m["retrieval.keyword.ap.7"] == pytest.approx(rep["keyword"]["ap"]["7"])
    assert "retrieval.fusion.rrf.map_at_10" in m
    assert m["retrieval.qbe.probs.ip.ndcg_at_10"] == pytest.approx(rep["qbe"]["probs"]["ip"]["ndcg_at_10"])
    assert "nDCG@10" in printed and m["retrieval.qbe_chance_ndcg"] == pytest.approx(rep["qbe_chance_ndcg"])
    from mlflow.artifacts import download_artifacts

    got = download_artifacts(run_id=run_id, artifact_path="retrieval/report.json", dst_path=str(tmp_path / "dl"),
                             tracking_uri=mlflow_server.uri)
    logged = json.loads(Path(got).read_text())
    assert logged["qbe"] == rep["qbe"]


@pytest.mark.mlflow
def test_command_errors_name_the_option(small_model, mlflow_server, capsys):
    from deepindex.cli import main

    assert main(["evaluate-retrieval", "--model", str(small_model), "--size", "100", "--features", "probs,fc9"]) == 2
    assert "fc9" in capsys.readouterr().err
    assert main(["evaluate-retrieval", "--model", str(small_model), "--size", "100", "--metrics", "manhattan"]) == 2
    assert "manhattan" in capsys.readouterr().err
    rc = main(["evaluate-retrieval", "--model", str(small_model), "--size", "100", "--features", "probs",
               "--metrics", "l2", "--queries-per-concept", "1", "--log-run", "f" * 32,
               "--tracking-uri", mlflow_server.uri])
    assert rc == 2 and "log-run: no MLflow run" in capsys.readouterr().err


def test_label_matrix_ignores_tags_the_model_lacks():
    from deepindex.index.evaluate import label_matrix

    m = label_matrix([["1", "x"], [], ["0", "1"]], ["0", "1"])
    assert m.tolist() == [[False, True], [False, False], [True, True]]
    assert np.asarray(m).dtype == bool


def test_a_manifest_is_evaluated_on_its_test_split_from_its_own_folder(tmp_path, capsys):
    """A user's manifest with a split column (what `deepindex example photos` writes): no --root needed,
    and the queries are the test rows, images no model trained on, unless --split says otherwise.
    The model is untrained: what is asserted is which items are evaluated, not their figures."""
    from deepindex.checkpoint import save_checkpoint
    from deepindex.cli import main
    from deepindex.config import load_config
    from deepindex.data.photos import make_photo_collection
    from deepindex.data.transforms import NormStats
    from deepindex.models import build_model

    photos = make_photo_collection(tmp_path / "photos", n=40, size=128, seed=0, concepts=["red", "circle"])
    cfg = load_config(str(photos.train_config), ["data.image_size=32"])
    save_checkpoint(tmp_path / "model", model=build_model(cfg.model, 2, 3), config=cfg,
                    stats=NormStats((0.5,) * 3, (0.25,) * 3), concepts=["red", "circle"], multilabel=True, epoch=0)
    base = ["evaluate-retrieval", "--model", str(tmp_path / "model"), "--collection", "manifest",
            "--manifest", str(photos.manifest), "--features", "probs", "--metrics", "cosine", "--k", "5"]
    sizes = {}
    for split in ("auto", "all", "val"):
        assert main([*base, "--split", split, "--json", str(tmp_path / f"{split}.json")]) == 0, capsys.readouterr().err
        coll = json.loads((tmp_path / f"{split}.json").read_text())["collection"]
        assert coll["root"] == str(photos.root) and coll["split"] == ("test" if split == "auto" else split)
        sizes[split] = coll["size"]
    assert (sizes["auto"], sizes["val"], sizes["all"]) == (photos.counts["test"], photos.counts["val"], 40)
    plain = tmp_path / "plain.csv"  # no split column: "auto" takes every row, a named split is refused
    plain.write_text("".join(line.rsplit(",", 1)[0] + "\n" for line in photos.manifest.read_text().splitlines()))
    capsys.readouterr()
    assert main([*base[:6], str(plain), "--root", str(photos.root), "--split", "test"]) == 2
    assert capsys.readouterr().err == f"deepindex evaluate-retrieval: error: split: {plain} has no 'test' rows " \
                                      "(no split column)\n"


def test_a_catalogue_collection_is_evaluated_by_name_as_its_manifest_is(tmp_path, capsys):
    """`--collection NAME`, the name `deepindex serve --collection` takes: the catalogue's live items, their
    stored bytes and tags, the test split the manifest import recorded. The same images as the manifest's
    test rows, so the same figures; a deleted item leaves the evaluation. Untrained model, as above."""
    from deepindex.checkpoint import save_checkpoint
    from deepindex.cli import main
    from deepindex.config import load_config
    from deepindex.data.photos import make_photo_collection
    from deepindex.data.transforms import NormStats
    from deepindex.models import build_model

    photos = make_photo_collection(tmp_path / "photos", n=40, size=128, seed=0, concepts=["red", "circle"])
    cfg = load_config(str(photos.train_config), ["data.image_size=32"])
    save_checkpoint(tmp_path / "model", model=build_model(cfg.model, 2, 3), config=cfg,
                    stats=NormStats((0.5,) * 3, (0.25,) * 3), concepts=["red", "circle"], multilabel=True, epoch=0)
    where = ["--catalogue", f"sqlite:///{tmp_path / 'catalogue.db'}", "--blobs", str(tmp_path / "blobs")]
    assert main(["collection", "import", "mine", "--manifest", str(photos.manifest), *where]) == 0
    base = ["evaluate-retrieval", "--model", str(tmp_path / "model"), "--features", "probs,penultimate",
            "--metrics", "cosine,l2", "--k", "3", "--queries-per-concept", "2"]

    def report(*args: str) -> dict:
        out = tmp_path / "report.json"
        assert main([*base, *args, "--json", str(out)]) == 0, capsys.readouterr().err
        return json.loads(out.read_text())

    capsys.readouterr()
    by_name = report("--collection", "mine", *where)
    n = photos.counts["test"]
    first, last = capsys.readouterr().err.splitlines()[-2:]  # the embedding's progress
    assert first == f"embedding: {n} items" and last.startswith(f"embedding: {n}/{n} items (100%), "), (first, last)
    by_file = report("--collection", "manifest", "--manifest", str(photos.manifest))
    assert by_name["collection"]["name"] == "mine" and by_name["collection"]["split"] == "test"
    assert by_name["collection"]["size"] == by_file["collection"]["size"] == photos.counts["test"]
    for part in ("qbe", "keyword", "fusion"):
        assert by_name[part] == by_file[part], part
    assert report("--collection", "mine", "--split", "all", *where)["collection"]["size"] == 40

    test_ids = [line.split(",")[0] for line in photos.manifest.read_text().splitlines()[1:] if line.endswith(",test")]
    assert main(["collection", "rm", "mine", test_ids[0], *where]) == 0
    assert report("--collection", "mine", *where)["collection"]["size"] == photos.counts["test"] - 1

    capsys.readouterr()
    assert main([*base, "--collection", "yours", *where]) == 2
    err = capsys.readouterr().err
    assert err.startswith("deepindex evaluate-retrieval: error: collection: no collection named 'yours'")
    assert "known: mine" in err and "digit-scenes, image-folder, manifest" in err and err.count("\n") == 1


def test_the_gallery_is_drawn_from_the_handwriting_the_model_did_not_train_on(small_model, tmp_path, monkeypatch):
    """Found on review: which digit glyphs are held out depends on data.seed, and the gallery was drawn with
    --seed (default 0): for a model trained with seed 1, 73 % of its "held-out" glyphs were training glyphs
    and every figure was inflated.  The default is now the model's own data.seed."""
    from deepindex.checkpoint import load_model, save_checkpoint
    from deepindex.cli import main
    from deepindex.index import collection as galleries

    lm = load_model(small_model)
    ckpt = save_checkpoint(tmp_path / "seed1", model=lm.model, config=lm.config.override({"data.seed": 1}),
                           stats=lm.stats, concepts=lm.concepts, multilabel=lm.multilabel, epoch=lm.epoch)
    seeds: list[int] = []
    real = galleries.load_collection

    def drawn_with(*args, **kwargs):
        seeds.append(kwargs["seed"])
        return real(*args, **kwargs)

    monkeypatch.setattr(galleries, "load_collection", drawn_with)
    base = ["evaluate-retrieval", "--model", str(ckpt), "--size", "100", "--features", "probs", "--metrics", "l2"]
    assert main(base) == 0 and main([*base, "--seed", "0"]) == 0
    assert seeds == [1, 0]


def test_a_gallery_where_no_item_shares_a_concept_is_refused_in_a_line(small_model):
    """Query by example asks with items that share a concept with another: with none, the report ended in a
    reshape error from the nearest-neighbour search (found on review)."""
    from deepindex.checkpoint import load_model
    from deepindex.index.collection import Collection, digit_gallery

    lm = load_model(small_model)
    g = digit_gallery(3, seed=0)
    lonely = Collection("lonely", g.ids, g.image_size, g.channels, images=g.images,
                        labels=[["0"], ["1"], ["2"]])
    from deepindex.index.evaluate import evaluate_retrieval

    with pytest.raises(ValueError, match=r"^collection: no item of lonely shares a concept with another, so query "
                                         r"by example has nothing to find"):
        evaluate_retrieval(lm, lonely, descriptors=["output"], metrics=["cosine"], k=2)
