"""FSDP2 (configs/accelerate/fsdp2.yaml) on CPU, 2 processes over gloo: what the engine-parametrized tests of
test_distributed.py do not show. World size, rank agreement, disjoint data, the killed-and-resumed run's ledger
and weights (against the DDP reference) and planted pickles are proven there, with ``fsdp2`` among the engines.

Here: the sharding units are the timm blocks and the MINT head (read from the model), recorded in
``distributed.json``; timm's grad checkpointing under fully_shard trains exactly as without it; the final
``model.safetensors`` (gathered from the shards) audits; EMA, torch.compile and FSDP1 are refused in one line.
"""

from __future__ import annotations

import json

import pytest
import safetensors.torch
import timm
import torch

from amint_dist.models.taps import block_class_names
from test_distributed import checkpoints, launcher, resumed_run
from train_helpers import run_quick_audit, run_train

pytestmark = pytest.mark.slow

STEPS = ("train.epochs=1", "train.max_steps=3", "mint.head.dropout=0")


@pytest.mark.parametrize("name, blocks", [("vit_tiny_patch16_224", ["Block"]), ("resnet18", ["BasicBlock"]),
                                          ("convnext_atto", ["ConvNeXtStage"])])
def test_sharding_units_are_the_backbones_blocks(name, blocks):
    """A ResNet's stages are plain Sequentials: their blocks are the units, not every Sequential in the model."""
    assert block_class_names(timm.create_model(name, pretrained=False)) == blocks


def test_fsdp2_shards_blocks_and_head_and_the_final_model_audits(tmp_path_factory, train_root):
    run_dir = resumed_run("fsdp2", tmp_path_factory, train_root)
    dist = json.loads((checkpoints(run_dir)[-1] / "distributed.json").read_text())
    assert dist["engine"] == "fsdp2" and dist["distributed_type"] == "DistributedType.FSDP"
    assert dist["fsdp_config"] == {"version": 2, "state_dict_type": "StateDictType.FULL_STATE_DICT",
                                   "reshard_after_forward": True, "units": ["Block", "ConvHead"]}
    weights = safetensors.torch.load_file(run_dir / "model.safetensors")
    assert all(w.dtype in (torch.float32, torch.int64) for w in weights.values())  # fp32 (BN counters: int64)
    assert sum(w.numel() for k, w in weights.items() if w.is_floating_point() and "running" not in k) \
        == dist["ranks"][0]["param_numel"]  # every parameter, whole
    run_quick_audit(run_dir)
    report = json.loads((run_dir / "audit" / "report.json").read_text())
    assert report["scored"]["members"]["n"] > 0


def test_grad_checkpointing_under_fsdp2_trains_exactly_as_without(tmp_path, train_root):
    """timm's checkpointed blocks re-run their forward (and FSDP2's all-gather) in backward: same weights."""
    finals = []
    for ckpt in ("false", "true"):
        run_dir = tmp_path / f"ckpt-{ckpt}"
        run_train(run_dir, train_root, *STEPS, f"train.grad_checkpointing={ckpt}", launcher=launcher("fsdp2"))
        finals.append(safetensors.torch.load_file(run_dir / "model.safetensors"))
    assert finals[0].keys() == finals[1].keys()
    for key, value in finals[0].items():
        torch.testing.assert_close(finals[1][key], value, rtol=1e-5, atol=1e-6, msg=key)


@pytest.mark.parametrize("override, extra, message", [
    ("train.ema.decay=0.99", (), "error: train.ema.decay=0.99 is not supported under FSDP2 (partitioned parameters)"),
    ("train.compile=true", (), "error: train.compile=true is not supported under FSDP2"),
    ("train.epochs=1", ("--fsdp_version", "1"), "error: fsdp_version 1: only FSDP2 is supported"),
])
def test_what_fsdp2_cannot_do_is_refused_before_any_work(tmp_path, train_root, override, extra, message):
    run_dir = tmp_path / "refused"
    proc = run_train(run_dir, train_root, override, check=False, launcher=launcher("fsdp2", *extra))
    assert proc.returncode != 0 and message in proc.stderr, proc.stderr[-3000:]
    assert not run_dir.exists()
