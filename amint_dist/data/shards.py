"""Write one split's samples into WebDataset tar shards, deterministically and atomically."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import webdataset as wds

from amint_dist.data.sources import Record
from amint_dist.io import fsync_dir, sha256_file

SHARD_PATTERN = "shard-%06d.tar"
_TAR_BLOCK = 512
_TAR_RECORD = 20 * _TAR_BLOCK  # tarfile pads the archive to whole records
_TAR_END = 2 * _TAR_BLOCK  # end-of-archive marker


@dataclass(frozen=True)
class ShardJob:
    """One shard to write: its path and the (index, record) pairs it holds, in index order."""

    path: str
    split: str
    samples: tuple[tuple[int, Record], ...]


def tar_entry_bytes(payload_size: int) -> int:
    """Bytes a member of ``payload_size`` takes in a tar (header + payload padded to 512)."""
    return _TAR_BLOCK + -(-payload_size // _TAR_BLOCK) * _TAR_BLOCK


def sample_meta(index: int, split: str, record: Record) -> bytes:
    """The ``<key>.json`` payload stored with each sample."""
    return json.dumps({"index": index, "split": split, "source_key": record.source_key}, sort_keys=True).encode()


def tar_file_bytes(entries_size: int) -> int:
    """Size of a tar file whose members take ``entries_size`` bytes (end marker, record padding)."""
    return -(-(entries_size + _TAR_END) // _TAR_RECORD) * _TAR_RECORD


def plan_shards(split_dir: Path, split: str, records: Sequence[Record], maxcount: int, maxsize: int) -> list[ShardJob]:
    """Cut the index-ordered records into shards of at most ``maxcount`` samples and ``maxsize`` bytes.

    A single sample larger than ``maxsize`` still gets a shard of its own. Member sizes assume plain
    ustar headers (keys under 100 characters; longer ones add a pax header).
    """
    jobs: list[ShardJob] = []
    current: list[tuple[int, Record]] = []
    size = 0
    for index, record in enumerate(records):
        need = sum(
            tar_entry_bytes(n)
            for n in (record.size, len(str(record.label)), len(sample_meta(index, split, record)))
        )
        if current and (len(current) >= maxcount or tar_file_bytes(size + need) > maxsize):
            jobs.append(ShardJob(str(split_dir / (SHARD_PATTERN % len(jobs))), split, tuple(current)))
            current, size = [], 0
        current.append((index, record))
        size += need
    if current:
        jobs.append(ShardJob(str(split_dir / (SHARD_PATTERN % len(jobs))), split, tuple(current)))
    return jobs


def write_shard(source, job: ShardJob) -> dict:
    """Write one shard (temp file, fsync, rename) and return its manifest entry."""
    tmp = job.path + ".tmp"
    with open(tmp, "wb") as stream:  # mtime an int: a float one makes tarfile add a pax header per member
        with wds.TarWriter(stream, encoder=False, mtime=0, user="amint", group="amint") as sink:
            for index, record in job.samples:
                sink.write({
                    "__key__": record.key,
                    record.ext: source.read(record.locator),
                    "cls": str(record.label).encode(),
                    "json": sample_meta(index, job.split, record),
                })
        stream.flush()
        os.fsync(stream.fileno())
    os.replace(tmp, job.path)
    fsync_dir(os.path.dirname(job.path))
    return {
        "name": os.path.basename(job.path),
        "num_samples": len(job.samples),
        "bytes": os.path.getsize(job.path),
        "sha256": sha256_file(job.path),
    }
