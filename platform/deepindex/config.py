"""One typed configuration for every step, loaded from YAML with dotted overrides.

Unknown or ill-typed keys are a :class:`ConfigError` that names the dotted key, so
``deepindex train optim.lrr=0.1`` fails with ``optim.lrr: unknown key (did you mean optim.lr?)``.  The resolved
config travels as a plain dict (``to_dict``) into checkpoints, MLflow params and Tune
search spaces, which address the same dotted keys.
"""
from __future__ import annotations

import difflib
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Literal, TypeGuard, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, PositiveInt, ValidationError, field_validator, model_validator


class ConfigError(ValueError):
    """A configuration problem; the message starts with the dotted key at fault."""


# Datasets read from image files (the ones data.pipeline=ray decodes once and caches).
FILE_DATASETS = ("image-folder", "manifest")
# Datasets generated in memory: exactly data.train_size train items.
GENERATED = ("digit-scenes", "digits")


class _Section(BaseModel):
    # frozen: a resolved config is a value; extra=forbid: typos are errors, not silence; no inf or nan in
    # a float (optim.lr=.inf passed every bound).
    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True, allow_inf_nan=False)


class DataConfig(_Section):
    dataset: Literal["digit-scenes", "digits", "image-folder", "manifest", "cifar10", "cifar100"] = "digit-scenes"
    root: str | None = None  # image folder root, manifest root or CIFAR folder
    manifest: str | None = None  # CSV or JSONL of path + tags (multi-label)
    concepts: str | None = None  # concept list file for a manifest (one per line)
    # Unset (None) = from the preset, else inferred from the data (deepindex.data.inspect), so a
    # folder of colour photos is not silently read as 32 px grayscale.  The resolved values
    # travel in the checkpoint, so serving applies the same preset.
    image_size: int | None = Field(None, ge=8, le=1024)
    channels: Literal[1, 3] | None = None
    # Eval/serving transform (deepindex.data.transforms.PRESETS): digit = squash to S x S;
    # photo = RGB, 224, resize to S/0.875 + centre crop; fit = shorter side to S + centre crop.
    preset: Literal["digit", "photo", "fit"] | None = None
    normalize: Literal["dataset", "imagenet"] | None = None  # None: imagenet with pretrained weights
    unknown_tags: Literal["error", "ignore", "add"] = "error"  # manifest tags not in the concept list
    # Train-time augmentation (deepindex.data.augment), names joined by commas: crop, flip, vflip,
    # jitter, hue, trivial, randaugment; "none" or empty = off.  Never applied at eval or serving.
    augment: tuple[Literal["crop", "flip", "vflip", "jitter", "hue", "trivial", "randaugment"], ...] = ()
    augment_strength: float = Field(0.5, ge=0, le=1)
    train_size: int = Field(20000, ge=1)
    val_size: int = Field(2000, ge=1)
    test_size: int = Field(2000, ge=1)
    max_digits: int = Field(4, ge=1, le=4)  # digit-scenes: 1..max_digits glyphs per scene
    val_fraction: float = Field(0.1, gt=0, lt=1)  # image-folder/manifest/CIFAR: held out from train
    test_fraction: float = Field(0.1, gt=0, lt=1)
    seed: int = 0
    num_workers: int = Field(0, ge=0)  # DataLoader worker processes (data.pipeline=local)
    # How training reads a file collection (image-folder, manifest): ray = Ray Data, decoded once into a
    # cache under ray.storage_path and sharded across the Train workers (deepindex.data.ingest);
    # local = every worker decodes its items itself (a DataLoader).  auto = ray for file collections;
    # the digit datasets and CIFAR are tensors in memory and always local.
    pipeline: Literal["auto", "ray", "local"] = "auto"
    # Where data.pipeline=ray keeps the decoded collections (deepindex.data.cache); unset: <ray.storage_path>/
    # data_cache.  A sweep or an audit sets it to its own storage path's, where its trials' runs live one
    # folder down: every run, trial and fold on one storage path decodes a collection once.
    cache_dir: str | None = None
    # Noisy web labels (deepindex.data.noise): the fraction of train and val items whose tag set
    # is corrupted (a tag dropped, added or swapped; exclusive classes: another class given); the
    # test split stays clean.
    label_noise: float = Field(0.0, ge=0, le=1)
    label_noise_seed: int = 0
    # An audit (`deepindex data audit`): its folder, suspects.csv or runs:/<MLflow run id>; its
    # suspect train labels are flipped (`flip`: the cleaned view) or their items left out (`drop`).
    label_filter: str | None = None
    label_filter_mode: Literal["flip", "drop"] = "flip"
    # K-fold cross-validation of the train split (the audit sets these): train on every fold but
    # cv_fold; 0 = off.  Folds are a permutation of the train items seeded by data.seed.
    cv_folds: int = Field(0, ge=0, le=100)
    cv_fold: int = Field(0, ge=0)

    @field_validator("augment", mode="before")
    @classmethod
    def _augment_names(cls, v: Any) -> Any:
        # "crop,flip" on the command line and in Tune choices; "none" or "" for no augmentation.
        if isinstance(v, str):
            return tuple(n.strip() for n in v.split(",") if n.strip() and n.strip() != "none")
        return () if v is None else v  # data.augment= (empty) on the command line: off


class ModelConfig(_Section):
    name: str = "convnet"
    channels: tuple[PositiveInt, ...] = (32, 64, 128)  # convnet: one block per entry, each halves H and W
    convs_per_block: int = Field(1, ge=1, le=4)
    activation: Literal["relu", "prelu", "tanh", "sigmoid"] = "relu"
    pool: Literal["max", "avg"] = "max"
    # Global pooling before the embedding: max answers "is the concept anywhere?", which suits
    # multi-label scenes where a concept fills one corner; avg is the classic choice.
    global_pool: Literal["max", "avg"] = "max"
    embed_dim: int = Field(128, ge=2)
    dropout: float = Field(0.3, ge=0, lt=1)
    stochastic_depth: float = Field(0.0, ge=0, lt=1)  # resnets: drop probability of the last block
    weights: str | None = None  # local state_dict file for transfer learning; never downloaded
    # torchvision backbones: ImageNet weights from torch's cache ($TORCH_HOME/hub/checkpoints).
    pretrained: Literal["none", "imagenet"] = "none"
    # none | backbone (everything but the head: a linear probe) | a module name such as layer2:
    # that module and every layer before it are frozen (deepindex.models.transfer).
    freeze: str = "none"
    mlp_input_size: int = Field(32, ge=1, le=256)  # mlp: pixels are average-pooled to this square
    mlp_hidden: tuple[PositiveInt, ...] = (512, 256)  # mlp: hidden layer widths


class OptimConfig(_Section):
    name: Literal["sgd", "adamw"] = "sgd"
    lr: float = Field(0.05, gt=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    nesterov: bool = True
    weight_decay: float = Field(0.0, ge=0)  # AdamW's decoupled decay; SGD uses regularization.l2
    backbone_lr_mult: float = Field(1.0, gt=0)  # lr of everything but the head = lr * this


class ScheduleConfig(_Section):
    policy: Literal["none", "step", "multistep", "exponential", "cosine", "plateau"] = "step"
    step_size: int = Field(4, ge=1)  # step: constant for step_size epochs, then / factor
    factor: float = Field(10.0, gt=1)  # divide by this at each step (step, multistep, plateau)
    milestones: tuple[int, ...] = (6, 9)
    gamma: float = Field(0.9, gt=0, le=1)  # exponential: lr *= gamma each epoch
    min_lr: float = Field(0.0, ge=0)  # cosine floor
    patience: int = Field(1, ge=0)  # plateau
    warmup_epochs: int = Field(0, ge=0)


class RegularizationConfig(_Section):
    l1: float = Field(0.0, ge=0)
    l1_start_epoch: int = Field(2, ge=0)
    l2: float = Field(5e-4, ge=0)
    l2_start_epoch: int = Field(2, ge=0)


class TrainConfig(_Section):
    epochs: int = Field(8, ge=1)
    batch_size: int = Field(128, ge=1)  # global: split across workers
    seed: int = 0
    threads: int = Field(0, ge=0)  # torch threads per worker; 0 = cpus_per_worker
    # Noise-robust losses (sweepable): label smoothing (BCE: targets pulled towards 1/2; CE:
    # torch's), and for multi-label bootstrapping (Reed et al. 2015): targets mixed with the
    # model's own detached predictions, so a confident model is not pulled towards a wrong tag.
    label_smoothing: float = Field(0.0, ge=0, lt=0.5)
    bootstrap: Literal["none", "soft", "hard"] = "none"
    bootstrap_beta: float = Field(0.8, gt=0, le=1)  # weight of the given label in the bootstrap target
    unfreeze_epoch: int | None = Field(None, ge=1)  # with model.freeze: train every layer from this epoch
    # GPU path: autocast dtype (fp16 adds a GradScaler), NHWC tensors.  Both also run on CPU.
    amp: Literal["none", "bf16", "fp16"] = "none"
    channels_last: bool = False


class RayConfig(_Section):
    num_workers: int = Field(2, ge=1)
    use_gpu: bool = False
    cpus_per_worker: float = Field(1.0, gt=0)
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"
    storage_path: str | None = None  # default: <state dir>/ray_results
    name: str | None = None  # same name + storage path = resume
    max_failures: int = Field(2, ge=-1)
    keep_checkpoints: int = Field(2, ge=1)

    def worker_group(self) -> dict[str, float]:
        """What a run's Train workers hold together (Train V2's controller holds nothing)."""
        need = {"CPU": self.num_workers * self.cpus_per_worker}
        if self.use_gpu:
            need["GPU"] = float(self.num_workers)
        return need


class TrackingConfig(_Section):
    enabled: bool = True
    experiment: str = "deepindex"
    registered_model: str = "deepindex"
    run_name: str | None = None
    # `promote`: besides beating the champion on the test split, the candidate's query-by-example
    # mAP@10 (its best descriptor x metric, on a held-out gallery of promote_qbe_gallery items:
    # digit-scenes from the test glyphs, else its own test split) must reach this.  None: no floor.
    promote_min_qbe_map: float | None = Field(None, ge=0, le=1)
    promote_qbe_gallery: int = Field(2000, ge=50)


class AuditConfig(_Section):
    """``deepindex data audit``: K-fold out-of-fold predictions, then cleanlab's label-issue filter."""

    folds: int = Field(5, ge=2, le=20)
    # cleanlab's filter_by (Confident Learning); prune_by_noise_rate flags, per concept, as many
    # labels as the estimated noise rate says are wrong, lowest-margin first.
    filter_by: Literal["prune_by_noise_rate", "prune_by_class", "both", "confident_learning",
                       "predicted_neq_given"] = "prune_by_noise_rate"
    max_concurrent: int = Field(0, ge=0)  # folds trained at once; 0 = all of them
    # The Tune trial that waits on a fold's Train run (then predicts its fold): no CPU by
    # default, so the folds' Train workers get them all (it reserves memory instead).
    fold_driver_cpus: float = Field(0.0, ge=0)
    grid_items: int = Field(24, ge=1, le=256)  # most suspect items drawn in suspects.png


class Config(_Section):
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    optim: OptimConfig = OptimConfig()
    schedule: ScheduleConfig = ScheduleConfig()
    regularization: RegularizationConfig = RegularizationConfig()
    train: TrainConfig = TrainConfig()
    ray: RayConfig = RayConfig()
    tracking: TrackingConfig = TrackingConfig()
    audit: AuditConfig = AuditConfig()

    @model_validator(mode="after")
    def _check(self) -> Config:
        from deepindex.models import is_registered, registered_models  # late: models import torch

        if not is_registered(self.model.name):
            raise ValueError(
                f"model.name: unknown model {self.model.name!r}; registered: {', '.join(registered_models())}"
            )
        if self.train.batch_size < self.ray.num_workers:
            raise ValueError("train.batch_size: smaller than ray.num_workers")
        multilabel = self.data.dataset in ("digit-scenes", "manifest")
        if self.data.pipeline == "ray" and self.data.dataset not in FILE_DATASETS:
            raise ValueError(f"data.pipeline: ray reads image files ({', '.join(FILE_DATASETS)}); "
                             f"{self.data.dataset} is built in memory (data.pipeline=auto or local)")
        if self.optim.name == "sgd" and self.optim.weight_decay > 0:
            # It was ignored without a word (found on review).
            raise ValueError("optim.weight_decay: AdamW's decoupled decay; SGD takes regularization.l2 (and "
                             "regularization.l2_start_epoch) instead")
        if self.train.bootstrap != "none" and not multilabel:
            raise ValueError("train.bootstrap: the bootstrapping loss is for multi-label datasets")
        s = self.schedule
        if s.policy == "multistep" and s.warmup_epochs and any(m <= s.warmup_epochs for m in s.milestones):
            # The main policy starts after the warm-up: such a milestone fired at once (the whole warm-up at
            # lr / factor) or never (found on review).
            raise ValueError(f"schedule.milestones: {list(s.milestones)} must come after the warm-up "
                             f"(schedule.warmup_epochs={s.warmup_epochs}): each > {s.warmup_epochs}")
        if self.data.cv_folds == 1 or (self.data.cv_folds and self.data.cv_fold >= self.data.cv_folds):
            raise ValueError(f"data.cv_fold: fold {self.data.cv_fold} of {self.data.cv_folds} folds "
                             "(cv_folds is 0 or >= 2; cv_fold < cv_folds)")
        if self.data.val_fraction + self.data.test_fraction >= 1:
            # Each is bounded alone; together they failed only after Ray started, as "too few items".
            raise ValueError(f"data.test_fraction: data.val_fraction + data.test_fraction must be < 1 "
                             f"({self.data.val_fraction:g} + {self.data.test_fraction:g} leaves no item to train)")
        if self.model.pretrained != "none":
            from deepindex.models.transfer import pretrained_weights

            if pretrained_weights(self.model.name) is None:
                raise ValueError(f"model.pretrained: {self.model.name} has no torchvision ImageNet weights")
        if self.train.unfreeze_epoch is not None:
            if self.model.freeze == "none":
                raise ValueError("train.unfreeze_epoch: needs model.freeze (nothing is frozen)")
            if self.train.unfreeze_epoch >= self.train.epochs:
                raise ValueError(f"train.unfreeze_epoch: {self.train.unfreeze_epoch} is not below "
                                 f"train.epochs ({self.train.epochs})")
        return self

    # ---- conversions -------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def flat(self) -> dict[str, Any]:
        """Dotted keys -> values, e.g. {"optim.lr": 0.05}: MLflow params, Tune spaces."""
        return flatten(self.to_dict())

    @property
    def multilabel(self) -> bool:
        return self.data.dataset in ("digit-scenes", "manifest")

    def override(self, overrides: dict[str, Any] | list[str]) -> Config:
        """A new config with dotted overrides applied (strings are parsed as YAML scalars)."""
        if isinstance(overrides, list):
            overrides = parse_overrides(overrides)
        return from_dict(_merge(self.to_dict(), overrides))


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``key=value`` items -> {key: value}: a value is read as YAML (numbers, lists, booleans), except for
    a config key that takes text, whose value is the text as typed (found on review: YAML read
    ``data.root=/data/photos #2`` as /data/photos, and refused ``tracking.experiment=no`` and
    ``ray.name=007``), and an integer key's decimal digits with a leading zero (YAML 1.1 reads ``010``
    as eight); an empty value unsets the key."""
    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"{item}: an override must look like key=value (e.g. optim.lr=0.1)")
        key, raw = item.split("=", 1)
        key = key.strip()
        kind = field_kind(key)
        if raw == "" or (kind is str and raw.strip() in ("null", "Null", "NULL", "~")):
            out[key] = None
        elif kind is str:
            out[key] = raw
        elif kind is int and re.fullmatch(r"[+-]?0[0-9]+", raw.strip()):
            out[key] = int(raw.strip(), 10)  # train.seed=010 is ten (YAML 1.1 reads eight)
        else:
            try:
                out[key] = yaml.safe_load(raw)
            except yaml.YAMLError:
                out[key] = raw
    return out


def field_kind(key: str) -> type | None:
    """``str`` or ``int`` when the dotted config ``key`` is a field of that type (optional or not), else None."""
    cls: Any = Config
    *sections, name = key.split(".")
    for part in sections:
        field = cls.model_fields.get(part) if _is_section(cls) else None
        if field is None or not _is_section(field.annotation):
            return None
        cls = field.annotation
    field = cls.model_fields.get(name) if _is_section(cls) else None
    if field is None:
        return None
    return next((t for t in (str, int) if field.annotation in (t, t | None)), None)


def _merge(base: dict[str, Any], dotted: dict[str, Any]) -> dict[str, Any]:
    out = _deepcopy(base)
    for key, value in _sections_as_keys(base, dotted).items():
        parts = key.split(".")
        if not all(parts):
            raise ConfigError(f"{key or '(empty key)'}: not a dotted config key (e.g. optim.lr)")
        node = out
        for i, part in enumerate(parts[:-1]):
            if not isinstance(node.get(part), dict):
                raise ConfigError(f"{'.'.join(parts[: i + 1])}: unknown section{did_you_mean(key, model_keys(Config))}")
            node = node[part]
        if parts[-1] not in node:
            raise ConfigError(f"{key}: unknown key{did_you_mean(key, model_keys(Config))}")
        if isinstance(node[parts[-1]], dict) and not isinstance(value, dict):
            raise ConfigError(f"{key}: is a section, not a value")
        node[parts[-1]] = value
    return out


def _sections_as_keys(base: dict[str, Any], dotted: dict[str, Any]) -> dict[str, Any]:
    """A section given as a mapping (``data={seed: 3}``) -> its dotted keys (``data.seed``): it sets those
    keys and keeps the rest of the section (found on review: it replaced the whole section, resetting what
    the config file had set)."""
    out: dict[str, Any] = {}
    for key, value in dotted.items():
        node: Any = base
        for part in key.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, dict) and isinstance(value, dict) and value:
            out.update({f"{key}.{k}": v for k, v in flatten(value).items()})
        else:
            out[key] = value
    return out


def model_keys(cls: type[BaseModel], prefix: str = "") -> list[str]:
    """Every dotted key of a pydantic model, its sections included."""
    out: list[str] = []
    for name, field in cls.model_fields.items():
        out.append(prefix + name)
        if _is_section(field.annotation):
            out += model_keys(field.annotation, f"{prefix}{name}.")
    return out


def _is_section(annotation: Any) -> TypeGuard[type[BaseModel]]:
    return isinstance(annotation, type) and issubclass(annotation, BaseModel)


def _all_sections(cls: type[BaseModel]) -> bool:
    return all(_is_section(f.annotation) for f in cls.model_fields.values())


def did_you_mean(key: str, known: Iterable[str]) -> str:
    """`` (did you mean optim.lr?)`` for a mistyped dotted key, or "" when nothing is close.  The same
    last part in another section comes first (``train.lr`` -> ``optim.lr``), then spelling
    (``optim.lrr`` -> ``optim.lr``, ``regularisation.l2`` -> ``regularization.l2``)."""
    known = [k for k in known if k != key]
    leaf = key.rsplit(".", 1)[-1]
    hits = [k for k in known if k.rsplit(".", 1)[-1] == leaf and "." in k] if "." in key else []
    if not hits:
        hits = difflib.get_close_matches(key, known, n=1, cutoff=0.8)
    if not hits:  # a mistyped section name alone (a YAML file's top level): compare it with the sections
        hits = difflib.get_close_matches(key, [k for k in known if "." not in k], n=1, cutoff=0.7)
    return f" (did you mean {' or '.join(hits[:3])}?)" if hits else ""


def _deepcopy(d: dict[str, Any]) -> dict[str, Any]:
    return {k: _deepcopy(v) if isinstance(v, dict) else v for k, v in d.items()}


def from_dict(d: dict[str, Any] | None) -> Config:
    """Validate a nested dict; the error names the first dotted key at fault."""
    return validate_as(Config, d or {})


M = TypeVar("M", bound=BaseModel)


def validate_as(cls: type[M], d: Any, prefix: str = "") -> M:
    """``cls.model_validate(d)``; a ValidationError becomes one line, a ConfigError naming the first
    dotted key at fault (after ``prefix``, e.g. ``args.`` for a Serve application's args)."""
    try:
        return cls.model_validate(d)
    except ValidationError as e:
        err = e.errors()[0]
        loc = ".".join(str(p) for p in err["loc"] if not isinstance(p, int))
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            # A top-level name of a model made of sections (Config's data, optim, ...) is a section.
            kind = "section" if "." not in loc and _all_sections(cls) else "key"
            msg = f"unknown {kind}" + did_you_mean(prefix + loc, [prefix + k for k in model_keys(cls)])
        elif msg.startswith("Value error, "):
            msg = msg[len("Value error, "):]
            if ": " in msg and not loc:  # our own validators already start with the key
                raise ConfigError(msg) from None
        raise ConfigError(f"{prefix}{loc}: {msg}" if loc else f"{prefix.rstrip('.') or 'config'}: {msg}") from None


def read_yaml(path: str | Path, label: str) -> Any:
    """A YAML file's content; a missing or malformed file is a ConfigError starting with ``label``."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{label}: no such file {p}")
    try:
        return yaml.safe_load(p.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{label}: {p} is not valid YAML ({e.__class__.__name__})") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{label}: {p} is not UTF-8 text (byte {e.start})") from None


# A dataset's own recipe: what `deepindex train data.dataset=NAME` starts from instead of the defaults,
# under whatever the config file and the overrides set.  digits (one glyph per canvas) reaches its
# 1.5 % top-1 floor with a quarter of the default ConvNet's compute: 4 epochs of 14k canvases, the
# lr / 10 after the third (test top-1 error 0.60-0.90 % at seeds 0-4, 2 DDP workers, 2026-12-06;
# 6 epochs of 20k reached 0.60-0.90 %, and 3 epochs of 20k 0.65-1.30 %), so the whole command
# runs in under a minute on 2 cores.
DATASET_RECIPES: dict[str, dict[str, Any]] = {
    "digits": {"model.channels": [16, 32, 64], "model.embed_dim": 64, "optim.lr": 0.02, "train.epochs": 4,
               "schedule.step_size": 3, "data.train_size": 14000},
}


# Keys that name local files or folders.  A relative one is relative to where the command runs: it is
# made absolute when the config is loaded, so Tune's trials (each in a folder of its own), the
# checkpoint, the MLflow params and a later ``deepindex evaluate`` from another folder name the same
# files.  URIs (``s3://``, ``runs:/``) stay as they are.
PATH_KEYS = ("data.root", "data.manifest", "data.concepts", "data.label_filter", "data.cache_dir",
             "model.weights", "ray.storage_path")


def absolute_paths(cfg: Config) -> Config:
    """``cfg`` with its relative (or ``~``) local paths made absolute against the working directory."""
    flat = cfg.flat()
    updates: dict[str, str] = {}
    for key in PATH_KEYS:
        value = flat.get(key)
        if not isinstance(value, str) or not value:
            continue
        if "\x00" in value:  # no file name holds one; the OS would refuse it later, mid-run
            raise ConfigError(f"{key}: {value!r} holds a NUL character, which no path can")
        if ":/" in value:
            continue
        p = Path(value).expanduser()
        if not p.is_absolute() or value.startswith("~"):
            updates[key] = str(p.resolve())
    return cfg.override(updates) if updates else cfg


def _file_sections(loaded: dict[Any, Any], path: Path) -> dict[Any, Any]:
    """A config file's mapping with its top-level dotted keys (``data.root: /x``) set in their sections, as
    overrides are: written so (the way tune_configs/*.yaml and the command line write keys), they were
    refused as unknown keys.  A key set both dotted and in its section is an error: one of the two
    would be silently lost.  A dotted key that is no config key fails validation with a suggestion."""
    out = {k: _deepcopy(v) if isinstance(v, dict) else v for k, v in loaded.items()
           if not (isinstance(k, str) and "." in k)}
    for key, value in loaded.items():
        if not (isinstance(key, str) and "." in key):
            continue
        parts = key.split(".")
        if not all(parts):
            raise ConfigError(f"{key}: not a dotted config key (e.g. optim.lr)")
        node = out
        for i, part in enumerate(parts[:-1]):
            if node.get(part) is None:
                node[part] = {}
            if not isinstance(node[part], dict):
                section = ".".join(parts[: i + 1])
                raise ConfigError(f"{key}: {path} also sets {section} to a value, not a section")
            node = node[part]
        if parts[-1] in node:
            raise ConfigError(f"{key}: set twice in {path} (as {key} and in its section {'.'.join(parts[:-1])}); "
                              "keep one")
        node[parts[-1]] = value
    return out


def load_config(path: str | Path | None = None, overrides: list[str] | dict[str, Any] | None = None) -> Config:
    """Defaults <- the dataset's recipe (``DATASET_RECIPES``) <- YAML file <- dotted overrides; local paths
    absolute (:func:`absolute_paths`).  The file holds sections (``optim: {lr: 0.01}``), dotted keys
    (``optim.lr: 0.01``, as a sweep file's and the command line's), or both (:func:`_file_sections`)."""
    base: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        loaded = read_yaml(p, "config")
        if not isinstance(loaded, dict):
            raise ConfigError(f"config: {p} must hold a mapping of sections")
        base = _file_sections(loaded, p)
    cfg = from_dict(base)
    dotted = parse_overrides(overrides) if isinstance(overrides, list) else dict(overrides or {})
    if dotted:
        cfg = cfg.override(dotted)
    given = flatten(_sections_as_keys(cfg.to_dict(), dotted)).keys() | flatten(base).keys()
    unset = {k: v for k, v in DATASET_RECIPES.get(cfg.data.dataset, {}).items() if k not in given}
    return absolute_paths(cfg.override(unset) if unset else cfg)
