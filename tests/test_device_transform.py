"""data.device_transform: uint8 batches from the workers, augmentation and normalisation in the training step."""

from __future__ import annotations

import pytest
import safetensors.torch
import torch

from amint_dist.data.device_transform import DeviceTransform, rand_augment_options
from amint_dist.data.pipeline import ShardedSplitStream, SplitShards, make_loader
from amint_dist.data.transforms import make_transform
from train_helpers import TINY, cli_error, run_train

DATA_CONFIG = {"input_size": (3, 16, 16), "interpolation": "bicubic", "mean": (0.485, 0.456, 0.406),
               "std": (0.229, 0.224, 0.225), "crop_pct": 0.875}
DEIT = {"auto_augment": "rand-m9-mstd0.5-inc1", "re_prob": 0.25, "re_mode": "pixel"}  # the ViT-B recipe's
CPU = torch.device("cpu")


def first_batch(root, augment: dict, uint8: bool, workers: int = 0) -> dict:
    """Batch 0 of epoch 0 of the members split (16 rows), read through the real streaming reader."""
    stream = ShardedSplitStream(SplitShards.from_root(root, "members"), make_transform(DATA_CONFIG, augment, uint8),
                                DATA_CONFIG["input_size"], 16, workers=workers, seed=5)
    stream.set_epoch(0)
    return next(iter(make_loader(stream)))


@pytest.mark.parametrize("augment", [{}, {"hflip": 0.5, "scale": (0.3, 1.0)}], ids=["eval", "crop-flip-jitter"])
def test_device_path_gives_the_worker_paths_tensors_without_device_augmentation(train_root, augment):
    """With nothing moved to the device (no RandAugment, no erasing) the uint8 path's normalised batch is the float
    path's, bit for bit: the same crops, flips and colour jitter (seeded alike) and ToTensor + Normalize's arithmetic."""
    floats = first_batch(train_root, augment, uint8=False)
    crops = first_batch(train_root, augment, uint8=True)
    assert crops["image"].dtype == torch.uint8 and floats["image"].dtype == torch.float32
    assert torch.equal(crops["index"], floats["index"])
    transform = DeviceTransform(DATA_CONFIG, augment, CPU)
    assert not transform.augments
    assert torch.equal(transform(crops["image"], "any seed"), floats["image"])


def test_uint8_batches_ship_a_quarter_of_the_bytes(train_root):
    """Through worker processes (the shared-memory transport), as training reads."""
    floats = first_batch(train_root, DEIT, uint8=False, workers=1)
    crops = first_batch(train_root, DEIT, uint8=True, workers=1)
    assert crops["image"].shape == floats["image"].shape
    assert crops["image"].nbytes * 4 == floats["image"].nbytes


def test_device_augmentation_is_seeded_and_drawn_per_sample(train_root):
    """One image repeated 16 times: every row augmented differently; the same seed gives the same batch, another
    seed another; the caller's RNG streams are left as they were."""
    crops = first_batch(train_root, {"hflip": 0.0}, uint8=True)["image"]
    same_image = crops[:1].expand(16, -1, -1, -1).contiguous()
    transform = DeviceTransform(DATA_CONFIG, DEIT, CPU)
    state = torch.random.get_rng_state()
    first, again, other = transform(same_image, "seed a"), transform(same_image, "seed a"), transform(same_image, "seed b")
    assert torch.equal(torch.random.get_rng_state(), state)
    assert torch.equal(first, again) and not torch.equal(first, other)
    assert len({row.numpy().tobytes() for row in first}) == 16
    plain = DeviceTransform(DATA_CONFIG, {}, CPU)(same_image, "seed a")
    assert not torch.equal(first, plain)  # augmented at all


def test_device_transform_refuses_float_images():
    with pytest.raises(TypeError, match="uint8"):
        DeviceTransform(DATA_CONFIG, DEIT, CPU)(torch.zeros(2, 3, 16, 16), "s")


@pytest.mark.parametrize("auto_augment, expected", [
    ("rand-m9-mstd0.5-inc1", {"num_ops": 2, "magnitude": 9}), ("rand-n3-m5", {"num_ops": 3, "magnitude": 5}), (None, None),
])
def test_rand_augment_strings_map_to_torchvision(auto_augment, expected):
    assert rand_augment_options(auto_augment) == expected


@pytest.mark.parametrize("augment, culprit", [
    ("augmix-m5", "only RandAugment"), ("rand-m15", "magnitude must be 0..10"),
])
def test_augmentation_the_device_cannot_run_is_one_line_error(tmp_path, train_root, capsys, augment, culprit):
    from amint_dist.train.loop import train

    error = cli_error("train", train, [f"run.dir={tmp_path / 'run'}", f"data.root={train_root}", *TINY,
                                       "data.device_transform=true", f"+data.augment.auto_augment={augment}"], capsys)
    assert "data.augment=" in error and culprit in error


def test_training_with_device_transform(tmp_path, train_root):
    """Real runs: without augmentation the device path trains to the default path's weights exactly; with the DeiT
    augmentation and shifted MINT negatives (made from the device-augmented images) it trains to other weights."""
    steps = ("train.max_steps=3",)
    run_train(tmp_path / "default", train_root, *steps)
    run_train(tmp_path / "device", train_root, *steps, "data.device_transform=true")
    run_train(tmp_path / "augmented", train_root, *steps, "data.device_transform=true", "mint.member_shift=2",
              "+data.augment.auto_augment=rand-m9-mstd0.5-inc1", "+data.augment.re_prob=0.25", "+data.augment.re_mode=pixel")
    default, device, augmented = (safetensors.torch.load_file(tmp_path / run / "model.safetensors")
                                  for run in ("default", "device", "augmented"))
    assert default.keys() == device.keys() == augmented.keys()
    assert all(torch.equal(default[k], device[k]) for k in default)
    assert all(torch.isfinite(v).all() for v in augmented.values())
    assert not all(torch.equal(default[k], augmented[k]) for k in default)


def test_device_augmentation_resumes_exactly(tmp_path, train_root):
    """Stopped after 2 steps and resumed to 4, a device-augmented run ends with the weights of the run that went
    straight to 4: the resumed steps drew the same augmentation (seeded by position, not by process history)."""
    augmented = ("data.device_transform=true", "+data.augment.auto_augment=rand-m9-mstd0.5-inc1",
                 "+data.augment.re_prob=0.5", "+data.augment.re_mode=pixel")
    run_train(tmp_path / "straight", train_root, *augmented, "train.max_steps=4")
    run_train(tmp_path / "resumed", train_root, *augmented, "train.max_steps=2")
    run_train(tmp_path / "resumed", train_root, *augmented, "train.max_steps=4", "resume=latest")
    straight, resumed = (safetensors.torch.load_file(tmp_path / run / "model.safetensors") for run in ("straight", "resumed"))
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)
