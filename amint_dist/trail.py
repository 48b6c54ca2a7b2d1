"""Tamper-evident audit trail: ``RUN/audit_trail.jsonl``, a hash chain of what a training run wrote.

One JSON object per line. Every entry holds ``seq``, ``kind`` (start | resume | checkpoint | final), the
sha256 of the dataset's ``splits.json``, ``prev`` (the previous entry's hash) and ``hash`` (sha256 of the
entry's canonical JSON without ``hash``/``hmac``): an edited, removed, reordered or torn line breaks the
chain. Checkpoint entries record the checkpoint's ledger digest (summed over ranks) and the sha256 of each
of its files (checked before anything in it is unpickled on resume); the final entry records the digest
of ``ledger.npz`` and the sha256 of ``model.safetensors``. With ``AMINT_AUDIT_KEY`` set, each entry is also
signed (``hmac``: HMAC-SHA256 of its hash): then nobody without the key can rewrite the chain consistently.
Rank 0 writes it; each entry rewrites the whole (small) file atomically.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from amint_dist import __version__
from amint_dist.io import atomic_append_line, atomic_write_text, sha256_file
from amint_dist.train.ledger import ExposureLedger

TRAIL_NAME = "audit_trail.jsonl"
KEY_ENV = "AMINT_AUDIT_KEY"
FORMAT = "amint-dist-trail/1"
GENESIS = "0" * 64


class TrailError(ValueError):
    """The audit trail, or a file it records, does not verify."""


def audit_key() -> bytes | None:
    """The signing key from ``$AMINT_AUDIT_KEY`` (None when unset or empty)."""
    key = os.environ.get(KEY_ENV, "")
    return key.encode() if key else None


def entry_hash(entry: dict[str, Any]) -> str:
    """sha256 of the entry's canonical JSON, without its ``hash`` and ``hmac`` fields."""
    body = {k: v for k, v in entry.items() if k not in ("hash", "hmac")}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def entry_hmac(digest: str, key: bytes) -> str:
    return hmac.new(key, digest.encode(), hashlib.sha256).hexdigest()


@dataclass
class Chain:
    """A parsed trail: its entries, what is wrong with the chain, and the signature verdict."""

    entries: list[dict] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    signature: str = "unsigned"  # unsigned | verified | broken | not checked (...)

    def last(self, kind: str, **match: Any) -> dict | None:
        """The last entry of ``kind`` whose fields equal ``match``."""
        return next((e for e in reversed(self.entries)
                     if e.get("kind") == kind and all(e.get(k) == v for k, v in match.items())), None)


def read_chain(path: Path, key: bytes | None) -> Chain:
    """Parse and check a trail: line integrity, sequence, links, self hashes, signatures.

    Raises TrailError when the chain is signed and ``key`` verifies none of its entries (a wrong key).
    """
    chain = Chain()
    text = path.read_text(errors="replace")
    lines = text.splitlines(keepends=True)
    prev = GENESIS
    for n, line in enumerate(lines, 1):
        if not line.endswith("\n"):
            chain.problems.append(f"{path.name} line {n} is incomplete (a torn write)")
            break
        try:
            entry = json.loads(line)
            if not isinstance(entry, dict):
                raise ValueError("not an object")
        except ValueError:
            chain.problems.append(f"{path.name} line {n} is not a JSON object")
            prev = None
            continue
        what = f"{path.name} entry {n} ({entry.get('kind')}{' ' + str(entry.get('checkpoint')) if entry.get('checkpoint') else ''})"
        if entry.get("seq") != n - 1:
            chain.problems.append(f"{what} has seq {entry.get('seq')}, expected {n - 1} (entries removed or reordered)")
        if prev is not None and entry.get("prev") != prev:
            chain.problems.append(f"{what} does not link to the entry before it (prev hash differs)")
        if entry.get("hash") != entry_hash(entry):
            chain.problems.append(f"{what} was modified (its hash does not match its content)")
        prev = entry.get("hash")
        chain.entries.append(entry)
    _check_signatures(chain, path, key)
    return chain


def _check_signatures(chain: Chain, path: Path, key: bytes | None) -> None:
    signed = [e for e in chain.entries if "hmac" in e]
    if not signed:
        return
    if key is None:
        chain.signature = f"not checked (the trail is signed; set {KEY_ENV} to verify it)"
        return
    bad = [e for e in signed if not hmac.compare_digest(str(e["hmac"]), entry_hmac(entry_hash(e), key))]
    if len(bad) == len(signed):
        raise TrailError(f"{path}: {KEY_ENV} verifies none of the trail's {len(signed)} signatures "
                         "(wrong key, or every entry forged): refusing")
    unsigned = [e for e in chain.entries if "hmac" not in e]
    chain.problems += [f"{path.name} entry {e.get('seq')} ({e.get('kind')}): signature does not verify" for e in bad]
    chain.problems += [f"{path.name} entry {e.get('seq')} ({e.get('kind')}) is unsigned in a signed trail"
                       for e in unsigned]
    chain.signature = "broken" if bad or unsigned else "verified"


class AuditTrail:
    """Writer (rank 0) and resume-time reader of one run's trail."""

    def __init__(self, run_dir: Path, splits_sha256: str, key: bytes | None):
        self.path = Path(run_dir) / TRAIL_NAME
        self.splits_sha256, self.key = splits_sha256, key

    def verified(self) -> Chain:
        """The trail, refused unless intact, verifiable with the key at hand and about this dataset."""
        if not self.path.is_file():
            raise TrailError(f"no audit trail at {self.path}: checkpoint files cannot be verified before loading")
        chain = read_chain(self.path, self.key)
        if chain.signature.startswith("not checked"):
            raise TrailError(f"{self.path} is signed: set {KEY_ENV} to the key it was signed with to resume")
        problems = chain.problems + splits_problems(chain, self.splits_sha256)
        if problems:
            raise TrailError(f"audit trail broken: {problems[0]}"
                             + (f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""))
        return chain

    def append(self, kind: str, *, fresh: bool = False, **fields: Any) -> dict:
        """Add an entry (``fresh``: start a new chain); return it."""
        entries = [] if fresh or not self.path.is_file() else read_chain(self.path, None).entries
        entry = {"format": FORMAT, "seq": len(entries), "kind": kind, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                 "splits_sha256": self.splits_sha256, "prev": entries[-1]["hash"] if entries else GENESIS, **fields}
        entry["hash"] = entry_hash(entry)
        if self.key is not None:
            entry["hmac"] = entry_hmac(entry["hash"], self.key)
        line = json.dumps(entry, sort_keys=True)
        if fresh:
            atomic_write_text(self.path, line + "\n")
        else:
            atomic_append_line(self.path, line)
        return entry

    def start(self, config_path: Path, world_size: int) -> dict:
        return self.append("start", fresh=True, config_sha256=sha256_file(config_path), world_size=world_size,
                           tool_version=__version__, signed=self.key is not None)


def splits_problems(chain: Chain, splits_sha256: str) -> list[str]:
    """Entries written for another dataset than the one whose splits.json hashes to ``splits_sha256``."""
    return [f"entry {e.get('seq')} ({e.get('kind')}) was written for splits.json sha256 "
            f"{str(e.get('splits_sha256'))[:16]}..., the dataset's is {splits_sha256[:16]}..."
            for e in chain.entries if e.get("splits_sha256") != splits_sha256]


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


def verify_run(run_dir: Path, splits_sha256: str, key: bytes | None, weights_sha256: str | None = None) -> dict:
    """The audit's integrity section: chain, signatures, dataset, present checkpoints' ledgers, final ledger and
    weights against the trail. ``status`` is verified, broken (``problems`` says exactly what) or absent."""
    run_dir = Path(run_dir)
    path = run_dir / TRAIL_NAME
    if not path.is_file():
        return {"status": "absent", "signature": "unsigned", "entries": 0, "problems": [], "checked": [],
                "note": f"no {TRAIL_NAME} (a model trained elsewhere or by an older version): nothing to verify"}
    chain = read_chain(path, key)
    problems = chain.problems + splits_problems(chain, splits_sha256)
    checked = [f"hash chain of {len(chain.entries)} entries", "splits.json digest"]
    unrecorded = []
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
    final = chain.last("final")
    if final is None:
        problems.append("the trail has no final entry (the run did not finish, or its end was cut off)")
    else:
        problems += _final_problems(run_dir, chain, final, weights_sha256)
        checked += ["ledger.npz digest", "model.safetensors sha256", "model_config.json sha256"]
    status = "broken" if problems or chain.signature == "broken" else "verified"
    return {"status": status, "signature": chain.signature, "entries": len(chain.entries), "problems": problems,
            "checked": checked, "unrecorded_checkpoints": unrecorded}


def _final_problems(run_dir: Path, chain: Chain, final: dict, weights_sha256: str | None) -> list[str]:
    problems = []
    ledger, weights = run_dir / "ledger.npz", run_dir / "model.safetensors"
    if not ledger.is_file():
        problems.append("ledger.npz is missing (recorded in the trail's final entry)")
    elif file_ledger_digest(ledger) != final.get("ledger_sha256"):
        problems.append("ledger.npz does not match the trail's final entry (exposure counts changed)")
    if (weights_sha256 or (sha256_file(weights) if weights.is_file() else None)) != final.get("weights_sha256"):
        problems.append("model.safetensors does not match the weights sha256 in the trail's final entry")
    config = run_dir / "model_config.json"  # the model and MINT settings the audit rebuilds the model from
    if (sha256_file(config) if config.is_file() else None) != final.get("model_config_sha256"):
        problems.append("model_config.json does not match the trail's final entry (model or MINT settings changed)")
    source = chain.last("checkpoint", checkpoint=final.get("checkpoint"))
    if source is None or source.get("ledger_sha256") != final.get("ledger_sha256"):
        problems.append(f"the final ledger does not chain to checkpoint {final.get('checkpoint')}'s ledger digest")
    return problems
