"""Train-time augmentation: by name and strength, train split only, sweepable like any key."""
import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import v2

from deepindex.config import ConfigError, load_config
from deepindex.data import build_splits
from deepindex.data.augment import build_augment


def test_names_and_strength_build_torchvision_v2_ops():
    assert build_augment((), 0.5, 32) is None
    t = build_augment(("trivial", "crop", "flip", "jitter"), 0.5, 32)
    assert [type(o) for o in t.transforms] == [v2.RandomResizedCrop, v2.RandomHorizontalFlip, v2.ColorJitter,
                                               v2.TrivialAugmentWide]  # a fixed order, whatever the order given
    crop = build_augment(("crop",), 1.0, 32).transforms[0]
    assert crop.scale == (pytest.approx(0.4), 1.0)
    assert build_augment(("randaugment",), 0.5, 32).transforms[0].magnitude == 15
    jitter = build_augment(("jitter",), 0.25, 32).transforms[0]
    assert jitter.brightness == pytest.approx((0.9, 1.1)) and jitter.hue is None  # no hue: colours keep their names
    with pytest.raises(ValueError, match=r"^data\.augment: unknown augmentation 'mixup'"):
        build_augment(("mixup",), 0.5, 32)


def test_config_takes_comma_names_and_refuses_unknown_ones():
    assert load_config(None, ["data.augment=crop,flip"]).data.augment == ("crop", "flip")
    assert load_config(None, ["data.augment=none"]).data.augment == ()
    with pytest.raises(ConfigError, match=r"^data\.augment"):
        load_config(None, ["data.augment=crop,mixup"])
    with pytest.raises(ConfigError, match=r"^data\.augment_strength"):
        load_config(None, ["data.augment_strength=2"])


def test_a_tune_space_sweeps_augmentation_like_any_key():
    from deepindex.tune.space import parse_space

    spec = parse_space({"space": {"data.augment": {"choice": ["none", "crop,flip", "crop,flip,trivial"]},
                                  "data.augment_strength": {"uniform": [0.2, 0.8]}}})
    assert spec.space["data.augment"].args == ["none", "crop,flip", "crop,flip,trivial"]
    with pytest.raises(ConfigError, match=r"^space\.data\.augment"):
        parse_space({"space": {"data.augment": {"choice": ["crop", "cutmix"]}}})


@pytest.mark.timeout(120)
def test_only_the_training_split_is_augmented(tmp_path):
    root = tmp_path / "imgs"
    rng = np.random.default_rng(0)
    for i in range(20):
        (root / ("a" if i % 2 else "b")).mkdir(parents=True, exist_ok=True)
        pixels = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(root / ("a" if i % 2 else "b") / f"{i}.png")
    cfg = load_config(None, ["data.dataset=image-folder", f"data.root={root}", "data.augment=crop,flip,jitter",
                             "data.augment_strength=1"])
    sp = build_splits(cfg.data)
    torch.manual_seed(0)
    assert not torch.equal(sp.train[0][0], sp.train[0][0])  # a new draw on every read
    assert torch.equal(sp.val[0][0], sp.val[0][0]) and torch.equal(sp.test[0][0], sp.test[0][0])
    plain = build_splits(cfg.data, train_augment=False)  # what scoring a checkpoint on "train" uses
    assert torch.equal(plain.train[0][0], plain.train[0][0])


@pytest.mark.timeout(120)
def test_in_memory_digit_scenes_are_augmented_too():
    cfg = load_config(None, ["data.train_size=8", "data.val_size=4", "data.test_size=4", "data.augment=flip,crop",
                             "data.augment_strength=1"])
    sp = build_splits(cfg.data)
    x0 = [sp.train[0][0] for _ in range(8)]
    assert any(not torch.equal(x0[0], x) for x in x0[1:]) and x0[0].shape == (1, 32, 32)
    # Un-normalise, augment on uint8, normalise: an identity op would return the input (to 1/255).
    plain = build_splits(cfg.data, train_augment=False)
    from deepindex.data.augment import AugmentedTensorDataset

    ident = AugmentedTensorDataset(plain.train, v2.Compose([v2.Identity()]), plain.stats)
    assert torch.allclose(ident[0][0], plain.train[0][0], atol=1.0 / 255 / min(plain.stats.std) + 1e-6)
