"""Safe keys and a fuzzed reader: crafted keys cannot name a path, crafted labels and indices are skipped, random
bytes never crash the reader and every sample is delivered or counted once (the audit trail and resume against
an attacker: tests/test_integrity.py)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from reliability_helpers import keys_of, png, to_tensor, write_split

from amint_dist.data.pipeline import ShardedSplitStream, SplitShards, make_loader
from amint_dist.data.sources import sanitize_key


@pytest.mark.parametrize("raw", ["../../etc/passwd", "/abs/path/x", "a/../../b", "..", "a\\..\\b", "x\nsplit\tkey",
                                 "~/.ssh/id_rsa", "C:\\Windows\\evil"])
def test_sanitized_keys_cannot_name_a_path(raw):
    key = sanitize_key(raw)
    assert re.fullmatch(r"[A-Za-z0-9_-]+", key) and ".." not in key and "/" not in key


def read_all(shards: SplitShards, workers: int = 0, num_classes: int = 10) -> list[dict]:
    stream = ShardedSplitStream(shards, to_tensor, (3, 8, 8), 16, workers=workers, seed=0, num_classes=num_classes)
    return list(make_loader(stream))


def test_crafted_keys_and_labels_are_skipped_not_trusted(tmp_path):
    good = [("ok_0.png", png(0)), ("ok_0.cls", b"3"), ("ok_0.json", b'{"index": 0}')]
    crafted = [("../../evil.png", png(1)), ("../../evil.cls", b"1"), ("../../evil.json", b'{"index": 1}'),
               ("big_label.png", png(2)), ("big_label.cls", b"99999999999"), ("big_label.json", b'{"index": 2}'),
               ("far_index.png", png(3)), ("far_index.cls", b"1"), ("far_index.json", b'{"index": 7}')]
    shards = write_split(tmp_path, "members", [good + crafted], ["ok_0", "../../evil", "big_label", "far_index"])
    batches = read_all(shards)
    assert [k for b in batches for k, v in zip(b["key"], b["valid"]) if v] == ["ok_0"]
    reasons = {what: why for b in batches for what, why in b["skipped"]}
    assert reasons == {"'../../evil'": "unsafe key", "big_label": "label out of range",
                       "far_index": "index outside its shard"}


# ---- fuzz: random bytes as images, labels and metadata through the reader ----

def fuzz_split(root: Path, seed: int, n_shards: int = 8, per_shard: int = 20) -> tuple[SplitShards, set[str], int]:
    """Shards of random samples: each image, label and metadata payload valid or garbage at random; some shards
    truncated, one pure noise. Returns the split, the keys that are fully valid, and the sample count."""
    rng = np.random.default_rng(seed)
    images = [lambda i: png(i), lambda i: rng.bytes(int(rng.integers(0, 300))),
              lambda i: png(i)[: int(rng.integers(1, 60))], lambda i: b"\x89PNG\r\n\x1a\n" + rng.bytes(40)]
    labels = [lambda: str(int(rng.integers(0, 10))).encode(), lambda: b"\xff" + rng.bytes(int(rng.integers(0, 8))),
              lambda: b"-3", lambda: b"1" * 5000, lambda: None]
    metas = [lambda i: json.dumps({"index": i}).encode(), lambda i: rng.bytes(int(rng.integers(0, 30))),
             lambda i: b"[" * 100_000, lambda i: b'{"index": 1e400}', lambda i: b'{"index": NaN}',
             lambda i: json.dumps([i]).encode(), lambda i: json.dumps({"index": i + 10_000}).encode(), lambda i: None]
    shards, keys, good = [], [], set()
    for s in range(n_shards):
        members = []
        for j in range(per_shard):
            i = s * per_shard + j
            key = f"fz_{i:05d}"
            keys.append(key)
            picks = [int(rng.integers(0, len(x))) if rng.random() < 0.5 else 0 for x in (images, labels, metas)]
            fields = {"png": images[picks[0]](i), "cls": labels[picks[1]](), "json": metas[picks[2]](i)}
            members += [(f"{key}.{ext}", data) for ext, data in fields.items() if data is not None]
            if picks == [0, 0, 0]:
                good.add(key)
        shards.append(members)
    split = write_split(root, "members", shards, keys)
    noise, cut = Path(split.urls[0]), Path(split.urls[1])
    noise.write_bytes(rng.bytes(noise.stat().st_size))
    cut.write_bytes(cut.read_bytes()[: int(rng.integers(512, cut.stat().st_size - 1024))])
    good -= set(keys[:per_shard])
    return split, good, n_shards * per_shard


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("workers", [0, 2])
def test_fuzzed_samples_never_crash_the_reader_and_are_all_counted(tmp_path, seed, workers):
    shards, good, total = fuzz_split(tmp_path, seed)
    batches = read_all(shards, workers)
    delivered = [k for b in batches for k, v in zip(b["key"], b["valid"]) if v]
    skipped = [what for b in batches for what, _ in b["skipped"]]
    assert len(delivered) == len(set(delivered)) and set(delivered) <= good and len(delivered) > 5
    assert len(delivered) + len(skipped) == total  # every sample is delivered or counted, once
    assert good - set(delivered) <= set(keys_of(tmp_path, "members")[20:40])  # only the cut shard's tail is lost
    reasons = {why.split(" (")[0] for b in batches for _, why in b["skipped"]}
    assert {"undecodable image", "missing or bad label/metadata", "label out of range", "index outside its shard",
            "truncated or unreadable shard"} <= reasons
