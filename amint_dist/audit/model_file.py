"""Audit a model trained elsewhere: a timm name and a weights file (``audit.model.*``), no run dir.

The backbone is built by name and its weights loaded strictly from the file (torch files weights-only); the
MINT head is passive (trained by the audit on the frozen taps), beside the population baselines. There is no
exposure ledger and no audit trail: members are the splits as prepared, integrity is not established, and the
report records the file's sha256.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import timm
from torch import nn

from amint_dist.audit.config import FileModelConfig
from amint_dist.audit.inputs import (
    AuditInputs,
    Gather,
    read_weights,
    verify_dataset_files,
)
from amint_dist.data.prepare import load_manifest
from amint_dist.data.transforms import data_config_for
from amint_dist.io import sha256_file
from amint_dist.models.auditable import model_from_record
from amint_dist.models.backbone import create_backbone
from amint_dist.records.signing import Verifier
from amint_dist.records.trail import TrailError
from amint_dist.records.verification import refusal

NO_TRAIL = ("a model file audited by name: no audit trail and no exposure ledger, so nothing shows which data "
            "trained it; members are the members/probe splits as prepared")


def load_file_inputs(model: FileModelConfig, data_root: str | Path | None, rank: int = 0, world: int = 1,
                     gather: Gather = lambda items: items, verifier: Verifier | None = None) -> AuditInputs:
    """The audit's inputs for ``audit.model.file``: the file checked against the timm model (one line naming the
    file when it does not fit), then the dataset root's files against splits.json."""
    if not data_root:
        raise ValueError("data.root is required with audit.model.file: the prepared dataset root to audit against")
    root, weights = Path(data_root), Path(model.file)
    if not weights.is_file():
        raise FileNotFoundError(f"audit.model.file not found: {weights}")
    manifest = load_manifest(root)
    record = file_model_record(model, weights, manifest["num_classes"])
    integrity = {"status": "absent", "signature": "unsigned", "keys": (verifier or Verifier()).describe(),
                 "entries": 0, "problems": [], "checked": [], "note": NO_TRAIL}
    refused = refusal(integrity, verifier or Verifier())
    if refused:
        raise TrailError(f"refusing to audit {weights}: {refused}")
    verify_dataset_files(root, manifest, rank, world, gather)
    return AuditInputs(None, root, manifest, sha256_file(root / "splits.json"), record, None, None, integrity,
                       weights_path=weights, own_head=False)


def file_model_record(model: FileModelConfig, weights: Path, dataset_classes: int) -> dict[str, Any]:
    """A ``model_config.json``-like record of the file's model (a passive MINT head on ``model.taps``), after a
    strict load of the file into the backbone."""
    if not timm.is_model(model.name):
        raise ValueError(f"audit.model.name: unknown timm model {model.name!r}")
    pretrained = timm.models.get_pretrained_cfg(model.name)
    img_size = model.img_size or (pretrained.input_size[-1] if pretrained else 224)
    state = read_weights(weights)
    num_classes = _classifier_classes(state, pretrained.classifier if pretrained else None) or dataset_classes
    if num_classes != dataset_classes:
        raise ValueError(f"{weights} has a {num_classes}-class classifier, the dataset root has {dataset_classes} "
                         "classes: audit it against the dataset it was trained on")
    try:
        backbone = create_backbone(model.name, num_classes, img_size, model.in_chans, model.kwargs)
    except ValueError as e:  # "model.kwargs: ..." is audit.model.kwargs here
        raise ValueError(f"audit.{e}") from None
    _load_strictly(backbone, state, weights, model.name)
    record = {
        "model": {"name": model.name, "img_size": img_size, "in_chans": model.in_chans, "num_classes": num_classes,
                  "kwargs": dict(model.kwargs)},
        "mint": {"mode": "passive", "taps": model.taps, "head": model.head.record()},
        "data_config": data_config_for(backbone, img_size, model.in_chans, model.transform),
        "weights_sha256": sha256_file(weights),
    }
    try:  # the passive head on these taps, one forward: a bad tap or head fails now, before any hashing
        model_from_record(record).check_forward(record["data_config"]["input_size"])
    except ValueError as e:
        raise ValueError(f"audit.model.taps={model.taps!r}, audit.model.head={model.head.record()}: {e}") from None
    return record


def _classifier_classes(state: dict, classifier: str | tuple | None) -> int | None:
    """Rows of the file's classifier weight (timm's ``pretrained_cfg.classifier``), None when not found."""
    names = classifier if isinstance(classifier, (tuple, list)) else [classifier] if classifier else []
    weight = next((state[f"{n}.weight"] for n in names if f"{n}.weight" in state), None)
    return int(weight.shape[0]) if weight is not None and weight.ndim >= 1 else None


def _load_strictly(backbone: nn.Module, state: dict, weights: Path, name: str) -> None:
    try:
        backbone.load_state_dict(state, strict=True)
    except RuntimeError as e:
        detail = " ".join(line.strip() for line in str(e).splitlines()[1:2])[:300]
        raise ValueError(f"{weights} does not fit timm model {name!r} (check audit.model.img_size, in_chans, "
                         f"kwargs): {detail}") from None
