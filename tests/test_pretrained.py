"""Fine-tuning from pretrained weights: model.pretrained (timm's pretrained loader on a local file, or timm's own
file in the local Hugging Face cache) and model.checkpoint (a timm model's weights, strictly). Real timm models,
real files; a run trained from a file is resumed and audited after the file is gone."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import huggingface_hub
import pytest
import safetensors.torch
import timm
import torch
from test_export import FIRST_STEP_ONLY, audited_backbone
from test_integrity import Planted
from train_helpers import run_quick_audit, run_train

from amint_dist.io import sha256_file
from amint_dist.models import ModelConfig
from amint_dist.models.init_weights import build_backbone, init_record

NAME = "vit_tiny_patch16_224"
TINY = {"patch_size": 4, "embed_dim": 32, "depth": 2, "num_heads": 2, "mlp_ratio": 2.0}  # the tiny test runs
FILE_CLASSES = 7  # the digits have 10: a fine-tuned head is re-initialised


def timm_weights(num_classes: int = FILE_CLASSES, name: str = NAME, **kwargs) -> dict[str, torch.Tensor]:
    """A timm model's state dict with deterministic non-random values (nothing a fresh init could produce)."""
    model = timm.create_model(name, num_classes=num_classes, **kwargs)
    with torch.no_grad():
        for i, p in enumerate(model.parameters()):
            p.copy_(torch.linspace(-1, 1, p.numel()).reshape(p.shape) * (i + 1) / 7)
    return {k: v.contiguous() for k, v in model.state_dict().items()}


def config(**fields) -> ModelConfig:
    return ModelConfig.from_dict({"name": NAME, "img_size": 16, "num_classes": 10, "kwargs": TINY, **fields})


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> tuple[dict[str, torch.Tensor], Path, Path]:
    """The same weights as safetensors and as a torch file."""
    weights, d = timm_weights(img_size=16, **TINY), tmp_path_factory.mktemp("pretrained")
    safetensors.torch.save_file(weights, d / "vit.safetensors")
    torch.save(weights, d / "vit.pth")
    return weights, d / "vit.safetensors", d / "vit.pth"


def assert_loaded(backbone: torch.nn.Module, weights: dict[str, torch.Tensor], except_head: bool) -> None:
    state = backbone.state_dict()
    assert state.keys() == weights.keys()
    for name, tensor in weights.items():
        if except_head and name.startswith("head."):
            assert state[name].shape[0] == 10 and tensor.shape[0] == FILE_CLASSES
        else:
            assert torch.equal(state[name], tensor), name


@pytest.mark.parametrize("kind", ["safetensors", "torch"])
def test_pretrained_file_loads_through_timm_and_the_head_is_new_when_classes_differ(saved, kind):
    weights, *files = saved
    path = files[kind == "torch"]
    assert_loaded(build_backbone(config(pretrained=True, pretrained_file=str(path))), weights, except_head=True)
    same_classes = config(pretrained=True, pretrained_file=str(path), num_classes=FILE_CLASSES)
    assert_loaded(build_backbone(same_classes), weights, except_head=False)
    assert init_record(same_classes) == {"from": "pretrained", "file": str(path.resolve()), "sha256": sha256_file(path)}


def test_checkpoint_loads_strictly_and_grayscale_input_is_adapted_by_timm(saved):
    weights, path, torch_file = saved
    assert_loaded(build_backbone(config(checkpoint=str(torch_file), num_classes=FILE_CLASSES)), weights, False)
    gray = build_backbone(config(pretrained=True, pretrained_file=str(path), in_chans=1)).state_dict()
    torch.testing.assert_close(gray["patch_embed.proj.weight"], weights["patch_embed.proj.weight"].sum(1, keepdim=True))
    assert init_record(config()) == {"from": "random"}


@pytest.mark.parametrize("fields, culprit", [
    ({"pretrained": True, "pretrained_file": "missing.safetensors"},
     "model.pretrained_file='missing.safetensors': no such file"),
    ({"checkpoint": "missing.pth"}, "model.checkpoint='missing.pth': no such file"),
    ({"pretrained": True, "pretrained_file": "{resnet}"},
     "model.pretrained_file=resnet.safetensors: not weights of model.name='vit_tiny_patch16_224': 30 missing "
     "tensor(s) (blocks.0"),
    ({"pretrained": True, "pretrained_file": "{wide}"},
     "model.pretrained_file=wide.safetensors: does not load into model.name='vit_tiny_patch16_224': RuntimeError: "
     "Error(s) in loading state_dict for VisionTransformer: size mismatch for cls_token"),
    ({"checkpoint": "{vit}"},
     "model.checkpoint={vit}: not the weights of this vit_tiny_patch16_224 (strict load; a run's model.safetensors "
     "needs launch/export.py first): RuntimeError: Error(s) in loading state_dict for VisionTransformer: size "
     "mismatch for head.weight"),
    ({"pretrained": True}, "timm's weights for 'vit_tiny_patch16_224' are not in the local Hugging Face cache"),
    ({"pretrained_file": "x.pth"}, "model.pretrained_file='x.pth': set model.pretrained=true to load it"),
    ({"pretrained": True, "checkpoint": "x.pth"}, "model.checkpoint='x.pth': choose one starting point"),
])
def test_a_file_that_does_not_fit_is_one_line_naming_key_and_file(saved, tmp_path, monkeypatch, fields, culprit):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty_cache"))
    monkeypatch.chdir(tmp_path)
    safetensors.torch.save_file(timm_weights(name="resnet18"), tmp_path / "resnet.safetensors")
    safetensors.torch.save_file(timm_weights(img_size=16, **{**TINY, "embed_dim": 64}), tmp_path / "wide.safetensors")
    files = {"resnet": "resnet.safetensors", "wide": "wide.safetensors", "vit": str(saved[1])}
    fields = {k: v.format(**files) if isinstance(v, str) else v for k, v in fields.items()}
    with pytest.raises((ValueError, FileNotFoundError)) as raised:
        build_backbone(config(**fields))
    message = str(raised.value)
    assert culprit.format(**files) in message and "\n" not in message


@pytest.mark.parametrize("key", ["pretrained_file", "checkpoint"])
def test_a_pickle_in_a_torch_file_never_runs(tmp_path, key):
    marker, path = tmp_path / "unpickled", tmp_path / "evil.pth"
    torch.save({"state_dict": Planted(marker)}, path)
    fields = {"pretrained": True, key: str(path)} if key == "pretrained_file" else {key: str(path)}
    with pytest.raises(ValueError, match=rf"^model.{key}=\S*evil.pth: .*weights_only=True blocked loading"):
        build_backbone(config(**fields))
    assert not marker.exists()


def test_pretrained_without_a_file_reads_timms_file_from_the_local_hub_cache(saved, tmp_path, monkeypatch):
    """The Hugging Face cache layout (refs/main -> snapshots/<revision>/model.safetensors), read by
    huggingface_hub's own lookup; nothing is downloaded."""
    weights, path, _ = saved
    repo = tmp_path / "hub" / f"models--timm--{NAME}.{timm.models.get_pretrained_cfg(NAME).tag}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0123abcd")
    (repo / "snapshots" / "0123abcd").mkdir(parents=True)
    shutil.copy(path, repo / "snapshots" / "0123abcd" / "model.safetensors")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    assert_loaded(build_backbone(config(pretrained=True)), weights, except_head=True)
    assert init_record(config(pretrained=True))["sha256"] == sha256_file(path)


# ---- a real run from the pretrained file: resumed and audited without it ----

@pytest.fixture(scope="module")
def fine_tuned(tmp_path_factory, train_root, saved) -> tuple[Path, Path, dict[str, torch.Tensor]]:
    """One near-zero step from a copy of the pretrained file, the file deleted, two more steps (resume), the audit;
    returns the run dir, the deleted file's path and the weights after the first step."""
    d = tmp_path_factory.mktemp("fine_tuned")
    pretrained = Path(shutil.copy(saved[1], d / "pretrained.safetensors"))
    run_dir = d / "run"
    run_train(run_dir, train_root, "model.pretrained=true", f"model.pretrained_file={pretrained}", *FIRST_STEP_ONLY)
    first_step = audited_backbone(run_dir).state_dict()
    pretrained.unlink()
    run_train(run_dir, train_root, "model.pretrained=true", f"model.pretrained_file={pretrained}", *FIRST_STEP_ONLY[1:],
              "train.max_steps=3", "resume=latest")
    run_quick_audit(run_dir, "audit.protocols=[seen]")
    return run_dir, pretrained, first_step


def test_a_run_starts_from_the_file_and_records_it(fine_tuned, saved):
    run_dir, pretrained, first_step = fine_tuned
    backbone_without_head = {k: v for k, v in saved[0].items() if not k.startswith("head.")}
    for name, tensor in backbone_without_head.items():
        torch.testing.assert_close(first_step[name], tensor, rtol=0, atol=1e-6, msg=name)
    init = json.loads((run_dir / "model_config.json").read_text())["init"]
    assert init == {"from": "pretrained", "file": str(pretrained), "sha256": sha256_file(saved[1])}


def test_resume_and_audit_need_no_pretrained_file(fine_tuned):
    run_dir, pretrained, _ = fine_tuned
    assert not pretrained.exists()
    report = json.loads((run_dir / "audit" / "report.json").read_text())
    assert report["integrity"]["status"] == "unsigned" and "seen" in report["protocols"]
    final = json.loads((run_dir / "audit_trail.jsonl").read_text().splitlines()[-1])
    assert final["kind"] == "final" and final["step"] == 3  # resumed after the file was deleted
