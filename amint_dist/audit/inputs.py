"""What is audited: a run dir (or a bare model.safetensors + model_config.json) and a dataset root.

Loading verifies everything first (``records.artifacts``, ``records.verification``): the audit never scores unverified inputs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import safetensors.torch

from amint_dist.records import artifacts
from amint_dist.data.prepare import load_manifest
from amint_dist.io import sha256_file
from amint_dist.models import AuditableModel, model_from_record
from amint_dist.records.signing import Verifier
from amint_dist.records.run_model import read_run_configs, required, verify_run_model
from amint_dist.records.ledger import ExposureLedger

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

    @property
    def mint_mode(self) -> str:
        return self.model_config["mint"]["mode"]

    def build_model(self) -> AuditableModel:
        """The audited model with its verified weights (strict load: any missing/extra tensor refuses)."""
        model = model_from_record(self.model_config)
        state = safetensors.torch.load_file(str(self.run_dir / "model.safetensors"))
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as e:
            first = str(e).splitlines()[0:2]
            raise artifacts.TamperedError(f"{self.run_dir / 'model.safetensors'} does not fit model_config.json: "
                                       f"{' '.join(first)}") from None
        return model.eval()


def load_inputs(run_dir: str | Path, data_root: str | Path | None, rank: int = 0, world: int = 1,
                gather: Gather = lambda items: items, verifier: Verifier | None = None) -> AuditInputs:
    """Read and verify the run dir and dataset root; every rank hashes its share of the dataset files.

    ``data_root`` defaults to the root recorded in model_config.json, then to the run's config.yaml. A
    ``verifier`` holding a key refuses any trail that does not verify with it (absent, unsigned, broken).
    """
    verifier = verifier or Verifier()
    run_dir = Path(run_dir)
    model_config, run_config = read_run_configs(run_dir)
    weights = required(run_dir / "model.safetensors", "model weights")
    root = data_root or model_config.get("dataset", {}).get("root") or (run_config or {}).get("data", {}).get("root")
    if not root:
        raise ValueError(f"no dataset root recorded for {run_dir}: pass data.root=/path/to/root")
    root = Path(root)
    manifest = load_manifest(root)
    splits_sha256 = sha256_file(root / "splits.json")

    artifacts.verify_dataset_identity(root, splits_sha256, model_config)  # the cheap checks first
    integrity = verify_run_model(run_dir, model_config, run_config, splits_sha256, verifier, sha256_file(weights))
    files = artifacts.dataset_files(root, manifest)
    artifacts.raise_first(gather(artifacts.dataset_problems(files[rank::world])))
    sizes = {split: int(meta["num_samples"]) for split, meta in manifest["splits"].items()}
    ledger_path = run_dir / "ledger.npz"
    ledger = ExposureLedger.load(ledger_path, sizes) if ledger_path.is_file() else None
    return AuditInputs(run_dir, root, manifest, splits_sha256, model_config, run_config, ledger, integrity)


def describe(inputs: AuditInputs) -> dict[str, Any]:
    """What was audited, for the report."""
    mc = inputs.model_config
    return {
        "run_dir": str(inputs.run_dir.resolve()),
        "model": {"name": mc["model"]["name"], "mint": mc["mint"], "taps": mc.get("taps"),
                  "weights_sha256": mc["weights_sha256"], "run_config": inputs.run_config is not None},
        "dataset": {"root": str(inputs.data_root.resolve()), "splits_sha256": inputs.splits_sha256,
                    "counts": inputs.manifest["counts"],
                    "verified_files": len(artifacts.dataset_files(inputs.data_root, inputs.manifest))},
    }

