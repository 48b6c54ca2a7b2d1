"""Distributed training on CPU, 2 processes over gloo: DDP, DeepSpeed ZeRO-2 and ZeRO-3, FSDP2, two machines on
localhost.

Nothing is taken from a green exit code: every claim is read back from what the ranks wrote. Each checkpoint
holds ``distributed.json`` (world size, every rank's rank/node/host and a sha256 of the full parameters it
computes with, gathered from the ranks themselves) and one ``ledger-rankNNNNN.npz`` per rank. Each engine's
run is killed (SIGKILL to the launcher and every rank) in its second epoch and resumed; it must then end
with exactly the ledger of an uninterrupted run (two "machines", one process each, a real rendezvous) and
with the same weights up to float rounding: a wrong gradient average, learning rate or resume shows there.
"""

from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import psutil
import pytest
import safetensors.torch
from accelerate.utils import set_seed
from hydra import compose, initialize_config_dir

from amint_dist.cli import to_dict
from amint_dist.dist import check_world
from amint_dist.models import model_from_record
from amint_dist.train.accelerator import deepspeed_config
from amint_dist.train.checkpoint import latest_checkpoint
from amint_dist.train.config import OptimConfig, TrainConfig
from train_helpers import ENV, REPO, assert_same_ledger, free_port, load_npz, run_train, train_command

pytestmark = pytest.mark.slow

ENGINES = {"ddp": "ddp", "zero2": "deepspeed_zero2", "zero3": "deepspeed_zero3", "fsdp2": "fsdp2"}
SHARDED = ("zero3", "fsdp2")  # engines whose ranks hold a part of the parameters
EPOCHS = 2
COMMON = (f"train.epochs={EPOCHS}", "optim.warmup_epochs=0.5", "optim.lr=3e-3", "mint.head.dropout=0",
          "train.ckpt_every_epochs=1", "train.keep_checkpoints=0")
_RUNS: dict[str, Path] = {}  # engine -> killed-and-resumed run dir, shared by the tests of this module


TRAIN = TrainConfig(batch_size=24, grad_accum=3)
OPTIM = OptimConfig(clip_grad=0.5)


@pytest.mark.parametrize("name", sorted(p.name for p in (REPO / "configs" / "deepspeed").glob("*.json")))
def test_deepspeed_configs_get_explicit_numbers_from_the_hydra_config(name):
    cfg = deepspeed_config(TRAIN, OPTIM, "bf16", REPO / "configs" / "deepspeed" / name)
    assert (cfg["train_micro_batch_size_per_gpu"], cfg["gradient_accumulation_steps"], cfg["gradient_clipping"]) == (24, 3, 0.5)
    assert cfg["torch_autocast"] == {"enabled": True, "dtype": "bfloat16"} and not cfg["bf16"]["enabled"]
    assert '"auto"' not in json.dumps(cfg)  # no value is "auto"
    if cfg["zero_optimization"]["stage"] == 3:  # model.safetensors is consolidated from the shards
        assert cfg["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True


@pytest.mark.parametrize("bad, message", [
    ({"zero_optimization": {"stage": 3, "reduce_bucket_size": "auto"}}, "reduce_bucket_size"),
    ({"zero_optimization": {"stage": 2}, "train_micro_batch_size_per_gpu": 8}, "train.batch_size"),
    ({"zero_optimization": {"stage": 3, "stage3_gather_16bit_weights_on_model_save": False}}, "consolidated"),
])
def test_deepspeed_config_refuses_auto_and_numbers_the_hydra_config_owns(tmp_path, bad, message):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(bad))
    with pytest.raises(ValueError, match=message):
        deepspeed_config(TRAIN, OPTIM, "no", path)


@pytest.mark.parametrize("name", ["vit_b16_imagenet", "vit_l16_imagenet"])
def test_imagenet_recipes_compose_to_the_deit_b_recipe(name):
    with initialize_config_dir(str(REPO / "configs"), version_base="1.3"):
        cfg = to_dict(compose("train", overrides=[f"experiment={name}", "data.root=/data/amint/imagenet"]))
    t, o = cfg["train"], cfg["optim"]
    assert (t["epochs"], t["precision"], t["label_smoothing"], t["mixup"], t["cutmix"]) == (300, "bf16", 0.1, 0.0, 0.0)
    assert (o["lr"], o["weight_decay"], o["warmup_epochs"], o["min_lr"]) == (1e-3, 0.05, 5, 1e-5)
    assert cfg["data"]["augment"]["auto_augment"].startswith("rand-m9") and cfg["mint"]["head"]["kind"] == "token"
    assert t["batch_size"] * 8 == 1024 and cfg["model"]["img_size"] == 224 and cfg["model"]["num_classes"] == 1000
    assert cfg["model"]["kwargs"]["drop_path_rate"] == (0.1 if name == "vit_b16_imagenet" else 0.2)


def test_mixup_and_cutmix_are_refused(tmp_path, train_root):
    proc = run_train(tmp_path / "mixup", train_root, "train.mixup=0.8", "train.cutmix=1.0", check=False)
    assert proc.returncode == 2 and proc.stderr.startswith("error: train.mixup=0.8, train.cutmix=1.0")


def test_a_world_smaller_than_launched_is_refused(monkeypatch):
    """Accelerate on CPU without our glue gives every rank a world of 1: each would train alone."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(RuntimeError, match="WORLD_SIZE=2"):
        check_world(SimpleNamespace(num_processes=1, distributed_type="NO"))
    check_world(SimpleNamespace(num_processes=2, distributed_type="MULTI_CPU"))


def launcher(config: str, *extra: str, port: int | None = None) -> list[str]:
    """``accelerate launch --config_file configs/accelerate/CONFIG.yaml`` on a free port."""
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
            str(REPO / "configs" / "accelerate" / f"{config}.yaml"),
            "--main_process_port", str(port or free_port()), *extra]


def start(cmd: list[str], log: Path) -> subprocess.Popen:
    with open(log, "w") as out:
        return subprocess.Popen(cmd, cwd=REPO, env=ENV, stdout=out, stderr=subprocess.STDOUT)


def finish(proc: subprocess.Popen, log: Path, timeout: float = 300) -> None:
    assert proc.wait(timeout=timeout) == 0, f"{proc.args[:6]} failed:\n{log.read_text()[-4000:]}"


def kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL the launcher and every process under it (torchrun starts ranks in sessions of their own)."""
    children = psutil.Process(proc.pid).children(recursive=True)
    proc.kill()
    for child in children:
        child.send_signal(signal.SIGKILL)
    psutil.wait_procs(children, timeout=30)  # the launcher is left to proc.wait(), which reaps it


def checkpoints(run_dir: Path) -> list[Path]:
    return sorted(p for p in (run_dir / "checkpoints").glob("step-*") if (p / "train_state.json").is_file())


def train_state(ckpt: Path) -> dict:
    return json.loads((ckpt / "train_state.json").read_text())


def resumed_run(engine: str, tmp_path_factory, data_root: Path) -> Path:
    """Train under ``engine``, checkpointing every step; kill everything mid second epoch; resume to the end."""
    if engine in _RUNS:
        return _RUNS[engine]
    run_dir = tmp_path_factory.mktemp(engine) / "run"
    log = run_dir.parent / "killed.log"
    proc = start(train_command(run_dir, data_root, *COMMON, "train.ckpt_every_steps=1",
                               launcher=launcher(ENGINES[engine])), log)
    deadline = time.monotonic() + 300
    while proc.poll() is None and time.monotonic() < deadline:
        latest = latest_checkpoint(run_dir) if (run_dir / "checkpoints" / "latest").exists() else None
        if latest is not None and train_state(latest)["epoch"] >= 1 and train_state(latest)["batch_in_epoch"] >= 2:
            break
        time.sleep(0.05)
    assert proc.poll() is None, f"the run ended before it could be killed:\n{log.read_text()[-4000:]}"
    kill_tree(proc)
    assert proc.wait() == -signal.SIGKILL and not (run_dir / "model.safetensors").exists()
    run_train(run_dir, data_root, *COMMON, "resume=latest", launcher=launcher(ENGINES[engine]))
    _RUNS[engine] = run_dir
    return run_dir


@pytest.fixture(scope="module", params=list(ENGINES))
def resumed(request, tmp_path_factory, train_root) -> tuple[str, Path]:
    return request.param, resumed_run(request.param, tmp_path_factory, train_root)


@pytest.fixture(scope="module")
def two_machines(tmp_path_factory, train_root) -> Path:
    """Uninterrupted run on two 'machines' (one process each) meeting at a real rendezvous on localhost."""
    run_dir = tmp_path_factory.mktemp("two_machines") / "run"
    port = free_port()
    procs = [
        (start(train_command(run_dir, train_root, *COMMON, launcher=launcher(
            "multinode_ddp", "--num_machines", "2", "--num_processes", "2", "--machine_rank", str(rank),
            "--main_process_ip", "127.0.0.1", port=port)), log), log)
        for rank in (0, 1)
        for log in [run_dir.parent / f"machine{rank}.log"]
    ]
    for proc, log in procs:
        finish(proc, log)
    return run_dir


def test_world_of_two_ranks_hold_identical_parameters(resumed):
    engine, run_dir = resumed
    assert checkpoints(run_dir)
    for ckpt in checkpoints(run_dir):
        dist = json.loads((ckpt / "distributed.json").read_text())
        ranks = dist["ranks"]
        assert dist["engine"] == engine and dist["world_size"] == 2, ckpt.name
        assert [r["rank"] for r in ranks] == [0, 1] and len({r["pid"] for r in ranks}) == 2
        assert all(r["world_size"] == r["torch_world_size"] == 2 and r["backend"] == "gloo" for r in ranks)
        assert ranks[0]["param_sha256"] == ranks[1]["param_sha256"], ckpt.name
        sharded = [r["local_param_numel"] < 0.6 * r["param_numel"] for r in ranks]
        assert all(sharded) if engine in SHARDED else not any(sharded), ckpt.name  # ZeRO-3, FSDP2: half a model


def test_ranks_consume_disjoint_members_covering_the_epoch(resumed, train_root):
    _, run_dir = resumed
    first_epoch = next(c for c in checkpoints(run_dir) if train_state(c)["epoch"] == 1 and not train_state(c)["batch_in_epoch"])
    per_rank = [load_npz(first_epoch / f"ledger-rank{r:05d}.npz") for r in (0, 1)]
    members = [ledger["members"] for ledger in per_rank]
    n = len((train_root / "members" / "keys.txt").read_text().split())
    assert all(m.shape == (n,) and set(np.unique(m)) <= {0, 1} and m.sum() > n // 4 for m in members)
    assert not (members[0] & members[1]).any(), "a member was consumed by both ranks"
    assert (members[0] + members[1] == 1).all(), "the ranks together must cover every member once per epoch"
    assert all(ledger["heldout"].sum() == 0 for ledger in per_rank)


def test_killed_run_resumes_to_the_uninterrupted_ledger(resumed, two_machines):
    _, run_dir = resumed
    final = assert_same_ledger(run_dir, two_machines)
    assert (final["members"] == EPOCHS).all()
    last = checkpoints(run_dir)[-1]
    summed = sum(load_npz(last / f"ledger-rank{r:05d}.npz")["members"] for r in (0, 1))
    np.testing.assert_array_equal(summed, final["members"])  # ledger.npz is the sum of the ranks' ledgers


def test_loss_falls(resumed, two_machines):
    _, run_dir = resumed
    epochs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [e["epoch"] for e in epochs] == list(range(EPOCHS))
    assert epochs[-1]["task_loss"] < epochs[0]["task_loss"]
    # the epoch killed mid-way reports the whole epoch's means (its running sums are checkpointed), as uninterrupted
    # (the MINT loss of this 2-epoch tiny run does not fall: only a partial epoch-1 mean used to make it look so)
    reference = [json.loads(line) for line in (two_machines / "metrics.jsonl").read_text().splitlines()]
    for got, want in zip(epochs, reference, strict=True):
        for key in ("task_loss", "task_acc", "mint_loss", "mint_acc_members", "mint_acc_external"):
            assert got[key] == pytest.approx(want[key], rel=1e-3, abs=1e-5), (got["epoch"], key)


def model_and_weights(run_dir: Path):
    config = json.loads((run_dir / "model_config.json").read_text())
    set_seed(0)  # train.seed: the initial weights of the run
    return model_from_record(config), safetensors.torch.load_file(run_dir / "model.safetensors")


def test_final_weights_load_exactly_and_match_the_ddp_reference(resumed, two_machines):
    assert_weights_match(resumed[1], two_machines)


def assert_weights_match(run_dir: Path, two_machines: Path) -> None:
    """The run's final weights load strictly and end within 1e-3 of the DDP reference's update."""
    model, weights = model_and_weights(run_dir)
    initial = {k: v.detach().clone() for k, v in model.named_parameters()}
    assert set(weights) == set(model.state_dict()) and not any(k.startswith("module.") for k in weights)
    model.load_state_dict(weights, strict=True)  # what the audit does
    _, reference = model_and_weights(two_machines)
    diff = sum(float((weights[k] - reference[k]).square().sum()) for k in initial) ** 0.5
    update = sum(float((reference[k] - initial[k]).square().sum()) for k in initial) ** 0.5
    assert update > 0.1 and diff < 1e-3 * update, f"|engine - ddp| = {diff:.3g}, |ddp update| = {update:.3g}"


def test_sigusr1_checkpoints_the_step_reached_exits_0_and_resumes_to_the_uninterrupted_run(tmp_path, train_root,
                                                                                            two_machines):
    """A plain SIGUSR1 to both DDP ranks mid second epoch: they agree on a step, checkpoint it and exit 0."""
    run_dir = tmp_path / "run"
    log = tmp_path / "signalled.log"
    proc = start(train_command(run_dir, train_root, *COMMON, launcher=launcher("ddp")), log)
    deadline = time.monotonic() + 300
    while not checkpoints(run_dir):  # the first epoch's checkpoint: the ranks train on, their handlers installed
        assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-4000:]
        time.sleep(0.05)
    first = train_state(checkpoints(run_dir)[0])
    ranks = psutil.Process(proc.pid).children(recursive=True)
    assert len(ranks) == 2
    for rank in ranks:
        rank.send_signal(signal.SIGUSR1)
    finish(proc, log)
    stopped = re.search(r"stopped by SIGUSR1 at step (\d+): checkpoint (step-\d+)", log.read_text())
    assert stopped, log.read_text()[-4000:]
    last = checkpoints(run_dir)[-1]
    assert last.name == stopped[2] and train_state(last)["step"] == int(stopped[1]) > first["step"]
    assert not (run_dir / "model.safetensors").exists()  # stopped, not finished
    run_train(run_dir, train_root, *COMMON, "resume=latest", launcher=launcher("ddp"))
    assert (assert_same_ledger(run_dir, two_machines)["members"] == EPOCHS).all()
    assert_weights_match(run_dir, two_machines)


def test_two_machines_both_train_and_appear_in_the_ledger(two_machines):
    last = checkpoints(two_machines)[-1]
    dist = json.loads((last / "distributed.json").read_text())
    assert dist["world_size"] == 2 and dist["engine"] == "ddp"
    assert [(r["rank"], r["node_rank"], r["local_rank"]) for r in dist["ranks"]] == [(0, 0, 0), (1, 1, 0)]
    assert dist["ranks"][0]["param_sha256"] == dist["ranks"][1]["param_sha256"]
    members = [load_npz(last / f"ledger-rank{r:05d}.npz")["members"] for r in (0, 1)]
    assert all(m.sum() > 0 for m in members) and (members[0] + members[1] == EPOCHS).all()


def test_only_rank_zero_reports_and_writes_provenance(two_machines):
    logs = {rank: (two_machines.parent / f"machine{rank}.log").read_text() for rank in (0, 1)}
    assert logs[0].count("run finished:") == 1 and "run finished" not in logs[1]
    assert "Saving current state" not in logs[0] + logs[1]  # Accelerate's per-checkpoint INFO lines: -v only
    provenance = json.loads((two_machines / "provenance.json").read_text())
    assert provenance["command"]["entry_point"] == "train"
    assert f"run.dir={two_machines}" in provenance["command"]["overrides"]


def test_audit_under_two_processes_reads_the_consolidated_zero3_model(tmp_path_factory, train_root):
    run_dir = resumed_run("zero3", tmp_path_factory, train_root)
    cmd = launcher("deepspeed_zero3") + [str(REPO / "launch" / "audit.py"), f"run.dir={run_dir}", "audit.n_boot=20",
                                         "audit.passive.epochs=1", "audit.workers=0"]
    log = run_dir.parent / "audit.log"
    finish(start(cmd, log), log)
    report = json.loads((run_dir / "audit" / "report.json").read_text())
    assert report["settings"]["world_size"] == 2
    counts = json.loads((train_root / "splits.json").read_text())["counts"]
    assert {s: v["n"] for s, v in report["scored"].items()} == {s: counts[s] for s in report["scored"]}


def test_compile_under_zero3_is_refused_before_any_work(tmp_path, train_root):
    """Dynamo cannot trace ZeRO-3's partitioned parameters (it fails deep in a fake-tensor call): one line first."""
    proc = run_train(tmp_path / "compiled", train_root, "train.compile=true", check=False,
                     launcher=launcher(ENGINES["zero3"]))
    assert proc.returncode != 0
    assert "error: train.compile=true is not supported under DeepSpeed ZeRO-3" in proc.stderr, proc.stderr[-3000:]
    assert not (tmp_path / "compiled").exists()


def test_a_planted_pickle_never_runs_under_any_engine(resumed, train_root, tmp_path):
    """Each engine's own pickled state (Accelerate's optimizer.bin, under DDP and FSDP2; DeepSpeed's model states,
    which DeepSpeed loads with weights_only=False) replaced by a pickle with a side effect, its sha256 written into
    a re-chained unsigned trail: resume refuses the file under the real 2-process engine and the side effect never
    happens."""
    from test_integrity import plant, rehash_file

    engine, source = resumed
    run_dir = Path(shutil.copytree(source, tmp_path / "run"))
    latest = latest_checkpoint(run_dir)
    name = "optimizer.bin" if engine in ("ddp", "fsdp2") else \
        sorted(p.relative_to(latest).as_posix() for p in latest.glob("pytorch_model/*model_states.pt"))[0]
    marker = tmp_path / "unpickled"
    plant(latest, name, marker, as_torch_file=True)
    rehash_file(run_dir, latest, name)
    proc = run_train(run_dir, train_root, *COMMON, "resume=latest", check=False, launcher=launcher(ENGINES[engine]))
    assert proc.returncode != 0 and not marker.exists(), proc.stderr[-3000:]
    assert f"{name} is not a weights-only pickle" in proc.stderr, proc.stderr[-3000:]
