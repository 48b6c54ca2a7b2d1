"""data.decode=device: workers ship the encoded bytes; the training step decodes (torchvision), crops and flips."""

from __future__ import annotations

import io
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import prep_cfg, write_wds_source
from PIL import Image
from reliability_helpers import keys_of, metrics
from test_bad_data import middle_key, rewrite_tar
from torchvision.transforms.v2.functional import pil_to_tensor
from train_helpers import TINY, cli_error, load_npz, run_train

from amint_dist.data.device_decode import DeviceDecode
from amint_dist.data.device_transform import DeviceTransform
from amint_dist.data.images import DEFAULT_MAX_PIXELS, decode_image
from amint_dist.data.pipeline import ShardedSplitStream, SplitShards, make_loader
from amint_dist.data.samples import seeded_rng
from amint_dist.data.transforms import make_transform

DATA_CONFIG = {"input_size": (3, 16, 16), "interpolation": "bicubic", "mean": (0.485, 0.456, 0.406),
               "std": (0.229, 0.224, 0.225), "crop_pct": 0.875}
CROP_FLIP = {"hflip": 0.5, "scale": (0.3, 1.0), "color_jitter": None}  # the workers' half: crop and flip only
DEIT = {"auto_augment": "rand-m9-mstd0.5-inc1", "re_prob": 0.25, "re_mode": "pixel"}
CPU = torch.device("cpu")


def jpeg(i: int) -> bytes:
    """A smooth 40x32 photo-like JPEG; every 7th grayscale, every 11th CMYK."""
    y, x = np.mgrid[0:32, 0:40]
    pixels = np.stack([(x * 6 + i * 13) % 256, (y * 8 + i * 7) % 256, ((x + y) * 3 + i) % 256], -1).astype(np.uint8)
    image = Image.fromarray(pixels, "RGB")
    image = image.convert("L") if i % 7 == 0 else image.convert("CMYK") if i % 11 == 0 else image
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


@pytest.fixture(scope="module")
def jpeg_root(tmp_path_factory) -> Path:
    from amint_dist.data.prepare import prepare_dataset

    tmp = tmp_path_factory.mktemp("jpeg")
    samples = [{"__key__": f"n{i % 4}_{i:04d}", "jpg": jpeg(i), "cls": str(i % 4).encode()} for i in range(300)]
    pattern = write_wds_source(tmp / "src", samples, per_shard=100)
    prepare_dataset(prep_cfg("wds", tmp / "root", source=pattern, shard_maxcount=32))
    return tmp / "root"


@pytest.fixture(scope="module")
def corrupt_root(tmp_path_factory, jpeg_root) -> tuple[Path, str]:
    """``jpeg_root`` with one member JPEG cut just after its start of scan: PIL reads its header, its pixels do
    not decode."""
    root = Path(shutil.copytree(jpeg_root, tmp_path_factory.mktemp("corrupt") / "root"))
    shard = sorted((root / "members").glob("*.tar"))[1]
    victim = middle_key(shard)
    rewrite_tar(shard, lambda name, data: data[: data.index(b"\xff\xda") + 20] if name == f"{victim}.jpg" else data)
    return root, victim


def first_batch(root: Path, transform, workers: int = 0) -> dict:
    stream = ShardedSplitStream(SplitShards.from_root(root, "members"), transform, DATA_CONFIG["input_size"], 16,
                                workers=workers, seed=5)
    stream.set_epoch(0)
    return next(iter(make_loader(stream)))


def encoded_batches(root: Path) -> list[dict]:
    stream = ShardedSplitStream(SplitShards.from_root(root, "members"), None, DATA_CONFIG["input_size"], 16, seed=5)
    stream.set_epoch(0)
    return list(make_loader(stream))


def test_workers_ship_the_encoded_bytes_untouched(jpeg_root):
    """Through a worker process as training reads: a list of 1-D uint8 tensors, the samples' bytes exactly."""
    raw, via_worker = first_batch(jpeg_root, None), first_batch(jpeg_root, None, workers=1)
    assert isinstance(raw["image"], list) and all(t.dtype == torch.uint8 and t.dim() == 1 for t in raw["image"])
    assert torch.equal(raw["index"], via_worker["index"]) and raw["key"] == via_worker["key"]
    assert all(torch.equal(a, b) for a, b in zip(raw["image"], via_worker["image"]))
    assert bytes(raw["image"][0][:3].tolist()) == b"\xff\xd8\xff"


@pytest.mark.parametrize("root", ["jpeg_root", "train_root"], ids=["jpeg", "png"])
def test_device_decode_is_pil_decode_and_the_crop_is_timms(request, root):
    """Every image (RGB, grayscale and CMYK JPEGs; the digits' PNGs) decodes to PIL's pixels exactly; seeded alike,
    the crop and flip draw timm's parameters, so the crops match the workers' up to the resampling (PIL's bicubic
    vs torchvision's antialiased bicubic)."""
    root = request.getfixturevalue(root)
    batch = first_batch(root, None)
    decode = DeviceDecode(DATA_CONFIG, CROP_FLIP, CPU)
    worker = make_transform(DATA_CONFIG, CROP_FLIP, uint8=True)
    decoded = decode.decode(batch["image"], batch["valid"].tolist())
    for payload, image in zip(batch["image"], decoded):
        pil = decode_image(payload.numpy().tobytes(), DEFAULT_MAX_PIXELS)
        assert torch.equal(image, pil_to_tensor(pil))
        with seeded_rng("same"):
            theirs = worker(pil)
        with seeded_rng("same"):
            ours = decode.crop_and_flip(image)
        assert ours.shape == theirs.shape == (3, 16, 16)
        assert (ours.float() - theirs.float()).abs().mean() < 4, "another crop or flip than the workers'"


def test_device_decode_is_seeded_per_batch(jpeg_root):
    """The same seed gives the same batch, another seed another; the caller's RNG streams are left alone."""
    batch = first_batch(jpeg_root, None)
    transform = DeviceTransform(DATA_CONFIG, DEIT, CPU, DeviceDecode(DATA_CONFIG, DEIT, CPU))
    state = torch.random.get_rng_state()
    first, again, other = (transform.apply(batch, s)["image"] for s in ("seed a", "seed a", "seed b"))
    assert torch.equal(torch.random.get_rng_state(), state)
    assert first.shape == (16, 3, 16, 16) and first.dtype == torch.float32
    assert torch.equal(first, again) and not torch.equal(first, other)


def test_a_corrupt_jpeg_is_an_invalid_row_and_a_skip(corrupt_root):
    """The batched decode fails; one by one, the corrupt sample alone becomes invalid and a counted skip."""
    root, victim = corrupt_root
    decode = DeviceDecode(DATA_CONFIG, CROP_FLIP, CPU)
    batch = next(b for b in encoded_batches(root) if victim in b["key"])
    row = batch["key"].index(victim)
    assert batch["valid"][row] and batch["skipped"] == []  # the header passed the workers' check
    out = decode(batch)
    assert out["skipped"] == [(victim, "undecodable image (RuntimeError)")]
    assert out["valid"].tolist() == [ok and r != row for r, ok in enumerate(batch["valid"].tolist())]
    assert out["image"].shape == (16, 3, 16, 16) and not out["image"][row].any()
    assert out["image"][[r for r in range(16) if r != row and batch["valid"][r]]].float().std(dim=(1, 2, 3)).min() > 0


def test_training_with_device_decode_skips_the_corrupt_jpeg(tmp_path, corrupt_root):
    """A real run (two epochs, the DeiT augmentation, shifted negatives): it finishes; the corrupt JPEG is listed
    as a skip each epoch and the ledger never counts it, while every other member is counted twice."""
    root, victim = corrupt_root
    run_train(tmp_path / "run", root, "train.epochs=2", "data.device_transform=true", "data.decode=device",
              "data.max_skip_fraction=0.05", "mint.member_shift=2", "+data.augment.color_jitter=null",
              "+data.augment.auto_augment=rand-m9-mstd0.5-inc1", "+data.augment.re_prob=0.25")
    lines = metrics(tmp_path / "run")
    assert [line["skipped_keys"] for line in lines] == [[[victim, "undecodable image (RuntimeError)"]]] * 2
    members = keys_of(root, "members")
    counts = load_npz(tmp_path / "run" / "ledger.npz")["members"]
    assert counts[members.index(victim)] == 0
    assert sorted(set(counts.tolist())) == [0, 2] and (counts == 0).sum() == 1


@pytest.mark.parametrize("overrides, culprit", [
    (["data.decode=device"], "data.decode='device': device decoding needs data.device_transform=true"),
    (["data.decode=device", "data.device_transform=true", "+data.augment.hflip=0.5"], "ColorJitter"),
    (["data.decode=device", "data.device_transform=true"], "Resize"),  # no augment: the eval transform
    (["data.decode=gpu"], "data.decode"),
], ids=["no-device-transform", "colour-jitter", "no-augment", "unknown"])
def test_device_decode_refusals_are_one_line(tmp_path, jpeg_root, capsys, overrides, culprit):
    from amint_dist.train.loop import train

    error = cli_error("train", train, [f"run.dir={tmp_path / 'run'}", f"data.root={jpeg_root}", *TINY, *overrides],
                      capsys)
    assert culprit in error
    assert not (tmp_path / "run").exists()
