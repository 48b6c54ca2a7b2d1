"""Helpers shared by the reliability and unit tests: read back what a run wrote (metrics, TensorBoard, keys),
write small raw splits of tar shards."""

from __future__ import annotations

import io
import json
import re
import tarfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from amint_dist.data.pipeline import SplitShards

EPOCHS = 2


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def scalars(run_dir: Path, tag: str) -> list[tuple[int, float]]:
    events = EventAccumulator(str(run_dir / "tb"), size_guidance={"scalars": 0})
    events.Reload()
    return [(e.step, e.value) for e in events.Scalars(tag)] if tag in events.Tags()["scalars"] else []


def keys_of(root: Path, split: str) -> list[str]:
    return (root / split / "keys.txt").read_text().split()


def write_split(root: Path, split: str, shards: list[list[tuple[str, bytes]]], keys: list[str]) -> SplitShards:
    """A split dir of raw tar shards (each a list of (member name, bytes)) with its _info.json and keys.txt."""
    d = root / split
    d.mkdir(parents=True)
    names = []
    for i, members in enumerate(shards):
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w") as tar:
            for name, data in members:
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
        names.append(f"shard-{i:06d}.tar")
        (d / names[-1]).write_bytes(buf.getvalue())
    lengths = [len({re.match(r"((?:.*/|)[^.]+)\.", n).group(1) for n, _ in s}) for s in shards]
    (d / "_info.json").write_text(json.dumps({"filenames": names, "shard_lengths": lengths}))
    (d / "keys.txt").write_text("".join(k + "\n" for k in keys))
    return SplitShards.from_root(root, split)


def png(seed: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (8, 8), dtype=np.uint8), "L").save(buf, "PNG")
    return buf.getvalue()


def to_tensor(img) -> torch.Tensor:
    """A decoded RGB image as a float CHW tensor in [0, 1] (the readers' transform in these tests)."""
    return torch.from_numpy(np.asarray(img, dtype=np.float32) / 255).permute(2, 0, 1)
