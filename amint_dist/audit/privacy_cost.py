"""The owner's privacy cost: the population attacks (loss, confidence, entropy: no MINT head, no reference runs)
against a plain model of the same recipe (``mint.mode=off``, ``audit.plain_run``) beside the same attacks
against the audited model, protocol by protocol: what making the model auditable gives away to anyone else."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager

import torch

from amint_dist.audit.baselines import BASELINES
from amint_dist.audit.inputs import AuditInputs, Gather, load_inputs
from amint_dist.audit.protocols import build_protocol
from amint_dist.audit.report import evaluate_protocol
from amint_dist.audit.scoring import Scored, gather_split, score_split
from amint_dist.records.signing import Verifier

StreamsOf = Callable  # (run, model) -> split -> evaluation stream (audit.run._eval_streams)


def load_plain_run(path: str, audited: AuditInputs, rank: int, world: int, gather: Gather,
                   verifier: Verifier) -> AuditInputs:
    """The plain run, verified as the audited run is; refused in one line unless it is a ``mint.mode=off`` run
    on the audited dataset root with a ledger."""
    try:
        plain = load_inputs(path, audited.data_root, rank, world, gather, verifier)
    except (ValueError, FileNotFoundError) as e:
        raise type(e)(f"audit.plain_run={path}: {e}") from None
    if plain.model_config.get("dataset", {}).get("splits_sha256") != audited.splits_sha256:
        raise ValueError(f"audit.plain_run={path}: trained on another dataset root than the audited run")
    if plain.mint_mode != "off":
        raise ValueError(f"audit.plain_run={path}: trained with mint.mode={plain.mint_mode}; the plain model of the "
                         "same recipe is trained with mint.mode=off")
    if plain.ledger is None:
        raise FileNotFoundError(f"audit.plain_run={path}: no ledger.npz, so its members are unknown")
    return plain


def score_plain(plain: AuditInputs, splits: Sequence[str], streams_of: StreamsOf, device: torch.device,
                autocast: Callable[[], AbstractContextManager], gather: Gather) -> dict[str, Scored]:
    """The population baselines' scores of the plain model on ``splits`` (every rank its shards, gathered)."""
    model = plain.build_model().to(device)
    streams = streams_of(plain, model)
    scored = {}
    for split in splits:
        parts = gather([score_split(model, streams(split), [], device, autocast)])
        scored[split] = gather_split([columns for columns, _ in parts], split)
    return scored


def privacy_cost(plain: AuditInputs, scored: Mapping[str, Scored], audited_results: Mapping[str, dict],
                 seed: int, calibration_fraction: float, n_boot: int) -> dict:
    """Per protocol and population attack: AUC against the audited model and against the plain model (each on
    its own ledger's members, the same calibration share and balancing rule)."""
    out = {}
    for name, results in audited_results.items():
        samples = build_protocol(name, scored, plain.ledger, list(BASELINES), seed, calibration_fraction)
        plain_results = evaluate_protocol(samples, list(BASELINES), n_boot, seed)["methods"]
        out[name] = {m: {"audited": results["methods"].get(m, {}).get("auc"), "plain": plain_results.get(m, {}).get("auc")}
                     for m in BASELINES}
    return {"plain_run": str(plain.run_dir.resolve()), "weights_sha256": plain.model_config["weights_sha256"],
            "integrity": plain.integrity.get("status"), "protocols": out}
