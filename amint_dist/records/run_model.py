"""A run's model, checked before anyone uses its weights (the audit, the export): the weights against
model_config.json, the run against its audit trail, model_config.json against the run's config.yaml."""

from __future__ import annotations

from pathlib import Path

from omegaconf import OmegaConf

from amint_dist.io import read_json
from amint_dist.records import artifacts
from amint_dist.records.signing import Verifier
from amint_dist.records.trail import TrailError
from amint_dist.records.verification import refusal, verify_run


def required(path: Path, what: str) -> Path:
    """``path``, or one line saying which file is missing."""
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    return path


def read_run_configs(run_dir: Path) -> tuple[dict, dict | None]:
    """(model_config.json, the resolved config.yaml or None for a model trained elsewhere) of ``run_dir``."""
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run dir not found: {run_dir}")
    model_config = read_json(required(run_dir / "model_config.json", "model config"), what="model config")
    config_path = run_dir / "config.yaml"
    run_config = OmegaConf.to_container(OmegaConf.load(config_path), resolve=True) if config_path.is_file() else None
    return model_config, run_config


def verify_run_model(run_dir: Path, model_config: dict, run_config: dict | None, splits_sha256: str,
                     verifier: Verifier, weights_sha256: str, purpose: str = "audit") -> dict:
    """Refuse weights (sha256 ``weights_sha256``) other than model_config.json's, a trail that a ``verifier``
    holding a key does not accept, and a model_config.json that is not the run's; return the trail's verdict
    (``records.verification.verify_run``)."""
    artifacts.verify_weights(run_dir / "model.safetensors", model_config, weights_sha256)
    integrity = verify_run(run_dir, splits_sha256, verifier, weights_sha256)
    refused = refusal(integrity, verifier)
    if refused:
        raise TrailError(f"refusing to {purpose} {run_dir}: {refused}")
    if run_config is not None:
        artifacts.verify_model_config(run_config, model_config, run_dir / "config.yaml")
    return integrity


def run_weights(run_dir: Path, model_config: dict, which: str, key: str) -> Path:
    """The run's ``which`` weights file (``artifacts.RUN_WEIGHTS``: model | ema), which model_config.json must
    record; the EMA file is checked against that record here (model.safetensors: by :func:`verify_run_model`).
    ``key``: the config key that chose it (``audit.weights``), for the one-line errors."""
    name, record = artifacts.RUN_WEIGHTS[which]
    if which == "ema" and not model_config.get(record):
        raise ValueError(f"{key}=ema: {run_dir} has no EMA weights (model_config.json records none: trained with "
                         f"train.ema.decay off); use {key}=model")
    path = required(run_dir / name, f"{key}={which}: {which} weights")
    if which != "model":
        artifacts.verify_weights(path, model_config, None, record)
    return path
