"""Bad data during training: corrupted, truncated and mislabelled samples are skipped, counted, listed and never
exposed; a mostly broken dataset stops the run (every rank) with one error line.

Every claim is read back from the files the runs wrote (docs/reliability.md maps each guarantee to its test).
"""

from __future__ import annotations

import io
import os
import re
import shutil
import tarfile
import time
from pathlib import Path

import pytest
from reliability_helpers import EPOCHS, keys_of, metrics, scalars
from test_distributed import launcher
from train_helpers import load_npz, run_train

from amint_dist.data.pipeline import SplitShards


def rewrite_tar(path: Path, edit) -> None:
    """Rewrite a shard member by member: ``edit(name, data)`` returns new bytes, or None to drop the member."""
    with tarfile.open(path) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    with tarfile.open(path, "w") as tar:
        for m, data in members:
            data = edit(m.name, data)
            if data is not None:
                m.size = len(data)
                tar.addfile(m, io.BytesIO(data))


def middle_key(path: Path) -> str:
    with tarfile.open(path) as tar:
        names = tar.getnames()
    return names[len(names) // 2].split(".")[0]


@pytest.fixture(scope="module")
def bad_root(tmp_path_factory, train_root) -> tuple[Path, dict[str, str]]:
    """A prepared root damaged in the middle of its splits: a truncated members shard, a non-image payload
    (members) and a missing label (external). Training verifies no hashes, so splits.json stays as it was."""
    root = Path(shutil.copytree(train_root, tmp_path_factory.mktemp("bad") / "root"))
    bad = {}
    not_image = middle_key(root / "members/shard-000005.tar")
    rewrite_tar(root / "members/shard-000005.tar",
                lambda name, data: b"this is not an image" if name == f"{not_image}.png" else data)
    bad[not_image] = "undecodable image (UnidentifiedImageError)"
    no_label = middle_key(root / "external/shard-000002.tar")
    rewrite_tar(root / "external/shard-000002.tar", lambda name, data: None if name == f"{no_label}.cls" else data)
    bad[no_label] = "missing or bad label/metadata"
    victim = root / "members/shard-000003.tar"
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    return root, bad


@pytest.fixture(scope="module")
def bad_data_run(tmp_path_factory, bad_root) -> Path:
    run_dir = tmp_path_factory.mktemp("bad_run") / "run"
    run_train(run_dir, bad_root[0], f"train.epochs={EPOCHS}", "data.max_skip_fraction=0.05")
    return run_dir


def test_bad_samples_are_skipped_counted_listed_and_never_exposed(bad_data_run, bad_root, train_root):
    root, bad = bad_root
    lines = metrics(bad_data_run)
    assert [x["epoch"] for x in lines] == list(range(EPOCHS))
    members = keys_of(root, "members")
    shard3 = SplitShards.from_root(root, "members").index_ranges[str(root / "members/shard-000003.tar")]
    for line in lines:
        listed = {tuple(e) for e in line["skipped_keys"]}
        truncated = {k for k, r in listed if r == "truncated or unreadable shard"}
        assert (next(k for k in bad if k in members), bad[next(k for k in bad if k in members)]) in listed
        assert 10 < len(truncated) and truncated <= {members[i] for i in shard3}  # named by key, from keys.txt
    total = lines[-1]["skipped"]
    listed_all = [tuple(e) for line in lines for e in line["skipped_keys"]]
    assert total == {r: sum(1 for _, x in listed_all if x == r) for r in total}  # counts == keys listed
    assert all(r in total for r in bad.values())
    for reason, n in total.items():  # TensorBoard: data/skipped/<reason>, last point == metrics.jsonl
        assert scalars(bad_data_run, f"data/skipped/{reason}")[-1][1] == n, reason
    ledger = load_npz(bad_data_run / "ledger.npz")
    skipped_members = {members.index(k) for k, _ in listed_all if k in members}
    assert len(skipped_members) > 10
    assert all(ledger["members"][i] == 0 for i in skipped_members)
    assert all(ledger["members"][i] == EPOCHS for i in set(range(len(members))) - skipped_members)
    assert ledger["external"][keys_of(root, "external").index(next(k for k in bad if k not in members))] == 0


def garbage_copy(train_root: Path, dest: Path, shards: int) -> Path:
    """A root whose first ``shards`` member shards hold no image: most of the data is broken."""
    root = Path(shutil.copytree(train_root, dest))
    for i in range(shards):
        rewrite_tar(root / f"members/shard-{i:06d}.tar",
                    lambda name, data: os.urandom(len(data)) if name.endswith(".png") else data)
    return root


@pytest.fixture(scope="module")
def garbage_root(tmp_path_factory, train_root) -> Path:
    return garbage_copy(train_root, tmp_path_factory.mktemp("garbage") / "root", shards=12)


def test_skip_cap_stops_the_run_with_one_error_line(tmp_path, garbage_root):
    proc = run_train(tmp_path / "run", garbage_root, "data.max_skip_fraction=0.1", check=False)
    errors = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert proc.returncode == 2 and errors == proc.stderr.strip().splitlines()[-1:], proc.stderr[-2000:]
    assert errors[0].startswith("error: data.max_skip_fraction=0.1 exceeded: ")  # not glued to the progress bar


@pytest.mark.slow
def test_skip_cap_stops_every_rank_together_with_one_line(tmp_path, garbage_root):
    root = garbage_root
    run_dir = tmp_path / "run"
    started = time.monotonic()
    proc = run_train(run_dir, root, f"train.epochs={EPOCHS}", "data.max_skip_fraction=0.1", launcher=launcher("ddp"),
                     check=False, timeout=240)
    assert proc.returncode != 0 and time.monotonic() - started < 200  # no hang
    errors = re.findall(r"error: .*", proc.stderr)  # rank 1's line may land after rank 0's open progress bar
    # every rank decides from the same gathered counts; the launcher may end the slower rank before it prints
    assert 1 <= len(errors) <= 2 and len(set(errors)) == 1, proc.stderr[-3000:]
    assert re.match(r"error: data\.max_skip_fraction=0\.1 exceeded: \d+ of \d+ samples read so far", errors[0])
    assert "undecodable image" in errors[0] and not (run_dir / "model.safetensors").exists()
    assert not metrics_exist(run_dir)  # stopped within the first epoch, long before its end


def metrics_exist(run_dir: Path) -> bool:
    return (run_dir / "metrics.jsonl").is_file() and bool((run_dir / "metrics.jsonl").read_text())
