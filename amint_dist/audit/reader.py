"""What every audit-layer job shares: the process state and eval-transform streams of a dataset root's splits."""

from __future__ import annotations

from dataclasses import dataclass

from accelerate import PartialState

from amint_dist.audit.inputs import AuditInputs
from amint_dist.data.images import DEFAULT_MAX_PIXELS
from amint_dist.data.pipeline import ShardedSplitStream, SplitShards
from amint_dist.data.transforms import data_config_for, make_transform
from amint_dist.dist import check_world, cpu_only, launched_world
from amint_dist.models import AuditableModel, ModelConfig


@dataclass
class SplitReader:
    """Eval-transform streams of the dataset root for this rank."""

    inputs: AuditInputs
    model: AuditableModel
    rank: int
    world: int
    workers: int
    seed: int

    def __post_init__(self) -> None:
        model = ModelConfig.from_dict(self.inputs.model_config["model"])
        data_config = self.inputs.model_config.get("data_config") or data_config_for(  # as in training, else timm's
            self.model.backbone, model.img_size, model.in_chans)
        self.transform = make_transform(data_config, None)  # eval transform: no augmentation
        self.image_shape = tuple(data_config["input_size"])

    def stream(self, split: str, batch_size: int, shuffle: bool) -> ShardedSplitStream:
        shards = SplitShards.from_root(self.inputs.data_root, split)
        max_pixels = int(self.inputs.manifest.get("max_pixels", DEFAULT_MAX_PIXELS))  # the limit it was prepared with
        return ShardedSplitStream(shards, self.transform, self.image_shape, batch_size, rank=self.rank,
                                  world=self.world, workers=self.workers, seed=self.seed, shuffle=shuffle,
                                  max_pixels=max_pixels)


def process_state() -> PartialState:
    """Rank, world, device and collectives (no Accelerator: nothing is prepared); gloo ranks without CUDA."""
    state = PartialState(cpu=cpu_only() and launched_world() > 1)
    check_world(state)
    return state
