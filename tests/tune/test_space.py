"""Search spaces: the shipped files load; bad spaces are refused with the key at fault."""
from pathlib import Path

import pytest

from deepindex.config import ConfigError, load_config
from deepindex.tune.space import SPACES, load_space, parse_space, shipped_spaces

ROOT = Path(__file__).resolve().parents[2]
GOOD_SPACE = {"optim.lr": {"loguniform": [0.001, 0.1]}}


@pytest.mark.parametrize("name, keys", [
    ("default", {"optim.lr", "model.dropout", "regularization.l1", "regularization.l2", "schedule.policy"}),
    ("smoke", {"optim.lr", "model.dropout", "regularization.l2", "schedule.policy"}),
])
def test_shipped_spaces_load(name, keys):
    """By name from any folder (the package's copy), or by the repository's tune_configs/ path: the same file."""
    spec = load_space(name)
    assert spec.path == str(SPACES / f"{name}.yaml") == load_space(f"{name}.yaml").path
    assert load_space(ROOT / "tune_configs" / f"{name}.yaml").raw == spec.raw
    assert keys <= set(spec.space)
    assert spec.space["regularization.l2"].kind == "loguniform"
    from ray.tune.search.sample import Domain

    space = spec.param_space()
    assert all(isinstance(v, Domain) for v in space.values())
    assert spec.settings.scheduler == "asha"


@pytest.mark.parametrize("space, message", [
    ({"optim.lrr": {"uniform": [0.1, 0.2]}}, "space.optim.lrr: unknown key (did you mean optim.lr?)"),
    ({"optim.lr": {"loguniform": [0.1, 0.1]}}, "space.optim.lr: empty range"),
    ({"model.dropout": {"uniform": [0.5, 0.2]}}, "space.model.dropout: empty range"),
    ({"schedule.policy": {"choice": []}}, "space.schedule.policy: empty choice"),
    ({"regularization.l1": {"loguniform": [0.0, 1e-3]}}, "space.regularization.l1: loguniform needs low > 0"),
    ({"model.dropout": {"uniform": [0.0, 1.5]}}, "space.model.dropout: 1.5 is not a valid value"),
    ({"schedule.policy": {"choice": ["step", "linear"]}}, "space.schedule.policy: 'linear' is not a valid value"),
    ({"optim.lr": {"normal": [0, 1]}}, "space.optim.lr: expected one of"),
    ({"optim": {"choice": [1]}}, "space.optim: unknown key"),
    # Found on review: integer bounds passed, and every trial failed on its draw (3.4 epochs of step).
    ({"schedule.step_size": {"uniform": [2, 5]}}, "space.schedule.step_size: uniform draws real numbers, "
                                                  "schedule.step_size takes integers: use {randint: [low, high]}"),
    ({"train.epochs": {"loguniform": [2, 8]}}, "space.train.epochs: loguniform draws real numbers"),
])
def test_bad_space_names_the_key(space, message):
    with pytest.raises(ConfigError) as e:
        parse_space({"space": space})
    assert str(e.value).startswith(message), str(e.value)


@pytest.mark.parametrize("raw, message", [
    ({"space": GOOD_SPACE, "tune": {"serach": "optuna"}}, "tune.serach: unknown key (did you mean tune.search?)"),
    ({"space": {"optim.lr": {"grid": [0.1, 0.2]}}, "tune": {"search": "optuna"}},
     "space.optim.lr: grid is not supported"),
    ({"space": GOOD_SPACE, "tune": {"grace_period": 50}}, "tune.grace_period:"),
    ({"space": GOOD_SPACE, "base": {"overrides": {"optim.lrr": 1}}}, "optim.lrr: unknown key"),
    ({"space": {}}, "space: needs at least one"),
    ({"spaces": GOOD_SPACE}, "spaces: unknown section"),
])
def test_bad_sweep_settings_are_refused(raw, message):
    with pytest.raises(ConfigError) as e:
        parse_space(raw)
    assert str(e.value).startswith(message), str(e.value)


def test_seed_defaults_runs_the_base_values_first():
    """`make demo`'s sweep starts from the defaults: they are the first point Tune evaluates."""
    from deepindex.tune.driver import _searcher

    spec = load_space(ROOT / "tune_configs" / "smoke.yaml")
    assert spec.settings.seed_defaults
    point = spec.default_point()
    assert point == {"optim.lr": 0.05, "schedule.policy": "step", "model.dropout": 0.3, "regularization.l2": 5e-4}
    search, _ = _searcher(spec, "val_map", "max", 4)
    assert search._points_to_evaluate == [point]
    # A base value outside the space cannot be the first trial.
    with pytest.raises(ConfigError) as e:
        parse_space({"space": {"optim.lr": {"loguniform": [0.1, 0.5]}}, "tune": {"seed_defaults": True}})
    assert str(e.value).startswith("space.optim.lr: the base value 0.05 is outside loguniform [0.1, 0.5]")


def test_base_overrides_and_randint_bounds_inclusive():
    spec = parse_space({"base": {"overrides": {"train.epochs": 3}},
                        "space": {"regularization.l2_start_epoch": {"randint": [0, 2]}}})
    assert spec.base.train.epochs == 3 and spec.max_epochs == 3
    dom = spec.param_space()["regularization.l2_start_epoch"]
    assert {dom.sample() for _ in range(200)} == {0, 1, 2}


def test_cli_refuses_a_bad_space_with_one_line(tmp_path, capsys):
    from deepindex.cli import main

    bad = tmp_path / "bad.yaml"
    bad.write_text("space:\n  optim.lr: {loguniform: [0.1, 0.01]}\n")
    assert main(["tune", "--space", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "deepindex tune: error: space.optim.lr: empty range [0.1, 0.01]"


def test_a_recipe_replaces_the_spaces_base_and_overrides_apply_on_top(tmp_path):
    """`deepindex tune --space smoke --config RECIPE key=value`: the trials start from the recipe (its dataset,
    not smoke's digit-scenes base), the dotted overrides on top; the space and its settings are smoke's."""
    recipe = tmp_path / "train.yaml"
    recipe.write_text("data:\n  dataset: digits\ntrain:\n  epochs: 3\n  batch_size: 16\n")
    spec = load_space("smoke", ["train.batch_size=8"], config=recipe)
    assert spec.base.data.dataset == "digits" and spec.base.train.epochs == 3 and spec.base.train.batch_size == 8
    assert spec.base.model.channels == load_space("smoke", config=recipe).base.model.channels != [16, 32, 64]
    assert set(spec.space) == set(load_space("smoke").space) and spec.settings.num_samples == 4
    with pytest.raises(ConfigError, match=r"^config: no such file .*nope\.yaml$"):
        load_space("smoke", config=tmp_path / "nope.yaml")


def test_tune_overrides_set_the_sweep_settings_a_recipe_may_need(tmp_path, capsys):
    """A recipe whose learning rate lies outside smoke's range cannot be smoke's first trial; the error says
    which setting, and `tune.seed_defaults=false` on the command line sets it (any `tune.` key does)."""
    from deepindex.cli import main

    recipe = tmp_path / "train.yaml"
    recipe.write_text("data:\n  dataset: digits\noptim:\n  lr: 0.003\n")
    with pytest.raises(ConfigError, match=r"base value 0\.003 is outside .* tune\.seed_defaults=false leaves it out"):
        load_space("smoke", config=recipe)
    spec = load_space("smoke", ["tune.seed_defaults=false", "tune.num_samples=2", "train.epochs=1"], config=recipe)
    assert not spec.settings.seed_defaults and spec.settings.num_samples == 2 and spec.base.train.epochs == 1
    assert spec.settings.search == "random"  # the space's other settings stay
    for bad, message in [("tune.seed_defaults=maybe", "tune.seed_defaults: must be true or false, got 'maybe'"),
                         ("tune.serach=optuna", "tune.serach: unknown key (did you mean tune.search?)")]:
        assert main(["tune", "--space", "smoke", "--config", str(recipe), "tune.seed_defaults=false", bad]) == 2
        assert capsys.readouterr().err.strip() == f"deepindex tune: error: {message}"


def test_cli_names_the_shipped_spaces_when_a_space_is_not_found(tmp_path, capsys, monkeypatch):
    from deepindex.cli import main

    monkeypatch.chdir(tmp_path)  # no tune_configs/ here
    names = ", ".join(shipped_spaces())
    assert names == "default, noisy_labels, smoke"
    for space in ("smokey", "tune_configs/smoke.yaml"):
        assert main(["tune", "--space", space]) == 2
        err = capsys.readouterr().err.strip()
        assert err == f"deepindex tune: error: space: no such file {space} (or a shipped space: {names})"
    bad = tmp_path / "train.yaml"
    bad.write_text("train:\n  epochz: 3\n")
    assert main(["tune", "--config", str(bad)]) == 2
    assert capsys.readouterr().err.strip().startswith("deepindex tune: error: train.epochz")


def test_a_constant_key_is_left_out_of_the_seed_trial_and_its_check():
    """Found on review: a ``value`` key (every trial's constant) in a space with tune.seed_defaults was
    checked against the base value (refused unless equal) and put in the seed point, where Optuna, which
    has no dimension for it, failed inside Tuner.fit after the sweep's MLflow run and state were made."""
    from ray.tune.search.optuna import OptunaSearch

    from deepindex.tune.driver import _searcher

    raw = {"space": {"optim.lr": {"loguniform": [0.01, 0.1]}, "train.epochs": {"value": 4}},
           "tune": {"seed_defaults": True, "search": "optuna", "num_samples": 2}}
    spec = parse_space(raw)  # the base's train.epochs is not 4: not refused
    assert spec.default_point() == {"optim.lr": 0.05}
    search, _ = _searcher(spec, "val_map", "max", 2)
    assert isinstance(search, OptunaSearch)
    assert search.set_search_properties("val_map", "max", spec.param_space())
    first = search.suggest("t0")  # the seed trial: the base lr; Tune adds the constant to every trial
    assert first == {"optim.lr": 0.05} and spec.param_space()["train.epochs"] == 4


def test_the_optuna_search_proposes_reproducibly_inside_the_space_and_logs_to_the_file(capsys):
    """The default space's model-based search (Optuna TPE, seeded by tune.seed): the same proposals for the
    same seed, each inside the space; in a command's quiet console optuna's own lines (`[I ...] A new study
    created in memory`) go to the log file, not the terminal."""
    from ray.tune.search.optuna import OptunaSearch

    from deepindex import console
    from deepindex.tune.driver import _searcher

    spec = load_space("default", settings={"num_samples": 4})
    assert spec.settings.search == "optuna"
    path = console.setup("unit-optuna")
    try:
        proposals = []
        for _ in range(2):
            search, limit = _searcher(spec, "val_map", "max", 3)
            assert isinstance(search, OptunaSearch) and limit == 3  # Tune caps a Searcher's concurrency
            assert search.set_search_properties("val_map", "max", spec.param_space())
            proposals.append([search.suggest(f"t{i}") for i in range(3)])
    finally:
        console.teardown()
    assert proposals[0] == proposals[1] and len({str(p) for p in proposals[0]}) == 3
    for point in proposals[0]:
        assert 0.005 <= point["optim.lr"] <= 0.2 and 0.0 <= point["model.dropout"] <= 0.5
        assert point["schedule.policy"] in ("step", "exponential", "cosine", "plateau")
        assert isinstance(point["schedule.step_size"], int) and 2 <= point["schedule.step_size"] <= 5
    assert "study created" not in capsys.readouterr().err
    assert "A new study created in memory" in path.read_text()


def test_a_trial_that_ran_its_own_epochs_was_not_stopped_early():
    """Found on review: with train.epochs searched, a 4-epoch trial of a [4, 8] choice that ran its 4 epochs
    was reported stopped early (and its run closed KILLED), against the space's largest value."""
    spec = parse_space({"space": {"train.epochs": {"choice": [4, 8]}, "optim.lr": {"uniform": [0.01, 0.1]}}})
    assert spec.max_epochs == 8 and spec.epochs_of({"train.epochs": 4, "optim.lr": 0.05}) == 4
    plain = parse_space({"space": GOOD_SPACE})
    assert plain.epochs_of({}) == plain.base.train.epochs == plain.max_epochs


def test_a_relative_base_config_is_the_space_files_neighbour_even_with_a_namesake_here(tmp_path, monkeypatch):
    """Found on review: a relative ``base.config`` was looked up in the current folder first, so a same-named
    file there replaced the one next to the space file."""
    (tmp_path / "spaces").mkdir()
    (tmp_path / "spaces" / "train.yaml").write_text("optim:\n  lr: 0.03\n")
    (tmp_path / "train.yaml").write_text("optim:\n  lr: 0.07\n")
    space = tmp_path / "spaces" / "s.yaml"
    space.write_text("base:\n  config: train.yaml\nspace:\n  model.dropout: {uniform: [0.1, 0.2]}\n")
    monkeypatch.chdir(tmp_path)
    assert load_space(str(space)).base.optim.lr == 0.03


def test_a_sweep_or_an_audit_on_a_remote_storage_path_is_refused_in_one_line():
    """Found on review: a sweep's folders were Path(storage) / name, and Path("s3://b/r") is the local
    "s3:/b/r": every trial trained to a local folder and the sweep then marked each one FAILED."""
    from deepindex.audit.run import run_audit
    from deepindex.tune.driver import run_sweep

    message = (r"^ray\.storage_path: a {} keeps its state, trials and reports in a folder every node shares, "
               r"not at s3://bucket/runs \(training runs alone take a remote URL\)")
    spec = load_space("smoke", overrides=["ray.storage_path=s3://bucket/runs"])
    with pytest.raises(ConfigError, match=message.format("sweep")):
        run_sweep(spec, name="s")
    with pytest.raises(ConfigError, match=message.format("audit")):
        run_audit(load_config(None, ["ray.storage_path=s3://bucket/runs", "data.label_noise=0.3"]), name="a")


def test_a_sweep_on_a_cluster_that_grows_runs_the_concurrency_asked_for(monkeypatch: pytest.MonkeyPatch):
    """Found on review: concurrency was sized from the resources free at the start, so a KubeRay sweep, which
    starts on the smallest cluster, ran one trial at a time whatever --max-concurrent said.  The cluster's
    answers are stand-ins here (the test is about trial_concurrency, their caller): 2.5 CPUs free, a trial
    needing 2.5."""
    from deepindex import cluster
    from deepindex.tune.driver import trial_concurrency

    monkeypatch.setattr(cluster, "wait_for_resources", lambda need, what: {"CPU": 2.5})
    spec = load_space("smoke", settings={"max_concurrent_trials": 6, "trial_driver_cpus": 0.5},
                      overrides=["ray.num_workers=2", "ray.cpus_per_worker=1"])
    monkeypatch.setattr(cluster, "fixed_size", lambda: False)  # an autoscaler adds nodes for queued trials
    assert trial_concurrency(spec) == 6
    monkeypatch.setattr(cluster, "fixed_size", lambda: True)  # this machine's cluster: what is free
    assert trial_concurrency(spec) == 1
    auto = load_space("smoke", settings={"max_concurrent_trials": 0, "trial_driver_cpus": 0.5},
                      overrides=["ray.num_workers=2", "ray.cpus_per_worker=1"])
    monkeypatch.setattr(cluster, "fixed_size", lambda: False)
    assert trial_concurrency(auto) == 1  # 0: sized to what is free


def test_a_grid_with_seed_defaults_is_refused_in_one_line():
    """Tune counted the seed point as a sample with the grid keys fixed: a 6-combination grid ran one trial
    (found on review)."""
    with pytest.raises(ConfigError, match=r"^tune.seed_defaults: a grid \(train.label_smoothing\) runs every "
                                          r"combination once already; a seed trial would replace it with one"):
        parse_space({"space": {"train.label_smoothing": {"grid": [0.0, 0.1]}}, "tune": {"seed_defaults": True}})
    assert parse_space({"space": {"train.label_smoothing": {"grid": [0.0, 0.1]}}}).space  # without: the grid


def test_a_diverged_epoch_is_the_worst_score_to_tune_and_no_trials_best():
    """A model that diverged scores NaN (train.engine).  ASHA compares NaN as never below its cutoff, so the
    trial was never stopped, and min/max kept a NaN that came first as the sweep's best (found on review)."""
    from types import SimpleNamespace

    from deepindex.tune.driver import EPOCHS_DONE, _best_reported, tune_metrics

    nan = float("nan")
    got = tune_metrics({"epoch": 2, "val_map": nan, "val_loss": nan})
    assert got["val_map"] == 0.0 and got[EPOCHS_DONE] == 3 and got["val_loss"] != got["val_loss"]
    assert tune_metrics({"epoch": 0, "val_top1_error": float("inf")})["val_top1_error"] == 1.0
    assert tune_metrics({"epoch": 0, "val_top1_error": 0.25})["val_top1_error"] == 0.25
    assert got["diverged"] == 1 and "diverged" not in tune_metrics({"epoch": 0, "val_map": 0.5})
    diverged = SimpleNamespace(metrics_dataframe=None, metrics={"val_top1_error": nan})
    assert _best_reported(diverged, "val_top1_error", "min") is None
    # What Tune recorded: the worst score, marked.  Every epoch diverged: no best; some did: the others'.
    import pandas as pd

    marked = tune_metrics({"epoch": 1, "val_top1_error": nan})
    all_bad = SimpleNamespace(metrics_dataframe=pd.DataFrame([marked]), metrics=marked)
    assert _best_reported(all_bad, "val_top1_error", "min") is None
    first_fine = pd.DataFrame([tune_metrics({"epoch": 0, "val_top1_error": 0.4}), marked])
    assert _best_reported(SimpleNamespace(metrics_dataframe=first_fine, metrics=marked), "val_top1_error", "min") == 0.4
    fine = SimpleNamespace(metrics_dataframe=None, metrics={"val_top1_error": 0.03})
    assert _best_reported(fine, "val_top1_error", "min") == 0.03


def test_a_dataset_on_the_command_line_brings_its_recipe_as_deepindex_train_does(tmp_path):
    """Found on review: `deepindex tune data.dataset=digits` applied the override after the base config was built,
    so the digits recipe (DATASET_RECIPES) that `deepindex train data.dataset=digits` starts from was left out:
    its trials trained the default 20k canvases with the default ConvNet.  Now the recipe comes in under the
    space's own base (default.yaml sets train.epochs: 8), as it comes in under a training YAML."""
    spec = load_space("default", ["data.dataset=digits"])
    assert spec.base.flat() == load_config(None, ["data.dataset=digits", "train.epochs=8"]).flat()
    assert spec.base.data.train_size == 14000 and spec.base.model.channels == (16, 32, 64)
    assert spec.base.schedule.step_size == 3 and spec.base.train.epochs == 8
    # smoke's base sets its own size, model and epochs: they stay; what it leaves unset is the recipe's.
    smoke = load_space("smoke", ["data.dataset=digits"]).base
    assert (smoke.data.dataset, smoke.data.train_size, smoke.train.epochs) == ("digits", 6000, 5)
    assert smoke.optim.lr == 0.02 and smoke.schedule.step_size == 3
    # --config FILE: the same, the file's values over the recipe's.
    recipe = tmp_path / "train.yaml"
    recipe.write_text("train:\n  epochs: 3\n")
    with_file = load_space("smoke", ["data.dataset=digits", "tune.seed_defaults=false"], config=recipe).base
    assert with_file.flat() == load_config(recipe, ["data.dataset=digits"]).flat()
    assert with_file.train.epochs == 3 and with_file.data.train_size == 14000 and with_file.optim.lr == 0.02


def test_a_sweeps_base_is_command_line_over_space_file_over_recipe_over_defaults(tmp_path):
    """The order every layer of a sweep's base config takes, the recipe brought in by a command-line dataset;
    a section the space file gives as a mapping keeps its other keys when the command line sets one of them."""
    space = tmp_path / "s.yaml"
    space.write_text("base:\n  overrides:\n    train.epochs: 6\n    optim.lr: 0.03\n"
                     "    data: {seed: 3, train_size: 5000}\n"
                     "space:\n  model.dropout: {uniform: [0.1, 0.2]}\n")
    base = load_space(str(space), ["data.dataset=digits", "data.train_size=3000", "schedule.step_size=2"]).base
    assert base.data.dataset == "digits"
    assert base.data.train_size == 3000 and base.schedule.step_size == 2  # the command line's, over file and recipe
    assert base.train.epochs == 6 and base.optim.lr == 0.03 and base.data.seed == 3  # the file's, over the recipe
    assert base.model.channels == (16, 32, 64) and base.model.embed_dim == 64  # the recipe's, over the defaults
    assert base.data.val_size == 2000 and base.model.dropout == 0.3  # the defaults
    # A section on the command line, a dotted key in the file: the command line's value, the file's others.
    spec = load_space(str(space), ["data={train_size: 4000}"])
    assert (spec.base.data.train_size, spec.base.data.seed, spec.base.data.dataset) == (4000, 3, "digit-scenes")
    bad = tmp_path / "bad.yaml"
    bad.write_text("base:\n  overrides: [train.epochs=6]\nspace:\n  model.dropout: {uniform: [0.1, 0.2]}\n")
    with pytest.raises(ConfigError, match=r"^base\.overrides: expected a mapping"):
        load_space(str(bad))


@pytest.mark.parametrize("override, message", [
    ("tune.max_concurrent_trials=abc", "tune.max_concurrent_trials: must be an integer >= 0 (0: sized to the cluster), "
                                       "got 'abc'"),
    ("tune.max_concurrent_trials=1.5", "tune.max_concurrent_trials: must be an integer >= 0"),
    ("tune.max_concurrent_trials=true", "tune.max_concurrent_trials: must be an integer >= 0"),
    ("tune.max_concurrent_trials=-1", "tune.max_concurrent_trials: must be an integer >= 0"),
    ("tune.trial_driver_cpus=abc", "tune.trial_driver_cpus: must be a number > 0 (the CPUs of each trial's driver), "
                                   "got 'abc'"),
    ("tune.trial_driver_cpus=true", "tune.trial_driver_cpus: must be a number > 0"),
    ("tune.trial_driver_cpus=0", "tune.trial_driver_cpus: must be a number > 0"),
    ("tune.trial_driver_cpus=.inf", "tune.trial_driver_cpus: must be a number > 0"),
    ("tune.seed=abc", "tune.seed: must be an integer in [0, 4294967295], or null for an unseeded search, got 'abc'"),
    ("tune.seed=true", "tune.seed: must be an integer"),
    ("tune.seed=1.5", "tune.seed: must be an integer"),
    ("tune.seed=-1", "tune.seed: must be an integer"),
    ("tune.num_samples=true", "tune.num_samples: must be an integer >= 1, got True"),
    ("tune.grace_period=true", "tune.grace_period: must be an integer in [1, 5] (train.epochs), got True"),
    ("tune.reduction_factor=true", "tune.reduction_factor: must be an integer >= 2, got True"),
])
def test_an_ill_typed_sweep_setting_is_refused_naming_it(override, message):
    """Found on review: an ill-typed `tune.*` setting was a TypeError naming no key (`'<' not supported`), or was
    taken and failed after Ray had started (a seed of 'abc' in the searcher)."""
    with pytest.raises(ConfigError) as e:
        load_space("smoke", [override])
    assert str(e.value).startswith(message) and "\n" not in str(e.value), str(e.value)


@pytest.mark.parametrize("name", [5, "", "  ", ["s"]])
def test_a_sweep_name_is_text(name):
    """Found on review: `name: 5` was taken, and the sweep's folder, Path(storage) / 5, failed after Ray started."""
    with pytest.raises(ConfigError, match=r"^tune\.name: must be the sweep's name, a non-empty text"):
        load_space("smoke", settings={"name": name})


@pytest.mark.parametrize("name", ["a/b", "../x", ".."])
def test_a_sweep_name_is_one_folder(name):
    """Found on review: `tune.name=a/b` was refused only after Ray started (`--name a/b` at parsing)."""
    with pytest.raises(ConfigError, match=r"^tune\.name: .* must be 1-100 characters of A-Z a-z 0-9 \. _ -"):
        load_space("smoke", [f"tune.name={name}"])


def test_sweep_settings_from_the_command_line_read_as_typed(capsys):
    """`tune.name=5` (and `007`) names the sweep 5 (007), as `ray.name=007` names a run; an empty seed unseeds the
    search; the command line refuses an ill-typed setting in one line, before Ray starts."""
    from deepindex.cli import main

    assert load_space("smoke", ["tune.name=5"]).settings.name == "5"
    assert load_space("smoke", ["tune.name=007"]).settings.name == "007"
    assert load_space("smoke", ["tune.name="]).settings.name is None
    got = load_space("smoke", ["tune.seed=", "tune.trial_driver_cpus=1", "tune.max_concurrent_trials=0"]).settings
    assert got.seed is None and got.trial_driver_cpus == 1 and got.max_concurrent_trials == 0
    assert main(["tune", "--space", "smoke", "tune.max_concurrent_trials=abc"]) == 2
    assert capsys.readouterr().err.strip() == ("deepindex tune: error: tune.max_concurrent_trials: must be an integer "
                                               ">= 0 (0: sized to the cluster), got 'abc'")
