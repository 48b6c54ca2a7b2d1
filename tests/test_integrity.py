"""The audit trail against an attacker: forge, re-chain, strip, downgrade, re-sign, delete, plant, swap.

One real training run is signed with an Ed25519 key pair and an HMAC secret; each test copies it, plays the
attacker on the copy, and checks what resume and the audit (in-process and through the CLI) make of it.
docs/reliability.md maps each promise to its test.
"""

from __future__ import annotations

import io
import json
import pickle
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from train_helpers import ENV, REPO, load_npz, run_train

from amint_dist.audit.run import audit_config, run_audit
from amint_dist.io import sha256_file
from amint_dist.records.signing import (HMAC_KEY_ENV, PUBLIC_KEY_ENV, SIGNING_KEY_ENV, Signer, Verifier,
                                        fingerprint, generate_keypair, load_private_key, load_public_key)
from amint_dist.records.trail import TRAIL_NAME, TrailError, entry_hash
from amint_dist.records.verification import file_ledger_digest, refusal, verify_run
from amint_dist.train.checkpoint import latest_checkpoint

SECRET = "auditor-secret"
RUN = ["train.epochs=2", "train.max_steps=25", "train.ckpt_every_steps=10", "train.keep_checkpoints=0"]  # epoch 0
RESUME = ["train.epochs=2", "train.ckpt_every_steps=10", "train.keep_checkpoints=0", "resume=latest"]
KEY_ENVS = (SIGNING_KEY_ENV, PUBLIC_KEY_ENV, HMAC_KEY_ENV)


@pytest.fixture(scope="module")
def owner(tmp_path_factory) -> tuple[Path, Path]:
    """The owner's key pair (private, public)."""
    return generate_keypair(tmp_path_factory.mktemp("owner_keys"))


@pytest.fixture(scope="module")
def signed_run(tmp_path_factory, train_root, owner) -> Path:
    """One epoch, a checkpoint every 10 steps, the trail signed with the owner's Ed25519 key and the HMAC secret."""
    run_dir = tmp_path_factory.mktemp("signed") / "run"
    run_train(run_dir, train_root, *RUN, env={SIGNING_KEY_ENV: str(owner[0]), HMAC_KEY_ENV: SECRET})
    return run_dir


@pytest.fixture
def copy(signed_run, tmp_path) -> Path:
    """A copy of the signed run at ``<tmp>/bad`` (where ``train_cli_error`` trains)."""
    return Path(shutil.copytree(signed_run, tmp_path / "bad"))


@pytest.fixture
def no_keys(monkeypatch):
    for name in KEY_ENVS:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def trail_lines(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / TRAIL_NAME).read_text().splitlines()]


def write_trail(run_dir: Path, entries: list[dict]) -> None:
    (run_dir / TRAIL_NAME).write_text("".join(json.dumps(e, sort_keys=True) + "\n" for e in entries))


def forge(run_dir: Path, edit: Callable[[list[dict]], None], signer: Signer | None = None) -> None:
    """The attacker's rewrite: edit the entries, re-hash and re-link the whole chain, drop every signature and
    the start entry's declaration (a downgrade to "unsigned"), or re-sign everything with ``signer``'s keys."""
    entries = trail_lines(run_dir)
    edit(entries)
    signer = signer or Signer()
    entries[0]["signing"] = signer.declaration()
    for i, entry in enumerate(entries):
        for name in ("sig", "hmac"):
            entry.pop(name, None)
        entry["prev"] = entries[i - 1]["hash"] if i else "0" * 64
        entry["hash"] = entry_hash(entry)
        entry.update(signer.signatures(entry["hash"]))
    write_trail(run_dir, entries)


def forge_ledger(run_dir: Path) -> None:
    """Claim five more member exposures than training recorded: in ledger.npz, in the last checkpoint's ledger
    and in every trail entry that records them."""
    ledger = load_npz(run_dir / "ledger.npz")
    ledger["members"][:5] += 1
    last = latest_checkpoint(run_dir)
    for path in (run_dir / "ledger.npz", last / "ledger-rank00000.npz"):
        np.savez(path, **ledger)
    digest = file_ledger_digest(run_dir / "ledger.npz")

    def edit(entries: list[dict]) -> None:
        entries[-1]["ledger_sha256"] = digest
        checkpoint = next(e for e in entries if e.get("checkpoint") == last.name and e["kind"] == "checkpoint")
        checkpoint["ledger_sha256"] = digest
        checkpoint["files"]["ledger-rank00000.npz"] = sha256_file(last / "ledger-rank00000.npz")

    forge(run_dir, edit)


def splits_digest(train_root: Path) -> str:
    return sha256_file(train_root / "splits.json")


def audit_cli(run_dir: Path, *overrides: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """``python launch/audit.py`` (no passive head, few resamples) with exactly the key variables in ``env``."""
    clean = {k: v for k, v in ENV.items() if k not in KEY_ENVS}
    cmd = [sys.executable, str(REPO / "launch" / "audit.py"), f"run.dir={run_dir}", "audit.passive.enabled=false",
           "audit.n_boot=20", "audit.workers=0", "audit.protocols=[seen]", *overrides]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600, env={**clean, **(env or {})})


def refused_line(proc: subprocess.CompletedProcess) -> str:
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and lines and lines[-1].startswith("error: "), (proc.returncode, proc.stderr[-2000:])
    return lines[-1]


# ---- the honest path: who can verify what ----

def test_intact_trail_verifies_with_the_public_key_or_the_secret_and_is_not_established_without(
        signed_run, train_root, owner, tmp_path):
    entries = trail_lines(signed_run)
    assert [e["kind"] for e in entries] == ["start", "checkpoint", "checkpoint", "checkpoint", "final"]
    assert all("sig" in e and "hmac" in e for e in entries)
    public = load_public_key(owner[1])
    assert entries[0]["signing"]["ed25519"]["fingerprint"] == fingerprint(public)
    for verifier in (Verifier(public=public), Verifier(hmac_secret=SECRET.encode()), Verifier(public, SECRET.encode())):
        result = verify_run(signed_run, splits_digest(train_root), verifier)
        assert (result["status"], result["signature"], result["problems"]) == ("verified", "verified", [])
        assert refusal(result, verifier) is None
    nokey = verify_run(signed_run, splits_digest(train_root), Verifier())
    assert nokey["status"] == "not checked" and nokey["declared"]["ed25519"] == fingerprint(public)
    stranger = load_public_key(generate_keypair(tmp_path)[1])
    wrong = verify_run(signed_run, splits_digest(train_root), Verifier(public=stranger))
    assert wrong["status"] == "broken" and "the public key given is" in wrong["problems"][0]
    assert "Ed25519 signature does not verify" in " ".join(wrong["problems"])
    assert refusal(wrong, Verifier(public=stranger)).startswith("audit trail does not verify with the key given")


def test_a_third_party_holding_only_the_public_key_verifies_the_run(signed_run, owner, tmp_path):
    """The auditor has the public key file and nothing else: no private key, no secret, in the environment."""
    auditor = tmp_path / "auditor.pub.pem"
    shutil.copy(owner[1], auditor)
    proc = audit_cli(signed_run, f"audit.public_key={auditor}", f"audit.out_dir={tmp_path / 'audit'}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    report_md = (tmp_path / "audit" / "report.md").read_text()
    fp = fingerprint(load_public_key(owner[1]))
    assert f"Integrity: **verified** (audit trail of 5 entries, every one signed and checked with Ed25519 public key {fp}" \
        in report_md
    report = json.loads((tmp_path / "audit" / "report.json").read_text())
    assert report["integrity"]["keys"] == {"ed25519": fp, "hmac": False}


def test_without_a_key_the_report_never_says_verified(copy, no_keys):
    cfg = small_audit(copy)
    report_md = run_audit(cfg).read_text()
    assert "Integrity: **NOT established** (the trail is signed (ed25519 sha256:" in report_md
    forge(copy, lambda entries: None)  # the same run, re-chained without its signatures
    report_md = run_audit(cfg).read_text()
    assert "Integrity: **NOT established** (unsigned trail" in report_md and "**verified**" not in report_md
    assert any(n.startswith("integrity NOT established: unsigned trail") for n in
               json.loads((copy / "audit" / "report.json").read_text())["notes"])


def small_audit(run_dir: Path) -> dict:
    cfg = audit_config(REPO / "configs", run_dir)
    cfg["audit"].update({"protocols": ["seen"], "workers": 0, "n_boot": 20,
                         "passive": {**cfg["audit"]["passive"], "enabled": False}})
    return cfg


# ---- the attacker: every rewrite is refused by whoever holds a key ----

@pytest.mark.parametrize("tamper, expected", [
    (lambda d: write_trail(d, edit_entry(trail_lines(d), 2, step=999)), "entry 3 (checkpoint step-00000020) was modified"),
    (lambda d: write_trail(d, trail_lines(d)[:1] + trail_lines(d)[2:]), "expected 1 (entries removed or reordered)"),
    (lambda d: (d / TRAIL_NAME).write_text((d / TRAIL_NAME).read_text()[:-40]), "incomplete (a torn write)"),
    (lambda d: np.savez(d / "ledger.npz", **{**load_npz(d / "ledger.npz"), "heldout": np.ones_like(
        load_npz(d / "ledger.npz")["heldout"])}), "ledger.npz does not match the trail's final entry"),
    (lambda d: np.savez(d / "checkpoints/step-00000010/ledger-rank00000.npz", **{
        k: v * 0 for k, v in load_npz(d / "checkpoints/step-00000010/ledger-rank00000.npz").items()}),
     "checkpoints/step-00000010: ledger digest"),
    (lambda d: (d / "model.safetensors").write_bytes((d / "model.safetensors").read_bytes() + b" "),
     "model.safetensors does not match the weights sha256"),
    (lambda d: (d / "model_config.json").write_text((d / "model_config.json").read_text().replace('"active"', '"passive"')),
     "model_config.json does not match the trail's final entry"),
    (lambda d: (d / "config.yaml").write_text((d / "config.yaml").read_text().replace("epochs: 2", "epochs: 3")),
     "config.yaml does not match the sha256 the trail's start entry recorded"),
    (lambda d: forge(d, lambda e: e[2].update(step=999)), "has no Ed25519 signature"),  # re-chained, stripped
    (lambda d: write_trail(d, [{k: v for k, v in e.items() if k != "sig" or e["seq"] != 3} for e in trail_lines(d)]),
     "entry 4 (checkpoint step-00000025) has no Ed25519 signature"),  # partly signed
])
def test_tampering_is_named_and_refused_with_a_key(copy, train_root, owner, tamper, expected):
    tamper(copy)
    verifier = Verifier(public=load_public_key(owner[1]))
    result = verify_run(copy, splits_digest(train_root), verifier)
    assert result["status"] == "broken" and any(expected in p for p in result["problems"]), result["problems"]
    assert refusal(result, verifier)


def edit_entry(entries: list[dict], i: int, **fields) -> list[dict]:
    entries[i].update(fields)
    return entries


def test_another_dataset_breaks_the_chain(signed_run, owner):
    result = verify_run(signed_run, "0" * 64, Verifier(public=load_public_key(owner[1])))
    assert result["status"] == "broken" and "was written for splits.json sha256" in result["problems"][0]


def test_a_downgraded_forgery_is_refused_by_the_audit_with_any_key(copy, owner, tmp_path):
    """Forge ledger.npz, recompute the chain, delete every signature: the old audit said "verified"."""
    forge_ledger(copy)
    for env, overrides in (({}, [f"audit.public_key={owner[1]}"]), ({HMAC_KEY_ENV: SECRET}, []),
                           ({SIGNING_KEY_ENV: str(owner[0])}, [])):
        line = refused_line(audit_cli(copy, *overrides, env=env))
        assert line.startswith(f"error: refusing to audit {copy}: audit trail does not verify with the key given: ")
        assert "has no Ed25519 signature" in line or "has no HMAC" in line, line
    assert not (copy / "audit").exists()
    proc = audit_cli(copy)  # no key: audited, and the report says integrity is not established
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Integrity: **NOT established** (unsigned trail" in (copy / "audit" / "report.md").read_text()


def test_a_trail_re_signed_with_the_attackers_key_is_refused(copy, owner, tmp_path):
    attacker = Signer(load_private_key(generate_keypair(tmp_path / "attacker")[0]))
    forge(copy, lambda entries: entries[-1].update(step=12345), signer=attacker)
    line = refused_line(audit_cli(copy, f"audit.public_key={owner[1]}"))
    assert "declares Ed25519 key sha256:" in line and "the public key given is" in line


def test_a_deleted_trail_is_refused_with_a_key_and_not_established_without(copy, owner):
    (copy / TRAIL_NAME).unlink()
    line = refused_line(audit_cli(copy, f"audit.public_key={owner[1]}"))
    assert f"no {TRAIL_NAME} in the run dir: a verifier holding a key refuses" in line
    assert audit_cli(copy).returncode == 0
    assert "Integrity: **NOT established** (no audit_trail.jsonl" in (copy / "audit" / "report.md").read_text()


def test_a_wrong_key_is_refused(copy, monkeypatch):
    monkeypatch.setenv(HMAC_KEY_ENV, "not the key")
    with pytest.raises(TrailError, match="HMAC does not verify"):
        run_audit(small_audit(copy))


# ---- resume: nothing unpickled before it is trusted ----

class Planted:
    """A pickle that, if ever unpickled, leaves a marker file."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def plant(checkpoint: Path, name: str, marker: Path, as_torch_file: bool) -> None:
    """Replace ``checkpoint/name`` with a pickle whose unpickling touches ``marker`` (a torch zip file or raw)."""
    if as_torch_file:
        buf = io.BytesIO()
        torch.save({"state": Planted(marker)}, buf)
        data = buf.getvalue()
    else:
        data = pickle.dumps(Planted(marker))
    (checkpoint / name).write_bytes(data)


def rehash_file(run_dir: Path, checkpoint: Path, name: str) -> None:
    """The attacker records the planted file's sha256 in the checkpoint's entry and re-chains (unsigned)."""
    digest = sha256_file(checkpoint / name)
    forge(run_dir, lambda entries: next(e for e in entries if e.get("checkpoint") == checkpoint.name)
          ["files"].update({name: digest}))


def test_resume_refuses_a_planted_pickle_before_loading_it(copy, train_root, owner, tmp_path, capsys, no_keys):
    from test_train import train_cli_error

    no_keys.setenv(SIGNING_KEY_ENV, str(owner[0]))
    no_keys.setenv(HMAC_KEY_ENV, SECRET)
    marker = tmp_path / "unpickled"
    latest = latest_checkpoint(copy)
    plant(latest, "random_states_0.pkl", marker, as_torch_file=False)
    error = train_cli_error(tmp_path, train_root, RESUME, capsys)
    assert error.startswith(f"error: refusing to resume from {latest.name}: ")
    assert "random_states_0.pkl does not match its sha256 in the audit trail" in error and not marker.exists()


@pytest.mark.parametrize("as_torch_file", [False, True])
def test_a_planted_pickle_in_a_downgraded_trail_never_runs(copy, train_root, owner, tmp_path, capsys, no_keys,
                                                            as_torch_file):
    """The pickle's sha256 is written into a re-chained, unsigned trail: with the key, resume refuses the trail;
    without any key, the weights-only unpickler refuses the file. The side effect happens in neither."""
    from test_train import train_cli_error

    marker = tmp_path / "unpickled"
    latest = latest_checkpoint(copy)
    plant(latest, "random_states_0.pkl", marker, as_torch_file)
    rehash_file(copy, latest, "random_states_0.pkl")
    no_keys.setenv(SIGNING_KEY_ENV, str(owner[0]))
    error = train_cli_error(tmp_path, train_root, RESUME, capsys)
    assert "has no Ed25519 signature" in error and not marker.exists(), error
    no_keys.delenv(SIGNING_KEY_ENV)
    error = train_cli_error(tmp_path, train_root, RESUME, capsys)
    assert "random_states_0.pkl is not a weights-only pickle" in error and not marker.exists(), error


def test_resume_refuses_unrecorded_files_an_edited_config_and_a_missing_key(copy, train_root, owner, tmp_path,
                                                                           capsys, no_keys):
    from test_train import train_cli_error

    assert "audit_trail.jsonl is signed with ed25519, hmac-sha256, this run signs with no key: resume with the keys" \
        in train_cli_error(tmp_path, train_root, RESUME, capsys)
    no_keys.setenv(SIGNING_KEY_ENV, str(owner[0]))  # both keys signed it: one alone would leave entries half signed
    assert "this run signs with ed25519: resume with the keys" in train_cli_error(tmp_path, train_root, RESUME, capsys)
    no_keys.setenv(HMAC_KEY_ENV, SECRET)
    extra = latest_checkpoint(copy) / "custom_checkpoint_0.pkl"
    extra.write_bytes(pickle.dumps({"x": 1}))
    assert f"{extra} is not recorded in the audit trail" in train_cli_error(tmp_path, train_root, RESUME, capsys)
    extra.unlink()
    (copy / "config.yaml").write_text((copy / "config.yaml").read_text().replace("lr: ", "lr: 1"))
    assert "config.yaml does not match the sha256" in train_cli_error(tmp_path, train_root, RESUME, capsys)


def test_kill_after_the_last_checkpoint_rewrites_the_same_final_artifacts(signed_run, train_root, owner, tmp_path):
    """As if killed while writing the final model (after the last checkpoint): the final files and trail entry
    absent, a half-written temp file left; resume=latest writes them again, identical, and saves no checkpoint."""
    run_dir = Path(shutil.copytree(signed_run, tmp_path / "run"))
    for name in ("ledger.npz", "model.safetensors", "model_config.json"):
        (run_dir / name).unlink()
    (run_dir / ".model.safetensors.x1y2.tmp").write_bytes(b"half a model")
    write_trail(run_dir, trail_lines(run_dir)[:-1])
    run_train(run_dir, train_root, *RUN, "resume=latest", env={SIGNING_KEY_ENV: str(owner[0]), HMAC_KEY_ENV: SECRET})
    for name in ("ledger.npz", "model.safetensors"):
        assert (run_dir / name).read_bytes() == (signed_run / name).read_bytes(), name
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == \
        sorted(p.name for p in (signed_run / "checkpoints").iterdir())
    assert not list(run_dir.glob(".*.tmp"))
    assert [e["kind"] for e in trail_lines(run_dir)][-2:] == ["resume", "final"]
    result = verify_run(run_dir, splits_digest(train_root), Verifier(load_public_key(owner[1]), SECRET.encode()))
    assert result["status"] == "verified", result["problems"]


def test_no_unsafe_deserialisation_in_our_code():
    """Weights through safetensors; every torch.load with weights_only=True; numpy never unpickles."""
    sources = [p for d in ("amint_dist", "launch", "benchmarks") for p in (REPO / d).rglob("*.py")]
    for path in sources:
        text = path.read_text()
        assert "pickle.load" not in text and "allow_pickle=True" not in text, path
        for call in text.split("torch.load(")[1:]:
            assert "weights_only=True" in call.split(")")[0], f"{path}: torch.load without weights_only=True"
