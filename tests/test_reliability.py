"""Reliability and integrity: SIGKILL at several points of a 2-process run, bad data during training, bad
configuration, the tamper-evident audit trail, safe loading, and a fuzzed reader.

Every claim is read back from the files the runs wrote (docs/reliability.md maps each guarantee to its test).
"""

from __future__ import annotations

import io
import json
import os
import pickle
import re
import shutil
import signal
import tarfile
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import safetensors.torch
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from test_distributed import launcher, start
from train_helpers import REPO, assert_same_ledger, load_npz, run_train, train_command

from amint_dist.audit.run import audit_config, run_audit
from amint_dist.config_checks import ConfigError, check_dataset_fit
from amint_dist.data.pipeline import ShardedSplitStream, SplitShards, make_loader
from amint_dist.data.sources import sanitize_key
from amint_dist.io import sha256_file
from amint_dist.trail import TRAIL_NAME, TrailError, entry_hash, verify_run
from amint_dist.train.checkpoint import latest_checkpoint

EPOCHS = 2
COMMON = (f"train.epochs={EPOCHS}", "optim.warmup_epochs=0.5", "optim.lr=3e-3", "mint.head.dropout=0",
          "train.ckpt_every_steps=4", "train.keep_checkpoints=0")
TIMING = {"data_wait_frac", "samples_per_s"}  # the only metrics a replay may change
KEY = "auditor-secret"


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
def test_killed_run_has_an_intact_audit_trail(crashed, train_root):
    run_dir, _ = crashed
    integrity = verify_run(run_dir, sha256_file(train_root / "splits.json"), None)
    assert integrity["status"] == "verified", integrity["problems"]
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
    ("resume=/nonexistent", "resume='/nonexistent'"),
])
def test_bad_config_is_one_line_naming_the_key_before_any_work(tmp_path, train_root, capsys, override, key):
    from test_train import train_cli_error

    error = train_cli_error(tmp_path, train_root, [override], capsys)
    assert key in error, error
    assert not (tmp_path / "bad").exists()  # nothing written: no run dir


def test_ranks_times_workers_beyond_shards_is_refused(train_root):
    manifest = json.loads((train_root / "splits.json").read_text())
    cfg = {"train": {"batch_size": 8, "grad_accum": 1, "probe_batch_size": "auto"}, "data": {"workers": 2},
           "mint": {"mode": "active", "external_ratio": 1.0}}
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


# ---- 4. tamper evidence: the hash chain, its signatures, and what the audit says ----

@pytest.fixture(scope="module")
def signed_run(tmp_path_factory, train_root) -> Path:
    """One epoch, a checkpoint every 10 steps, the chain signed with AMINT_AUDIT_KEY."""
    run_dir = tmp_path_factory.mktemp("signed") / "run"
    run_train(run_dir, train_root, "train.epochs=1", "train.ckpt_every_steps=10", "train.keep_checkpoints=0",
              env={"AMINT_AUDIT_KEY": KEY})
    return run_dir


@pytest.fixture
def signed_copy(signed_run, tmp_path) -> Path:
    return Path(shutil.copytree(signed_run, tmp_path / "run"))


def splits_digest(train_root: Path) -> str:
    return sha256_file(train_root / "splits.json")


def trail_lines(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / TRAIL_NAME).read_text().splitlines()]


def write_trail(run_dir: Path, entries: list[dict]) -> None:
    (run_dir / TRAIL_NAME).write_text("".join(json.dumps(e, sort_keys=True) + "\n" for e in entries))


def test_intact_signed_trail_verifies(signed_run, train_root):
    entries = trail_lines(signed_run)
    assert [e["kind"] for e in entries] == ["start", "checkpoint", "checkpoint", "checkpoint", "final"]
    assert all("hmac" in e for e in entries) and entries[-1]["checkpoint"] == entries[-2]["checkpoint"]
    result = verify_run(signed_run, splits_digest(train_root), KEY.encode())
    assert (result["status"], result["signature"], result["problems"]) == ("verified", "verified", [])
    unsigned = verify_run(signed_run, splits_digest(train_root), None)
    assert unsigned["signature"].startswith("not checked") and "AMINT_AUDIT_KEY" in unsigned["signature"]
    with pytest.raises(TrailError, match="verifies none of the trail's 5 signatures"):
        verify_run(signed_run, splits_digest(train_root), b"wrong key")


def edit_entry(entries: list[dict], i: int, rehash: bool = False, **fields) -> list[dict]:
    entries[i].update(fields)
    if rehash:  # a forger without the key: recompute the hash and every link after it
        for j in range(i, len(entries)):
            if j > i:
                entries[j]["prev"] = entries[j - 1]["hash"]
            entries[j]["hash"] = entry_hash(entries[j])
    return entries


@pytest.mark.parametrize("tamper, expected", [
    (lambda d: write_trail(d, edit_entry(trail_lines(d), 2, step=999)), "entry 3 (checkpoint step-00000020) was modified"),
    (lambda d: write_trail(d, edit_entry(trail_lines(d), 2, rehash=True, step=999)), "signature does not verify"),
    (lambda d: write_trail(d, trail_lines(d)[:1] + trail_lines(d)[2:]), "expected 1 (entries removed or reordered)"),
    (lambda d: (d / TRAIL_NAME).write_text((d / TRAIL_NAME).read_text()[:-40]), "incomplete (a torn write)"),
    (lambda d: np.savez(d / "ledger.npz", **{**load_npz(d / "ledger.npz"), "heldout": np.ones_like(
        load_npz(d / "ledger.npz")["heldout"])}), "ledger.npz does not match the trail's final entry"),
    (lambda d: np.savez(d / "checkpoints/step-00000010/ledger-rank00000.npz", **{
        k: v * 0 for k, v in load_npz(d / "checkpoints/step-00000010/ledger-rank00000.npz").items()}),
     "checkpoints/step-00000010: ledger digest"),
    (lambda d: (d / "model.safetensors").write_bytes((d / "model.safetensors").read_bytes() + b" "),
     "model.safetensors does not match the weights sha256"),
    (lambda d: (d / "model_config.json").write_text((d / "model_config.json").read_text().replace('"active"', '"passive"')),
     "model_config.json does not match the trail's final entry"),
])
def test_tampering_is_named(signed_copy, train_root, tamper, expected):
    tamper(signed_copy)
    result = verify_run(signed_copy, splits_digest(train_root), KEY.encode())
    assert result["status"] == "broken" and any(expected in p for p in result["problems"]), result["problems"]


def test_another_dataset_breaks_the_chain(signed_run):
    result = verify_run(signed_run, "0" * 64, KEY.encode())
    assert result["status"] == "broken" and "was written for splits.json sha256" in result["problems"][0]


def test_audit_report_states_what_broke_and_refuses_a_wrong_key(signed_copy, monkeypatch):
    ledger = load_npz(signed_copy / "ledger.npz")
    ledger["members"][:5] += 1  # claim more exposure than training recorded
    np.savez(signed_copy / "ledger.npz", **ledger)
    cfg = audit_config(REPO / "configs", signed_copy)
    cfg["audit"].update({"protocols": ["seen"], "workers": 0, "n_boot": 20, "passive": {**cfg["audit"]["passive"],
                                                                                        "enabled": False}})
    monkeypatch.setenv("AMINT_AUDIT_KEY", KEY)
    report_md = run_audit(cfg)
    report = json.loads(report_md.with_name("report.json").read_text())
    assert report["integrity"]["status"] == "broken" and report["integrity"]["signature"] == "verified"
    assert "ledger.npz does not match the trail's final entry" in report["integrity"]["problems"][0]
    assert "Integrity: **BROKEN**" in report_md.read_text() and any("INTEGRITY BROKEN" in n for n in report["notes"])
    monkeypatch.setenv("AMINT_AUDIT_KEY", "not the key")
    with pytest.raises(TrailError, match="wrong key"):
        run_audit(cfg)


def test_kill_after_the_last_checkpoint_rewrites_the_same_final_artifacts(signed_run, train_root, tmp_path):
    """As if killed while writing the final model (after the last checkpoint): the final files and trail entry
    absent, a half-written temp file left; resume=latest writes them again, identical, and saves no checkpoint."""
    run_dir = Path(shutil.copytree(signed_run, tmp_path / "run"))
    for name in ("ledger.npz", "model.safetensors", "model_config.json"):
        (run_dir / name).unlink()
    (run_dir / ".model.safetensors.x1y2.tmp").write_bytes(b"half a model")
    write_trail(run_dir, trail_lines(run_dir)[:-1])
    run_train(run_dir, train_root, "train.epochs=1", "train.ckpt_every_steps=10", "train.keep_checkpoints=0",
              "resume=latest", env={"AMINT_AUDIT_KEY": KEY})
    for name in ("ledger.npz", "model.safetensors"):
        assert (run_dir / name).read_bytes() == (signed_run / name).read_bytes(), name
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == \
        sorted(p.name for p in (signed_run / "checkpoints").iterdir())
    assert not list(run_dir.glob(".*.tmp"))
    assert [e["kind"] for e in trail_lines(run_dir)][-2:] == ["resume", "final"]
    assert verify_run(run_dir, splits_digest(train_root), KEY.encode())["status"] == "verified"


# ---- 5. safe loading ----

class Planted:
    """A pickle that, if ever unpickled, leaves a marker file."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


@pytest.fixture
def resumable(signed_run, tmp_path) -> Path:
    """A copy of the signed run where ``train_cli_error`` trains (``<tmp>/bad``)."""
    return Path(shutil.copytree(signed_run, tmp_path / "bad"))


RESUME = ["train.epochs=2", "train.ckpt_every_steps=10", "train.keep_checkpoints=0", "resume=latest"]


def test_resume_refuses_a_planted_pickle_before_loading_it(resumable, train_root, tmp_path, capsys, monkeypatch):
    from test_train import train_cli_error

    monkeypatch.setenv("AMINT_AUDIT_KEY", KEY)
    marker = tmp_path / "unpickled"
    latest = latest_checkpoint(resumable)
    (latest / "random_states_0.pkl").write_bytes(pickle.dumps(Planted(marker)))
    error = train_cli_error(tmp_path, train_root, RESUME, capsys)
    assert error.startswith(f"error: refusing to resume from {latest.name}: ")
    assert "random_states_0.pkl does not match its sha256 in the audit trail" in error and not marker.exists()


def test_resume_refuses_unrecorded_files_and_a_missing_key(resumable, train_root, tmp_path, capsys, monkeypatch):
    from test_train import train_cli_error

    monkeypatch.delenv("AMINT_AUDIT_KEY", raising=False)
    assert "is signed: set AMINT_AUDIT_KEY" in train_cli_error(tmp_path, train_root, RESUME, capsys)
    monkeypatch.setenv("AMINT_AUDIT_KEY", KEY)
    extra = latest_checkpoint(resumable) / "custom_checkpoint_0.pkl"
    extra.write_bytes(pickle.dumps({"x": 1}))
    assert f"{extra} is not recorded in the audit trail" in train_cli_error(tmp_path, train_root, RESUME, capsys)


def test_no_unsafe_deserialisation_in_our_code():
    """Weights through safetensors; every torch.load with weights_only=True; numpy never unpickles."""
    for path in (REPO / "amint_dist").rglob("*.py"):
        text = path.read_text()
        assert "pickle.load" not in text and "allow_pickle=True" not in text, path
        for call in re.findall(r"torch\.load\([^)]*\)", text):
            assert "weights_only=True" in call, (path, call)


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
