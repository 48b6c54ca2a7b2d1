"""RUN/MODEL_CARD.md: written by training, rewritten by the audit with its figures; its digests are the files'."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from train_helpers import run_quick_audit, run_train

from amint_dist.io import sha256_file
from amint_dist.records.signing import SIGNING_KEY_ENV, fingerprint, generate_keypair, load_public_key


def front_matter(card: Path) -> dict:
    """The YAML between the card's leading '---' lines (Hugging Face's layout)."""
    text = card.read_text()
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n")[1])


@pytest.fixture(scope="module")
def audited(tmp_path_factory, train_root) -> tuple[Path, dict, str]:
    """A tiny run; its card as training wrote it; then the audit (which rewrites it)."""
    run_dir = tmp_path_factory.mktemp("card") / "run"
    run_train(run_dir, train_root, "train.epochs=1")
    before = front_matter(run_dir / "MODEL_CARD.md"), (run_dir / "MODEL_CARD.md").read_text()
    run_quick_audit(run_dir)
    return run_dir, *before


def test_training_writes_a_card_whose_digests_are_the_files(audited, train_root):
    run_dir, meta, text = audited
    assert meta["library_name"] == "timm" and "membership-inference" in meta["tags"]
    assert meta["model_name"] == "vit_tiny_patch16_224" and meta["dataset"] == "digits"
    amint = meta["amint"]
    assert amint["splits_sha256"] == sha256_file(train_root / "splits.json")
    assert amint["ledger_sha256"] == sha256_file(run_dir / "ledger.npz")
    assert amint["weights_sha256"] == sha256_file(run_dir / "model.safetensors")
    assert amint["signature"] == "unsigned" and amint["init"] == {"from": "random"} and amint["audit"] is None
    assert "Not audited yet" in text and "| `train.epochs` | `1` |" in text


def test_the_audit_rewrites_the_card_with_its_headline_figures(audited):
    run_dir, before, _ = audited
    meta, text = front_matter(run_dir / "MODEL_CARD.md"), (run_dir / "MODEL_CARD.md").read_text()
    report = json.loads((run_dir / "audit" / "report.json").read_text())
    figures = meta["amint"]["audit"]
    assert figures["integrity"] == report["integrity"]["status"] == "unsigned"
    for name, protocol, metric in (("seen_auc", "seen", "auc"), ("seen_tpr_at_1pct_fpr", "seen", "tpr_at_1pct_fpr"),
                                   ("null_auc", "null", "auc"), ("unseen_auc", "unseen", "auc")):
        assert figures[name] == report["protocols"][protocol]["methods"]["amint"][metric], name
    assert {k: v for k, v in meta["amint"].items() if k != "audit"} == {k: v for k, v in before["amint"].items()
                                                                       if k != "audit"}
    seen = figures["seen_auc"]
    assert f"{seen['value']:.3f} (95% CI {seen['ci95'][0]:.3f} to {seen['ci95'][1]:.3f})" in text
    assert f"```\npython launch/audit.py run.dir={run_dir.resolve()}\n```" in text and "not established" in text


def test_a_signed_run_names_its_key_fingerprint(tmp_path, train_root):
    private, public = generate_keypair(tmp_path / "keys")
    run_dir = tmp_path / "signed"
    run_train(run_dir, train_root, "train.max_steps=2", env={SIGNING_KEY_ENV: str(private)})
    meta, text = front_matter(run_dir / "MODEL_CARD.md"), (run_dir / "MODEL_CARD.md").read_text()
    expected = fingerprint(load_public_key(public))
    assert meta["amint"]["signature"] == f"ed25519 {expected}"
    assert "audit.public_key=OWNER_PUBLIC_KEY.pem\n```" in text and f"must read `{expected}`" in text
