"""Checking a run's files against its audit trail: checkpoints before resume, the whole run before an audit.

The verdict (``verify_run``'s ``status``) is one of:

- ``verified``: a key was given, every entry carries its valid signature, and every file matches;
- ``unsigned``: the chain and files match, but nothing is signed: integrity NOT established (anyone able
  to write the run dir could have rewritten the chain);
- ``not checked``: the trail is signed but no key was given: integrity NOT established;
- ``broken``: something does not match (``problems`` says exactly what);
- ``absent``: no trail (a model trained elsewhere): integrity NOT established.

A verifier holding a key accepts ``verified`` only (:func:`refusal`): a forged, re-chained, downgraded or
deleted trail is refused, never reported as merely "unsigned".
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np

from amint_dist.io import sha256_file
from amint_dist.records.artifacts import EMA_WEIGHTS
from amint_dist.records.ledger import ExposureLedger
from amint_dist.records.signing import Verifier
from amint_dist.records.trail import TRAIL_NAME, Chain, config_problems, read_chain, splits_problems


def summed_ledger(files: Iterable[Path]) -> ExposureLedger:
    """The sum of per-rank ledger files (no size check: for digests)."""
    total: dict[str, np.ndarray] = {}
    for f in files:
        with np.load(f, allow_pickle=False) as data:
            for split in data.files:
                total[split] = total.get(split, 0) + data[split].astype(np.int64)
    ledger = ExposureLedger({})
    ledger.counts = {s: c.astype(np.int32) for s, c in total.items()}
    return ledger


def checkpoint_ledger_digest(path: Path) -> str | None:
    """Digest of a checkpoint's ledger summed over its rank files (None when it has none)."""
    files = sorted(path.glob("ledger-rank*.npz"))
    return summed_ledger(files).digest() if files else None


def file_ledger_digest(path: Path) -> str:
    return summed_ledger([path]).digest()


def relative_files(root: Path) -> list[str]:
    """Every regular file under ``root`` as a sorted relative POSIX path."""
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())


def hash_files(root: Path, names: Iterable[str], fsync: bool = False) -> dict[str, str]:
    return {name: sha256_file(root / name, fsync=fsync) for name in names}


def checkpoint_file_problems(path: Path, recorded: dict[str, str], rank: int = 0, world: int = 1) -> list[str]:
    """This rank's share of the files a checkpoint entry records: missing or changed; rank 0 also lists
    files the entry does not record (they would be loaded unverified)."""
    names = sorted(recorded)
    problems = []
    for name in names[rank::world]:
        f = path / name
        if not f.is_file():
            problems.append(f"{f} is missing (recorded in the audit trail)")
        elif sha256_file(f) != recorded[name]:
            problems.append(f"{f} does not match its sha256 in the audit trail (tampered or corrupted)")
    if rank == 0:
        problems += [f"{path / name} is not recorded in the audit trail" for name in relative_files(path)
                     if name not in recorded]
    return problems


def verify_run(run_dir: Path, splits_sha256: str, verifier: Verifier, weights_sha256: str | None = None) -> dict:
    """The audit's integrity section: chain, signatures, dataset, config.yaml, present checkpoints' ledgers,
    final ledger and weights against the trail (see the module docstring for ``status``)."""
    run_dir = Path(run_dir)
    path = run_dir / TRAIL_NAME
    keys = verifier.describe()
    if not path.is_file():
        return {"status": "absent", "signature": "unsigned", "keys": keys, "entries": 0, "problems": [], "checked": [],
                "note": f"no {TRAIL_NAME} (a model trained elsewhere or by an older version): nothing to verify"}
    chain = read_chain(path, verifier)
    problems = chain.problems + splits_problems(chain, splits_sha256)
    if (run_dir / "config.yaml").is_file() or chain.entries:
        problems += config_problems(run_dir, chain)
    checked = [f"hash chain of {len(chain.entries)} entries", "splits.json digest", "config.yaml sha256"]
    checked_ckpts, unrecorded = _checkpoint_problems(run_dir, chain, problems)
    checked += checked_ckpts
    final = chain.last("final")
    if final is None:
        problems.append("the trail has no final entry (the run did not finish, or its end was cut off)")
    else:
        problems += _final_problems(run_dir, chain, final, weights_sha256)
        checked += ["ledger.npz digest", "model.safetensors sha256", "model_config.json sha256"]
        checked += [f"{EMA_WEIGHTS} sha256"] if final.get("ema_weights_sha256") else []
    if problems or chain.signature == "broken":
        status = "broken"
    else:
        status = "verified" if chain.signature == "verified" else chain.signature.split(" (")[0]
    return {"status": status, "signature": chain.signature, "keys": keys, "declared": chain.declared_summary(),
            "entries": len(chain.entries), "problems": problems, "checked": checked, "unrecorded_checkpoints": unrecorded}


def refusal(result: dict, verifier: Verifier) -> str | None:
    """Why a verifier holding a key must refuse this verdict (None when it may proceed).

    Without a key nothing is refused here: the report states that integrity is not established.
    """
    if not verifier.holds_key or result["status"] == "verified":
        return None
    if result["status"] == "absent":
        return f"no {TRAIL_NAME} in the run dir: a verifier holding a key refuses a run without a signed trail"
    problems = result["problems"] or [f"signature {result['signature']}"]
    more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
    return f"audit trail does not verify with the key given: {problems[0]}{more}"


def _checkpoint_problems(run_dir: Path, chain: Chain, problems: list[str]) -> tuple[list[str], list[str]]:
    """Append the ledger mismatches of checkpoints still present; return (what was checked, unrecorded ones)."""
    checked, unrecorded = [], []
    for ckpt in sorted(p for p in (run_dir / "checkpoints").glob("step-*") if (p / "train_state.json").is_file()):
        entry = chain.last("checkpoint", checkpoint=ckpt.name)
        if entry is None:
            unrecorded.append(ckpt.name)  # a crash between its rename and its entry: never resumed from
            continue
        digest = checkpoint_ledger_digest(ckpt)
        if digest != entry.get("ledger_sha256"):
            problems.append(f"checkpoints/{ckpt.name}: ledger digest {str(digest)[:16]}... differs from the trail's "
                            f"{str(entry.get('ledger_sha256'))[:16]}...")
        checked.append(f"ledger of checkpoints/{ckpt.name}")
    return checked, unrecorded


def _final_problems(run_dir: Path, chain: Chain, final: dict, weights_sha256: str | None) -> list[str]:
    problems = []
    ledger, weights = run_dir / "ledger.npz", run_dir / "model.safetensors"
    if not ledger.is_file():
        problems.append("ledger.npz is missing (recorded in the trail's final entry)")
    elif file_ledger_digest(ledger) != final.get("ledger_sha256"):
        problems.append("ledger.npz does not match the trail's final entry (exposure counts changed)")
    if (weights_sha256 or (sha256_file(weights) if weights.is_file() else None)) != final.get("weights_sha256"):
        problems.append("model.safetensors does not match the weights sha256 in the trail's final entry")
    ema, ema_sha256 = run_dir / EMA_WEIGHTS, final.get("ema_weights_sha256")
    if (ema_sha256 or ema.is_file()) and (sha256_file(ema) if ema.is_file() else None) != ema_sha256:
        problems.append(f"{EMA_WEIGHTS} does not match the EMA weights sha256 in the trail's final entry"
                        if ema_sha256 else f"{EMA_WEIGHTS} is not recorded in the trail's final entry")
    config = run_dir / "model_config.json"  # the model and MINT settings the audit rebuilds the model from
    if (sha256_file(config) if config.is_file() else None) != final.get("model_config_sha256"):
        problems.append("model_config.json does not match the trail's final entry (model or MINT settings changed)")
    source = chain.last("checkpoint", checkpoint=final.get("checkpoint"))
    if source is None or source.get("ledger_sha256") != final.get("ledger_sha256"):
        problems.append(f"the final ledger does not chain to checkpoint {final.get('checkpoint')}'s ledger digest")
    return problems
