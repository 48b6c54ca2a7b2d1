"""AuditableModel: a timm classifier and its MINT head as one module (one DeepSpeed engine)."""

from collections.abc import Mapping, Sequence
from dataclasses import asdict, replace

import torch
from timm.optim import param_groups_weight_decay
from torch import Tensor, nn

from .backbone import config_error
from .config import MintConfig, ModelConfig
from .heads import build_head
from .init_weights import build_backbone
from .taps import block_class_names, resolve_taps

MODES = ("active", "passive", "off")


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

    @property
    def _no_split_modules(self) -> list[str]:
        """FSDP's sharding units, read by Accelerate's TRANSFORMER_BASED_WRAP: the backbone's blocks and the MINT
        head (each gathered whole for its forward)."""
        head = [type(self.mint_head).__name__] if self.mint_head is not None else []
        return block_class_names(self.backbone) + head

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
                    config_error("model.*", backbone_fails, lambda: self.backbone(x))
                else:
                    _, taps = config_error("model.*", backbone_fails, lambda: self._backbone_with_taps(x))
                    config_error("mint.head", "the MINT head fails on the backbone's taps",
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


def build_auditable_model(model_cfg: ModelConfig, mint_cfg: MintConfig) -> AuditableModel:
    """AuditableModel from the typed ``model`` and ``mint`` configs (``model.num_classes`` resolved); its
    ``record`` holds the two as ``model_config.json`` keeps them."""
    model = _build(model_cfg, mint_cfg)
    model.record = {"model": asdict(model_cfg), "mint": mint_cfg.model_record()}
    return model


def _build(model_cfg: ModelConfig, mint_cfg: MintConfig) -> AuditableModel:
    if model_cfg.num_classes is None:
        raise ValueError("model.num_classes=None: set it, or let training take it from the dataset root")
    backbone = build_backbone(model_cfg)
    if not mint_cfg.on:
        return AuditableModel(backbone, None, [], mint_cfg.mode)
    head_cfg = mint_cfg.head.record()
    taps = resolve_taps(backbone, mint_cfg.taps)
    in_chs = [backbone.feature_info[i]["num_chs"] for i in taps]
    kind = head_cfg.pop("kind")
    head = config_error(f"mint.head={mint_cfg.head.record()}", "cannot be built", lambda: build_head(
        kind, in_chs, num_prefix_tokens=getattr(backbone, "num_prefix_tokens", 0), **head_cfg))
    return AuditableModel(backbone, head, taps, mint_cfg.mode)


def model_from_record(record: Mapping, mode: str | None = None) -> AuditableModel:
    """The model a ``model_config.json`` describes (its ``model`` and ``mint`` sections), ``mode`` replacing the
    recorded MINT mode when given; randomly initialised (its weights are loaded next: no pretrained file or
    checkpoint is read, nor needed)."""
    mint = MintConfig.from_dict(record["mint"])
    model = ModelConfig.from_dict(record["model"]).architecture()
    return build_auditable_model(model, replace(mint, mode=mode) if mode else mint)
