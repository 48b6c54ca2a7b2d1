"""train.grad_checkpointing reaches the timm backbone where the model is built and changes no number."""

from __future__ import annotations

import torch

from amint_dist.train.config import JobConfig
from amint_dist.train.loop import _build_model


def tiny_vit_job(grad_checkpointing: bool) -> JobConfig:
    return JobConfig.from_dict({
        "train": {"grad_checkpointing": grad_checkpointing}, "data": {}, "optim": {},
        "model": {"name": "vit_tiny_patch16_224", "img_size": 16, "num_classes": 5,
                  "kwargs": {"patch_size": 4, "embed_dim": 32, "depth": 3, "num_heads": 2}},
        "mint": {"mode": "active", "taps": [0, 2], "head": {"kind": "token", "hidden": 16, "dropout": 0.0}}})


def built(grad_checkpointing: bool) -> torch.nn.Module:
    config = tiny_vit_job(grad_checkpointing)
    torch.manual_seed(0)
    return _build_model(config, config.model)[0]


def loss_and_grads(model: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    logits, mint_logit = model.train()(x)
    loss = logits.logsumexp(-1).mean() + mint_logit.square().mean()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_grad_checkpointing_reaches_timm_and_keeps_loss_and_grads():
    off, on = built(False), built(True)
    assert on.backbone.grad_checkpointing and not off.backbone.grad_checkpointing
    on.load_state_dict(off.state_dict())  # the very same weights
    calls = []
    on.backbone.blocks[0].register_forward_pre_hook(lambda *_: calls.append(1))
    x = torch.randn(4, 3, 16, 16)
    loss_off, grads_off = loss_and_grads(off, x)
    loss_on, grads_on = loss_and_grads(on, x)
    assert len(calls) == 2  # the block started again in backward: it was checkpointed
    torch.testing.assert_close(loss_on, loss_off)
    assert grads_on.keys() == grads_off.keys() and len(grads_on) > 10
    for name, grad in grads_off.items():
        torch.testing.assert_close(grads_on[name], grad, rtol=1e-5, atol=1e-6, msg=name)
