"""The audit job: verify, train the passive baseline, score every split once, gather, report (rank 0)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from dataclasses import asdict
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import PartialState
from accelerate.utils import gather_object, reduce
from hydra import compose, initialize_config_dir
from torch import nn

from amint_dist import __version__
from amint_dist.audit.baselines import BASELINES
from amint_dist.audit.blind import BLIND, add_blind_scores, shift_warnings
from amint_dist.audit.blind import DESCRIPTION as BLIND_DESCRIPTION
from amint_dist.audit.config import AuditConfig
from amint_dist.audit.inputs import AuditInputs, describe, load_inputs
from amint_dist.audit.model_card import write_model_card
from amint_dist.audit.model_file import load_file_inputs
from amint_dist.audit.passive import fresh_head, train_passive
from amint_dist.audit.power import audit_power
from amint_dist.audit.privacy_cost import load_plain_run, privacy_cost, score_plain
from amint_dist.audit.references import REFERENCE_METHODS
from amint_dist.audit.protocols import NONMEMBER_SPLIT, PROTOCOLS, build_protocol
from amint_dist.audit.reader import SplitReader, process_state
from amint_dist.audit.report import (METHOD_DESCRIPTIONS, REPORT_FORMAT, evaluate_protocol, summary_notes,
                                     task_section, write_outputs)
from amint_dist.audit.report_md import integrity_notes
from amint_dist.audit.scoring import StackedHeads, gather_split, score_batch, score_split
from amint_dist.audit.suspect import MEMBER_SPLIT, audit_suspect, reference_scores
from amint_dist.cli import to_dict
from amint_dist.data.images import DEFAULT_MAX_PIXELS
from amint_dist.dist import main_process_holds
from amint_dist.models import AuditableModel
from amint_dist.provenance import collect as collect_provenance
from amint_dist.records.signing import Verifier
from amint_dist.run_dir import RunDirLock
from amint_dist.tb import Monitor


def audit_config(config_dir: str | Path, run_dir: str | Path) -> dict:
    """``config_dir/audit.yaml`` with its defaults, auditing ``run_dir`` (how a training job audits its run)."""
    with initialize_config_dir(str(Path(config_dir).resolve()), version_base="1.3"):
        cfg = compose("audit")
    cfg.run.dir = str(run_dir)
    return to_dict(cfg)


def run_audit(cfg: Mapping[str, Any]) -> Path:
    """Audit ``cfg.run.dir`` or ``cfg.audit.model.file`` (optionally against ``cfg.data.root``); return the path
    of report.md on every rank."""
    run_dir = (cfg.get("run") or {}).get("dir")
    acfg = AuditConfig.from_dict(cfg["audit"])
    if bool(run_dir) == bool(acfg.model.file):
        raise ValueError("run.dir=RUN (a training run dir, or a dir with model.safetensors + model_config.json) or "
                         "audit.model.name=NAME audit.model.file=WEIGHTS: one of the two is required"
                         if not run_dir else "run.dir and audit.model.file: audit one or the other")
    if acfg.model.file and acfg.weights != "model":
        raise ValueError(f"audit.weights={acfg.weights}: a model file is audited as given (audit.weights=model)")
    state = process_state()
    held = Path(run_dir) if run_dir else _made(Path(acfg.out_dir))  # one writer per run dir (or output dir)
    with main_process_holds(state, lambda: RunDirLock(held, "audit").acquire()):
        return _audit(acfg, run_dir, (cfg.get("data") or {}).get("root"), state)


def _made(directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    return directory


def _audit(acfg: AuditConfig, run_dir: str | None, data_root: str | None, state: PartialState) -> Path:
    """:func:`run_audit`, its run dir (or output dir) held by rank 0."""
    load = partial(load_inputs, run_dir, weights=acfg.weights) if run_dir else partial(load_file_inputs, acfg.model)
    inputs = load(data_root, state.process_index, state.num_processes, gather_object,
                  Verifier.from_env(acfg.public_key))
    model = inputs.build_model().to(state.device)
    reader = SplitReader(inputs, model, state.process_index, state.num_processes, acfg.workers, acfg.seed)
    autocast = partial(torch.autocast, state.device.type, dtype=torch.bfloat16, enabled=acfg.precision == "bf16")
    scorer, names, history, notes = _mint_heads(inputs, model, acfg, reader, state, autocast)

    counts = inputs.manifest["counts"]
    protocols = [p for p in acfg.protocols if counts[PROTOCOLS[p][0]] and counts[NONMEMBER_SPLIT]]
    notes += [f"protocol {p} skipped: its splits are empty" for p in acfg.protocols if p not in protocols]
    scored, skipped = {}, {}
    suspect_splits = [MEMBER_SPLIT] if acfg.suspect else []  # its member reference
    for split in dict.fromkeys([*(PROTOCOLS[p][0] for p in protocols), *suspect_splits, NONMEMBER_SPLIT]):
        stream = reader.stream(split, acfg.batch_size, shuffle=False)
        parts = gather_object([score_split(scorer, stream, names, state.device, autocast,
                                           show=f"audit: score {split}" if state.is_main_process else None)])
        scored[split] = gather_split([columns for columns, _ in parts], split)
        skipped[split] = sum((skips for _, skips in parts), Counter())

    power = audit_power(acfg, inputs, model, partial(_eval_streams, acfg, state), list(scored), state.device,
                        autocast, gather_object, state.process_index, state.num_processes)
    power.add_to(scored)
    plain = load_plain_run(acfg.plain_run, inputs, state.process_index, state.num_processes, gather_object,
                           Verifier.from_env(acfg.public_key)) if acfg.plain_run else None
    plain_scored = score_plain(plain, [PROTOCOLS[p][0] for p in protocols] + [NONMEMBER_SPLIT],
                               partial(_eval_streams, acfg, state), state.device, autocast,
                               gather_object) if plain is not None else {}
    out_dir = Path(acfg.out_dir or Path(run_dir) / "audit")
    if state.is_main_process:
        methods = [*names, *BASELINES, *power.methods]
        samples = [build_protocol(p, scored, inputs.ledger, methods, acfg.seed, acfg.calibration_fraction)
                   for p in protocols]
        if acfg.blind:
            for s in samples:
                add_blind_scores(s, power.signals, acfg.seed)
            methods.append(BLIND)
        results = {s.name: {"description": PROTOCOLS[s.name][1], "member_split": PROTOCOLS[s.name][0],
                            "nonmember_split": NONMEMBER_SPLIT, **s.counts,
                            **evaluate_protocol(s, methods, acfg.n_boot, acfg.seed)} for s in samples}
        if inputs.ledger is None:
            notes.append("no exposure ledger (model trained elsewhere?): members are the whole members/probe "
                         "splits as prepared, not checked against what training consumed")
        report = {
            "format": REPORT_FORMAT,
            "tool_version": __version__,
            "provenance": collect_provenance(),  # this audit's command, versions, git, host, time
            "audited": describe(inputs),
            "ledger": inputs.ledger is not None,
            "members_rule": "exposure ledger > 0 (consumed by training); non-members: ledger == 0"
            if inputs.ledger is not None else "no ledger: members = the members/probe split as prepared",
            "settings": {**{k: v for k, v in asdict(acfg).items() if k != "out_dir"},
                         "world_size": state.num_processes},
            "methods": {m: {**METHOD_DESCRIPTIONS, **REFERENCE_METHODS, BLIND: BLIND_DESCRIPTION}[m] for m in methods},
            "integrity": inputs.integrity,
            "distribution_shift": shift_warnings(results),
            "reference_runs": power.record,
            "notes": shift_warnings(results) + integrity_notes(inputs.integrity) + notes + summary_notes(results),
            "task": task_section({s: c["correct"] for s, c in scored.items()}),
            "scored": {s: {"n": int(c["key"].size), "skipped": dict(skipped[s])} for s, c in scored.items()},
            "passive_training": history,
            "protocols": results,
        }
        if plain is not None:
            report["privacy_cost"] = privacy_cost(plain, plain_scored, results, acfg.seed, acfg.calibration_fraction,
                                                  acfg.n_boot)
        if acfg.suspect:
            report["suspect"] = _suspect(acfg, inputs, reader, scorer, names, scored, state, autocast, out_dir)
        write_outputs(out_dir, report, samples, Monitor(Path(run_dir or out_dir), True))
        if run_dir:
            write_model_card(Path(run_dir), report)
    state.wait_for_everyone()
    return out_dir / "report.md"


def _mint_heads(inputs: AuditInputs, model: AuditableModel, acfg: AuditConfig, reader: SplitReader,
                state: PartialState, autocast) -> tuple[nn.Module, list[str], list[dict], list[str]]:
    """The scoring model (backbone + every MINT head on one pass), head names, passive training log, notes."""
    if inputs.mint_mode == "off":
        return model, [], [], ["the model has no MINT head (mint.mode=off): no amint or passive scores"]
    notes = ["the model's head was trained passively (mint.mode=passive): 'amint' is a passive head"
             ] if inputs.mint_mode == "passive" and inputs.own_head else []
    heads, names, history = ([model.mint_head], ["amint"], []) if inputs.own_head else ([], [], [])
    pcfg, counts = acfg.passive, inputs.manifest["counts"]
    if pcfg.enabled and counts["members"] and counts["external"]:
        head = fresh_head(inputs.model_config, acfg.seed)
        batch = pcfg.batch_size
        external_batch = max(1, round(batch * counts["external"] / counts["members"]))
        history = train_passive(model, head, reader.stream("members", batch, shuffle=True),
                                reader.stream("external", external_batch, shuffle=True), pcfg.epochs,
                                pcfg.lr, acfg.seed, state.device, autocast,
                                partial(_reduce_sum, state.device), state.num_processes, show=state.is_main_process)
        heads.append(head)
        names.append("passive")
    elif pcfg.enabled:
        notes.append("passive MINT skipped: the members or external split is empty")
    if not heads:  # a model file without the passive head: the population baselines only
        return AuditableModel(model.backbone, None, [], "off"), [], history, notes
    return AuditableModel(model.backbone, StackedHeads(heads), model.taps, "passive"), names, history, notes


def _eval_streams(acfg: AuditConfig, state: PartialState, run: AuditInputs, model: AuditableModel):
    """``split -> evaluation stream`` of ``run`` (the audited or a reference run) read for ``model``."""
    reader = SplitReader(run, model, state.process_index, state.num_processes, acfg.workers, acfg.seed)
    return partial(reader.stream, batch_size=acfg.batch_size, shuffle=False)


def _suspect(acfg: AuditConfig, inputs: AuditInputs, reader: SplitReader, scorer: nn.Module, names: list[str],
             scored: dict, state: PartialState, autocast, out_dir: Path) -> dict:
    """The suspect set's report section (scored on rank 0 only)."""
    methods = [*names, *BASELINES]

    def score(images: torch.Tensor, labels: np.ndarray | None) -> dict:
        return score_batch(scorer, images, None if labels is None else torch.from_numpy(labels), names,
                           state.device, autocast)

    references = reference_scores(scored, inputs.ledger, acfg.seed, acfg.calibration_fraction, methods)
    out_dir.mkdir(parents=True, exist_ok=True)
    return audit_suspect(acfg.suspect, inputs.manifest["classes"], reader.transform,
                         int(inputs.manifest.get("max_pixels", DEFAULT_MAX_PIXELS)), score, names, references,
                         {"alpha": acfg.alpha, "n_boot": acfg.n_boot, "seed": acfg.seed,
                          "batch_size": acfg.batch_size}, out_dir)


def _reduce_sum(device: torch.device, tensor: torch.Tensor) -> torch.Tensor:
    """Sum a CPU tensor over ranks (through the device, for NCCL); back on the CPU."""
    return reduce(tensor.to(device), reduction="sum").cpu()
