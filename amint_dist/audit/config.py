"""The ``audit`` config group (configs/audit.yaml): what the audit scores and how."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from amint_dist.audit.protocols import PROTOCOLS
from amint_dist.config import Config, option


@dataclass
class PassiveConfig(Config):
    section = "audit.passive"

    enabled: bool = option(True, help="train the passive MINT baseline (fresh head on the frozen model's taps)")
    epochs: int = option(10, lo=0, help="passive head epochs")
    lr: float = option(1e-3, lo=0, lo_open=True, help="passive head learning rate")
    batch_size: int = option(64, lo=1, help="member rows per step (external rows in proportion to the split sizes)")


@dataclass
class AuditConfig(Config):
    section = "audit"

    out_dir: str | None = option(None, help="where the report goes; default RUN/audit")
    public_key: str | None = option(None, help="the owner's Ed25519 public key (PEM) to verify the trail with")
    protocols: list = option(["seen", "unseen", "null"], help="protocols to run: seen | unseen | null")
    batch_size: int = option(256, lo=1, help="evaluation batch per rank")
    workers: int = option(2, lo=0, help="loader workers per rank (fewer for splits with too few shards)")
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

    def __post_init__(self) -> None:
        names = ["null" if n is None else str(n) for n in self.protocols]  # a bare null (YAML's None): the protocol
        unknown = sorted(set(names) - set(PROTOCOLS))
        if unknown:
            raise self.error("protocols", f"unknown {unknown}; valid: {list(PROTOCOLS)}")
        self.protocols = list(dict.fromkeys(names))
