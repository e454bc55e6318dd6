"""Train-time augmentation: torchvision.transforms.v2 ops chosen by name, scaled by one strength.

``data.augment`` names the ops (``crop,flip,jitter``; a Tune search space addresses it like
any key: ``data.augment: {choice: ["none", "crop,flip", "crop,flip,trivial"]}``) and
``data.augment_strength`` in [0, 1] scales those that have a magnitude.  They run on the
uint8 (C, S, S) image the eval preset produced, before normalisation, on the training split
only: evaluation, indexing and serving never see them.  Applying them after the preset (not
to the original file) is what lets a decoded, cached collection be augmented per epoch.

| name | op | strength s |
|---|---|---|
| crop | RandomResizedCrop(S, scale=(1 - 0.6 s, 1), ratio=(1/(1 + s/3), 1 + s/3)) | how much is cut and stretched |
| flip / vflip | RandomHorizontalFlip / RandomVerticalFlip (p = 0.5) | - |
| jitter | ColorJitter(brightness, contrast, saturation = 0.4 s); no hue | amplitude |
| hue | ColorJitter(hue = 0.25 s) | amplitude (changes what "red" means: off for colour concepts) |
| trivial | TrivialAugmentWide | - (one random op, random magnitude) |
| randaugment | RandAugment(num_ops=2, magnitude = round(30 s)) | magnitude |

TrivialAugment and RandAugment include Solarize/Posterize/Equalize, which shift colours: they
suit shape and texture concepts more than colour ones.
"""
from __future__ import annotations

from collections.abc import Callable, Sized

import torch
from torch.utils.data import Dataset

from deepindex.data.transforms import NormStats, normalize

# uint8 (C, S, S) -> uint8 (C, S, S); a v2.Compose is one.
Transform = Callable[[torch.Tensor], torch.Tensor]

AUGMENTS = ("crop", "flip", "vflip", "jitter", "hue", "trivial", "randaugment")  # also the order applied


def build_augment(names: tuple[str, ...] | list[str], strength: float, image_size: int) -> Transform | None:
    """A ``v2.Compose`` over uint8 (C, S, S) tensors, or None when ``names`` is empty (torchvision is
    not imported then: a second of a Train worker's start-up)."""
    unknown = [n for n in names if n not in AUGMENTS]
    if unknown:
        raise ValueError(f"data.augment: unknown augmentation {unknown[0]!r}; one of {', '.join(AUGMENTS)}")
    if not names:
        return None
    from torchvision.transforms import v2

    s = float(strength)
    factories = {
        # The aspect ratio range grows with s up to torchvision's 3/4..4/3: a stretched circle is an
        # ellipse, so shape concepts want a low strength.
        "crop": lambda: v2.RandomResizedCrop(image_size, scale=(1.0 - 0.6 * s, 1.0),
                                             ratio=(1.0 / (1.0 + s / 3), 1.0 + s / 3), antialias=True),
        "flip": lambda: v2.RandomHorizontalFlip(),
        "vflip": lambda: v2.RandomVerticalFlip(),
        "jitter": lambda: v2.ColorJitter(brightness=0.4 * s, contrast=0.4 * s, saturation=0.4 * s),
        "hue": lambda: v2.ColorJitter(hue=0.25 * s),
        "trivial": lambda: v2.TrivialAugmentWide(),
        "randaugment": lambda: v2.RandAugment(num_ops=2, magnitude=round(30 * s), num_magnitude_bins=31),
    }
    ops = [factories[n]() for n in AUGMENTS if n in set(names)]
    return v2.Compose(ops) if ops else None


def augment_unit(x: torch.Tensor, transform: Transform) -> torch.Tensor:
    """(C, S, S) float in [0, 1] -> augmented, same shape and range (through uint8, as files are)."""
    u8 = (x.clamp(0, 1) * 255.0).round().to(torch.uint8)
    return transform(u8).float().div_(255.0)


class AugmentedTensorDataset(Dataset[tuple[torch.Tensor, torch.Tensor]]):
    """A dataset of normalised in-memory images (the digit datasets), augmented on access.

    Undo the normalisation, augment the uint8 image, normalise again: the same ops and the
    same order as for files, whose uint8 pixels are augmented before normalising.
    """

    def __init__(self, base: Dataset[tuple[torch.Tensor, ...]], transform: Transform, stats: NormStats) -> None:
        self.base: Dataset[tuple[torch.Tensor, ...]] = base  # a label view may swap in a relabelled one
        self.transform, self.stats = transform, stats
        self._mean = torch.tensor(stats.mean).view(-1, 1, 1)
        self._std = torch.tensor(stats.std).view(-1, 1, 1)

    def __len__(self) -> int:
        base = self.base
        if not isinstance(base, Sized):
            raise TypeError(f"AugmentedTensorDataset: its base, a {type(base).__name__}, has no length")
        return len(base)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = self.base[i]
        unit = x * self._std + self._mean  # (C, S, S) in [0, 1]
        return normalize(augment_unit(unit, self.transform), self.stats), y
