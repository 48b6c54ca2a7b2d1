"""The ``data`` config group: the dataset root, how it is prepared, and how training reads it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from amint_dist.config import Config, ConfigError, as_number, option
from amint_dist.data.device_transform import rand_augment_options
from amint_dist.data.images import DEFAULT_MAX_PIXELS
from amint_dist.data.splits import validate_fractions
from amint_dist.data.subset import SubsetRule

POOL_SPLITS = ("members", "probe", "heldout")  # splits a reference run's subset may draw from


@dataclass
class SubsetConfig(Config):
    """A reference run: its task + MINT-positive samples are a key-hash subset of a pool (data/subset.py)."""

    section = "data.subset"

    pool: list = option(["members", "heldout"], help="splits the subset draws from (must include members)")
    fraction: float = option(0.5, lo=0, hi=1, lo_open=True, help="share of the pool read: hash_unit(seed, 'subset:'+key) < fraction")
    seed: int | None = option(None, lo=0, help="the reference run's subset seed (one per run); null: no subset")

    def __post_init__(self) -> None:
        if "validation" in self.pool:
            raise self.error("pool", "validation is the tuning share: neither training nor the audit may read it")
        bad = [s for s in self.pool if s not in POOL_SPLITS]
        if bad or "members" not in self.pool or len(set(self.pool)) != len(self.pool):
            raise self.error("pool", f"expected distinct splits of {list(POOL_SPLITS)}, members among them")

    def rule(self) -> SubsetRule:
        return SubsetRule(self.seed, self.fraction)


# validation: carved from the end of heldout's hash range, so members, probe and external (all training reads)
# are the same samples as with the former {heldout: 0.25}; only the audit's non-member pool is smaller
FRACTIONS = {"members": 0.40, "probe": 0.10, "external": 0.25, "heldout": 0.15, "validation": 0.10}


@dataclass
class DataConfig(Config):
    section = "data"

    kind: Literal["digits", "imagefolder", "wds"] = option("digits", help="source kind: digits | imagefolder | wds")
    root: str = option("data/digits", help="the dataset root (prepared WebDataset shards + splits.json)")
    source: str | None = option(None, help="imagefolder: the class-per-folder tree; wds: the shard pattern")
    seed: int = option(0, lo=0, help="seed of the key-hash member/non-member split")
    fractions: dict = option(FRACTIONS, help="split -> fraction (members, probe, external, heldout, validation), summing to 1")
    image_field: str = option("jpg", help="wds: image field(s), ';'-separated, the first present is used")
    label_field: str = option("cls", help="wds: label field")
    num_classes: int | None = option(None, lo=1, help="wds: labels outside [0, num_classes) are refused; null: inferred")
    classes: list | None = option(None, help="imagefolder: fixed class list (folder names); null: sorted folder names")
    shard_maxcount: int = option(1000, lo=1, help="samples per shard")
    shard_maxsize: int = option(1 << 30, lo=1, help="bytes per shard (upper bound)")
    prepare_workers: int = option(1, lo=0, help="writer processes when preparing")
    workers: int = option(2, lo=0, help="loader worker processes per rank when training (0: in the main process)")
    overwrite: bool = option(False, help="prepare replaces an existing prepared root (else refuses it)")
    max_pixels: int = option(DEFAULT_MAX_PIXELS, lo=1, help="width x height above this is a skip (read from the header)")
    shuffle_buffer: int = option(1000, lo=0, help="per-reader sample shuffle buffer (seeded)")
    max_skip_fraction: float = option(0.01, lo=0, hi=1, help="training stops when more of the samples read were skipped")
    transform: dict = option({}, help="overrides of timm's data config (crop_pct, interpolation, mean, std)")
    augment: dict = option({}, help="timm create_transform(is_training=True) options; empty: no augmentation")
    device_transform: bool = option(False, help="training loaders ship uint8 crops; RandAugment, normalisation and "
                                                "random erasing run on the batch in the training step")
    decode: Literal["worker", "device"] = option("worker", help="training images decoded by the loader workers, or "
                                                 "(device: needs data.device_transform) as encoded bytes in the "
                                                 "training step with the random resized crop and flip")
    subset: SubsetConfig | None = option(None, help="a reference run's member subset (data.subset.*); null: off")

    @property
    def reference_subset(self) -> SubsetConfig | None:
        """The subset a reference run reads (``data.subset`` with a seed), None for an ordinary run."""
        return self.subset if self.subset is not None and self.subset.seed is not None else None

    def __post_init__(self) -> None:
        bad = next((f"{k}={v!r}" for k, v in self.fractions.items() if as_number(v) is None), None)
        if bad:
            raise self.error("fractions", f"{bad} is not a number")
        try:
            self.fractions = validate_fractions({k: float(v) for k, v in self.fractions.items()})
        except ValueError as e:
            raise ConfigError(f"{self.key('fractions')}: {e}") from None
        if self.decode == "device" and not self.device_transform:
            raise self.error("decode", "device decoding needs data.device_transform=true")
        if self.device_transform:
            try:
                rand_augment_options(self.augment.get("auto_augment"))
            except ValueError as e:
                raise self.error("augment", f"with data.device_transform=true: {e}") from None
