"""Bad configuration: one line naming the key, before any work (no run dir, no dataset written)."""

from __future__ import annotations

import pytest
from train_helpers import REPO


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
    ("train.grad_accum=100", "train.grad_accum=100"),
    ("data.subset.pool=[members,validation]", "data.subset.pool=['members', 'validation']: validation is the tuning"),
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


def test_prepare_names_the_bad_key(tmp_path, capsys):
    from amint_dist.cli import run_cli
    from amint_dist.data.prepare import prepare_dataset

    with pytest.raises(SystemExit) as exit_info:
        run_cli(str(REPO / "configs"), "prepare_data", lambda cfg: prepare_dataset(cfg["data"]),
                argv=[f"data.root={tmp_path / 'root'}", "data.seed=abc"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip().splitlines() == ["error: data.seed='abc': expected a non-negative integer"]
    assert not (tmp_path / "root").exists()
