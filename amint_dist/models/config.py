"""The ``model`` and ``mint`` config groups: the timm backbone and the MINT head reading its taps."""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any, Literal

from amint_dist.config import Config, option

MODEL_MINT_KEYS = ("mode", "taps", "head")  # the mint keys that define the model (model_config.json records them)


@dataclass
class ModelConfig(Config):
    section = "model"

    name: str = option(help="any timm model name")
    img_size: int = option(lo=1, help="input height and width in pixels")
    in_chans: Literal[1, 3] = option(3, help="input channels: 3 (RGB) or 1 (grayscale, images converted to L)")
    num_classes: int | None = option(None, lo=1, help="task classes; null: from the dataset's splits.json")
    kwargs: dict = option({}, help="further timm.create_model arguments (patch_size, depth, drop_path_rate, ...)")
    pretrained: bool = option(False, help="start from pretrained weights through timm's loader (classifier "
                              "re-initialised when num_classes differs, in_chans adapted): model.pretrained_file, "
                              "else timm's file already in the local Hugging Face cache (never downloaded)")
    pretrained_file: str | None = option(None, help="local weights for model.pretrained (safetensors, or a torch "
                                         "file read weights-only)")
    checkpoint: str | None = option(None, help="start from the weights of a timm model of this very architecture "
                                    "and num_classes, loaded strictly (e.g. a file written by launch/export.py)")

    def __post_init__(self) -> None:
        if self.pretrained_file is not None and not self.pretrained:
            raise self.error("pretrained_file", "set model.pretrained=true to load it (or drop the file)")
        if self.pretrained and self.checkpoint is not None:
            raise self.error("checkpoint", "choose one starting point: model.pretrained or model.checkpoint")

    def architecture(self) -> ModelConfig:
        """This model, randomly initialised (no pretrained file or checkpoint): what saved weights load into."""
        return replace(self, pretrained=False, pretrained_file=None, checkpoint=None)


@dataclass
class HeadConfig(Config):
    section = "mint.head"

    kind: Literal["conv", "mlp", "token"] = option(help="conv (the paper's) | mlp (original MINT) | token (ViT tokens)")
    channels: int | None = option(None, lo=1, help="conv head: channels of each tap's 3x3 conv")
    hidden: int | None = option(None, lo=1, help="hidden units of the head's classifier (default: the head's)")
    dropout: float | None = option(None, lo=0, hi=1, hi_open=True, help="dropout before the classifier's last layer")
    grid: int | None = option(None, lo=1, help="conv head: g x g pooled cells per tap (1 = global pooling)")

    def record(self) -> dict[str, Any]:
        """The keys that were set (as configured: kind first)."""
        return {k: v for k, v in asdict(self).items() if v is not None}


@dataclass
class PerturbConfig(Config):
    section = "mint.member_perturb"

    rotate_deg: float = option(0.0, lo=0, hi=45, help="member-negative copies rotated by up to this many degrees")
    scale: float = option(0.0, lo=0, hi=0.5, help="member-negative copies zoomed by a factor 1 +- up to this")
    subpixel: float = option(0.0, lo=0, hi=1, help="member-negative copies translated by up to this many pixels, "
                                                   "bilinear (on top of mint.member_shift's whole pixels)")
    noise: float = option(0.0, lo=0, help="std of Gaussian noise added to member-negative copies (normalised units)")

    @property
    def on(self) -> bool:
        return bool(self.rotate_deg or self.scale or self.subpixel or self.noise)


@dataclass
class HardNegativesConfig(Config):
    section = "mint.hard_negatives"

    fraction: float = option(0.0, lo=0, hi=1, help="share of a micro-batch's negative rows, highest MINT logit first, "
                                                   "that weigh mint.hard_negatives.weight in the MINT loss (0: off)")
    weight: float = option(1.0, lo=0, lo_open=True, help="weight of those hard negative rows (the others weigh 1)")


@dataclass
class MintConfig(Config):
    section = "mint"

    mode: Literal["active", "passive", "off"] = option("active", help="active | passive (taps detached) | off (task only)")
    taps: str | list | None = option(None, help="entry | middle | output, or forward_intermediates indices")
    head: HeadConfig | None = option(None, help="the MINT head (mint.head.*)")
    task_weight: float = option(1.0, lo=0, help="weight of the task loss (l1)")
    weight: float = option(1.0, lo=0, help="weight of the MINT loss (l2)")
    normalize: bool = option(True, help="divide each loss by its first-step value (the authors' normalisation)")
    external_ratio: float = option(1.0, lo=0, lo_open=True, help="external batch size / member batch size")
    member_shift: int = option(0, lo=0, help="> 0: members shifted by up to this many pixels are extra MINT negatives")
    external_shift: int = option(0, lo=0, help="> 0: the same for external samples")
    member_weight: float = option(1.0, lo=0, lo_open=True, help="weight of member rows in the MINT BCE")
    member_perturb: PerturbConfig = option(
        PerturbConfig(), help="perturbed member copies as extra MINT negatives (mint.member_perturb.*)")
    hard_negatives: HardNegativesConfig = option(
        HardNegativesConfig(), help="more weight on the negatives scored most member-like (mint.hard_negatives.*)")
    focal_gamma: float = option(0.0, lo=0, help="focal MINT loss (1 - p_true)^gamma * BCE; 0: plain BCE")
    balancer: Literal["fixed", "famo"] = option(
        "fixed", help="fixed: task_weight and weight | famo: FAMO's adaptive weights, starting from them")
    famo_lr: float = option(0.025, lo=0, lo_open=True, help="learning rate of FAMO's task-weight logits (Adam)")
    famo_weight_decay: float = option(1e-3, lo=0, help="weight decay of FAMO's task-weight logits (gamma)")

    def __post_init__(self) -> None:
        if self.mode != "off" and (self.taps is None or self.head is None):
            raise self.error("mode", "needs both 'taps' and 'head'")
        if self.famo and not (self.task_weight and self.weight):
            raise self.error("balancer", f"FAMO starts from z = (task_weight, weight) normalised: both must be > 0 "
                                         f"(mint.task_weight={self.task_weight}, mint.weight={self.weight})")

    def model_record(self) -> dict[str, Any]:
        """The mint keys that define the model (``MODEL_MINT_KEYS``), as model_config.json records them."""
        values = {"mode": self.mode, "taps": self.taps, "head": self.head.record() if self.head else None}
        return {k: values[k] for k in MODEL_MINT_KEYS if values[k] is not None}

    @property
    def on(self) -> bool:
        return self.mode != "off"

    @property
    def famo(self) -> bool:
        """FAMO balances the two losses; with mint.mode=off there is one, and the balancer has nothing to do."""
        return self.balancer == "famo" and self.on

    def shifts(self, positives: tuple[str, ...] = ("members",)) -> dict[str, int]:
        """Split -> max shift of its copies (extra MINT negatives; 0: perturbed only); only the splits that get
        them. ``positives``: the splits ``member_shift`` and ``member_perturb`` apply to (a reference run's pool)."""
        shifts = {**{split: self.member_shift for split in positives}, "external": self.external_shift}
        copied = {split for split, s in shifts.items() if s} | (set(positives) if self.member_perturb.on else set())
        return {split: s for split, s in shifts.items() if split in copied} if self.on else {}
