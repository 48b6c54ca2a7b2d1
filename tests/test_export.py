"""launch/export.py: a run's verified backbone as a plain timm file, loaded back by timm itself; tampering refused;
the exported file starts a new run (model.checkpoint)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import safetensors.torch
import timm
import torch
from train_helpers import ENV, REPO, run_train

from amint_dist.io import sha256_file
from amint_dist.models import model_from_record

FIRST_STEP_ONLY = ["train.max_steps=1", "optim.lr=1e-12", "optim.min_lr=0"]  # weights move by ~1e-12 at most


def export_cli(run_dir: Path, *overrides: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(REPO / "launch" / "export.py"), f"run.dir={run_dir}", *overrides]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300, env=ENV)


def error_line(proc: subprocess.CompletedProcess) -> str:
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and lines and lines[-1].startswith("error: "), (proc.returncode, proc.stderr[-2000:])
    return lines[-1]


def audited_backbone(run_dir: Path) -> torch.nn.Module:
    """The run's backbone as the audit rebuilds it (model_config.json, model.safetensors loaded strictly)."""
    model = model_from_record(json.loads((run_dir / "model_config.json").read_text()))
    model.load_state_dict(safetensors.torch.load_file(run_dir / "model.safetensors"), strict=True)
    return model.backbone.eval()


@pytest.fixture(scope="module")
def trained(tmp_path_factory, train_root) -> Path:
    run_dir = tmp_path_factory.mktemp("export") / "run"
    run_train(run_dir, train_root, "train.epochs=1")
    return run_dir


@pytest.fixture(scope="module")
def exported(trained, tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    out = tmp_path_factory.mktemp("exported") / "vit.safetensors"
    proc = export_cli(trained, f"export.out={out}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, proc


def test_timm_loads_the_export_and_computes_what_the_audited_backbone_computes(trained, exported):
    out, proc = exported
    info = json.loads(out.with_suffix(".json").read_text())
    assert info["sha256"] == sha256_file(out)
    assert info["source"]["weights_sha256"] == json.loads((trained / "model_config.json").read_text())["weights_sha256"]
    assert info["source"]["integrity"] == "unsigned" and info["source"]["init"] == {"from": "random"}
    line = proc.stdout.strip().splitlines()[-1]
    assert line.startswith('python -c "import timm; model = timm.create_model(') and line.endswith(')"')
    printed: dict = {}
    exec(line.removeprefix('python -c "').removesuffix('"'), printed)  # the printed command, as a user runs it
    by_json = timm.create_model(**info["create_model"])
    create = {k: v for k, v in info["create_model"].items() if k not in ("pretrained", "pretrained_cfg_overlay")}
    strict = timm.create_model(create.pop("model_name"), pretrained=False, **create)
    strict.load_state_dict(safetensors.torch.load_file(out), strict=True)
    x = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = audited_backbone(trained)(x)
        for model in (printed["model"], by_json, strict):
            assert torch.equal(model.eval()(x), expected)
    assert not torch.equal(timm.create_model("vit_tiny_patch16_224", **{**create, "num_classes": 10}).eval()(x),
                           expected)  # a random model of the same kind computes something else


def test_tampered_weights_are_refused_even_with_their_hash_rewritten(trained, tmp_path):
    copy = Path(shutil.copytree(trained, tmp_path / "copy"))
    weights = safetensors.torch.load_file(copy / "model.safetensors")
    weights["backbone.head.bias"] += 1.0  # the attacker's "improvement"
    safetensors.torch.save_file(weights, copy / "model.safetensors")
    line = error_line(export_cli(copy))
    assert "model.safetensors does not match model_config.json weights_sha256" in line
    config = json.loads((copy / "model_config.json").read_text())
    config["weights_sha256"] = sha256_file(copy / "model.safetensors")  # and covers it in model_config.json
    (copy / "model_config.json").write_text(json.dumps(config))
    line = error_line(export_cli(copy))
    assert "refusing to export" in line and "trail is broken" in line and "final entry" in line
    assert not (copy / "export").exists()


def test_ema_weights_must_exist_and_be_recorded(trained, tmp_path):
    copy = Path(shutil.copytree(trained, tmp_path / "copy"))
    no_ema = f"export.weights=ema: {copy} has no EMA weights (model_config.json records none"
    assert no_ema in error_line(export_cli(copy, "export.weights=ema"))
    shutil.copy(copy / "model.safetensors", copy / "model_ema.safetensors")  # planted, recorded nowhere
    line = error_line(export_cli(copy, "export.weights=ema"))  # the trail's final entry knows no EMA file
    assert "refusing to export" in line and "model_ema.safetensors is not recorded in the trail's final entry" in line
    config = json.loads((copy / "model_config.json").read_text())
    (copy / "model_config.json").write_text(json.dumps({**config, "ema_weights_sha256": "0" * 64}))  # and recorded
    line = error_line(export_cli(copy, "export.weights=ema"))  # model_config.json no longer the trail's
    assert "refusing to export" in line and "trail is broken" in line
    assert "export.out='x.pt': must end in .safetensors" in error_line(export_cli(copy, "export.out=x.pt"))


def test_the_export_starts_a_new_run_from_its_weights(exported, train_root, tmp_path):
    out, _ = exported
    run_dir = tmp_path / "from_export"
    run_train(run_dir, train_root, f"model.checkpoint={out}", *FIRST_STEP_ONLY)
    init = json.loads((run_dir / "model_config.json").read_text())["init"]
    assert init == {"from": "checkpoint", "file": str(out.resolve()), "sha256": sha256_file(out)}
    start = json.loads((run_dir / "audit_trail.jsonl").read_text().splitlines()[0])
    assert start["init"] == init  # in the signed chain from its first entry
    started, scratch = audited_backbone(run_dir).state_dict(), safetensors.torch.load_file(out)
    assert started.keys() == scratch.keys()
    for name, tensor in scratch.items():
        torch.testing.assert_close(started[name], tensor, rtol=0, atol=1e-6, msg=name)
