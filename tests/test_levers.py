"""Audit-power levers: perturbed member negatives (mint.member_perturb), hard-negative weighting
(mint.hard_negatives) and the focal MINT loss (mint.focal_gamma): hand-computed units, real short runs with every
switch on (exact resume, an audit of the result) and 2-rank ZeRO-2 runs whose ranks agree and resume exactly."""

from __future__ import annotations

import json
import math
import re

import pytest
import safetensors.torch
import torch
import torch.nn.functional as F
from test_distributed import launcher
from train_helpers import run_quick_audit, run_train

from amint_dist.api import AMintLoss
from amint_dist.config import ConfigError
from amint_dist.models.config import MintConfig, PerturbConfig
from amint_dist.train.losses import hard_negative_weights, mint_loss
from amint_dist.train.negatives import (
    negatives_generator,
    perturbed_copies,
    shifted_batch,
)

LEVERS = ("mint.member_shift=1", "mint.member_perturb.rotate_deg=10", "mint.member_perturb.scale=0.1",
          "mint.member_perturb.subpixel=0.5", "mint.member_perturb.noise=0.1", "mint.hard_negatives.fraction=0.25",
          "mint.hard_negatives.weight=4", "mint.focal_gamma=2", "optim.warmup_epochs=0", "optim.min_lr=1e-3")
HEAD = {"kind": "conv", "channels": 8}


# ---- hard negatives ----

def test_hard_negative_weights_pick_exactly_the_top_valid_negative_rows():
    """Rows: 0 member (highest logit), 1-6 negatives, 7 a masked negative (padding) scoring above all of them.
    fraction 0.5 of 6 negatives: the 3 highest (rows 4, 2, 6), never the member or the masked row."""
    logit = torch.tensor([9.0, -1.0, 2.0, -3.0, 5.0, 0.5, 1.0, 8.0])
    member = torch.tensor([1, 0, 0, 0, 0, 0, 0, 0], dtype=torch.bool)
    mask = torch.tensor([1, 1, 1, 1, 1, 1, 1, 0], dtype=torch.bool)
    weights = hard_negative_weights(logit, mask & ~member, 0.5, 3.0)
    assert weights.tolist() == [1, 1, 3, 1, 3, 1, 3, 1]
    assert hard_negative_weights(logit, mask & ~member, 0.1, 3.0).tolist() == [1, 1, 1, 1, 3, 1, 1, 1]  # ceil(0.6)
    ten = torch.arange(10.0)  # 10 x 0.3 = 3.0000000000000004 in floating point: still the top 3, not 4
    assert hard_negative_weights(ten, torch.ones(10, dtype=torch.bool), 0.3, 2.0).tolist() == [1] * 7 + [2] * 3
    tied = hard_negative_weights(torch.zeros(4), torch.ones(4, dtype=torch.bool), 0.5, 2.0)
    assert tied.tolist() == [2, 2, 1, 1]  # ties: the earlier rows


def test_mint_loss_with_hard_negatives_is_the_hand_weighted_mean():
    logit = torch.tensor([2.0, -1.0, 1.5, 0.2, 3.0], requires_grad=True)
    member = torch.tensor([1, 0, 0, 0, 0], dtype=torch.bool)
    mask = torch.tensor([1, 1, 1, 1, 0], dtype=torch.bool)
    bce = F.binary_cross_entropy_with_logits(logit.detach(), member.float(), reduction="none")
    # member weighs 2, top ceil(0.4 x 3) = 2 negatives (rows 2 and 3) weigh 5, row 4 masked
    expected = (2 * bce[0] + bce[1] + 5 * bce[2] + 5 * bce[3]) / (2 + 1 + 5 + 5)
    loss = mint_loss(logit, member, mask, member_weight=2.0, hard_fraction=0.4, hard_weight=5.0)
    assert torch.isclose(loss, expected)
    loss.backward()
    assert logit.grad[4] == 0 and (logit.grad[:4] != 0).all()  # the selection itself carries no gradient


# ---- focal ----

def test_focal_gamma_zero_is_bce_and_positive_gamma_is_the_focal_formula():
    logit = torch.tensor([3.0, -2.0, 0.3, -0.7, 1.1])
    member = torch.tensor([1, 0, 1, 0, 0], dtype=torch.bool)
    mask = torch.ones(5, dtype=torch.bool)
    bce = F.binary_cross_entropy_with_logits(logit, member.float())
    assert torch.equal(mint_loss(logit, member, mask, focal_gamma=0.0), bce)
    p = torch.sigmoid(logit)
    p_true = torch.where(member, p, 1 - p)
    for gamma in (0.5, 2.0):
        expected = (-(1 - p_true) ** gamma * p_true.log()).mean()
        assert torch.isclose(mint_loss(logit, member, mask, focal_gamma=gamma), expected, rtol=1e-5)
    weighted = mint_loss(logit, member, mask, member_weight=3.0, focal_gamma=2.0)  # composes with the weights
    w = torch.where(member, 3.0, 1.0)
    assert torch.isclose(weighted, (w * -(1 - p_true) ** 2 * p_true.log()).sum() / w.sum(), rtol=1e-5)


def test_focal_loss_has_finite_gradients_where_rows_are_certain():
    logit = torch.tensor([200.0, -200.0, 0.0], requires_grad=True)  # BCE rounds to exactly 0 on the first two
    mint_loss(logit, torch.tensor([True, False, True]), torch.ones(3, dtype=torch.bool), focal_gamma=0.5).backward()
    assert torch.isfinite(logit.grad).all() and logit.grad[2] != 0


def test_api_loss_takes_the_levers():
    """api.AMintLoss with focal_gamma and hard negatives: task CE plus the trainer's MINT loss with the same options."""
    logits, mint = torch.randn(6, 4, generator=torch.Generator().manual_seed(0)), torch.tensor([2.0, 1, 0, 3, -1, 0.5])
    labels, member = torch.tensor([0, 1, 2, 3, 0, 1]), torch.tensor([1, 1, 1, 0, 0, 0], dtype=torch.bool)
    options = {"member_weight": 0.5, "focal_gamma": 1.0, "hard_fraction": 0.34, "hard_weight": 3.0}
    loss = AMintLoss(normalize=False, mint_weight=2.0, **options)(logits, mint, labels, member)
    expected = F.cross_entropy(logits[:3], labels[:3]) + 2.0 * mint_loss(mint, member, torch.ones(6, dtype=torch.bool),
                                                                         **options)
    assert torch.isclose(loss, expected)
    assert not torch.isclose(expected, F.cross_entropy(logits[:3], labels[:3]) + 2.0 * mint_loss(
        mint, member, torch.ones(6, dtype=torch.bool), member_weight=0.5))


# ---- perturbed copies ----

def ramp(n: int = 6, size: int = 16) -> torch.Tensor:
    """n images whose pixels rise by 1 per column (rows alike), 3 channels."""
    return torch.arange(size, dtype=torch.float32).expand(n, 3, size, size).contiguous()


@pytest.mark.parametrize("kind", ["rotate_deg", "scale", "subpixel", "noise"])
def test_each_perturbation_changes_every_image(kind):
    images = torch.randn(8, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    out = perturbed_copies(images, PerturbConfig(**{kind: 0.3 if kind != "rotate_deg" else 10.0}),
                           negatives_generator(0, 0, 0, 0))
    assert out.shape == images.shape and out.dtype == images.dtype
    assert all(not torch.allclose(a, b, atol=1e-3) for a, b in zip(out, images))


def test_subpixel_shift_moves_a_ramp_by_a_drawn_fraction_of_a_pixel():
    """Bilinear translation of a horizontal ramp: the interior rises or falls by the x offset, whose size is in
    [subpixel / 2, subpixel]; rows are unchanged up and down (a ramp in x has no y gradient)."""
    out = perturbed_copies(ramp(), PerturbConfig(subpixel=0.6), negatives_generator(0, 3, 1, 0))
    diff = (out - ramp())[:, :, :, 2:-2]
    per_image = diff.flatten(1)
    assert torch.allclose(per_image, per_image[:, :1].expand_as(per_image), atol=1e-5)  # one offset per image
    sizes = per_image[:, 0].abs()
    assert ((sizes >= 0.3 - 1e-5) & (sizes <= 0.6 + 1e-5)).all()


def test_rotation_and_zoom_keep_a_constant_image_constant():
    """Replicated edges: no zeros come in from outside the image."""
    flat = torch.full((4, 3, 16, 16), 0.7)
    out = perturbed_copies(flat, PerturbConfig(rotate_deg=30, scale=0.5), negatives_generator(0, 0, 0, 0))
    assert torch.allclose(out, flat)


def test_perturbations_are_seeded_by_the_position():
    """The same (seed, step, batch, rank) draws the same copies; another step, batch or rank other ones."""
    images = torch.randn(8, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    batch = {"image": images, "label": torch.zeros(8, dtype=torch.long), "valid": torch.ones(8, dtype=torch.bool)}
    perturb = PerturbConfig(rotate_deg=10, scale=0.1, subpixel=0.5, noise=0.1)

    def copies(*position: int) -> torch.Tensor:
        return shifted_batch(batch, 1, negatives_generator(*position), perturb)["image"]

    first = copies(0, 5, 2, 0)
    assert torch.equal(first, copies(0, 5, 2, 0))
    for other in [(0, 6, 2, 0), (0, 5, 3, 0), (0, 5, 2, 1), (1, 5, 2, 0)]:
        assert not torch.allclose(first, copies(*other), atol=1e-3), other
    unperturbed = shifted_batch(batch, 1, negatives_generator(0, 5, 2, 0))
    assert not torch.allclose(first, unperturbed["image"], atol=1e-3)
    assert unperturbed["label"].tolist() == [-1] * 8


def test_perturbation_alone_makes_member_copies_and_bad_values_are_one_line():
    base = {"mode": "active", "taps": [0, 1], "head": HEAD}
    assert MintConfig.from_dict(base).shifts() == {}
    assert MintConfig.from_dict({**base, "member_perturb": {"noise": 0.1}}).shifts() == {"members": 0}
    both = MintConfig.from_dict({**base, "member_shift": 2, "external_shift": 1, "member_perturb": {"scale": 0.1}})
    assert both.shifts(("members", "heldout")) == {"members": 2, "heldout": 2, "external": 1}
    assert MintConfig.from_dict({**base, "mode": "off", "member_perturb": {"noise": 0.1}}).shifts() == {}
    for values, culprit in [({"member_perturb": {"rotate_deg": 90}}, "mint.member_perturb.rotate_deg=90"),
                            ({"member_perturb": {"blur": 1}}, "mint.member_perturb: unknown key(s) blur"),
                            ({"hard_negatives": {"fraction": 1.5}}, "mint.hard_negatives.fraction=1.5"),
                            ({"hard_negatives": {"weight": 0}}, "mint.hard_negatives.weight=0"),
                            ({"focal_gamma": -1}, "mint.focal_gamma=-1")]:
        with pytest.raises(ConfigError, match="^" + re.escape(culprit)) as error:
            MintConfig.from_dict({**base, **values})
        assert "\n" not in str(error.value)


# ---- real runs ----

def weights(run_dir) -> dict[str, torch.Tensor]:
    return safetensors.torch.load_file(run_dir / "model.safetensors")


def test_run_with_every_lever_trains_resumes_exactly_and_audits(tmp_path, train_root):
    """4 steps straight vs 2 steps + resume to 4 (bit for bit); the levers change the weights (against the same
    run without them); the audit (which never makes negatives) runs on the result."""
    run_train(tmp_path / "straight", train_root, *LEVERS, "train.max_steps=4")
    run_train(tmp_path / "resumed", train_root, *LEVERS, "train.max_steps=2")
    run_train(tmp_path / "resumed", train_root, *LEVERS, "train.max_steps=4", "resume=latest")
    run_train(tmp_path / "shift_only", train_root, *LEVERS[:1], *LEVERS[-2:], "train.max_steps=4")
    straight, shift_only = weights(tmp_path / "straight"), weights(tmp_path / "shift_only")
    assert all(torch.isfinite(v).all() for v in straight.values())
    assert (tmp_path / "resumed" / "model.safetensors").read_bytes() == (tmp_path / "straight" / "model.safetensors").read_bytes()
    assert not all(torch.equal(straight[k], shift_only[k]) for k in straight)
    run_quick_audit(tmp_path / "straight")
    report = json.loads((tmp_path / "straight" / "audit" / "report.json").read_text())
    assert math.isfinite(report["protocols"]["seen"]["methods"]["amint"]["auc"]["value"])


@pytest.mark.slow
def test_zero2_ranks_agree_with_every_lever_and_resume_exactly(tmp_path, train_root):
    """Two gloo ranks under DeepSpeed ZeRO-2, each drawing its own perturbations and picking its own hard negatives:
    every checkpoint's parameters agree across ranks (a checkpoint of diverging ranks is refused), and 2 steps +
    resume to 4 gives the 4 straight steps' weights bit for bit (the levers' draws are seeded by position)."""
    run_train(tmp_path / "straight", train_root, *LEVERS, "train.max_steps=4", launcher=launcher("deepspeed_zero2"))
    run_train(tmp_path / "resumed", train_root, *LEVERS, "train.max_steps=2", launcher=launcher("deepspeed_zero2"))
    run_train(tmp_path / "resumed", train_root, *LEVERS, "train.max_steps=4", "resume=latest", launcher=launcher("deepspeed_zero2"))
    checkpoints = sorted((tmp_path / "resumed" / "checkpoints").glob("step-*"))
    assert [c.name for c in checkpoints] == ["step-00000002", "step-00000004"]
    for ckpt in checkpoints:
        dist = json.loads((ckpt / "distributed.json").read_text())
        ranks = dist["ranks"]
        assert dist["engine"] == "zero2" and dist["world_size"] == 2
        assert [r["rank"] for r in ranks] == [0, 1] and ranks[0]["param_sha256"] == ranks[1]["param_sha256"]
    assert (tmp_path / "resumed" / "model.safetensors").read_bytes() == \
        (tmp_path / "straight" / "model.safetensors").read_bytes()
