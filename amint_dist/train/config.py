"""The training job's config: the ``optim``, ``train`` and ``run`` groups, and the whole composed job."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from amint_dist.config import Config, ConfigError, option
from amint_dist.data.config import DataConfig
from amint_dist.models.config import MintConfig, ModelConfig
from amint_dist.train.trackers import tracker_problem


@dataclass
class OptimConfig(Config):
    section = "optim"

    lr: float = option(1e-3, lo=0, lo_open=True, help="peak learning rate (AdamW)")
    min_lr: float = option(1e-5, lo=0, help="learning rate at the end of the cosine decay")
    betas: tuple[float, float] = option((0.9, 0.999), lo=0, hi=1, hi_open=True, help="AdamW betas")
    weight_decay: float = option(0.05, lo=0, help="not applied to norms, biases, position embeddings, cls token")
    warmup_epochs: float = option(2.0, lo=0, help="linear warm-up length in member epochs")
    clip_grad: float = option(1.0, lo=0, help="max global gradient norm; 0 disables")


@dataclass
class EmaConfig(Config):
    section = "train.ema"

    decay: float | None = option(None, lo=0, hi=1, hi_open=True,
                                 help="EMA of the whole model's weights (timm ModelEmaV3) with this decay; 0 or null: off")
    warmup: bool = option(False, help="timm's EMA decay warm-up (use_warmup): the decay grows towards train.ema.decay")
    device: Literal["model", "cpu"] = option("model", help="where the EMA weights live: the model's device | cpu")

    @property
    def on(self) -> bool:
        return bool(self.decay)


@dataclass
class TrainConfig(Config):
    section = "train"

    epochs: int = option(60, lo=1, help="member epochs")
    max_steps: int = option(0, lo=0, help="> 0 stops after this many optimizer steps (the LR schedule stays train.epochs')")
    batch_size: int = option(32, lo=1, help="member samples per rank per micro-batch")
    probe_batch_size: Literal["auto"] | int = option("auto", lo=0, help="auto: keeps the probe split's epochs in pace")
    grad_accum: int = option(1, lo=1, help="micro-batches per optimizer step")
    compile: bool = option(False, help="torch.compile the model's forward (inductor)")
    grad_checkpointing: bool = option(
        False, help="recompute the backbone's blocks in backward (timm set_grad_checkpointing): less memory, more compute")
    channels_last: Literal["auto"] | bool = option("auto", help="auto: NHWC for CNN backbones on CUDA | true | false")
    precision: Literal["auto", "no", "bf16", "fp16"] = option(
        "auto", help="auto: Accelerate's mixed_precision if set, else bf16 on GPUs that have it, else no")
    label_smoothing: float = option(0.0, lo=0, hi=1, hi_open=True, help="task cross-entropy label smoothing")
    mixup: float = option(0.0, lo=0, help="refused when > 0: a blended member is no member")
    cutmix: float = option(0.0, lo=0, help="refused when > 0, like mixup")
    seed: int = option(0, lo=0, help="model init, reader shuffles, shifted and perturbed negatives")
    log_every: int = option(10, lo=1, help="optimizer steps between TensorBoard points")
    log_with: list = option([], help="Accelerate trackers beside TensorBoard, e.g. [mlflow] or [wandb]; []: none")
    ckpt_every_steps: int = option(0, lo=0, help="optimizer steps between checkpoints; 0: epoch ends and the end")
    ckpt_every_epochs: int = option(10, lo=0, help="epochs between checkpoints; 0: none at epoch ends")
    keep_checkpoints: int = option(2, lo=0, help="complete checkpoints kept (0: all)")
    exposure_log: bool = option(False, help="per-rank trace of every consumed sample in RUN/exposure_log")
    dist_timeout_s: int = option(
        1800, lo=1, help="seconds a collective may wait before the process group (NCCL, gloo) fails the run")
    ema: EmaConfig = option(EmaConfig(), help="EMA weights (train.ema.*)")

    def __post_init__(self) -> None:
        if self.mixup or self.cutmix:  # a blended member is no sample the ledger or the audit can name
            raise ConfigError(f"train.mixup={self.mixup}, train.cutmix={self.cutmix}: batch mixing is refused, members "
                              "must stay identifiable (see docs/distributed.md, 'Mixup and CutMix'); set both to 0")
        self.log_with = [str(name) for name in self.log_with]
        problem = tracker_problem(self.log_with)
        if problem:
            raise self.error("log_with", problem)


@dataclass
class RunConfig(Config):
    section = "run"

    dir: str | None = option(None, help="the run dir; default runs/<SLURM_JOB_ID or time stamp chosen on rank 0>")
    audit: bool = option(True, help="audit the finished model (configs/audit.yaml's defaults)")
    validate: bool = option(False, help="score the finished model on the validation share (RUN/validation.json)")


@dataclass
class JobConfig(Config):
    """The whole training job (configs/train.yaml composed)."""

    section = ""

    data: DataConfig = option(help="the dataset root and its reading (data.*)")
    model: ModelConfig = option(help="the audited timm model (model.*)")
    mint: MintConfig = option(help="the MINT head and loss (mint.*)")
    optim: OptimConfig = option(help="the optimizer and schedule (optim.*)")
    train: TrainConfig = option(help="the training loop (train.*)")
    run: RunConfig = option(RunConfig(), help="where the run goes, and whether it is audited (run.*)")
    resume: str | None = option(None, help="latest | a checkpoint directory (holding train_state.json)")

    def __post_init__(self) -> None:
        if self.resume not in (None, "latest") and not (Path(self.resume) / "train_state.json").is_file():
            raise self.error("resume", "expected latest or a checkpoint directory (holding train_state.json)")
