"""The ``audit`` config group (configs/audit.yaml): what the audit scores and how."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from amint_dist.audit.protocols import PROTOCOLS
from amint_dist.config import Config, option
from amint_dist.models.config import HeadConfig

TRANSFORM_KEYS = ("crop_pct", "crop_mode", "interpolation", "mean", "std")  # timm data-config entries


@dataclass
class FileHeadConfig(HeadConfig):
    """The passive MINT head of a model file (``mint.head``'s fields, under ``audit.model.head``)."""

    section = "audit.model.head"


CONV_HEAD = FileHeadConfig(kind="conv", channels=64, hidden=256, dropout=0.2, grid=1)  # as configs/mint/conv.yaml


@dataclass
class PassiveConfig(Config):
    section = "audit.passive"

    enabled: bool = option(True, help="train the passive MINT baseline (fresh head on the frozen model's taps)")
    epochs: int = option(10, lo=0, help="passive head epochs")
    lr: float = option(1e-3, lo=0, lo_open=True, help="passive head learning rate")
    batch_size: int = option(64, lo=1, help="member rows per step (external rows in proportion to the split sizes)")


@dataclass
class FileModelConfig(Config):
    """A model trained elsewhere, audited from its weights file and timm name (no run dir, ledger or trail)."""

    section = "audit.model"

    name: str | None = option(None, help="timm name of a model trained elsewhere (with audit.model.file, no run.dir)")
    file: str | None = option(None, help="its weights: timm state_dict / checkpoint (read weights-only) or "
                                         ".safetensors")
    img_size: int | None = option(None, lo=1, help="input height and width; null: timm's default for the model")
    in_chans: Literal[1, 3] = option(3, help="input channels the file was trained with: 3 (RGB) or 1 (grayscale)")
    kwargs: dict = option({}, help="further timm.create_model arguments the file was trained with")
    transform: dict = option({}, help="its eval transform: timm data-config overrides (crop_pct, interpolation, "
                             "mean, std); {}: timm's for the model")
    taps: str | list = option("middle", help="the passive MINT head's taps: entry | middle | output, or indices")
    head: FileHeadConfig = option(CONV_HEAD, help="the passive MINT head (audit.model.head.*; the paper's conv head)")

    def __post_init__(self) -> None:
        unknown = sorted(set(self.transform) - set(TRANSFORM_KEYS))
        if unknown:
            raise self.error("transform", f"unknown {unknown}; valid: {list(TRANSFORM_KEYS)}")
        if (self.name is None) != (self.file is None):
            raise self.error("file" if self.file is None else "name", "audit.model.name and audit.model.file "
                             "go together (the timm architecture and its weights)")


@dataclass
class AuditConfig(Config):
    section = "audit"

    out_dir: str | None = option(None, help="where the report goes; default RUN/audit")
    public_key: str | None = option(None, help="the owner's Ed25519 public key (PEM) to verify the trail with")
    protocols: list = option(["seen", "unseen", "null"], help="protocols to run: seen | unseen | null")
    batch_size: int = option(256, lo=1, help="evaluation batch per rank")
    workers: int = option(2, lo=0, help="loader workers per rank")
    weights: Literal["model", "ema"] = option(
        "model", help="which weights to score: model (model.safetensors) | ema (model_ema.safetensors, train.ema)")
    precision: Literal["fp32", "bf16"] = option("fp32", help="fp32 | bf16 (autocast on GPUs; scores stay float64)")
    seed: int = option(0, lo=0, help="calibration share, null halves, class balancing, passive head, bootstrap")
    n_boot: int = option(1000, lo=1, help="bootstrap resamples per metric")
    calibration_fraction: float = option(0.2, lo=0, hi=1, hi_open=True,
                                         help="share of every protocol's samples used only to choose thresholds")
    suspect: str | None = option(None, help="a suspect set to test (image folder, tar shard pattern or file list)")
    alpha: float = option(0.01, lo=0, hi=1, lo_open=True, hi_open=True,
                          help="the suspect set test's level: verdict 'used' when the aMINT p-value is below it")
    passive: PassiveConfig = option(PassiveConfig(), help="the passive MINT baseline (audit.passive.*)")
    reference_runs: list = option([], help="reference run dirs (data.subset runs) for LiRA, RMIA and aMINT-LR")
    plain_run: str | None = option(None, help="a mint.mode=off run of the same recipe and root: the population "
                                              "attacks against it beside the audited model (the privacy cost)")
    rmia_gamma: float = option(1.0, lo=0, lo_open=True, help="RMIA: a population sample counts when LR(x, z) > gamma")
    rmia_offline_a: float = option(0.3, lo=0, hi=1, help="offline RMIA: p(x) ~ ((1+a) p_out(x) + (1-a)) / 2")
    blind: bool = option(True, help="the blind (model-free, pixels only) baseline in every protocol")
    model: FileModelConfig = option(FileModelConfig(), help="a model file to audit instead of a run (audit.model.*)")

    def __post_init__(self) -> None:
        names = ["null" if n is None else str(n) for n in self.protocols]  # a bare null (YAML's None): the protocol
        unknown = sorted(set(names) - set(PROTOCOLS))
        if unknown:
            raise self.error("protocols", f"unknown {unknown}; valid: {list(PROTOCOLS)}")
        self.protocols = list(dict.fromkeys(names))
        if len(set(map(str, self.reference_runs))) != len(self.reference_runs):
            raise self.error("reference_runs", "a reference run is listed twice")
        self.reference_runs = [str(r) for r in self.reference_runs]
        if self.model.file and not self.out_dir:
            raise self.error("out_dir", "required with audit.model.file (there is no run dir to write into)")
