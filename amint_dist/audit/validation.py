"""Recipe selection figures: a run scored on the ``validation`` share, which neither training nor the audit reads.

``members`` (those the exposure ledger says training consumed) vs ``validation`` (never consumed: checked)
with the aMINT head, and task accuracy on ``validation``; written to ``RUN/validation.json``. Tuning compares
runs by this file only (``amint_dist.audit.pareto``), so no recipe is chosen on what the audit evaluates.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate.utils import gather_object

from amint_dist.audit.config import AuditConfig
from amint_dist.audit.inputs import AuditInputs, load_inputs
from amint_dist.audit.metrics import evaluate_method
from amint_dist.audit.reader import SplitReader, process_state
from amint_dist.audit.report import proportion
from amint_dist.audit.scoring import gather_split, score_split
from amint_dist.dist import main_process_holds
from amint_dist.io import atomic_write_json, read_json
from amint_dist.records.signing import Verifier
from amint_dist.run_dir import RunDirLock

VALIDATION_SPLIT = "validation"
MEMBER_SPLIT = "members"
VALIDATION_FORMAT = "amint-dist-validation/1"


def validation_problem(inputs: AuditInputs) -> str | None:
    """Why ``inputs`` cannot be validated (no validation share, or training consumed some of it), else None."""
    if not inputs.manifest["counts"].get(VALIDATION_SPLIT):
        return (f"dataset root {inputs.data_root} has no validation share: re-prepare it with a 'validation' "
                f"fraction in data.fractions (the defaults have one)")
    if inputs.ledger is not None and VALIDATION_SPLIT in inputs.ledger.counts \
            and inputs.ledger.counts[VALIDATION_SPLIT].any():
        return f"{inputs.run_dir}: the exposure ledger says training consumed validation samples"
    return None


def run_validation(cfg: Mapping[str, Any]) -> Path:
    """Score ``cfg.run.dir`` on the validation share (``audit.*`` settings: batch size, workers, precision,
    seed, n_boot); write and return ``RUN/validation.json`` on every rank."""
    run_dir = Path((cfg.get("run") or {}).get("dir") or "")
    if not str(run_dir) or str(run_dir) == ".":
        raise ValueError("run.dir is required: the training run to score on the validation share")
    acfg = AuditConfig.from_dict(cfg["audit"])
    state = process_state()
    with main_process_holds(state, lambda: RunDirLock(run_dir, "validation").acquire()):
        inputs = load_inputs(run_dir, (cfg.get("data") or {}).get("root"), state.process_index,
                             state.num_processes, gather_object, Verifier.from_env(acfg.public_key))
        problem = validation_problem(inputs)
        if problem:
            raise ValueError(problem)
        started = time.time()
        model = inputs.build_model().to(state.device)
        reader = SplitReader(inputs, model, state.process_index, state.num_processes, acfg.workers, acfg.seed)
        autocast = partial(torch.autocast, state.device.type, dtype=torch.bfloat16, enabled=acfg.precision == "bf16")
        names = [] if inputs.mint_mode == "off" else ["amint"]
        scored = {}
        for split in (MEMBER_SPLIT, VALIDATION_SPLIT):
            parts = gather_object([score_split(model, reader.stream(split, acfg.batch_size, shuffle=False), names,
                                               state.device, autocast)])
            scored[split] = gather_split([columns for columns, _ in parts], split)
        if state.is_main_process:
            result = validation_figures(scored, inputs, names, acfg.n_boot, acfg.seed)
            result["seconds"] = round(time.time() - started, 1)
            atomic_write_json(run_dir / "validation.json", result)
        state.wait_for_everyone()
    return run_dir / "validation.json"


def validation_figures(scored: Mapping[str, dict], inputs: AuditInputs, names: list[str], n_boot: int,
                       seed: int) -> dict:
    """validation.json's content: task accuracy on validation; aMINT members (consumed) vs validation."""
    members = scored[MEMBER_SPLIT]
    if inputs.ledger is not None:
        members = {k: v[inputs.ledger.counts[MEMBER_SPLIT][members["index"]] > 0] for k, v in members.items()}
    held = scored[VALIDATION_SPLIT]
    out: dict[str, Any] = {
        "format": VALIDATION_FORMAT,
        "run_dir": str(inputs.run_dir.resolve()),
        "weights_sha256": inputs.model_config["weights_sha256"],
        "splits_sha256": inputs.splits_sha256,
        "mint_mode": inputs.mint_mode,
        "members_rule": "consumed by training (exposure ledger > 0)" if inputs.ledger is not None
        else "the members split as prepared (no ledger)",
        "n_members": int(members["key"].size),
        "n_validation": int(held["key"].size),
        "task_accuracy": proportion(held["correct"]),
        "mint": {},
    }
    for name in names:
        labels = np.concatenate([np.ones(members["key"].size, bool), np.zeros(held["key"].size, bool)])
        scores = np.concatenate([members[name], held[name]])
        out["mint"][name] = evaluate_method(labels, scores, None, True, n_boot=n_boot, seed=seed)
    return out


def read_validation(run_dir: str | Path) -> dict:
    """``RUN/validation.json``, checked to be this format and to describe the run's current weights."""
    run_dir = Path(run_dir)
    result = read_json(run_dir / "validation.json", what="validation figures")
    if result.get("format") != VALIDATION_FORMAT:
        raise ValueError(f"{run_dir / 'validation.json'}: not {VALIDATION_FORMAT}")
    weights = read_json(run_dir / "model_config.json", what="model config")["weights_sha256"]
    if result["weights_sha256"] != weights:
        raise ValueError(f"{run_dir / 'validation.json'} scored other weights than {run_dir / 'model.safetensors'}")
    return result


