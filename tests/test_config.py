import re

import pytest
from pydantic import ValidationError

from deepindex.config import Config, ConfigError, load_config


def test_defaults_are_valid_and_multilabel_digit_scenes():
    cfg = load_config()
    assert cfg.data.dataset == "digit-scenes" and cfg.multilabel
    assert cfg.flat()["optim.lr"] == cfg.optim.lr


def test_yaml_then_overrides(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("optim:\n  lr: 0.2\nmodel:\n  channels: [4, 8]\n")
    cfg = load_config(f, ["optim.lr=0.3", "schedule.policy=cosine"])
    assert cfg.optim.lr == 0.3 and cfg.model.channels == (4, 8) and cfg.schedule.policy == "cosine"


@pytest.mark.parametrize("override, key", [
    (["optim.lrr=1"], "optim.lrr"),
    (["nosuch.lr=1"], "nosuch"),
    (["optim.lr=abc"], "optim.lr"),
    (["optim.lr=-1"], "optim.lr"),
    (["schedule.policy=linear"], "schedule.policy"),
    (["model.name=nosuchnet"], "model.name"),
    (["optim=3"], "optim"),
    (["noequals"], "noequals"),
])
def test_bad_override_names_the_key(override, key):
    with pytest.raises(ConfigError) as e:
        load_config(None, override)
    assert str(e.value).startswith(key), str(e.value)


def test_a_dataset_recipe_sits_under_the_file_and_the_overrides(tmp_path):
    default = load_config(None, [])
    digits = load_config(None, ["data.dataset=digits"])
    assert (digits.model.channels, digits.model.embed_dim, digits.optim.lr, digits.train.epochs,
            digits.schedule.step_size, digits.data.train_size) == ((16, 32, 64), 64, 0.02, 4, 3, 14000)
    assert digits.model.dropout == default.model.dropout  # what the recipe does not name stays the default
    assert load_config(None, ["data.dataset=digits", "train.epochs=3"]).train.epochs == 3
    f = tmp_path / "c.yaml"
    f.write_text("data: {dataset: digits}\noptim: {lr: 0.1}\n")
    from_file = load_config(f)
    assert from_file.optim.lr == 0.1 and from_file.train.epochs == 4
    assert load_config(None, ["data.dataset=digit-scenes"]).model.channels == default.model.channels


def test_bad_yaml_key_is_named(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("train:\n  epochz: 3\n")
    with pytest.raises(ConfigError, match=r"^train\.epochz: unknown key"):
        load_config(f)


def test_config_is_frozen_and_roundtrips():
    cfg = load_config(None, ["train.epochs=3"])
    with pytest.raises(ValidationError, match="frozen"):
        cfg.train.epochs = 4  # type: ignore[misc]
    assert Config.model_validate(cfg.to_dict()) == cfg


def test_cli_prints_one_line_for_bad_key(capsys):
    from deepindex.cli import main

    assert main(["train", "optim.lrr=0.1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["deepindex train: error: optim.lrr: unknown key (did you mean optim.lr?)"]


@pytest.mark.parametrize("override, message", [
    ("train.lr=0.1", "train.lr: unknown key (did you mean optim.lr?)"),  # the key in another section
    ("train.l2=0.001", "train.l2: unknown key (did you mean regularization.l2?)"),
    ("train.dropout=0.2", "train.dropout: unknown key (did you mean model.dropout?)"),
    ("train.epoch=3", "train.epoch: unknown key (did you mean train.epochs?)"),  # spelling
    ("regularisation.l2=0.001", "regularisation: unknown section (did you mean regularization.l2?)"),
    ("optimizer.lr=0.1", "optimizer: unknown section (did you mean optim.lr?)"),
    ("nosuch.thing=1", "nosuch: unknown section"),  # nothing close: no guess
])
def test_a_mistyped_key_gets_the_key_it_was_likely_meant_to_be(override, message):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    assert str(e.value) == message


def test_a_mistyped_yaml_key_and_serve_arg_get_a_suggestion(tmp_path):
    from deepindex.config import validate_as

    f = tmp_path / "c.yaml"
    f.write_text("train:\n  lr: 0.1\n")
    with pytest.raises(ConfigError, match=r"^train\.lr: unknown key \(did you mean optim\.lr\?\)$"):
        load_config(f)
    f.write_text("optimizer:\n  lr: 0.1\n")
    with pytest.raises(ConfigError, match=r"^optimizer: unknown section \(did you mean optim\?\)$"):
        load_config(f)
    from serving.schemas import ServeArgs

    with pytest.raises(ConfigError) as e:
        validate_as(ServeArgs, {"reload_interval": 5}, prefix="args.")
    assert str(e.value) == "args.reload_interval: unknown key (did you mean args.reload_interval_s?)"


def test_local_paths_are_made_absolute_where_the_command_runs(tmp_path, monkeypatch):
    """A recipe's `data.root: photos` names the folder beside the command: trials (each in a folder of its
    own), the checkpoint and a later `deepindex evaluate` from elsewhere must all read that one."""
    from pathlib import Path

    monkeypatch.chdir(tmp_path)
    recipe = tmp_path / "sub" / "train.yaml"
    recipe.parent.mkdir()
    recipe.write_text("data:\n  dataset: manifest\n  root: photos\n  manifest: photos/tags.csv\n")
    cfg = load_config(recipe, ["data.label_filter=audit/report", "model.weights=~/w.pth", "ray.storage_path=results"])
    assert cfg.data.root == str(tmp_path / "photos") and cfg.data.manifest == str(tmp_path / "photos" / "tags.csv")
    assert cfg.data.label_filter == str(tmp_path / "audit" / "report")
    assert cfg.model.weights == str(Path.home() / "w.pth") and cfg.ray.storage_path == str(tmp_path / "results")
    kept = load_config(None, ["data.root=/data/photos", "data.label_filter=runs:/abc123",
                              "ray.storage_path=s3://bucket/results", "data.cache_dir=gs://b/cache"])
    assert (kept.data.root, kept.data.label_filter, kept.ray.storage_path, kept.data.cache_dir) == (
        "/data/photos", "runs:/abc123", "s3://bucket/results", "gs://b/cache")
    assert load_config(None).data.root is None


def test_overrides_read_as_a_user_means_them():
    """Found on review: values were YAML whatever the key, so text keys lost what follows a '#' or were
    refused when they looked like numbers, dates or booleans; 010 was eight; data.augment= (empty, "off"
    by the field's own comment) was refused; channels of 0 and an infinite lr passed; and a section given
    as a mapping replaced the whole section, resetting what the config file set."""
    cfg = load_config(None, ["data.root=/data/photos #2", "ray.name=007", "tracking.experiment=no",
                             "tracking.run_name=2024-06-01", "model.weights=~/w.pth", "train.seed=010",
                             "data.augment="])
    assert (cfg.data.root, cfg.ray.name, cfg.tracking.experiment, cfg.tracking.run_name) == (
        "/data/photos #2", "007", "no", "2024-06-01")
    assert cfg.model.weights.endswith("/w.pth") and cfg.train.seed == 10 and cfg.data.augment == ()
    assert load_config(None, ["tracking.run_name=null", "data.root=~"]).tracking.run_name is None
    for bad, message in (("model.channels=[32,0]", "model.channels: Input should be greater than 0"),
                         ("model.mlp_hidden=[-1]", "model.mlp_hidden: Input should be greater than 0"),
                         ("optim.lr=.inf", "optim.lr: Input should be a finite number"),
                         ("optim.lr=.nan", "optim.lr: Input should be a finite number")):
        with pytest.raises(ConfigError, match=rf"^{re.escape(message)}"):
            load_config(None, [bad])


def test_a_section_given_as_a_mapping_sets_its_keys_and_keeps_the_rest(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("data:\n  dataset: digits\n  train_size: 500\noptim:\n  name: adamw\n")
    cfg = load_config(f, ["data={seed: 3}", "optim={lr: 0.01}"])
    assert (cfg.data.dataset, cfg.data.train_size, cfg.data.seed) == ("digits", 500, 3)
    assert (cfg.optim.name, cfg.optim.lr) == ("adamw", 0.01)
    with pytest.raises(ConfigError, match=r"^data\.sed: unknown key \(did you mean data\.seed\?\)"):
        load_config(f, ["data={sed: 3}"])
    f.write_bytes(b"data:\n  root: \xff\xfe\n")
    with pytest.raises(ConfigError, match=rf"^config: {re.escape(str(f))} is not UTF-8 text"):
        load_config(f, [])


def test_multistep_milestones_inside_the_warm_up_are_refused():
    """Found on review: the milestones are shifted by the warm-up, so one at its end fired at once (the whole
    warm-up at lr / factor) and one before it never fired."""
    for bad in ("[2,4]", "[1,6]"):
        with pytest.raises(ConfigError, match=r"^schedule\.milestones: \[\d, \d\] must come after the warm-up "
                                              r"\(schedule\.warmup_epochs=2\)"):
            load_config(None, ["schedule.policy=multistep", "schedule.warmup_epochs=2", f"schedule.milestones={bad}"])
    load_config(None, ["schedule.policy=multistep", "schedule.warmup_epochs=2", "schedule.milestones=[3,6]"])
    load_config(None, ["schedule.policy=step", "schedule.warmup_epochs=7"])  # milestones (6, 9): not used


def test_the_default_storage_path_is_the_environments_then_the_state_folders(tmp_path, monkeypatch):
    """k8s sets DEEPINDEX_STORAGE_PATH to the shared volume's folder: a command given no ray.storage_path
    (a sweep named again, tracking sync, promote) finds the jobs' runs there."""
    from deepindex.paths import state_dir
    from deepindex.train.trainer import STORAGE_ENV, storage_path

    monkeypatch.delenv(STORAGE_ENV, raising=False)
    assert storage_path(load_config(None, [])) == str(state_dir() / "ray_results")
    monkeypatch.setenv(STORAGE_ENV, str(tmp_path / "shared"))
    assert storage_path(load_config(None, [])) == str(tmp_path / "shared")
    assert storage_path(load_config(None, [f"ray.storage_path={tmp_path / 'mine'}"])) == str(tmp_path / "mine")
    monkeypatch.setenv(STORAGE_ENV, "s3://bucket/runs")
    assert storage_path(load_config(None, [])) == "s3://bucket/runs"


def test_weight_decay_is_adamws_and_refused_with_sgd() -> None:
    """optim.weight_decay is AdamW's decoupled decay; with SGD it was ignored without a word."""
    with pytest.raises(ConfigError, match=r"^optim.weight_decay: AdamW's decoupled decay; SGD takes regularization.l2"):
        load_config(None, ["optim.weight_decay=0.01"])
    assert load_config(None, ["optim.name=adamw", "optim.weight_decay=0.01"]).optim.weight_decay == 0.01


def test_val_and_test_fractions_that_leave_nothing_to_train_are_refused_by_the_config(capsys):
    """Found on review: each fraction was bounded alone, so 0.5 + 0.5 passed validation and failed only after Ray
    started, as "too few items"."""
    from deepindex.cli import main

    for val, test in (("0.5", "0.5"), ("0.7", "0.4")):
        with pytest.raises(ConfigError, match=rf"^data\.test_fraction: data\.val_fraction \+ data\.test_fraction must "
                                              rf"be < 1 \({val} \+ {test} leaves no item to train\)$"):
            load_config(None, [f"data.val_fraction={val}", f"data.test_fraction={test}"])
    assert main(["train", "data.val_fraction=0.5", "data.test_fraction=0.5"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "deepindex train: error: data.test_fraction: data.val_fraction + data.test_fraction must be < 1 "
        "(0.5 + 0.5 leaves no item to train)"]
    cfg = load_config(None, ["data.val_fraction=0.45", "data.test_fraction=0.5"])
    assert (cfg.data.val_fraction, cfg.data.test_fraction) == (0.45, 0.5)


def test_dotted_keys_in_a_config_file_are_read_as_the_command_lines_are(tmp_path):
    """Found on review: a sweep file's keys are dotted (tune_configs/*.yaml), so users write a train config the
    same way, and `data.root: /x` at the top level was refused as an unknown key, with no suggestion."""
    f = tmp_path / "c.yaml"
    f.write_text("data.dataset: digits\noptim.lr: 0.01\ndata:\n  seed: 3\ntrain.epochs: 2\n")
    cfg = load_config(f, ["train.epochs=3"])
    assert (cfg.data.dataset, cfg.data.seed, cfg.optim.lr, cfg.train.epochs) == ("digits", 3, 0.01, 3)
    assert load_config(f).train.epochs == 2  # set in the file, dotted: the digits recipe's 4 does not apply
    assert load_config(f).model.channels == (16, 32, 64)  # what the file leaves out: the recipe's
    for text, message in (
        ("data.rooot: /x\n", "data.rooot: unknown key (did you mean data.root?)"),
        ("train.lr: 0.1\n", "train.lr: unknown key (did you mean optim.lr?)"),
        ("optimizer.lr: 0.1\n", "optimizer: unknown section (did you mean optim?)"),
        ("nosuch.thing: 1\n", "nosuch: unknown section"),
        # The same key both ways in one file: one of the two would be lost without a word.
        ("data.root: /a\ndata:\n  root: /b\n", f"data.root: set twice in {f} (as data.root and in its section data); "
                                               "keep one"),
        ("data:\n  root: /b\ndata.root: /a\n", f"data.root: set twice in {f} (as data.root and in its section data); "
                                               "keep one"),
    ):
        f.write_text(text)
        with pytest.raises(ConfigError) as e:
            load_config(f)
        assert str(e.value) == message
