"""Worker CPU per augmented sample with the DeiT augmentation: all in the worker vs ``data.device_transform``.

Worker sides (this process, one torch thread, alternated A/B/A/B; CPU seconds are this process's):
``float32`` = decode + timm's DeiT training transform (random resized crop, flip, RandAugment
rand-m9-mstd0.5-inc1, ToTensor, Normalize, random erasing 0.25 pixel), what the workers do today;
``uint8`` = decode + random resized crop + flip to a uint8 tensor (``make_transform(..., uint8=True)``), what
they do with ``data.device_transform=true``; ``bytes`` = the header check and the encoded bytes as a uint8
tensor, what they do with ``data.decode=device`` too; ``decode`` = the JPEG decode alone (the floor of a
worker that decodes).
Device sides: the moved half (``DeviceTransform``: RandAugment per sample, float, normalise, random erasing) on
batches of the uint8 crops (``uint8``), and with the decode, crop and flip before it (``DeviceDecode``: batched
``decode_jpeg``; ``bytes``), on this process's CPU (``--device-threads``) and on CUDA when there is one: the work
moved there, it did not vanish. Bytes per batch: the image tensor a worker ships, per batch.

    python benchmarks/device_augment.py                    # 256 generated 448x448 JPEGs -> 224x224, 4 rounds
    python benchmarks/device_augment.py --n 512 --rounds 6 --size 500
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from _record import alternate, record, set_threads, verdict
from amint_dist.data.device_decode import DeviceDecode
from amint_dist.data.device_transform import DeviceTransform
from amint_dist.data.images import DEFAULT_MAX_PIXELS, check_header, decode_image
from amint_dist.data.samples import seeded_rng
from amint_dist.data.transforms import make_transform
from data_throughput import natural_ish_jpeg

DEIT = {"auto_augment": "rand-m9-mstd0.5-inc1", "re_prob": 0.25, "re_mode": "pixel"}  # configs/experiment/vit_b16_imagenet


def deit_data_config(img_size: int) -> dict:
    return {"input_size": (3, img_size, img_size), "interpolation": "bicubic", "crop_pct": 0.875,
            "mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225)}


def worker_side(payloads: list[bytes], transform) -> int:
    """Decode and transform every payload (the per-sample work of a loader worker); samples done."""
    with seeded_rng("bench"):
        for payload in payloads:
            transform(decode_image(payload, DEFAULT_MAX_PIXELS))
    return len(payloads)


def bytes_side(payloads: list[bytes]) -> int:
    """What a ``data.decode=device`` worker does per sample: the header check, the bytes as a uint8 tensor."""
    for payload in payloads:
        check_header(payload, DEFAULT_MAX_PIXELS)
        torch.frombuffer(bytearray(payload), dtype=torch.uint8)
    return len(payloads)


def encoded_batch(payloads: list[bytes]) -> dict:
    """A reader batch under ``data.decode=device``: the encoded images, every row valid."""
    return {"image": [torch.frombuffer(bytearray(p), dtype=torch.uint8) for p in payloads],
            "valid": torch.ones(len(payloads), dtype=torch.bool), "key": [str(i) for i in range(len(payloads))],
            "skipped": []}


def device_side(batches: list, transform: DeviceTransform) -> int:
    """The moved half on every batch (uint8 crops, or encoded batches when ``transform`` decodes); samples
    done (CUDA synchronised)."""
    n = 0
    for b, batch in enumerate(batches):
        if transform.decode is None:
            n += len(transform(batch, f"bench:{b}"))
        else:
            n += len(transform.apply(batch, f"bench:{b}")["image"])
    if transform.device.type == "cuda":
        torch.cuda.synchronize()
    return n


def device_seconds_per_sample(batches: list, transform: DeviceTransform) -> dict:
    """Wall and CPU seconds per sample of :func:`device_side` (after one warm-up pass)."""
    device_side(batches, transform)
    wall, cpu = time.perf_counter(), time.process_time()
    n = device_side(batches, transform)
    return {"wall_s_per_sample": round((time.perf_counter() - wall) / n, 6),
            "cpu_s_per_sample": round((time.process_time() - cpu) / n, 6)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=256, help="generated JPEGs (timed per block)")
    p.add_argument("--size", type=int, default=448, help="generated JPEG side (px); ImageNet's average is ~400x350")
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--batch-size", type=int, default=128, help="rows per batch (the ViT-B recipe: 1024 / 8 ranks)")
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--device-threads", type=int, default=1, help="torch threads for the CPU device side")
    args = p.parse_args()
    set_threads(1)
    rng = np.random.default_rng(0)
    payloads = [natural_ish_jpeg(rng, args.size) for _ in range(args.n)]
    data_config = deit_data_config(args.img_size)
    full, crop_only = make_transform(data_config, DEIT), make_transform(data_config, DEIT, uint8=True)
    sides = {"float32": lambda: worker_side(payloads, full), "uint8": lambda: worker_side(payloads, crop_only),
             "bytes": lambda: bytes_side(payloads), "decode": lambda: worker_side(payloads, lambda image: image)}
    workers = alternate(sides, args.rounds)
    cpu_s = {name: round(1 / rate, 6) for name, rate in workers["samples_per_cpu_s"].items()}
    with seeded_rng("crops"):
        crops = torch.stack([crop_only(decode_image(b, DEFAULT_MAX_PIXELS)) for b in payloads])
    torch.set_num_threads(args.device_threads)
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    size = args.batch_size
    crop_batches = [crops[i:i + size] for i in range(0, len(crops), size)]
    encoded = [encoded_batch(payloads[i:i + size]) for i in range(0, len(payloads), size)]
    moved = {}
    for d in devices:
        device = torch.device(d)
        moved[d] = device_seconds_per_sample(crop_batches, DeviceTransform(data_config, DEIT, device))
        decode = DeviceDecode(data_config, DEIT, device)
        moved[f"{d}_with_decode"] = device_seconds_per_sample(encoded, DeviceTransform(data_config, DEIT, device, decode))
    pixels = args.batch_size * 3 * args.img_size ** 2
    record("device_augment", {
        "n": args.n, "jpeg_size": args.size, "img_size": args.img_size, "batch_size": args.batch_size,
        "worker_cpu_s_per_sample": cpu_s, "workers": workers,
        **verdict(workers, "float32", "bytes", 3.0, "bytes_to_float32"),
        "ratio_uint8_to_float32": workers["paired_ratio_to_float32"]["uint8"],
        "cpu_ratio_uint8_to_float32": workers["cpu_ratio_to_float32"]["uint8"],
        "device_side_per_sample": moved, "device_threads": args.device_threads,
        "bytes_per_batch": {"float32": pixels * 4, "uint8": pixels,
                            "bytes": sum(len(p) for p in payloads) * size // len(payloads)},
    })


if __name__ == "__main__":
    main()
