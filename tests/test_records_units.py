"""The records layer piece by piece, on a tmp dir: the audit trail's chain (seq, links, hashes, signatures, torn
lines), its config/dataset/checkpoint checks, key handling, and the pickle vetting before a checkpoint is loaded.

Expectations are computed here independently (hashlib, hmac, cryptography), not by the functions under test.
End-to-end tampering of a real run: tests/test_integrity.py.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import pickle
import stat
from pathlib import Path

import pytest
import torch
from cryptography.hazmat.primitives import serialization

from amint_dist.records.pickles import unsafe_pickle_problems
from amint_dist.records.signing import (
    Signer,
    Verifier,
    fingerprint,
    generate_keypair,
    load_private_key,
    load_public_key,
)
from amint_dist.records.trail import TRAIL_NAME, AuditTrail, config_problems, read_chain, splits_problems
from amint_dist.records.verification import checkpoint_file_problems

SPLITS = "ab" * 32
SECRET = b"auditor-secret"


@pytest.fixture(scope="module")
def keys(tmp_path_factory) -> tuple[Path, Path]:
    return generate_keypair(tmp_path_factory.mktemp("keys"))


@pytest.fixture
def signer(keys) -> Signer:
    return Signer(load_private_key(keys[0]), SECRET)


def raw_public(path: Path) -> bytes:
    return load_public_key(path).public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def canonical_hash(entry: dict) -> str:
    body = {k: v for k, v in entry.items() if k not in ("hash", "sig", "hmac")}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def written_run(run_dir: Path, signer: Signer) -> AuditTrail:
    """A run dir with config.yaml and a trail: start, two checkpoints, final."""
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text("train: {epochs: 2}\n")
    trail = AuditTrail(run_dir, SPLITS, signer)
    trail.start(run_dir / "config.yaml", world_size=2)
    trail.append("checkpoint", checkpoint="step-00000004", ledger_sha256="l4")
    trail.append("checkpoint", checkpoint="step-00000008", ledger_sha256="l8")
    trail.append("final", checkpoint="step-00000008", ledger_sha256="l8")
    return trail


def lines(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()]


# ---- the chain as written ----

def test_trail_entries_are_sequenced_linked_hashed_and_signed(tmp_path, signer, keys):
    trail = written_run(tmp_path / "run", signer)
    entries = lines(trail.path)
    assert [e["seq"] for e in entries] == [0, 1, 2, 3]
    assert [e["kind"] for e in entries] == ["start", "checkpoint", "checkpoint", "final"]
    assert entries[0]["prev"] == "0" * 64
    assert [e["prev"] for e in entries[1:]] == [e["hash"] for e in entries[:-1]]
    public = load_public_key(keys[1])
    for e in entries:
        assert e["hash"] == canonical_hash(e) and e["splits_sha256"] == SPLITS
        public.verify(base64.b64decode(e["sig"]), e["hash"].encode())  # raises when wrong
        assert e["hmac"] == hmac.new(SECRET, e["hash"].encode(), hashlib.sha256).hexdigest()
    start = entries[0]
    assert start["config_sha256"] == hashlib.sha256(b"train: {epochs: 2}\n").hexdigest() and start["world_size"] == 2
    assert start["signing"]["ed25519"]["fingerprint"] == "sha256:" + hashlib.sha256(raw_public(keys[1])).hexdigest()
    assert start["signing"]["hmac-sha256"] is True

    chain = read_chain(trail.path, signer.verifier)
    assert (chain.problems, chain.signature, len(chain.entries)) == ([], "verified", 4)
    assert chain.declared_summary() == {"ed25519": start["signing"]["ed25519"]["fingerprint"], "hmac-sha256": True}
    assert chain.last("checkpoint")["seq"] == 2
    assert chain.last("checkpoint", checkpoint="step-00000004")["seq"] == 1
    assert chain.last("checkpoint", checkpoint="step-00000012") is None and chain.last("resume") is None
    assert trail.verified().entries == chain.entries


def test_signature_verdict_depends_on_the_keys_held(tmp_path, signer, keys):
    signed = written_run(tmp_path / "signed", signer)
    no_key = read_chain(signed.path, Verifier())
    assert no_key.problems == [] and no_key.signature.startswith("not checked (the trail is signed: ed25519, hmac")
    public_only = read_chain(signed.path, Verifier(load_public_key(keys[1])))
    assert (public_only.problems, public_only.signature) == ([], "verified")
    unsigned = written_run(tmp_path / "unsigned", Signer())
    assert "sig" not in lines(unsigned.path)[0] and lines(unsigned.path)[0]["signing"] == {}
    assert (read_chain(unsigned.path, Verifier()).signature, read_chain(unsigned.path, Verifier()).problems) == (
        "unsigned", [])
    held = read_chain(unsigned.path, Verifier(load_public_key(keys[1])))  # a key refuses an unsigned trail
    assert held.signature == "broken" and len(held.problems) == 4
    assert all("has no Ed25519 signature" in p for p in held.problems)


def test_a_fresh_start_replaces_the_chain(tmp_path, signer):
    trail = written_run(tmp_path / "run", signer)
    trail.start(tmp_path / "run" / "config.yaml", world_size=1)
    assert [(e["seq"], e["kind"], e["world_size"]) for e in lines(trail.path)] == [(0, "start", 1)]


# ---- damage read back ----

def test_a_torn_last_line_is_named_and_the_next_append_continues_from_the_last_whole_entry(tmp_path, signer):
    trail = written_run(tmp_path / "run", signer)
    with trail.path.open("a") as f:
        f.write('{"seq": 4, "kind": "checkp')
    chain = read_chain(trail.path, signer.verifier)
    assert chain.problems == [f"{TRAIL_NAME} line 5 is incomplete (a torn write)"] and len(chain.entries) == 4
    trail.append("resume", checkpoint="step-00000008")
    entries = lines(trail.path)
    assert [e["seq"] for e in entries] == [0, 1, 2, 3, 4] and entries[4]["prev"] == entries[3]["hash"]
    assert read_chain(trail.path, signer.verifier).problems == []


def test_an_edited_entry_is_named_modified_and_its_signatures_fail(tmp_path, signer):
    trail = written_run(tmp_path / "run", signer)
    raw = trail.path.read_text().splitlines(keepends=True)
    edited = json.loads(raw[1])
    edited["ledger_sha256"] = "forged"
    raw[1] = json.dumps(edited, sort_keys=True) + "\n"
    trail.path.write_text("".join(raw))
    chain = read_chain(trail.path, signer.verifier)
    what = f"{TRAIL_NAME} entry 2 (checkpoint step-00000004)"
    assert chain.problems == [f"{what} was modified (its hash does not match its content)",
                              f"{what} Ed25519 signature does not verify with the public key given",
                              f"{what} HMAC does not verify with AMINT_AUDIT_KEY"]
    assert chain.signature == "broken"


def test_a_removed_entry_breaks_seq_and_link_and_a_garbage_line_is_named(tmp_path, signer):
    trail = written_run(tmp_path / "run", signer)
    raw = trail.path.read_text().splitlines(keepends=True)
    trail.path.write_text("".join(raw[:1] + raw[2:]))
    problems = read_chain(trail.path, signer.verifier).problems
    assert problems == [f"{TRAIL_NAME} entry 2 (checkpoint step-00000008) has seq 2, expected 1 (entries removed or "
                        "reordered)",
                        f"{TRAIL_NAME} entry 2 (checkpoint step-00000008) does not link to the entry before it "
                        "(prev hash differs)",
                        f"{TRAIL_NAME} entry 3 (final step-00000008) has seq 3, expected 2 (entries removed or "
                        "reordered)"]
    trail.path.write_text("".join(raw[:1] + ["[1, 2]\n"] + raw[2:]))
    problems = read_chain(trail.path, signer.verifier).problems
    assert problems == [f"{TRAIL_NAME} line 2 is not a JSON object"]  # in place of seq 1: the rest still chains


# ---- the run's files against the chain ----

def test_config_problems(tmp_path, signer):
    run = tmp_path / "run"
    trail = written_run(run, signer)
    chain = read_chain(trail.path, Verifier())
    assert config_problems(run, chain) == []
    (run / "config.yaml").write_text("train: {epochs: 20}\n")
    assert config_problems(run, chain) == ["config.yaml does not match the sha256 the trail's start entry recorded "
                                           "(the run's config was edited)"]
    (run / "config.yaml").unlink()
    assert config_problems(run, chain) == ["config.yaml is missing (recorded in the trail's start entry)"]
    chain.entries = chain.entries[1:]
    assert config_problems(run, chain) == [f"{TRAIL_NAME} has no start entry (its first line is missing or not a "
                                           "start)"]


def test_splits_problems_name_every_entry_of_another_dataset(tmp_path, signer):
    chain = read_chain(written_run(tmp_path / "run", signer).path, Verifier())
    assert splits_problems(chain, SPLITS) == []
    other = "cd" * 32
    assert splits_problems(chain, other) == [
        f"entry {seq} ({kind}) was written for splits.json sha256 {SPLITS[:16]}..., the dataset's is {other[:16]}..."
        for seq, kind in enumerate(["start", "checkpoint", "checkpoint", "final"])]


def test_checkpoint_file_problems_are_shared_between_ranks(tmp_path):
    ckpt = tmp_path / "step-00000008"
    (ckpt / "sub").mkdir(parents=True)
    names = ["a.bin", "b.json", "c.npz", "d.bin", "sub/e.safetensors"]
    for i, name in enumerate(names):
        (ckpt / name).write_bytes(bytes([i]) * 10)
    recorded = {n: hashlib.sha256((ckpt / n).read_bytes()).hexdigest() for n in names}
    assert checkpoint_file_problems(ckpt, recorded) == []
    (ckpt / "b.json").write_bytes(b"edited")
    (ckpt / "d.bin").unlink()
    (ckpt / "sub" / "planted.pkl").write_bytes(b"x")
    changed = f"{ckpt / 'b.json'} does not match its sha256 in the audit trail (tampered or corrupted)"
    missing = f"{ckpt / 'd.bin'} is missing (recorded in the audit trail)"
    unrecorded = f"{ckpt / 'sub/planted.pkl'} is not recorded in the audit trail"
    assert checkpoint_file_problems(ckpt, recorded) == [changed, missing, unrecorded]
    # two ranks: sorted names split round-robin (rank 0: a, c, sub/e; rank 1: b, d); only rank 0 lists extras
    assert checkpoint_file_problems(ckpt, recorded, rank=0, world=2) == [unrecorded]
    assert checkpoint_file_problems(ckpt, recorded, rank=1, world=2) == [changed, missing]
    # three ranks: rank 0 a, d; rank 1 b, sub/e; rank 2 c
    assert [checkpoint_file_problems(ckpt, recorded, rank=r, world=3) for r in range(3)] == [
        [missing, unrecorded], [changed], []]


# ---- keys ----

def test_generate_keypair_never_overwrites_and_the_private_key_is_private(tmp_path):
    private, public = generate_keypair(tmp_path, "owner")
    assert (private.name, public.name) == ("owner.pem", "owner.pub.pem")
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    before = (private.read_bytes(), public.read_bytes())
    with pytest.raises(FileExistsError, match="not overwriting"):
        generate_keypair(tmp_path, "owner")
    assert (private.read_bytes(), public.read_bytes()) == before
    (tmp_path / "half.pub.pem").write_bytes(b"someone's public key")
    with pytest.raises(FileExistsError, match="half.pub.pem"):
        generate_keypair(tmp_path, "half")
    assert not (tmp_path / "half.pem").exists() and (tmp_path / "half.pub.pem").read_bytes() == b"someone's public key"


def test_fingerprint_is_stable_and_the_same_from_either_half(keys):
    expected = "sha256:" + hashlib.sha256(raw_public(keys[1])).hexdigest()
    assert fingerprint(load_public_key(keys[1])) == expected
    assert fingerprint(load_private_key(keys[0]).public_key()) == expected
    assert fingerprint(load_public_key(keys[1])) == expected  # loading again changes nothing
    assert Verifier(load_public_key(keys[1])).describe() == {"ed25519": expected, "hmac": False}


def test_verifier_problems_for_missing_and_bad_signatures(keys):
    digest = hashlib.sha256(b"entry").hexdigest()
    private = load_private_key(keys[0])
    good = {"sig": base64.b64encode(private.sign(digest.encode())).decode(),
            "hmac": hmac.new(SECRET, digest.encode(), hashlib.sha256).hexdigest()}
    both = Verifier(private.public_key(), SECRET)
    assert both.problems(good, digest) == []
    assert Verifier().problems({}, digest) == []  # no key: nothing to check
    assert both.problems({}, digest) == ["has no Ed25519 signature (unsigned or stripped)",
                                         "has no HMAC (AMINT_AUDIT_KEY) signature (unsigned or stripped)"]
    other = hashlib.sha256(b"another entry").hexdigest()
    assert both.problems(good, other) == ["Ed25519 signature does not verify with the public key given",
                                          "HMAC does not verify with AMINT_AUDIT_KEY"]
    assert both.problems({**good, "sig": "not base64!"}, digest) == [
        "Ed25519 signature does not verify with the public key given"]
    wrong_secret = Verifier(None, b"another secret")
    assert wrong_secret.problems(good, digest) == ["HMAC does not verify with AMINT_AUDIT_KEY"]
    stranger = Verifier(load_private_key(generate_keypair(keys[0].parent / "stranger")[0]).public_key())
    assert stranger.problems(good, digest) == ["Ed25519 signature does not verify with the public key given"]


# ---- pickles vetted before an engine opens them ----

class SideEffect:
    """Unpickling it would create ``path`` (``open(path, "w")``)."""

    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return (open, (str(self.path), "w"))


def test_a_torch_save_of_tensors_and_plain_containers_passes(tmp_path):
    torch.save({"state": {0: {"exp_avg": torch.randn(3)}}, "step": 4, "lr": [1e-3]}, tmp_path / "optimizer.bin")
    torch.save(torch.zeros(2), tmp_path / "scaler.pt")
    (tmp_path / "model.safetensors").write_bytes(b"not a pickle, not vetted here")
    assert unsafe_pickle_problems(tmp_path, ["optimizer.bin", "scaler.pt", "model.safetensors"]) == []
    assert unsafe_pickle_problems(tmp_path, []) == []


def test_a_pickle_with_a_side_effect_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "unpickled"
    torch.save({"w": torch.ones(1), "evil": SideEffect(marker)}, tmp_path / "optimizer.bin")
    problems = unsafe_pickle_problems(tmp_path, ["optimizer.bin"])
    assert len(problems) == 1 and problems[0].startswith(f"{tmp_path / 'optimizer.bin'} is not a weights-only pickle (")
    assert problems[0].endswith("): refusing to load it") and "\n" not in problems[0]
    assert not marker.exists()


@pytest.mark.parametrize("payload", ["plain", "evil"])
def test_a_non_zip_pickle_is_refused(tmp_path, payload):
    marker = tmp_path / "unpickled"
    data = {"w": [1.0, 2.0]} if payload == "plain" else SideEffect(marker)
    (tmp_path / "random_states_0.pkl").write_bytes(pickle.dumps(data))
    problems = unsafe_pickle_problems(tmp_path, ["random_states_0.pkl", "notes.txt"])
    assert len(problems) == 1 and problems[0].startswith(f"{tmp_path / 'random_states_0.pkl'} is not a weights-only")
    assert not marker.exists()
