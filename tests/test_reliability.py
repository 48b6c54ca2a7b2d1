"""Reliability: SIGKILL at several points of a 2-process run, bad data during training, bad configuration,
safe keys and a fuzzed reader (the audit trail against an attacker: tests/test_integrity.py).

Every claim is read back from the files the runs wrote (docs/reliability.md maps each guarantee to its test).
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import signal
import tarfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import psutil
import pytest
import safetensors.torch
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from test_distributed import launcher, start
from test_train import read_trace
from train_helpers import REPO, assert_same_ledger, load_npz, run_train, train_command

from amint_dist.config import ConfigError
from amint_dist.data.pipeline import ShardedSplitStream, SplitShards, make_loader
from amint_dist.data.sources import sanitize_key
from amint_dist.io import sha256_file
from amint_dist.records.signing import Verifier
from amint_dist.records.trail import TRAIL_NAME
from amint_dist.records.verification import verify_run
from amint_dist.train.checkpoint import latest_checkpoint
from amint_dist.train.streams import check_dataset_fit

EPOCHS = 2
COMMON = (f"train.epochs={EPOCHS}", "optim.warmup_epochs=0.5", "optim.lr=3e-3", "mint.head.dropout=0",
          "train.ckpt_every_steps=4", "train.keep_checkpoints=0", "train.exposure_log=true")
TIMING = {"data_wait_frac", "samples_per_s"}  # the only metrics a replay may change


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def scalars(run_dir: Path, tag: str) -> list[tuple[int, float]]:
    events = EventAccumulator(str(run_dir / "tb"), size_guidance={"scalars": 0})
    events.Reload()
    return [(e.step, e.value) for e in events.Scalars(tag)] if tag in events.Tags()["scalars"] else []


def keys_of(root: Path, split: str) -> list[str]:
    return (root / split / "keys.txt").read_text().split()


# ---- 1. crash safety: SIGKILL a 2-process DDP run at several points ----

class Launched:
    """A training launch whose ranks can be frozen (SIGSTOP) to look at the run dir, then killed."""

    def __init__(self, cmd: list[str], log: Path):
        self.proc, self.log = start(cmd, log), log
        deadline = time.monotonic() + 120
        while len(self.ranks()) < 2 and self.proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        self.rank_procs = self.ranks()

    def ranks(self) -> list[psutil.Process]:
        found = []
        for p in psutil.Process(self.proc.pid).children(recursive=True):
            try:
                if "train.py" in " ".join(p.cmdline()):
                    found.append(p)
            except psutil.Error:  # a short-lived child
                continue
        return found

    def alive(self) -> bool:
        return self.proc.poll() is None

    def signal(self, sig: int) -> None:
        for p in self.rank_procs:
            try:
                p.send_signal(sig)
            except psutil.NoSuchProcess:
                continue

    def freeze(self, stop: bool = True) -> None:
        self.signal(signal.SIGSTOP if stop else signal.SIGCONT)

    def kill(self) -> None:
        self.signal(signal.SIGKILL)
        self.proc.kill()
        psutil.wait_procs(self.rank_procs, timeout=30)
        assert self.proc.wait(timeout=30) == -signal.SIGKILL

    def kill_when(self, ready, timeout: float = 240):
        """Freeze the ranks as soon as ``ready()`` returns something, re-check it frozen, then SIGKILL; return it."""
        deadline = time.monotonic() + timeout
        while self.alive() and time.monotonic() < deadline:
            if ready():
                self.freeze()
                found = ready()
                if found:
                    self.kill()
                    return found
                self.freeze(False)
            time.sleep(0.002)
        raise AssertionError(f"no kill point reached (alive={self.alive()}):\n{self.log.read_text()[-3000:]}")


def partial_checkpoint(run_dir: Path, steps: range):
    """A checkpoint being written (hidden partial dir with files in it) at one of ``steps``."""
    try:
        for p in (run_dir / "checkpoints").glob(".step-*.partial"):
            step = int(p.name.split("-")[1].split(".")[0])
            contents = sorted(f.relative_to(p).as_posix() for f in p.rglob("*") if f.is_file())
            if step in steps and contents:
                return p, contents
    except OSError:  # renamed while listed
        return None
    return None


def between_checkpoints(run_dir: Path, after_step: int):
    """Mid-step: ``latest`` is past ``after_step`` in epoch >= 1 and no checkpoint is being written."""
    pointer = run_dir / "checkpoints" / "latest"
    try:
        state = json.loads((run_dir / "checkpoints" / pointer.read_text().strip() / "train_state.json").read_text())
    except (OSError, ValueError):
        return None
    if state["epoch"] >= 1 and state["step"] > after_step and not list((run_dir / "checkpoints").glob(".step-*")):
        return state
    return None


@pytest.fixture(scope="module")
def reference(tmp_path_factory, train_root) -> Path:
    """The uninterrupted 2-process DDP run."""
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    run_train(run_dir, train_root, *COMMON, launcher=launcher("ddp"))
    return run_dir


@pytest.fixture(scope="module")
def crashed(tmp_path_factory, train_root, reference) -> tuple[Path, dict]:
    """The same run killed three times (during a checkpoint write in epoch 0, mid-step in epoch 1, during the
    final checkpoint write), each time resumed with ``resume=latest``; what was seen at each kill."""
    run_dir = tmp_path_factory.mktemp("crashed") / "run"
    total = json.loads((latest_checkpoint(reference) / "train_state.json").read_text())["step"]
    seen: dict = {}
    logs = run_dir.parent

    def launch(name: str, *extra: str) -> Launched:
        return Launched(train_command(run_dir, train_root, *COMMON, *extra, launcher=launcher("ddp")), logs / name)

    first = launch("a.log")
    seen["a"] = first.kill_when(lambda: partial_checkpoint(run_dir, range(8, 13)))
    seen["a_latest"] = latest_checkpoint(run_dir).name
    second = launch("b.log", "resume=latest")
    seen["b"] = second.kill_when(lambda: between_checkpoints(run_dir, after_step=15))
    seen["b_metrics"] = (run_dir / "metrics.jsonl").read_text()
    seen["b_latest"] = latest_checkpoint(run_dir).name
    third = launch("c.log", "resume=latest")
    seen["c"] = third.kill_when(lambda: partial_checkpoint(run_dir, range(total, total + 1)))
    seen["c_latest"] = latest_checkpoint(run_dir).name
    seen["logs"] = {n: (logs / n).read_text() for n in ("b.log", "c.log")}
    run_train(run_dir, train_root, *COMMON, "resume=latest", launcher=launcher("ddp"))
    seen["total"] = total
    return run_dir, seen


@pytest.mark.slow
def test_kills_land_where_intended_and_resume_takes_the_last_complete_checkpoint(crashed):
    run_dir, seen = crashed
    partial, contents = seen["a"]
    assert partial.exists() is False  # removed by the resumed run, never renamed into place
    step_a = int(partial.name.split("-")[1].split(".")[0])
    assert contents and int(seen["a_latest"].split("-")[1]) < step_a  # latest never named the half-written one
    assert f"resuming from {run_dir / 'checkpoints' / seen['a_latest']}" in seen["logs"]["b.log"]
    assert seen["b"]["epoch"] >= 1 and f"resuming from {run_dir / 'checkpoints' / seen['b_latest']}" in seen["logs"]["c.log"]
    final_partial, _ = seen["c"]
    assert final_partial.name == f".step-{seen['total']:08d}.partial" and seen["c_latest"] < f"step-{seen['total']:08d}"
    leftovers = [*(run_dir / "checkpoints").glob(".*"), *run_dir.glob(".*.tmp")]
    assert not leftovers, leftovers


@pytest.mark.slow
def test_killed_run_ends_with_the_uninterrupted_ledger_weights_and_metrics(crashed, reference):
    run_dir, seen = crashed
    assert_same_ledger(run_dir, reference)
    ours, theirs = (safetensors.torch.load_file(d / "model.safetensors") for d in (run_dir, reference))
    for name in theirs:
        np.testing.assert_allclose(ours[name].numpy(), theirs[name].numpy(), rtol=1e-5, atol=1e-6, err_msg=name)
    # metrics.jsonl: one line per epoch, the pre-crash line kept byte for byte, the rest equal to the reference's
    lines = (run_dir / "metrics.jsonl").read_text().splitlines(keepends=True)
    assert [json.loads(x)["epoch"] for x in lines] == list(range(EPOCHS))
    assert seen["b_metrics"] and lines[0] == seen["b_metrics"].splitlines(keepends=True)[0]
    for got, want in zip(metrics(run_dir), metrics(reference)):
        assert set(got) == set(want)
        for k in set(want) - TIMING:
            assert got[k] == pytest.approx(want[k], rel=1e-4, abs=1e-6), k
    # TensorBoard: the killed attempts' post-checkpoint points are purged, every step appears once
    for tag in ("train/task_loss", "train/mint_loss", "train/lr"):
        got, want = scalars(run_dir, tag), scalars(reference, tag)
        assert [s for s, _ in got] == [s for s, _ in want], tag
        np.testing.assert_allclose([v for _, v in got], [v for _, v in want], rtol=1e-4, err_msg=tag)


@pytest.mark.slow
def test_killed_run_exposure_trace_equals_its_ledger_and_the_uninterrupted_trace(crashed, reference):
    """The trace is synced before every checkpoint: no step before the one resumed from is lost in a buffer."""
    run_dir, _ = crashed
    trace = read_trace(run_dir)
    ledger = load_npz(run_dir / "ledger.npz")
    assert Counter((split, index) for _, split, index, _ in trace) == {
        (split, i): int(n) for split, counts in ledger.items() for i, n in enumerate(counts) if n}
    assert trace == read_trace(reference)


@pytest.mark.slow
def test_killed_run_has_an_intact_audit_trail(crashed, train_root):
    run_dir, _ = crashed
    integrity = verify_run(run_dir, sha256_file(train_root / "splits.json"), Verifier())
    assert (integrity["status"], integrity["problems"]) == ("unsigned", [])  # intact, but no key signed it
    kinds = [json.loads(x)["kind"] for x in (run_dir / TRAIL_NAME).read_text().splitlines()]
    assert kinds[0] == "start" and kinds.count("resume") == 3 and kinds[-1] == "final"


# ---- 2. bad data during training ----

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


# ---- 3. bad configuration: one line naming the key, before any work ----

@pytest.mark.parametrize("override, key", [
    ("train.epochs=abc", "train.epochs='abc'"),
    ("data.seed=abc", "data.seed='abc'"),
    ("train.epochs=0", "train.epochs=0"),
    ("train.batch_size=0", "train.batch_size=0"),
    ("optim.lr=-1e-3", "optim.lr=-0.001"),
    ("optim.lr=0", "optim.lr=0"),
    ("train.precision=fp8", "train.precision='fp8'"),
    ("train.channels_last=sometimes", "train.channels_last='sometimes'"),
    ("train.compile=maybe", "train.compile='maybe'"),
    ("data.max_skip_fraction=2", "data.max_skip_fraction=2"),
    ("data.fractions.members=-0.1", "data.fractions"),
    ("data.fractions.members=0.5", "data.fractions"),
    ("train.batch_size=1000", "train.batch_size=1000"),  # larger than the members split (784)
    ("data.workers=7", "data.workers=7"),  # the probe split has 6 shards
    ("train.grad_accum=100", "train.grad_accum=100"),
    ("train.foo=1", "foo"),  # Hydra struct mode: unknown key
    ("+train.foo=1", "+train.foo=1: adds train.foo"),  # adding a key is refused too
    ("++train.foo=1", "++train.foo=1: adds train.foo"),
    ("+experiment=digits_vit", "+experiment=digits_vit: adds experiment"),  # every group is in the defaults list
    ("hydra.run.dir=elsewhere", "hydra.run.dir=elsewhere: "),  # no effect without Hydra's job runner
    ("hydra/job_logging=disabled", "hydra/job_logging=disabled: "),
    ("resume=/nonexistent", "resume='/nonexistent'"),
    ("mint.head.channels=0", "mint.head"),  # builds, fails in a forward: found by the dry forward
    ("model.kwargs.num_heads=5", "model.kwargs"),  # timm asserts embed_dim % num_heads == 0
    ("+model.kwargs.foo=1", "model.kwargs"),  # an added timm argument is checked by building the model
])
def test_bad_config_is_one_line_naming_the_key_before_any_work(tmp_path, train_root, capsys, override, key):
    from test_train import train_cli_error

    error = train_cli_error(tmp_path, train_root, ["train.max_steps=1", override], capsys)  # max_steps: fail fast
    assert key in error, error
    assert not (tmp_path / "bad").exists()  # nothing written: no run dir


@pytest.mark.parametrize("config_name, override, added", [
    ("audit", "+model.kwargs.depth=1", "model.kwargs.depth"),  # timm arguments only where there is a model
    ("audit", "+data=wds", "data"),
    ("audit", "hydra.run.dir=elsewhere", None),
    ("prepare_data", "++data.foo=1", "data.foo"),
    ("prepare_data", "hydra.verbose=true", None),
])
def test_audit_and_prepare_refuse_the_same_overrides(capsys, config_name, override, added):
    from amint_dist.cli import run_cli

    called = []
    with pytest.raises(SystemExit) as exit_info:
        run_cli(str(REPO / "configs"), config_name, called.append, argv=[override])
    assert exit_info.value.code == 2 and not called
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {override}: "), lines
    assert (f"adds {added}," if added else "no effect") in lines[0], lines


def test_overrides_may_force_existing_keys_and_add_timm_arguments():
    from amint_dist.cli import run_cli

    cfg = run_cli(str(REPO / "configs"), "train", lambda cfg: cfg,
                  argv=["++train.epochs=3", "+model.kwargs.drop_path_rate=0.1"])
    assert cfg["train"]["epochs"] == 3 and cfg["model"]["kwargs"]["drop_path_rate"] == 0.1


def test_ranks_times_workers_beyond_shards_is_refused(train_root):
    from amint_dist.cli import run_cli
    from amint_dist.train.config import JobConfig

    manifest = json.loads((train_root / "splits.json").read_text())
    cfg = run_cli(str(REPO / "configs"), "train", JobConfig.from_dict,
                  argv=["train.batch_size=8", "data.workers=2", "mint.external_ratio=1.0"])
    check_dataset_fit(cfg, manifest, world=2)  # 4 readers: every split has >= 6 shards
    with pytest.raises(ConfigError, match=r"data.workers=2: split 'probe' has 6 shards but 4 rank\(s\) x 2"):
        check_dataset_fit(cfg, manifest, world=4)


def test_prepare_names_the_bad_key(tmp_path, capsys):
    from amint_dist.cli import run_cli
    from amint_dist.data.prepare import prepare_dataset

    with pytest.raises(SystemExit) as exit_info:
        run_cli(str(REPO / "configs"), "prepare_data", lambda cfg: prepare_dataset(cfg["data"]),
                argv=[f"data.root={tmp_path / 'root'}", "data.seed=abc"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip().splitlines() == ["error: data.seed='abc': expected a non-negative integer"]
    assert not (tmp_path / "root").exists()


# ---- 5. safe loading (the audit trail and resume against an attacker: tests/test_integrity.py) ----

@pytest.mark.parametrize("raw", ["../../etc/passwd", "/abs/path/x", "a/../../b", "..", "a\\..\\b", "x\nsplit\tkey",
                                 "~/.ssh/id_rsa", "C:\\Windows\\evil"])
def test_sanitized_keys_cannot_name_a_path(raw):
    key = sanitize_key(raw)
    assert re.fullmatch(r"[A-Za-z0-9_-]+", key) and ".." not in key and "/" not in key


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


def to_tensor(img):
    import torch

    return torch.from_numpy(np.asarray(img, dtype=np.float32) / 255).permute(2, 0, 1)


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
