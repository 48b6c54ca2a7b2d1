"""Tamper-evident audit trail: ``RUN/audit_trail.jsonl``, a signed hash chain of what a training run wrote.

One JSON object per line. Every entry holds ``seq``, ``kind`` (start | resume | checkpoint | final), the
sha256 of the dataset's ``splits.json``, ``prev`` (the previous entry's hash) and ``hash`` (sha256 of the
entry's canonical JSON without its signature fields): an edited, removed, reordered or torn line breaks the
chain. The start entry declares how the chain is signed (``signing``: {} when unsigned, else the schemes and
the Ed25519 public key's fingerprint); a chain is signed or not from its start, and every entry then carries
``sig`` (Ed25519 over its hash) and/or ``hmac``. A reader holding a key requires a valid signature of that
key on every entry (:mod:`amint_dist.records.signing`). Rank 0 writes it; each entry rewrites the whole
(small) file atomically.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from amint_dist import __version__
from amint_dist.io import atomic_append_line, atomic_write_text, sha256_file
from amint_dist.records.signing import ED25519, HMAC_KEY_ENV, SIGNING_KEY_ENV, Signer, Verifier

TRAIL_NAME = "audit_trail.jsonl"
FORMAT = "amint-dist-trail/2"
GENESIS = "0" * 64
SIGNATURE_FIELDS = ("hash", "sig", "hmac")


class TrailError(ValueError):
    """The audit trail, or a file it records, does not verify."""


def entry_hash(entry: dict[str, Any]) -> str:
    """sha256 of the entry's canonical JSON, without its ``hash`` and signature fields."""
    body = {k: v for k, v in entry.items() if k not in SIGNATURE_FIELDS}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


@dataclass
class Chain:
    """A parsed trail: its entries, what is wrong with it, and the signature verdict.

    ``signature``: ``verified`` (every entry signed by every key the reader holds), ``broken`` (a key is held
    and some entry lacks a valid signature), ``unsigned`` (no key held, the trail declares no signing), or
    ``not checked (...)`` (no key held, the trail says it is signed).
    """

    entries: list[dict] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)  # the chain's own problems, then the signatures'
    signature: str = "unsigned"

    def last(self, kind: str, **match: Any) -> dict | None:
        """The last entry of ``kind`` whose fields equal ``match``."""
        return next((e for e in reversed(self.entries)
                     if e.get("kind") == kind and all(e.get(k) == v for k, v in match.items())), None)

    @property
    def declared(self) -> dict:
        """The start entry's ``signing`` declaration ({} when unsigned or when there is no start entry)."""
        start = self.entries[0] if self.entries and self.entries[0].get("kind") == "start" else {}
        return start.get("signing") or {}

    def declared_summary(self) -> dict:
        """The declared schemes, each with its key's fingerprint where it has one (for a report)."""
        return {k: v.get("fingerprint") if isinstance(v, dict) else v for k, v in self.declared.items()}


def _label(path: Path, n: int, entry: dict) -> str:
    checkpoint = f" {entry['checkpoint']}" if entry.get("checkpoint") else ""
    return f"{path.name} entry {n} ({entry.get('kind')}{checkpoint})"


def read_chain(path: Path, verifier: Verifier) -> Chain:
    """Parse and check a trail: line integrity, sequence, links, self hashes, and the signatures of every key
    ``verifier`` holds (all of them, on every entry)."""
    chain, unsigned = Chain(), []
    prev: str | None = GENESIS
    for n, line in enumerate(path.read_text(errors="replace").splitlines(keepends=True), 1):
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
        what = _label(path, n, entry)
        if entry.get("seq") != n - 1:
            chain.problems.append(f"{what} has seq {entry.get('seq')}, expected {n - 1} (entries removed or reordered)")
        if prev is not None and entry.get("prev") != prev:
            chain.problems.append(f"{what} does not link to the entry before it (prev hash differs)")
        digest = entry_hash(entry)
        if entry.get("hash") != digest:
            chain.problems.append(f"{what} was modified (its hash does not match its content)")
        unsigned += [f"{what} {p}" for p in verifier.problems(entry, digest)]
        prev = entry.get("hash")
        chain.entries.append(entry)
    chain.signature = _signature_verdict(chain, path, verifier, unsigned)
    chain.problems += unsigned
    return chain


def _signature_verdict(chain: Chain, path: Path, verifier: Verifier, unsigned: list[str]) -> str:
    """Record a key mismatch first in ``unsigned``; return the verdict (see :class:`Chain`)."""
    if verifier.holds_key:
        declared = chain.declared.get(ED25519, {}).get("fingerprint")
        given = verifier.describe()["ed25519"]
        if declared and given and declared != given:
            unsigned.insert(0, f"{path.name} declares Ed25519 key {declared[:23]}..., the public key given is "
                               f"{given[:23]}... (another owner's key, or a re-signed trail)")
        return "broken" if unsigned or not chain.entries else "verified"
    if chain.declared or any("sig" in e or "hmac" in e for e in chain.entries):
        schemes = ", ".join(sorted(chain.declared)) or "signatures present"
        return f"not checked (the trail is signed: {schemes}; give the public key or {HMAC_KEY_ENV} to verify it)"
    return "unsigned"


class AuditTrail:
    """Writer (rank 0) and resume-time reader of one run's trail."""

    def __init__(self, run_dir: Path, splits_sha256: str, signer: Signer):
        self.path = Path(run_dir) / TRAIL_NAME
        self.splits_sha256, self.signer = splits_sha256, signer

    def verified(self) -> Chain:
        """The trail, refused unless intact, signed from its start by exactly the keys this run signs with (every
        entry: no downgrade, no upgrade or change of keys mid-way), about this dataset, with ``config.yaml``
        unchanged."""
        if not self.path.is_file():
            raise TrailError(f"no audit trail at {self.path}: checkpoint files cannot be verified before loading")
        chain = read_chain(self.path, self.signer.verifier)
        problems = chain.problems + splits_problems(chain, self.splits_sha256)
        problems += config_problems(self.path.parent, chain)
        declared, mine = sorted(chain.declared), sorted(self.signer.declaration())
        if not problems and declared != mine:
            problems = [f"{self.path.name} is signed with {', '.join(declared) or 'no key'}, this run signs with "
                        f"{', '.join(mine) or 'no key'}: resume with the keys it started with "
                        f"(${SIGNING_KEY_ENV}, ${HMAC_KEY_ENV})"]
        if problems:
            raise TrailError(f"audit trail broken: {problems[0]}"
                             + (f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""))
        return chain

    def append(self, kind: str, *, fresh: bool = False, **fields: Any) -> dict:
        """Add a signed entry (``fresh``: start a new chain); return it."""
        entries = [] if fresh or not self.path.is_file() else read_chain(self.path, Verifier()).entries
        entry = {"format": FORMAT, "seq": len(entries), "kind": kind, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                 "splits_sha256": self.splits_sha256, "prev": entries[-1]["hash"] if entries else GENESIS, **fields}
        entry["hash"] = entry_hash(entry)
        entry.update(self.signer.signatures(entry["hash"]))
        line = json.dumps(entry, sort_keys=True)
        if fresh:
            atomic_write_text(self.path, line + "\n")
        else:
            atomic_append_line(self.path, line)
        return entry

    def start(self, config_path: Path, world_size: int, **fields: Any) -> dict:
        """A new chain whose first entry records ``config_path``'s sha256 and the signing keys (and ``fields``)."""
        return self.append("start", fresh=True, config_sha256=sha256_file(config_path), world_size=world_size,
                           tool_version=__version__, signing=self.signer.declaration(), **fields)

    def start_entry(self) -> dict:
        """The chain's first entry as written ({} when there is none)."""
        entries = read_chain(self.path, Verifier()).entries if self.path.is_file() else []
        return entries[0] if entries and entries[0].get("kind") == "start" else {}


def splits_problems(chain: Chain, splits_sha256: str) -> list[str]:
    """Entries written for another dataset than the one whose splits.json hashes to ``splits_sha256``."""
    return [f"entry {e.get('seq')} ({e.get('kind')}) was written for splits.json sha256 "
            f"{str(e.get('splits_sha256'))[:16]}..., the dataset's is {splits_sha256[:16]}..."
            for e in chain.entries if e.get("splits_sha256") != splits_sha256]


def config_problems(run_dir: Path, chain: Chain) -> list[str]:
    """``config.yaml`` must be the file the start entry recorded (learning rate, epochs, ... unchanged)."""
    start = chain.entries[0] if chain.entries and chain.entries[0].get("kind") == "start" else None
    if start is None:
        return [f"{TRAIL_NAME} has no start entry (its first line is missing or not a start)"]
    config = Path(run_dir) / "config.yaml"
    if not config.is_file():
        return ["config.yaml is missing (recorded in the trail's start entry)"]
    if sha256_file(config) != start.get("config_sha256"):
        return ["config.yaml does not match the sha256 the trail's start entry recorded (the run's config was edited)"]
    return []
