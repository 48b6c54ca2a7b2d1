"""AuditableModel: a timm classifier and its MINT head as one module (one DeepSpeed engine)."""

from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, replace
from typing import TypeVar

import timm
import torch
from timm.optim import param_groups_weight_decay
from torch import Tensor, nn

from .config import MintConfig, ModelConfig
from .heads import build_head
from .taps import resolve_taps

MODES = ("active", "passive", "off")
_SET_BY_US = {"pretrained", "num_classes", "in_chans", "img_size"}
T = TypeVar("T")


class AuditableModel(nn.Module):
    """timm `backbone` + `mint_head` reading the backbone's taps, in one backbone pass.

    mode: `active` (MINT gradients reach the backbone), `passive` (taps detached), `off` (no head).
    """

    def __init__(self, backbone: nn.Module, mint_head: nn.Module | None, taps: Sequence[int], mode: str):
        super().__init__()
        _check_mode(mode)
        if (mode == "off") != (mint_head is None):
            raise ValueError(f"MINT mode {mode!r} needs {'no' if mode == 'off' else 'a'} mint_head")
        self.backbone = backbone
        self.mint_head = mint_head
        self.taps = list(taps)
        self.mode = mode
        self.record: dict | None = None  # the model and mint configs it was built from (build_auditable_model)
        # ViT-like backbones hand token heads their tokens, prefix (cls/register) tokens included
        wants_tokens = getattr(mint_head, "input_fmt", "NCHW") == "NLC"
        self._tap_kwargs = (
            {"output_fmt": "NLC", "return_prefix_tokens": True}
            if wants_tokens and hasattr(backbone, "num_prefix_tokens")
            else {}
        )

    def extra_repr(self) -> str:
        return f"mode={self.mode!r}, taps={self.taps}"

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor | None]:
        """(task logits [B, num_classes], membership logit [B] or None when mode is off)."""
        if self.mint_head is None:
            return self.backbone(x), None
        logits, taps = self._backbone_with_taps(x)
        return logits, self.mint_head(taps)

    def _backbone_with_taps(self, x: Tensor) -> tuple[Tensor, list[Tensor]]:
        final, taps = self.backbone.forward_intermediates(x, indices=self.taps, **self._tap_kwargs)
        taps = [_join_prefix(t) for t in taps]
        if self.mode == "passive":
            taps = [t.detach() for t in taps]
        return self.backbone.forward_head(final), taps

    def check_forward(self, input_size: Sequence[int]) -> None:
        """One zero input of ``input_size`` (C, H, W) through the backbone, then the MINT head, in eval mode
        without gradients (nothing changes: no BatchNorm statistics, no RNG): a config that builds but cannot
        compute fails now, as one ValueError naming its group, before any work."""
        x = torch.zeros(1, *input_size)
        backbone_fails = f"the backbone fails on a {tuple(input_size)} input"
        was_training = self.training
        self.eval()
        try:
            with torch.no_grad():
                if self.mint_head is None:
                    _config_error("model.*", backbone_fails, lambda: self.backbone(x))
                else:
                    _, taps = _config_error("model.*", backbone_fails, lambda: self._backbone_with_taps(x))
                    _config_error("mint.head", "the MINT head fails on the backbone's taps",
                                  lambda: self.mint_head(taps))
        finally:
            self.train(was_training)

    def memory_format(self, setting: bool | str, device: torch.device) -> torch.memory_format:
        """The memory format to train in: ``channels_last`` (NHWC) when ``setting`` is true, or ``"auto"`` on
        CUDA for a convolutional backbone (tensor-core convolutions want NHWC); else contiguous (NCHW).
        Patch-embedding backbones (ViT & co.) convolve once per image, so ``auto`` leaves them be."""
        if setting == "auto":
            setting = device.type == "cuda" and not hasattr(self.backbone, "patch_embed")
        return torch.channels_last if setting else torch.contiguous_format

    def param_groups(self, weight_decay: float) -> list[dict]:
        """AdamW groups: no decay on 1-D params (norms, biases) and the backbone's `no_weight_decay()`."""
        skip = getattr(self.backbone, "no_weight_decay", set)()
        return param_groups_weight_decay(self, weight_decay, no_weight_decay_list=[f"backbone.{n}" for n in skip])


def _check_mode(mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"mint.mode: unknown mode {mode!r}; valid modes: {', '.join(MODES)}")


def _join_prefix(tap: Tensor | tuple[Tensor, Tensor]) -> Tensor:
    """timm returns (spatial, prefix) pairs with return_prefix_tokens: make [B, prefix + spatial, C]."""
    if isinstance(tap, tuple):
        spatial, prefix = tap
        return torch.cat([prefix, spatial], dim=1)
    return tap


def _config_error(where: str, what: str, call: Callable[[], T]) -> T:
    """``call()``; whatever it raises (timm's assertions, torch's shape errors) becomes one ValueError naming
    the config keys ``where`` and the error's first line."""
    try:
        return call()
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise ValueError(f"{where}: {what}: {type(e).__name__}: {first}") from e


def create_backbone(
    name: str, num_classes: int, img_size: int, in_chans: int = 3, kwargs: Mapping | None = None
) -> nn.Module:
    """timm classifier, never pretrained; `img_size` is passed only to fixed-input-size models (ViTs)."""
    if not timm.is_model(name):
        raise ValueError(f"model.name: unknown timm model {name!r}")
    kwargs = dict(kwargs or {})
    clash = sorted(_SET_BY_US & set(kwargs))
    if clash:
        raise ValueError(f"model.kwargs: {', '.join(clash)} not allowed here (set at model level or fixed)")
    where = f"model.name={name!r}, model.kwargs={kwargs}"
    pretrained_cfg = timm.models.get_pretrained_cfg(name)
    if pretrained_cfg is not None and pretrained_cfg.fixed_input_size:
        kwargs["img_size"] = img_size
    return _config_error(where, "timm cannot build it", lambda: timm.create_model(
        name, pretrained=False, num_classes=num_classes, in_chans=in_chans, **kwargs))


def build_auditable_model(model_cfg: ModelConfig, mint_cfg: MintConfig) -> AuditableModel:
    """AuditableModel from the typed ``model`` and ``mint`` configs (``model.num_classes`` resolved); its
    ``record`` holds the two as ``model_config.json`` keeps them."""
    model = _build(model_cfg, mint_cfg)
    model.record = {"model": asdict(model_cfg), "mint": mint_cfg.model_record()}
    return model


def _build(model_cfg: ModelConfig, mint_cfg: MintConfig) -> AuditableModel:
    if model_cfg.num_classes is None:
        raise ValueError("model.num_classes=None: set it, or let training take it from the dataset root")
    backbone = create_backbone(model_cfg.name, model_cfg.num_classes, model_cfg.img_size, model_cfg.in_chans,
                               model_cfg.kwargs)
    if not mint_cfg.on:
        return AuditableModel(backbone, None, [], mint_cfg.mode)
    head_cfg = mint_cfg.head.record()
    taps = resolve_taps(backbone, mint_cfg.taps)
    in_chs = [backbone.feature_info[i]["num_chs"] for i in taps]
    kind = head_cfg.pop("kind")
    head = _config_error(f"mint.head={mint_cfg.head.record()}", "cannot be built", lambda: build_head(
        kind, in_chs, num_prefix_tokens=getattr(backbone, "num_prefix_tokens", 0), **head_cfg))
    return AuditableModel(backbone, head, taps, mint_cfg.mode)


def model_from_record(record: Mapping, mode: str | None = None) -> AuditableModel:
    """The model a ``model_config.json`` describes (its ``model`` and ``mint`` sections), ``mode`` replacing the
    recorded MINT mode when given."""
    mint = MintConfig.from_dict(record["mint"])
    return build_auditable_model(ModelConfig.from_dict(record["model"]), replace(mint, mode=mode) if mode else mint)
