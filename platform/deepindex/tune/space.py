"""Search spaces: YAML files over the same dotted keys as training configs.

The spaces shipped with deepindex live in ``deepindex/tune/spaces/`` (``tune_configs/`` in the
repository is that folder) and are named without their folder: ``deepindex tune --space smoke``.
A file has three sections::

    base:                     # the config every trial starts from (``--config FILE`` replaces it)
      config: null            # optional training YAML, relative to this file
      overrides: {train.epochs: 8}
    space:                    # dotted key -> one distribution
      optim.lr: {loguniform: [0.005, 0.2]}
      schedule.policy: {choice: [step, cosine]}
    tune:                     # how the sweep runs (see SweepSettings)
      num_samples: 12
      search: optuna

Distributions: ``choice`` / ``grid`` (a non-empty list), ``uniform`` / ``loguniform``
(``[low, high]``, low < high, loguniform needs low > 0), ``randint`` (``[low, high]``,
both included), ``value`` (a constant).  Every key must exist in the config, and both ends
of a range (and every choice) must be a valid value of that key: the error names the key.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from deepindex.config import (
    Config,
    ConfigError,
    did_you_mean,
    field_kind,
    load_config,
    parse_overrides,
    read_yaml,
)
from deepindex.restore import check_name

# The spaces that ship with the package, by name (``default``, ``smoke``, ``noisy_labels``).
SPACES = Path(__file__).resolve().parent / "spaces"
KINDS = ("choice", "grid", "uniform", "loguniform", "randint", "value")
_SECTIONS = ("base", "space", "tune")


@dataclass(frozen=True)
class Dist:
    kind: str
    args: Any  # list of values, [low, high], or a constant

    def to_tune(self) -> object:
        """A Tune search-space domain, a ``grid_search`` spec, or the constant itself (``value``)."""
        from ray import tune

        if self.kind == "choice":
            return tune.choice(list(self.args))
        if self.kind == "grid":
            return tune.grid_search(list(self.args))
        if self.kind == "uniform":
            return tune.uniform(*self.args)
        if self.kind == "loguniform":
            return tune.loguniform(*self.args)
        if self.kind == "randint":
            return tune.randint(self.args[0], self.args[1] + 1)  # tune's upper bound is exclusive
        return self.args

    def samples(self) -> list[Any]:
        """Values that must all be valid for the key: the ends of a range, every choice."""
        return list(self.args) if self.kind in ("choice", "grid", "uniform", "loguniform", "randint") else [self.args]


@dataclass(frozen=True)
class SweepSettings:
    num_samples: int = 8
    search: Literal["random", "grid", "optuna"] = "random"
    scheduler: Literal["asha", "fifo"] = "asha"
    grace_period: int = 1  # epochs before ASHA may stop a trial
    reduction_factor: int = 2
    max_concurrent_trials: int = 0  # 0: as many as the cluster's free CPUs/GPUs hold
    trial_driver_cpus: float = 0.5  # the Tune trial that drives a TorchTrainer (waits, then scores the test split)
    seed: int | None = 0
    promote: bool = True  # promote the best trial at the end of the sweep
    name: str | None = None
    # The first trial runs the base config's own values of the searched keys (Tune's
    # points_to_evaluate): a sweep then never ends worse than the defaults it started from.
    seed_defaults: bool = False


@dataclass(frozen=True)
class SweepSpec:
    path: str
    base: Config
    space: dict[str, Dist]
    settings: SweepSettings
    raw: dict[str, Any] = field(default_factory=dict)

    def param_space(self) -> dict[str, Any]:
        return {k: d.to_tune() for k, d in self.space.items()}

    def default_point(self) -> dict[str, Any]:
        """The base config's values of the searched keys: the first trial when ``tune.seed_defaults``.
        A ``value`` key is every trial's constant, not searched: left out (a searcher such as Optuna has no
        dimension for it, and the sweep died in Tuner.fit; found on review)."""
        flat = self.base.flat()
        return {k: list(flat[k]) if isinstance(flat[k], (list, tuple)) else flat[k]
                for k, d in self.space.items() if d.kind != "value"}

    @property
    def max_epochs(self) -> int:
        d = self.space.get("train.epochs")
        return int(max(d.samples())) if d is not None else self.base.train.epochs

    def epochs_of(self, params: dict[str, Any]) -> int:
        """The epochs a trial with ``params`` trains when nothing stops it (its own ``train.epochs`` when
        searched: a 4-epoch trial of a [4, 8] choice that ran 4 was not stopped early; found on review)."""
        return int(params.get("train.epochs", self.base.train.epochs))


def _dist(key: str, spec: Any) -> Dist:
    where = f"space.{key}"
    if not isinstance(spec, dict) or len(spec) != 1 or next(iter(spec)) not in KINDS:
        raise ConfigError(f"{where}: expected one of {{{', '.join(KINDS)}: ...}}, got {spec!r}")
    kind, args = next(iter(spec.items()))
    if kind in ("choice", "grid"):
        if not isinstance(args, list) or not args:
            raise ConfigError(f"{where}: empty {kind} (needs a non-empty list)")
    elif kind in ("uniform", "loguniform", "randint"):
        if not (isinstance(args, list) and len(args) == 2
                and all(isinstance(a, (int, float)) and not isinstance(a, bool) for a in args)):
            raise ConfigError(f"{where}: {kind} needs [low, high], got {args!r}")
        low, high = args
        if (low >= high) if kind != "randint" else (low > high):
            raise ConfigError(f"{where}: empty range [{low}, {high}]")
        if kind == "loguniform" and low <= 0:
            raise ConfigError(f"{where}: loguniform needs low > 0, got {low}")
        if kind == "randint" and not all(isinstance(a, int) for a in args):
            raise ConfigError(f"{where}: randint needs integer bounds, got {args!r}")
        args = [float(low), float(high)] if kind != "randint" else [int(low), int(high)]
    return Dist(kind, args)


def parse_space(raw: dict[str, Any], path: str = "<space>", overrides: list[str] | None = None,
                config: str | Path | None = None) -> SweepSpec:
    """Validate a loaded YAML dict; the first problem is a ConfigError naming its key.  ``config``: a
    training YAML every trial starts from instead of the space's ``base`` section (``overrides`` still
    apply on top), so one space sweeps any collection's recipe.  An override ``tune.KEY=VALUE`` sets the
    space's sweep setting instead (``tune.seed_defaults=false``)."""
    sweep_overrides = _sweep_overrides([o for o in overrides or [] if o.startswith("tune.")])
    # Parsed once, as `deepindex train` parses them; load_config then applies them over the base and the recipe.
    cli = parse_overrides([o for o in overrides or [] if not o.startswith("tune.")])
    if not isinstance(raw, dict):
        raise ConfigError(f"space: {path} must hold a mapping with sections {', '.join(_SECTIONS)}")
    for k in raw:
        if k not in _SECTIONS:
            raise ConfigError(f"{k}: unknown section (expected {', '.join(_SECTIONS)})")
    base_raw = raw.get("base") or {}
    if not isinstance(base_raw, dict) or set(base_raw) - {"config", "overrides"}:
        raise ConfigError("base: expected a mapping with `config` and/or `overrides`")
    if config is None:
        cfg_path = base_raw.get("config")
        if cfg_path and not Path(cfg_path).is_absolute():
            # Relative to the space file, as documented; the current folder only when the space file's folder
            # has no such file (a same-named file in the current folder was taken first; found on review).
            here = Path(path).parent / cfg_path
            cfg_path = str(here) if here.exists() or not Path(cfg_path).exists() else cfg_path
        file_overrides = base_raw.get("overrides") or {}
        if not isinstance(file_overrides, dict):
            raise ConfigError("base.overrides: expected a mapping of dotted keys to values (e.g. train.epochs: 8)")
        # One load_config, as `deepindex train` runs it: the dataset's recipe (DATASET_RECIPES) under the
        # space's base and the command line's overrides.  Applied after it, a `data.dataset=digits` on the
        # command line left the digits recipe out (found on review).  Precedence: command line > the
        # space's base.overrides > its base.config file > the recipe > the defaults.
        base = load_config(cfg_path, _layer(file_overrides, cli))
    else:
        base = load_config(config, cli)  # command line > the --config file > the recipe > the defaults

    flat = base.flat()
    space_raw = raw.get("space") or {}
    if not isinstance(space_raw, dict) or not space_raw:
        raise ConfigError("space: needs at least one dotted key with a distribution")
    space: dict[str, Dist] = {}
    for key, spec in space_raw.items():
        if key not in flat:
            raise ConfigError(f"space.{key}: unknown key{did_you_mean(key, flat)}")
        dist = _dist(key, spec)
        if dist.kind in ("uniform", "loguniform") and field_kind(key) is int:
            # Its bounds pass as integers, its draws (3.4) fail every trial (found on review).
            raise ConfigError(f"space.{key}: {dist.kind} draws real numbers, {key} takes integers: use "
                              f"{{randint: [low, high]}} or a choice")
        for v in dist.samples():
            try:
                base.override({key: v})
            except ConfigError as e:
                raise ConfigError(f"space.{key}: {v!r} is not a valid value ({e})") from None
        space[key] = dist

    tune_raw = raw.get("tune") or {}
    if not isinstance(tune_raw, dict):
        raise ConfigError("tune: expected a mapping")
    tune_raw = {**tune_raw, **sweep_overrides}
    allowed = SweepSettings.__dataclass_fields__
    for k in tune_raw:
        if k not in allowed:
            hint = did_you_mean(f"tune.{k}", [f"tune.{a}" for a in allowed])
            raise ConfigError(f"tune.{k}: unknown key{hint}")
    settings = SweepSettings(**tune_raw)
    _check_settings(settings, space, base)
    grid = [k for k, d in space.items() if d.kind == "grid"]
    if settings.seed_defaults and grid:
        # Tune counts the seed point as a sample with the grid keys fixed: one trial, not the grid
        # (found on review).  A grid runs every combination once, the base values' among them if it holds them.
        raise ConfigError(f"tune.seed_defaults: a grid ({', '.join(grid)}) runs every combination once already; "
                          "a seed trial would replace it with one (tune.seed_defaults=false)")
    if settings.seed_defaults:
        for key, dist in space.items():
            if dist.kind != "value":  # a constant: the seed trial takes it too
                _check_in_space(key, dist, flat[key])
    return SweepSpec(path, base, space, settings, raw)


# Sweep settings that take free text: on the command line their value is the text as typed (`tune.name=007`
# is the sweep 007, as `ray.name=007` is a run's; YAML read it as the number 7), an empty value or null unsets.
_TEXT_SETTINGS = ("name",)


def _sweep_overrides(items: list[str]) -> dict[str, Any]:
    """``tune.KEY=VALUE`` items -> {KEY: value}, a value read as :func:`parse_overrides` reads one."""
    out = {k.split(".", 1)[1]: v for k, v in parse_overrides(items).items()}
    for item in items:
        key, raw = item.split("=", 1)
        name = key.strip().split(".", 1)[1]
        if name in _TEXT_SETTINGS:
            out[name] = None if raw == "" or raw.strip() in ("null", "Null", "NULL", "~") else raw
    return out


def _layer(low: dict[str, Any], high: dict[str, Any]) -> dict[str, Any]:
    """Overrides ``high`` over ``low``, as one mapping for :func:`load_config`: a section both give as a
    mapping (``data: {seed: 3}``) is merged, and ``high``'s keys come after ``low``'s, so that a key one
    gives dotted and the other inside its section takes ``high``'s value."""
    out = dict(low)
    for key, value in high.items():
        below = out.pop(key, None)
        out[key] = _layer(below, value) if isinstance(below, dict) and isinstance(value, dict) else value
    return out


def _check_in_space(key: str, dist: Dist, value: Any) -> None:
    """``tune.seed_defaults`` runs the base value of every searched key: it must lie in the space."""
    if dist.kind in ("choice", "grid"):
        ok = value in dist.args or (isinstance(value, (list, tuple)) and list(value) in dist.args)
    elif dist.kind in ("uniform", "loguniform", "randint"):
        ok = isinstance(value, (int, float)) and dist.args[0] <= value <= dist.args[1]
    else:
        ok = value == dist.args
    if not ok:
        raise ConfigError(f"space.{key}: the base value {value!r} is outside {dist.kind} {dist.args} "
                          "(tune.seed_defaults runs it as the first trial; tune.seed_defaults=false leaves it out)")


def _integer(v: Any) -> bool:
    """An integer, not a bool (YAML's ``true`` is Python's 1)."""
    return isinstance(v, int) and not isinstance(v, bool)


def _check_settings(s: SweepSettings, space: dict[str, Dist], base: Config) -> None:
    """Every setting's type and range, each a one-line ConfigError naming ``tune.KEY``: an ill-typed one was a
    TypeError naming nothing (``tune.max_concurrent_trials=abc``), or was taken and failed after Ray started
    (``tune.name=5``, ``tune.seed=abc``; found on review)."""
    if not _integer(s.num_samples) or s.num_samples < 1:
        raise ConfigError(f"tune.num_samples: must be an integer >= 1, got {s.num_samples!r}")
    if s.search not in ("random", "grid", "optuna"):
        raise ConfigError(f"tune.search: must be random, grid or optuna, got {s.search!r}")
    if s.scheduler not in ("asha", "fifo"):
        raise ConfigError(f"tune.scheduler: must be asha or fifo, got {s.scheduler!r}")
    grids = [k for k, d in space.items() if d.kind == "grid"]
    if s.search == "optuna" and grids:
        raise ConfigError(f"space.{grids[0]}: grid is not supported by the optuna search (use choice)")
    if s.search == "grid" and not grids:
        raise ConfigError("tune.search: grid needs at least one `grid` distribution in space")
    epochs = space.get("train.epochs")
    max_t = int(max(epochs.samples())) if epochs else base.train.epochs
    if not _integer(s.grace_period) or not 1 <= s.grace_period <= max_t:
        raise ConfigError(
            f"tune.grace_period: must be an integer in [1, {max_t}] (train.epochs), got {s.grace_period!r}")
    if not _integer(s.reduction_factor) or s.reduction_factor < 2:
        raise ConfigError(f"tune.reduction_factor: must be an integer >= 2, got {s.reduction_factor!r}")
    if not _integer(s.max_concurrent_trials) or s.max_concurrent_trials < 0:
        raise ConfigError("tune.max_concurrent_trials: must be an integer >= 0 (0: sized to the cluster), "
                          f"got {s.max_concurrent_trials!r}")
    cpus = s.trial_driver_cpus
    if not (isinstance(cpus, (int, float)) and not isinstance(cpus, bool) and math.isfinite(cpus) and cpus > 0):
        raise ConfigError(f"tune.trial_driver_cpus: must be a number > 0 (the CPUs of each trial's driver), "
                          f"got {cpus!r}")
    if s.seed is not None and not (_integer(s.seed) and 0 <= s.seed < 2**32):
        # Optuna's sampler and the random search's generator (numpy) take 0 .. 2**32 - 1.
        raise ConfigError(f"tune.seed: must be an integer in [0, {2**32 - 1}], or null for an unseeded search, "
                          f"got {s.seed!r}")
    if s.name is not None and not (isinstance(s.name, str) and s.name.strip()):
        raise ConfigError(f"tune.name: must be the sweep's name, a non-empty text (quote a number in YAML: "
                          f"name: '5'), or null for a fresh one, got {s.name!r}")
    if s.name is not None:  # one folder under the storage path, checked before Ray starts (a/b: nested folders)
        check_name(s.name, "tune.name")
    for flag in ("promote", "seed_defaults"):
        if not isinstance(getattr(s, flag), bool):
            raise ConfigError(f"tune.{flag}: must be true or false, got {getattr(s, flag)!r}")


def shipped_spaces() -> list[str]:
    """The names of the spaces that ship with the package."""
    return sorted(f.stem for f in SPACES.glob("*.yaml"))


def space_file(space: str | Path) -> Path:
    """A space's file: ``space`` itself where that file exists, else the shipped space of that name."""
    p = Path(space)
    if p.is_file():
        return p
    shipped = SPACES / (p.name if p.suffix == ".yaml" else f"{p.name}.yaml")
    if p.name == str(space) and shipped.is_file():  # a bare name (`smoke`, `smoke.yaml`), not a missing path
        return shipped
    raise ConfigError(f"space: no such file {space} (or a shipped space: {', '.join(shipped_spaces())})")


def load_space(path: str | Path, overrides: list[str] | None = None,
               settings: dict[str, Any] | None = None, config: str | Path | None = None) -> SweepSpec:
    """Read and validate a space (a file, or a shipped space's name: :func:`space_file`); ``config``
    replaces its ``base`` section, ``overrides`` apply to the base config, ``settings`` to the
    ``tune`` section (e.g. ``{"num_samples": 4}``)."""
    p = space_file(path)
    raw = read_yaml(p, "space")
    if settings and isinstance(raw, dict):
        raw = {**raw, "tune": {**(raw.get("tune") or {}), **settings}}
    return parse_space(raw, str(p), overrides, config)
