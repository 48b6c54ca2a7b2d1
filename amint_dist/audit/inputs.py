"""What is audited: a run dir (or a bare model.safetensors + model_config.json) and a dataset root.

Loading verifies everything first (``records.artifacts``, ``records.verification``): the audit never scores unverified inputs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import safetensors.torch
from omegaconf import OmegaConf

from amint_dist.records import artifacts
from amint_dist.data.prepare import load_manifest
from amint_dist.io import read_json, sha256_file
from amint_dist.models import AuditableModel, model_from_record
from amint_dist.records.signing import Verifier
from amint_dist.records.trail import TrailError
from amint_dist.records.verification import refusal, verify_run
from amint_dist.records.ledger import ExposureLedger

WEIGHTS_FILES = {"model": "model.safetensors", "ema": artifacts.EMA_WEIGHTS}  # audit.weights -> the file scored
WEIGHTS_RECORDS = {"model": "weights_sha256", "ema": "ema_weights_sha256"}  # -> its sha256 in model_config.json
Gather = Callable[[list], list]  # every rank's list items, concatenated in rank order (accelerate's gather_object)


@dataclass
class AuditInputs:
    """Verified inputs of one audit."""

    run_dir: Path
    data_root: Path
    manifest: dict
    splits_sha256: str
    model_config: dict
    run_config: dict | None  # the run's config.yaml, None for a model trained elsewhere
    ledger: ExposureLedger | None  # None when the run dir has no ledger.npz
    integrity: dict = field(default_factory=dict)  # the audit trail's verdict (records.verification.verify_run)
    weights: str = "model"  # which weights are scored: model (model.safetensors) | ema (model_ema.safetensors)

    @property
    def weights_file(self) -> Path:
        return self.run_dir / WEIGHTS_FILES[self.weights]

    @property
    def mint_mode(self) -> str:
        return self.model_config["mint"]["mode"]

    def build_model(self) -> AuditableModel:
        """The audited model with its verified weights (strict load: any missing/extra tensor refuses)."""
        model = model_from_record(self.model_config)
        state = safetensors.torch.load_file(str(self.weights_file))
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as e:
            first = str(e).splitlines()[0:2]
            raise artifacts.TamperedError(f"{self.weights_file} does not fit model_config.json: "
                                       f"{' '.join(first)}") from None
        return model.eval()


def _required(path: Path, what: str) -> Path:
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    return path


def load_inputs(run_dir: str | Path, data_root: str | Path | None, rank: int = 0, world: int = 1,
                gather: Gather = lambda items: items, verifier: Verifier | None = None,
                weights: str = "model") -> AuditInputs:
    """Read and verify the run dir and dataset root; every rank hashes its share of the dataset files.

    ``data_root`` defaults to the root recorded in model_config.json, then to the run's config.yaml. A
    ``verifier`` holding a key refuses any trail that does not verify with it (absent, unsigned, broken).
    ``weights``: ``model`` or ``ema`` (the run's EMA weights, verified like model.safetensors).
    """
    verifier = verifier or Verifier()
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run dir not found: {run_dir}")
    model_config = read_json(_required(run_dir / "model_config.json", "model config"), what="model config")
    if weights == "ema" and not model_config.get("ema_weights_sha256"):
        raise ValueError(f"audit.weights=ema: {run_dir} has no EMA weights (model_config.json records none: trained "
                         "with train.ema.decay off); use audit.weights=model")
    scored = _required(run_dir / WEIGHTS_FILES[weights], f"{weights} weights")
    config_path = run_dir / "config.yaml"
    run_config = OmegaConf.to_container(OmegaConf.load(config_path), resolve=True) if config_path.is_file() else None
    root = data_root or model_config.get("dataset", {}).get("root") or (run_config or {}).get("data", {}).get("root")
    if not root:
        raise ValueError(f"no dataset root recorded for {run_dir}: pass data.root=/path/to/root")
    root = Path(root)
    manifest = load_manifest(root)
    splits_sha256 = sha256_file(root / "splits.json")

    artifacts.verify_dataset_identity(root, splits_sha256, model_config)  # the cheap checks first
    scored_sha256 = sha256_file(scored)
    artifacts.verify_weights(scored, model_config, scored_sha256, WEIGHTS_RECORDS[weights])
    integrity = verify_run(run_dir, splits_sha256, verifier, scored_sha256 if weights == "model" else None)
    refused = refusal(integrity, verifier)
    if refused:
        raise TrailError(f"refusing to audit {run_dir}: {refused}")
    if run_config is not None:
        artifacts.verify_model_config(run_config, model_config, config_path)
    files = artifacts.dataset_files(root, manifest)
    artifacts.raise_first(gather(artifacts.dataset_problems(files[rank::world])))
    sizes = {split: int(meta["num_samples"]) for split, meta in manifest["splits"].items()}
    ledger_path = run_dir / "ledger.npz"
    ledger = ExposureLedger.load(ledger_path, sizes) if ledger_path.is_file() else None
    return AuditInputs(run_dir, root, manifest, splits_sha256, model_config, run_config, ledger, integrity, weights)


def describe(inputs: AuditInputs) -> dict[str, Any]:
    """What was audited, for the report."""
    mc = inputs.model_config
    return {
        "run_dir": str(inputs.run_dir.resolve()),
        "model": {"name": mc["model"]["name"], "mint": mc["mint"], "taps": mc.get("taps"),
                  "weights_sha256": mc["weights_sha256"], "run_config": inputs.run_config is not None},
        "weights": {"scored": inputs.weights, "file": inputs.weights_file.name,
                    "sha256": mc[WEIGHTS_RECORDS[inputs.weights]], **({"ema": mc["ema"]} if "ema" in mc else {})},
        "dataset": {"root": str(inputs.data_root.resolve()), "splits_sha256": inputs.splits_sha256,
                    "counts": inputs.manifest["counts"],
                    "verified_files": len(artifacts.dataset_files(inputs.data_root, inputs.manifest))},
    }

