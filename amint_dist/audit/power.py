"""Audit power beyond the model's own scores: reference-model attacks (LiRA, RMIA, aMINT-LR) and the blind
baseline's inputs, computed from one signals pass of the audited model and one of each reference run."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field

import numpy as np
import torch

from amint_dist.audit.config import AuditConfig
from amint_dist.audit.inputs import AuditInputs, Gather
from amint_dist.audit.references import POPULATION_SPLIT, attack_columns, load_references, reference_record
from amint_dist.audit.scoring import Scored
from amint_dist.audit.signals import model_signals
from amint_dist.data.pipeline import ShardedSplitStream
from amint_dist.models import AuditableModel
from amint_dist.records.signing import Verifier

StreamsOf = Callable[[AuditInputs, AuditableModel], Callable[[str], ShardedSplitStream]]


@dataclass
class Power:
    """The audited model's signals (pixels included when blind), attack scores per split, their record."""

    signals: dict[str, Scored] = field(default_factory=dict)
    columns: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)
    record: dict | None = None

    @property
    def methods(self) -> list[str]:
        return list(next(iter(self.columns.values()), {}))

    def add_to(self, scored: dict[str, Scored]) -> None:
        """The attack columns joined to the audit's scored splits (the same samples, in index order)."""
        for split, columns in self.columns.items():
            if not np.array_equal(scored[split]["index"], self.signals[split]["index"]):
                raise RuntimeError(f"split {split!r}: the signals pass read other samples than the scoring pass")
            scored[split].update(columns)


def audit_power(acfg: AuditConfig, inputs: AuditInputs, model: AuditableModel, streams_of: StreamsOf,
                splits: Sequence[str], device: torch.device, autocast: Callable[[], AbstractContextManager],
                gather: Gather, rank: int, world: int) -> Power:
    """Signals of the audited model on ``splits`` (the protocols'), and with ``audit.reference_runs`` those of
    every reference run and the attack scores."""
    if not (acfg.blind or acfg.reference_runs):
        return Power()
    refs = load_references(acfg.reference_runs, inputs, rank, world, gather, Verifier.from_env(acfg.public_key))
    read = [*splits, *([POPULATION_SPLIT] if refs else [])]
    target = model_signals(model, streams_of(inputs, model), read, device, autocast, gather, pixels=acfg.blind)
    if not refs:
        return Power(target)
    scored = []
    for ref in refs:
        ref_model = ref.build_model().to(device)
        scored.append(model_signals(ref_model, streams_of(ref, ref_model), read, device, autocast, gather))
        del ref_model
    # aMINT-LR needs a trained MINT head on every model: a model file's (own_head False) is a fresh, untrained one
    with_mint = inputs.own_head and bool(np.isfinite(target[splits[0]]["mint"]).all()) and all(
        np.isfinite(r[splits[0]]["mint"]).all() for r in scored)
    columns = attack_columns(target, scored, [r.ledger for r in refs], splits, acfg.rmia_gamma, acfg.rmia_offline_a,
                             with_mint)
    return Power(target, columns, reference_record(refs, splits, target))

