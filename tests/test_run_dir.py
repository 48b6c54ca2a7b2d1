"""Run-dir safety: somebody's folder is never written into, and a run dir has one writer at a time.

The lock is tested for real: a training subprocess holds it while a second training (a subprocess), the audit
and a 2-process launch are refused, naming the holder; SIGKILL of the holder frees it.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
from test_distributed import launcher
from test_train import train_cli_error
from train_helpers import ENV, REPO, run_train, train_command

from amint_dist.audit.run import audit_config, run_audit
from amint_dist.run_dir import LOCK_NAME, RunDirError, RunDirLock, check_run_dir, claim_run_dir


def snapshot(folder: Path) -> dict[str, tuple[bytes, int]]:
    """Every file under ``folder``: its bytes and modification time."""
    return {p.relative_to(folder).as_posix(): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def users_folder(tmp_path) -> Path:
    """``<tmp>/bad`` (where ``train_cli_error`` trains): a user's folder holding files named like a run's."""
    folder = tmp_path / "bad"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"the user's own weights")
    (folder / "ledger.npz").write_bytes(b"the user's own ledger")
    (folder / "notes").mkdir()
    (folder / "notes" / "todo.txt").write_text("keep me\n")
    return folder


def test_a_folder_that_is_not_a_run_is_refused_and_left_unchanged(users_folder, tmp_path, train_root, capsys):
    before = snapshot(users_folder)
    error = train_cli_error(tmp_path, train_root, ["train.max_steps=1"], capsys)
    assert error.startswith(f"error: run.dir {users_folder} exists, is not empty and is not a run (no config.yaml): ")
    assert "ledger.npz" in error and "model.safetensors" in error
    assert snapshot(users_folder) == before and sorted(p.name for p in users_folder.iterdir()) == [
        "ledger.npz", "model.safetensors", "notes"]  # no lock file either


@pytest.mark.parametrize("content", [[], [LOCK_NAME]])
def test_an_empty_folder_or_one_holding_only_a_lock_file_is_a_new_run(tmp_path, content):
    folder = tmp_path / "run"
    folder.mkdir()
    for name in content:
        (folder / name).write_text("")
    check_run_dir(folder, None)
    with claim_run_dir(folder, None):
        assert (folder / LOCK_NAME).is_file()


def test_run_dir_rules(tmp_path):
    check_run_dir(tmp_path / "absent", None)  # created by the claim
    (tmp_path / "file").write_text("x")
    with pytest.raises(RunDirError, match="exists and is not a directory"):
        check_run_dir(tmp_path / "file", None)
    with pytest.raises(RunDirError, match="no checkpoint to resume"):
        check_run_dir(tmp_path / "absent", "latest")
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("run: {}\n")
    check_run_dir(run, "latest")
    with pytest.raises(RunDirError, match="already holds a run; pass resume=latest"):
        check_run_dir(run, None)
    with pytest.raises(RunDirError, match="no checkpoint to resume"):
        claim_run_dir(tmp_path / "absent", "latest")
    assert not (tmp_path / "absent").exists()  # a refused claim creates nothing



def test_run_dir_refusals_list_the_content_and_ignore_the_lock_file(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(RunDirError, match=f"resume=latest: no checkpoint to resume: {re.escape(str(empty))} holds no run"):
        check_run_dir(empty, "latest")  # an existing empty folder is not a run either
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / LOCK_NAME).write_text("")
    for name in ["g", "f", "e", "d", "c", "b", "a"]:
        (folder / name).write_text(name)
    with pytest.raises(RunDirError) as info:
        check_run_dir(folder, None)
    assert str(info.value) == (f"run.dir {folder} exists, is not empty and is not a run (no config.yaml): a, b, c, d, e "
                               "and 2 more; choose a new or empty run.dir")


def test_a_refused_claim_of_a_run_releases_its_lock(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("run: {}\n")
    with pytest.raises(RunDirError, match="already holds a run"):
        claim_run_dir(run, None)
    with claim_run_dir(run, "latest"):  # the refused claim let go of the lock
        assert json.loads((run / LOCK_NAME).read_text())["pid"] == os.getpid()
    with RunDirLock(run, "again"):  # and so did this one, on exit
        pass


def test_a_holder_that_has_not_written_the_lock_file_yet_is_named_as_such(tmp_path):
    fd = os.open(tmp_path / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.write(fd, b'{"pid": 12')  # torn: the holder is still writing itself in
        with pytest.raises(RunDirError, match=r"is in use by another process \(not yet recorded in its lock file\)$"):
            RunDirLock(tmp_path, "train").acquire()
    finally:
        os.close(fd)
    with RunDirLock(tmp_path, "train"):  # closed: released
        assert json.loads((tmp_path / LOCK_NAME).read_text())["purpose"] == "train"

def test_the_lock_is_exclusive_names_its_holder_and_is_released(tmp_path):
    with RunDirLock(tmp_path, "test").acquire():
        holder = json.loads((tmp_path / LOCK_NAME).read_text())
        assert holder["pid"] == os.getpid() and holder["purpose"] == "test" and holder["command"]
        with pytest.raises(RunDirError, match=rf"run dir {re.escape(str(tmp_path))} is in use by pid {os.getpid()} "
                                              rf"on host {re.escape(holder['host'])} since .* \(test\)$"):
            RunDirLock(tmp_path, "other").acquire()
    with RunDirLock(tmp_path, "again").acquire():  # released on exit
        pass
    with pytest.raises(FileNotFoundError, match="run dir not found"):
        RunDirLock(tmp_path / "absent", "audit").acquire()


def wait_for(condition, proc: subprocess.Popen, log: Path, timeout: float = 300):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"training ended ({proc.returncode}):\n{log.read_text()[-3000:]}")
        found = condition()
        if found:
            return found
        time.sleep(0.2)
    raise AssertionError(f"timed out:\n{log.read_text()[-3000:]}")


def lock_holder(run_dir: Path) -> dict | None:
    try:
        return json.loads((run_dir / LOCK_NAME).read_text())
    except (OSError, ValueError):
        return None


@pytest.mark.slow
def test_a_second_writer_is_refused_naming_the_holder_and_sigkill_frees_the_lock(tmp_path, train_root, capsys):
    run_dir, log = tmp_path / "bad", tmp_path / "first.log"  # train_cli_error trains in <tmp>/bad
    with open(log, "w") as out:  # long enough to outlive the second writer's start-up; killed below
        first = subprocess.Popen(train_command(run_dir, train_root, "train.ckpt_every_steps=2"), cwd=REPO, env=ENV,
                                 stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: (run_dir / "checkpoints" / "latest").is_file(), first, log)  # a resumable run, in use
        holder = lock_holder(run_dir)
        assert holder and holder["pid"] == first.pid and holder["purpose"] == "train"
        in_use = (rf"error: run dir {re.escape(str(run_dir))} is in use by pid {first.pid} on host \S+ since .+ "
                  r"\(train\)")
        second = run_train(run_dir, train_root, "resume=latest", check=False, timeout=300)
        lines = second.stderr.strip().splitlines()
        assert second.returncode == 2 and re.fullmatch(in_use, lines[-1]), second.stderr[-3000:]
        assert sum("error:" in line for line in lines) == 1
        assert re.fullmatch(in_use, train_cli_error(tmp_path, train_root, [], capsys))  # the same dir, no resume
        with pytest.raises(RunDirError, match=in_use.removeprefix("error: ")):
            run_audit(audit_config(REPO / "configs", run_dir))
        assert first.poll() is None
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=60)
    with RunDirLock(run_dir, "test").acquire():  # the kernel released the dead holder's lock
        assert lock_holder(run_dir)["pid"] == os.getpid()


@pytest.mark.slow
def test_every_rank_of_a_launch_stops_together_when_the_run_dir_is_in_use(tmp_path, train_root):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    started = time.monotonic()
    with RunDirLock(run_dir, "test").acquire():
        proc = run_train(run_dir, train_root, "train.max_steps=1", launcher=launcher("ddp"), check=False, timeout=240)
    assert proc.returncode != 0 and time.monotonic() - started < 200  # no rank left waiting
    errors = re.findall(r"error: .*", proc.stderr)
    assert 1 <= len(errors) <= 2 and len(set(errors)) == 1, proc.stderr[-3000:]
    assert errors[0].startswith(f"error: run dir {run_dir} is in use by pid {os.getpid()} on host ")
    assert sorted(p.name for p in run_dir.iterdir()) == [LOCK_NAME]
