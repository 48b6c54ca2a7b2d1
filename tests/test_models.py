"""AuditableModel, MINT heads and tap presets on tiny real timm models (pretrained=False)."""

import pytest
import timm
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch import nn

from amint_dist.models import AuditableModel, model_from_record, resolve_taps
from amint_dist.models.backbone import create_backbone

NUM_CLASSES = 5
IMG = 32
TINY_VIT = dict(patch_size=4, embed_dim=32, depth=4, num_heads=2, mlp_ratio=2.0)

FAMILIES = {
    "vit": dict(name="vit_tiny_patch16_224", kwargs=TINY_VIT),
    "resnet": dict(name="resnet18"),
    "mobilenetv3": dict(name="mobilenetv3_small_050"),
    "mobilenetv2": dict(name="mobilenetv2_050"),
    "densenet": dict(name="densenet121"),
    "convnext": dict(name="convnext_atto"),
}
# preset -> indices per family: 4 maps (ViT depth 4, ConvNeXt stages) or 5 maps (stem + 4 stages)
FOUR = {"entry": [0, 1], "middle": [1, 2], "output": [3]}
FIVE = {"entry": [0, 1], "middle": [2, 3], "output": [4]}
EXPECTED_PRESETS = {
    "vit": FOUR, "resnet": FIVE, "mobilenetv3": FIVE, "mobilenetv2": FIVE, "densenet": FIVE, "convnext": FOUR,
}
HEADS = ("conv", "mlp", "token")


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models: intra-op threads only add sync overhead (10x slower on a busy 2-core box)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def model_cfg(family: str) -> dict:
    return dict(FAMILIES[family], num_classes=NUM_CLASSES, img_size=IMG)


def build(family: str, mode: str = "active", taps="middle", kind: str = "conv", **head) -> AuditableModel:
    torch.manual_seed(0)
    return model_from_record({"model": model_cfg(family), "mint": dict(mode=mode, taps=taps, head=dict(kind=kind, **head))})


def images(batch: int = 4) -> torch.Tensor:
    return torch.randn(batch, 3, IMG, IMG, generator=torch.Generator().manual_seed(1))


def stem_weight(model: AuditableModel) -> nn.Parameter:
    """Weight of the backbone's first conv (ViT patch embedding, CNN stem): precedes every tap."""
    return next(m for m in model.backbone.modules() if isinstance(m, nn.Conv2d)).weight


def mint_only_backward(model: AuditableModel) -> None:
    model.train()
    _, score = model(images())
    F.binary_cross_entropy_with_logits(score, torch.tensor([1.0, 0.0, 1.0, 0.0])).backward()


@pytest.mark.parametrize("family", FAMILIES)
def test_presets_and_feature_info_match_forward_intermediates(family):
    backbone = create_backbone(**model_cfg(family)).eval()
    assert {p: resolve_taps(backbone, p) for p in FOUR} == EXPECTED_PRESETS[family]
    with torch.no_grad():
        _, maps = backbone.forward_intermediates(images(2))
    # heads are sized from feature_info: it must describe exactly what forward_intermediates returns
    assert [m.shape[1] for m in maps] == [f["num_chs"] for f in backbone.feature_info]


@pytest.mark.parametrize("kind", HEADS)
@pytest.mark.parametrize("preset", ["entry", "middle", "output"])
@pytest.mark.parametrize("family", FAMILIES)
def test_output_shapes(family, preset, kind):
    model = build(family, taps=preset, kind=kind).eval()
    assert model.taps == EXPECTED_PRESETS[family][preset]
    with torch.no_grad():
        logits, score = model(images(3))
    assert logits.shape == (3, NUM_CLASSES)
    assert score.shape == (3,)
    assert torch.isfinite(score).all()


def plain_timm(family: str) -> nn.Module:
    """The family's classifier straight from timm, built after the same seed as :func:`build`: nothing of ours."""
    spec = FAMILIES[family]
    size = {"img_size": IMG} if family == "vit" else {}  # the fixed-input-size family
    torch.manual_seed(0)
    return timm.create_model(spec["name"], pretrained=False, num_classes=NUM_CLASSES, **spec.get("kwargs", {}), **size)


@pytest.mark.parametrize("mode", ["active", "passive", "off"])
@pytest.mark.parametrize("family", FAMILIES)
def test_task_logits_equal_timm_forward(family, mode):
    model = build(family, mode=mode).eval()
    reference = plain_timm(family).eval()
    ours, theirs = model.backbone.state_dict(), reference.state_dict()
    assert list(ours) == list(theirs)  # the same architecture, initialised alike from the seed
    for name, value in theirs.items():
        torch.testing.assert_close(ours[name], value, rtol=0, atol=0, msg=name)
    x = images()
    with torch.no_grad():
        logits, _ = model(x)
        expected = reference(x)
    torch.testing.assert_close(logits, expected, rtol=0, atol=0)


@pytest.mark.parametrize("family", ["vit", "resnet", "convnext"])
def test_forward_runs_the_backbone_once(family):
    model = build(family)
    calls = []
    stem = next(m for m in model.backbone.modules() if isinstance(m, nn.Conv2d))
    stem.register_forward_hook(lambda *_: calls.append(1))
    model(images())
    assert len(calls) == 1


@pytest.mark.parametrize("kind", HEADS)
@pytest.mark.parametrize("family", ["vit", "resnet", "mobilenetv3", "densenet"])
def test_active_mint_gradients_reach_backbone(family, kind):
    model = build(family, mode="active", taps="entry", kind=kind)
    mint_only_backward(model)
    grad = stem_weight(model).grad
    assert grad is not None and grad.abs().sum() > 0
    # only MINT loss: the classifier after the taps gets nothing
    assert model.backbone.get_classifier().weight.grad is None


@pytest.mark.parametrize("kind", HEADS)
@pytest.mark.parametrize("family", ["vit", "resnet", "convnext"])
def test_passive_mint_gradients_stop_at_taps(family, kind):
    model = build(family, mode="passive", taps="middle", kind=kind)
    mint_only_backward(model)
    assert all(p.grad is None for p in model.backbone.parameters())
    head_grads = [p.grad for p in model.mint_head.parameters()]
    assert all(g is not None for g in head_grads)
    assert sum(g.abs().sum() for g in head_grads) > 0


@pytest.mark.parametrize("family", ["vit", "densenet"])
def test_off_mode_has_no_head(family):
    model = build(family, mode="off")
    assert model.mint_head is None
    assert not [n for n, _ in model.named_parameters() if not n.startswith("backbone.")]
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in plain_timm(family).parameters())
    logits, score = model(images())
    assert score is None and logits.shape == (4, NUM_CLASSES)


def test_explicit_indices_are_normalised_and_used():
    model = build("resnet", taps=[-1, 1])
    assert model.taps == [1, 4]
    assert len(model.mint_head.branches) == 2
    assert model.mint_head.branches[1][0].conv.in_channels == 512  # resnet18 layer4
    assert model(images())[1].shape == (4,)


def test_token_head_reads_vit_prefix_tokens():
    model = build("vit", taps=[0, 3], kind="token").eval()
    seen = []
    model.mint_head.register_forward_pre_hook(lambda _, args: seen.extend(args[0]))
    x = images()
    with torch.no_grad():
        model(x)
        _, spatial = model.backbone.forward_intermediates(x, indices=[0, 3], output_fmt="NLC")
    num_patches = (IMG // TINY_VIT["patch_size"]) ** 2
    assert [t.shape for t in seen] == [(4, 1 + num_patches, TINY_VIT["embed_dim"])] * 2
    for tokens, patches in zip(seen, spatial):
        torch.testing.assert_close(tokens[:, 1:], patches)
    assert model.mint_head.norms[0].normalized_shape == (2 * TINY_VIT["embed_dim"],)


def test_accepts_dictconfig():
    mint = {"mode": "active", "taps": [0, -1], "head": {"kind": "mlp", "hidden": 16}}
    cfg = OmegaConf.create({"model": model_cfg("vit"), "mint": mint})
    model = model_from_record(cfg)
    assert model.taps == [0, 3]
    assert model.mint_head.classifier.fc1.out_features == 16


def test_param_groups_exempt_norms_biases_and_vit_tokens():
    model = build("vit", kind="token")
    groups = model.param_groups(0.05)
    names = {id(p): n for n, p in model.named_parameters()}
    by_wd = {g["weight_decay"]: {names[id(p)] for p in g["params"]} for g in groups}
    assert set(by_wd) == {0.0, 0.05}
    no_decay = {"pos_embed", "cls_token", "norm.weight", "blocks.0.attn.qkv.bias", "patch_embed.proj.bias"}
    decay = {"patch_embed.proj.weight", "blocks.0.attn.qkv.weight"}
    assert {f"backbone.{n}" for n in no_decay} | {"mint_head.norms.0.weight"} <= by_wd[0.0]
    assert {f"backbone.{n}" for n in decay} | {"mint_head.classifier.fc1.weight"} <= by_wd[0.05]
    assert by_wd[0.0].isdisjoint(by_wd[0.05]) and by_wd[0.0] | by_wd[0.05] == set(names.values())


def test_heads_have_no_lazy_parameters():
    model = build("convnext", kind="conv")
    assert not any(isinstance(p, nn.parameter.UninitializedParameter) for p in model.parameters())


@pytest.mark.parametrize(
    ("taps", "message"),
    [
        ("bottom", "valid presets: entry, middle, output"),
        ([5], "tap index 5 out of range: valid are -5..4"),
        ([-6], "tap index -6 out of range"),
        ([0, -5], "tap index -5 repeats index 0"),
        ([], "empty"),
        (["1"], "not an int"),
    ],
)
def test_bad_taps_raise(taps, message):
    backbone = create_backbone(**model_cfg("resnet"))
    with pytest.raises(ValueError, match=message):
        resolve_taps(backbone, taps)


@pytest.mark.parametrize(
    ("model_update", "mint", "message"),
    [
        ({}, dict(mode="active", taps="entry", head=dict(kind="attn")), "mint.head.kind='attn': expected one of"),
        ({}, dict(mode="semi", taps="entry", head=dict(kind="conv")), "mint.mode='semi': expected one of"),
        ({}, dict(mode="active", taps="entry", head=dict(kind="conv", width=3)), r"mint.head: unknown key\(s\) width"),
        ({}, dict(mode="active", tap="entry", head=dict(kind="conv")), r"mint: unknown key\(s\) tap"),
        ({}, dict(mode="active", head=dict(kind="conv")), "needs both 'taps' and 'head'"),
        ({"depth": 2}, dict(mode="off"), r"model: unknown key\(s\) depth"),
        ({"kwargs": {"img_size": 64}}, dict(mode="off"), "model.kwargs: img_size"),
        ({"name": "resnet_nope"}, dict(mode="off"), "unknown timm model 'resnet_nope'"),
    ],
)
def test_bad_config_raises(model_update, mint, message):
    with pytest.raises(ValueError, match=message):
        model_from_record({"model": {**model_cfg("resnet"), **model_update}, "mint": mint})


@pytest.mark.parametrize("family, setting, device, expected", [
    ("resnet", "auto", "cuda", torch.channels_last),  # a CNN on CUDA: NHWC
    ("convnext", "auto", "cuda", torch.channels_last),
    ("resnet", "auto", "cpu", torch.contiguous_format),  # not on CPU (slower for resnet18 there)
    ("vit", "auto", "cuda", torch.contiguous_format),  # patch embedding: one conv per image
    ("vit", True, "cpu", torch.channels_last),  # an explicit setting wins
    ("resnet", False, "cuda", torch.contiguous_format),
])
def test_memory_format_setting(family, setting, device, expected):
    assert build(family).memory_format(setting, torch.device(device)) == expected


@pytest.mark.parametrize("family", ["resnet", "mobilenetv3"])
def test_channels_last_model_computes_what_the_contiguous_one_does(family):
    """train.channels_last=true converts the model and the step's images (batches.combine) to NHWC: same
    logits, scores and gradients up to float rounding; the conv weights really are NHWC."""
    from amint_dist.train.batches import combine

    reference, nhwc = build(family, dropout=0.0), build(family, dropout=0.0).to(memory_format=torch.channels_last)
    weight = next(m for m in nhwc.backbone.modules() if isinstance(m, nn.Conv2d) and m.kernel_size != (1, 1)).weight
    assert weight.is_contiguous(memory_format=torch.channels_last) and not weight.is_contiguous()
    part = {"image": images(), "label": torch.zeros(4, dtype=torch.long), "valid": torch.ones(4, dtype=torch.bool)}
    x = combine({"members": part}, torch.device("cpu"), torch.channels_last)["image"]
    assert x.is_contiguous(memory_format=torch.channels_last) and torch.equal(x, images())
    outputs = []
    for model, inputs in ((reference, images()), (nhwc, x)):
        logits, score = model(inputs)
        (logits.sum() + score.sum()).backward()
        outputs.append((logits, score, stem_weight(model).grad))
    for got, want in zip(outputs[1], outputs[0]):  # as a whole: NHWC kernels sum in another order
        assert ((got - want).norm() / want.norm()).item() < 1e-3
