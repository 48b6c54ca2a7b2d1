"""The entry points' command line: Hydra's flags (--help, --cfg job, --info, -m), one-line errors, provenance."""

from __future__ import annotations

import json
import logging
import subprocess
import sys

import pytest
import yaml
from train_helpers import ENV, REPO, run_train

from amint_dist.provenance import git_state

CONFIGS = str(REPO / "configs")


def launch(script: str, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "launch" / script), *args], cwd=REPO, capture_output=True,
                          text=True, timeout=300, env={**ENV, **(env or {})})


def cli_error(config_name: str, argv: list[str], capsys) -> str:
    """Run an entry point's CLI in-process; it must exit 2 with exactly one ``error:`` line and call nothing."""
    from amint_dist.cli import run_cli

    called = []
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        run_cli(CONFIGS, config_name, called.append, argv=argv, sweep_dir_key="run.dir")
    assert exit_info.value.code == 2 and not called
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), lines
    return lines[0]


def git_head() -> str | None:
    out = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True)
    return out.stdout.strip() if out.returncode == 0 else None


def test_help_lists_every_group_and_option_and_prints_the_commented_config():
    proc = launch("train.py", "--help")
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    for group in ("data", "model", "mint", "optim", "train", "experiment"):
        assert f"\n  {group}:\n" in out, group
    experiments = out.split("\n  experiment:\n")[1].split("\n\n")[0]
    assert "vit_b16_imagenet  ViT-B/16 on ImageNet-1k" in experiments and "*digits_vit" in experiments
    assert "vit_large_patch16" in out and "imagefolder" in out
    assert "# where the run goes" in out  # configs/train.yaml, comments and all
    assert "# ==== configs/experiment/digits_vit.yaml (experiment=digits_vit) ====" in out
    keys = out.split("\nkeys (key: meaning;")[1].split("\n\n")[0]  # every typed field with its one-line doc
    assert "\n  train.precision: auto: Accelerate's mixed_precision if set" in keys and "\n  mint.head.kind: " in keys
    prepare = launch("prepare_data.py", "-h").stdout
    assert "\n  data:\n" in prepare and "\n  model:\n" not in prepare  # only the groups its defaults list has
    assert "\n  data.max_pixels: " in prepare and "\n  train." not in prepare


def test_cfg_job_prints_the_composed_config_with_the_overrides():
    proc = launch("train.py", "--cfg", "job", "experiment=vit_b16_imagenet", "train.epochs=7")
    assert proc.returncode == 0, proc.stderr
    cfg = yaml.safe_load(proc.stdout)
    assert cfg["train"]["epochs"] == 7 and cfg["model"]["name"] == "vit_base_patch16_224"
    assert cfg["data"]["kind"] == "wds" and cfg["mint"]["head"]["kind"] == "token"


def test_info_prints_hydra_search_path_and_defaults_tree():
    proc = launch("train.py", "--info", "model=vit_base_patch16")
    assert proc.returncode == 0, proc.stderr
    assert "Config search path" in proc.stdout and f"file://{CONFIGS}" in proc.stdout
    assert "Defaults Tree" in proc.stdout and "model: vit_base_patch16" in proc.stdout


@pytest.mark.parametrize("config_name", ["train", "prepare_data"])
def test_bad_group_choice_lists_the_available_options(capsys, config_name):
    error = cli_error(config_name, ["data=foo"], capsys)
    assert "Could not find 'data/foo'" in error and "available options in 'data': digits, imagefolder, wds" in error


@pytest.mark.parametrize("argv, culprit", [
    (["--bogus"], "--bogus"),
    (["--cfg", "hydra"], "'hydra'"),
    (["-m", "train.epochs=1,2", "hydra.sweep.dir=x"], "hydra.sweep.dir=x: Hydra's own settings have no effect"),
    (["-m", "train.epochs=1,2", "model=vit_digits,foo"], "Could not find 'model/foo'"),  # all composed first
])
def test_bad_flags_and_sweeps_are_one_line(capsys, argv, culprit):
    assert culprit in cli_error("train", argv, capsys)


def test_multirun_is_refused_under_a_multi_process_launcher(capsys, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    error = cli_error("train", ["-m", "train.epochs=1,2"], capsys)
    assert "WORLD_SIZE=2" in error and "every rank" in error


def test_multirun_runs_each_combination_in_its_own_run_dir_with_provenance(tmp_path, train_root):
    base = tmp_path / "sweep"
    proc = run_train(base, train_root, "-m", "train.epochs=1,2", "train.max_steps=2")
    dirs = {1: base / "train.epochs-1", 2: base / "train.epochs-2"}
    assert sorted(p.name for p in base.iterdir()) == sorted(d.name for d in dirs.values())
    assert proc.stdout.count("run finished:") == 2 and "[multirun] job 2/2:" in proc.stdout
    assert "Saving current state" not in proc.stdout and "Random states saved" not in proc.stdout  # Accelerate's INFO
    head = git_head()
    for epochs, run_dir in dirs.items():
        cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
        assert cfg["train"]["epochs"] == epochs and cfg["run"]["dir"] == str(run_dir)
        prov = json.loads((run_dir / "provenance.json").read_text())
        assert prov["command"]["entry_point"] == "train" and prov["command"]["flags"] == ["-m"]
        assert f"train.epochs={epochs}" in prov["command"]["overrides"]
        assert "train.epochs=1,2" in prov["command"]["sweep"] and "train.max_steps=2" in prov["command"]["overrides"]
        assert prov["git"]["revision"] == head and isinstance(prov["git"]["dirty"], bool) == (head is not None)
        assert prov["versions"]["torch"] and prov["versions"]["hydra-core"] and prov["versions"]["amint-dist"]
        assert prov["host"] and prov["time"]


def test_provenance_of_a_resumed_run_keeps_the_first_start(tmp_path, train_root):
    run_dir = tmp_path / "run"
    run_train(run_dir, train_root, "train.epochs=1", "train.max_steps=2")
    run_train(run_dir, train_root, "train.epochs=1", "train.max_steps=3", "resume=latest")
    prov = json.loads((run_dir / "provenance.json").read_text())
    assert "train.max_steps=2" in prov["command"]["overrides"] and prov["command"]["sweep"] is None
    assert len(prov["resumes"]) == 1 and prov["resumes"][0]["step"] == 2
    assert "resume=latest" in prov["resumes"][0]["command"]["overrides"]


def test_git_state_is_none_outside_a_checkout_of_the_project(tmp_path):
    assert git_state(tmp_path) == {"revision": None, "dirty": None}
    subprocess.run(["git", "init", "-q", str(tmp_path / "other")], check=True)
    assert git_state(tmp_path / "other") == {"revision": None, "dirty": None}  # no commit yet
    assert git_state(REPO)["revision"] == git_head()


def test_accelerate_info_lines_only_with_verbose():
    from amint_dist.cli import run_cli

    def shown(cfg: dict) -> bool:
        return logging.getLogger("accelerate.checkpointing").isEnabledFor(logging.INFO)

    try:
        assert run_cli(CONFIGS, "prepare_data", shown, argv=["data.seed=1"]) is False
        assert run_cli(CONFIGS, "prepare_data", shown, argv=["-v", "data.seed=1"]) is True
    finally:
        logging.getLogger("accelerate").setLevel(logging.NOTSET)


def test_a_real_data_source_needs_its_root_named():
    """The ImageNet experiment (wds source) has no default dataset root: refused in one line before any work."""
    for entry in ("train.py", "prepare_data.py"):
        extra = ("experiment=vit_b16_imagenet",) if entry == "train.py" else ("data=wds", "data.source=x.tar")
        proc = launch(entry, *extra)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and lines[-1] == "error: missing mandatory value data.root: pass data.root=...", \
            (entry, proc.stderr[-1500:])
