"""Building blocks of the training loop, each against an expectation computed here: losses, schedule, ledger,
cycling batches and their cursor, step inputs, shifted negatives, the skip budget, running statistics, batch
sizing."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from reliability_helpers import png, to_tensor, write_split

from amint_dist.config import ConfigError
from amint_dist.data.pipeline import ShardedSplitStream, SplitShards, make_loader
from amint_dist.records.ledger import ExposureLedger
from amint_dist.train.batches import CyclingBatches, combine, skipped_entries
from amint_dist.train.losses import LossCombiner, LossParts, mint_loss, task_loss
from amint_dist.train.negatives import shifted_batch
from amint_dist.train.schedule import lr_at
from amint_dist.train.skips import SkipBudget, SkipBudgetExceeded
from amint_dist.train.config import JobConfig
from amint_dist.train.stats import DEVICE_FIELDS, FIELDS, StepStats, step_sums
from amint_dist.train.streams import check_dataset_fit, read_batches


def test_task_loss_ignores_masked_rows():
    logits = torch.tensor([[4.0, 0.0], [0.0, 4.0], [9.0, -9.0]])
    labels = torch.tensor([0, 1, -1])
    mask = torch.tensor([True, True, False])
    expected = torch.nn.functional.cross_entropy(logits[:2], labels[:2])
    assert torch.isclose(task_loss(logits, labels, mask), expected)


def test_mint_loss_is_bce_over_masked_rows():
    logit = torch.tensor([2.0, -1.0, 5.0])
    member = torch.tensor([True, False, True])
    mask = torch.tensor([True, True, False])
    expected = torch.nn.functional.binary_cross_entropy_with_logits(logit[:2], member[:2].float())
    assert torch.isclose(mint_loss(logit, member, mask), expected)


def test_combiner_normalises_by_first_step_values():
    combine = LossCombiner(task_weight=1.0, mint_weight=10.0, normalize=True)
    with pytest.raises(RuntimeError):
        combine(LossParts(torch.tensor(1.0), torch.tensor(1.0)))
    combine.set_norms(2.0, 0.5)
    total = combine(LossParts(torch.tensor(2.0), torch.tensor(0.25)))
    assert math.isclose(float(total), 1.0 + 10.0 * 0.5)
    plain = LossCombiner(1.0, 3.0, normalize=False)
    assert math.isclose(float(plain(LossParts(torch.tensor(2.0), None))), 2.0)


def test_lr_warms_up_then_decays_to_min():
    lrs = [lr_at(s, 100, 1e-3, 10, 1e-5) for s in range(101)]
    assert lrs[0] == pytest.approx(1e-4) and lrs[9] == pytest.approx(1e-3)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:]))
    assert lrs[100] == pytest.approx(1e-5)


def test_ledger_counts_valid_rows_and_round_trips(tmp_path):
    ledger = ExposureLedger({"members": 5, "external": 3})
    ledger.record("members", torch.tensor([0, 3, 3, -1]), torch.tensor([True, True, True, False]))
    np.testing.assert_array_equal(ledger.counts["members"], [1, 0, 0, 2, 0])
    ledger.save(tmp_path / "l.npz")
    back = ExposureLedger.load(tmp_path / "l.npz", {"members": 5, "external": 3})
    np.testing.assert_array_equal(back.counts["members"], ledger.counts["members"])
    with pytest.raises(ValueError, match="members"):
        ExposureLedger.load(tmp_path / "l.npz", {"members": 6, "external": 3})


# ---- CyclingBatches: endless batches with a resumable (epoch, position) cursor ----

SHARD_LENGTHS = (5, 3, 4)  # 12 samples; batches of 4


def tiny_split(root: Path) -> SplitShards:
    """A members split of real PNG samples, index i in shard order, label i % 10."""
    shards, keys, i = [], [], 0
    for n in SHARD_LENGTHS:
        members = []
        for _ in range(n):
            keys.append(f"s_{i:03d}")
            members += [(f"{keys[-1]}.png", png(i)), (f"{keys[-1]}.cls", str(i % 10).encode()),
                        (f"{keys[-1]}.json", json.dumps({"index": i}).encode())]
            i += 1
        shards.append(members)
    return write_split(root, "members", shards, keys)


def new_stream(shards: SplitShards, workers: int) -> ShardedSplitStream:
    return ShardedSplitStream(shards, to_tensor, (3, 8, 8), 4, workers=workers, seed=5, num_classes=10)


def one_epoch(shards: SplitShards, workers: int, epoch: int) -> list[list[int]]:
    """The epoch's batches (indices) from a fresh, non-endless loader."""
    stream = new_stream(shards, workers)
    stream.set_epoch(epoch)
    return [b["index"].tolist() for b in make_loader(stream)]


@pytest.mark.parametrize("workers", [0, 2])
def test_cycling_batches_run_across_epoch_ends_and_resume_from_their_cursor(tmp_path, workers):
    shards = tiny_split(tmp_path)
    epochs = [one_epoch(shards, workers, e) for e in range(3)]
    for batches in epochs:  # every sample once per epoch (padding rows are -1)
        assert sorted(i for b in batches for i in b if i >= 0) == list(range(sum(SHARD_LENGTHS)))
    expected = [b for batches in epochs for b in batches]
    cursors = [[e, p] for e, batches in enumerate(epochs) for p in range(len(batches))]  # before each batch

    cycling = CyclingBatches(new_stream(shards, workers))
    got = []
    for cursor in cursors:
        assert cycling.cursor() == cursor
        got.append(cycling.next()["index"].tolist())
    assert got == expected and cycling.cursor() == [3, 0]

    mid = len(epochs[0]) + 1  # epoch 1, position 1: with 2 workers the other worker reads first
    resumed = CyclingBatches(new_stream(shards, workers), *cursors[mid])
    assert [resumed.next()["index"].tolist() for _ in expected[mid:]] == expected[mid:]


def test_a_cursor_at_an_epochs_end_starts_the_next_epoch(tmp_path):
    shards = tiny_split(tmp_path)
    first, second = one_epoch(shards, 0, 0), one_epoch(shards, 0, 1)
    cycling = CyclingBatches(new_stream(shards, 0), epoch=0, position=len(first))
    assert cycling.next()["index"].tolist() == second[0]
    assert cycling.cursor() == [1, 1]


# ---- combine / skipped_entries: one forward's tensors from the step's batches ----

def part(n: int, valid: list[bool], fill: float, label0: int, skipped: list | None = None) -> dict:
    return {"image": torch.full((n, 3, 4, 4), fill), "label": torch.arange(label0, label0 + n),
            "valid": torch.tensor(valid), "skipped": skipped or []}


def test_combine_concatenates_parts_in_order_with_their_loss_masks():
    parts = {"members": part(3, [True, True, False], 1.0, 0), "probe": part(2, [True, False], 2.0, 10),
             "external": part(2, [True, True], 3.0, 20), "members_shifted": part(2, [False, True], 4.0, 30),
             "external_shifted": part(1, [True], 5.0, 40)}
    out = combine(parts, torch.device("cpu"), torch.channels_last)
    T, F = True, False
    #           members   probe  external shifted   ext_shifted
    expected = {"valid": [T, T, F, T, F, T, T, F, T, T],
                "task_mask": [T, T, F, T, F, F, F, F, F, F],
                "mint_mask": [T, T, F, F, F, T, T, F, T, T],
                "is_member": [T, T, T, F, F, F, F, F, F, F],
                "is_external": [F, F, F, F, F, T, T, F, F, F]}
    for key, want in expected.items():
        assert out[key].tolist() == want, key
    assert out["label"].tolist() == [0, 1, 2, 10, 11, 20, 21, 30, 31, 40]
    assert out["image"][:, 0, 0, 0].tolist() == [1, 1, 1, 2, 2, 3, 3, 4, 4, 5]
    assert out["image"].shape == (10, 3, 4, 4) and out["image"].is_contiguous(memory_format=torch.channels_last)


def test_skipped_entries_lists_every_parts_skips_in_order():
    parts = {"members": part(1, [True], 0, 0, [("k1", "undecodable image")]), "probe": part(1, [True], 0, 0),
             "external": part(1, [False], 0, 0, [("k2", "label out of range"), ("shard-3.tar", "truncated")])}
    assert skipped_entries(parts) == [("k1", "undecodable image"), ("k2", "label out of range"),
                                      ("shard-3.tar", "truncated")]
    assert skipped_entries({"members": part(1, [True], 0, 0)}) == []


# ---- shifted negatives ----

def translated(image: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """``image`` moved by (dy, dx) with replicated edges: output[r, c] = image[clamp(r + dy), clamp(c + dx)]."""
    _, h, w = image.shape
    rows = (torch.arange(h) + dy).clamp(0, h - 1)
    cols = (torch.arange(w) + dx).clamp(0, w - 1)
    return image[:, rows][:, :, cols]


def test_shifted_batch_translates_every_image_by_a_nonzero_offset():
    n, s = 64, 1
    images = torch.rand(n, 3, 6, 5, generator=torch.Generator().manual_seed(0))
    valid = torch.tensor([i % 3 != 0 for i in range(n)])
    batch = {"image": images, "label": torch.arange(n), "index": torch.arange(n), "valid": valid,
             "key": [f"k{i}" for i in range(n)], "skipped": [("x", "y")]}
    out = shifted_batch(batch, s, torch.Generator().manual_seed(7))
    assert out["image"].shape == images.shape
    assert out["label"].tolist() == [-1] * n and out["index"].tolist() == [-1] * n
    assert out["key"] == [""] * n and out["skipped"] == []
    assert out["valid"].tolist() == valid.tolist()  # invalid rows stay invalid
    out["valid"][:] = True
    assert batch["valid"].tolist() == valid.tolist()  # a copy: the members batch is untouched
    offsets = [(dy, dx) for dy in range(-s, s + 1) for dx in range(-s, s + 1)]
    seen = set()
    for i in range(n):
        matches = [o for o in offsets if torch.equal(out["image"][i], translated(images[i], *o))]
        assert len(matches) == 1 and matches[0] != (0, 0), (i, matches)
        seen.add(matches[0])
    assert seen == set(offsets) - {(0, 0)}  # every non-zero offset occurs, none is zero


def test_shifted_batch_is_deterministic_for_a_seeded_generator():
    images = torch.rand(8, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    batch = {"image": images, "label": torch.zeros(8, dtype=torch.long), "valid": torch.ones(8, dtype=torch.bool)}
    first, again, other = (shifted_batch(batch, 2, torch.Generator().manual_seed(seed))["image"] for seed in (3, 3, 4))
    assert torch.equal(first, again) and not torch.equal(first, other)


# ---- the skip budget (data.max_skip_fraction) ----

def manifest_with_shards(*sizes: int) -> dict:
    return {"splits": {"members": {"shards": [{"num_samples": n} for n in sizes[:-1]]},
                       "external": {"shards": [{"num_samples": sizes[-1]}]}}}


def test_skip_budget_floor_is_the_largest_shard_over_the_cap():
    assert SkipBudget.for_dataset(0.1, manifest_with_shards(30, 50, 20)) == SkipBudget(0.1, 500)
    assert SkipBudget.for_dataset(0.3, manifest_with_shards(30, 50, 20)) == SkipBudget(0.3, 167)  # ceil(166.7)
    assert SkipBudget.for_dataset(0, manifest_with_shards(30, 50, 20)) == SkipBudget(0.0, 0)


def test_skip_budget_mid_epoch_and_epoch_end_rules():
    budget = SkipBudget(0.1, 500)
    budget.check({"undecodable image": 60}, 400, epoch_end=False)  # 15% but fewer than 500 read: not judged yet
    with pytest.raises(SkipBudgetExceeded):
        budget.check({"undecodable image": 60}, 400, epoch_end=True)  # an epoch's end is always judged
    with pytest.raises(SkipBudgetExceeded):
        budget.check({"undecodable image": 51}, 500, epoch_end=False)  # 10.2% of 500
    budget.check({"undecodable image": 50}, 500, epoch_end=False)  # exactly the cap is allowed
    budget.check({"undecodable image": 50}, 500, epoch_end=True)
    for read in range(50, 3000, 7):  # the whole largest shard (50) lost mid-epoch never stops the run alone
        budget.check({"truncated or unreadable shard": 50}, read, epoch_end=False)


def test_skip_budget_cap_zero_tolerates_no_skip_and_one_any():
    SkipBudget(0.0, 0).check({}, 10, epoch_end=False)
    with pytest.raises(SkipBudgetExceeded):
        SkipBudget(0.0, 0).check({"no image": 1}, 10_000, epoch_end=False)
    SkipBudget(1.0, 1).check({"no image": 10}, 10, epoch_end=True)


def test_skip_budget_error_is_one_line_with_counts_reasons_and_examples():
    with pytest.raises(SkipBudgetExceeded) as info:
        SkipBudget(0.1, 0).check({"label out of range": 20, "undecodable image": 40}, 400, epoch_end=True,
                                 examples=[("k1", "x"), ("k2", "y"), ("k3", "z"), ("k4", "w")])
    assert str(info.value) == (
        "data.max_skip_fraction=0.1 exceeded: 60 of 400 samples read so far (15.0%) were skipped "
        "(undecodable image: 40, label out of range: 20; e.g. k1, k2, k3): repair the dataset root, "
        "or raise data.max_skip_fraction")
    with pytest.raises(SkipBudgetExceeded, match=r"^[^\n]*\(no image: 2\): repair"):
        SkipBudget(0.1, 0).check({"no image": 2}, 3, epoch_end=True)  # no examples: no "e.g."


# ---- StepStats: running sums, reduced across ranks ----

T, F = True, False


def stats_batch() -> dict:
    """Rows 0-2 members (row 2 invalid), 3-4 external, 5 a shifted member (a MINT negative, no task row)."""
    valid = torch.tensor([T, T, F, T, T, T])
    member = torch.tensor([T, T, T, F, F, F])
    external = torch.tensor([F, F, F, T, T, F])
    return {"label": torch.tensor([0, 1, 2, 0, 1, -1]), "valid": valid, "task_mask": valid & member,
            "mint_mask": valid & torch.tensor([T, T, T, T, T, T]), "is_member": member, "is_external": external}


# argmax [0, 0, 2, 1, 1, 0]: of the task rows (0, 1) one is right
LOGITS = torch.tensor([[3.0, 0, 0], [2.0, 1, 0], [0, 0, 1.0], [0, 1.0, 0], [0, 1.0, 0], [1.0, 0, 0]])
MINT_LOGIT = torch.tensor([2.0, -1.0, 5.0, -3.0, 0.5, -2.0])  # > 0: members 0 right, 1 wrong; external 3 right, 4 wrong


def identity(t: torch.Tensor) -> torch.Tensor:
    return t


def test_step_stats_sums_and_ratios():
    stats = StepStats()
    stats.add(stats_batch(), LOGITS, None, LossParts(torch.tensor(0.1), None), data_wait=0.1, step_time=1.0)
    assert "train/mint_loss" not in stats.reduce(identity)  # no MINT rows yet: no MINT ratios
    stats.add(stats_batch(), LOGITS, MINT_LOGIT, LossParts(torch.tensor(0.7), torch.tensor(0.5)), data_wait=0.4,
              step_time=1.0)
    sums = stats.sums_dict()
    assert sums == pytest.approx({
        "task_loss": 0.1 * 2 + 0.7 * 2, "task_correct": 2, "task_rows": 4, "mint_loss": 0.5 * 5,
        "member_correct": 1, "member_rows": 2, "external_correct": 1, "external_rows": 2, "samples": 10,
        "data_wait": 0.5, "step_time": 2.0, "steps": 2, "mint_rows": 5})
    seen = []

    def fake_reduce(t: torch.Tensor) -> torch.Tensor:  # one rank: the sums as they are, modified in place
        seen.append((t.dtype, t.shape))
        return t.mul_(1)

    out = stats.reduce(fake_reduce)
    assert seen == [(torch.float64, (len(FIELDS),))] and stats.sums_dict() == sums
    assert out["train/task_loss"] == pytest.approx(0.4) and out["train/task_acc"] == pytest.approx(0.5)
    assert out["train/samples_per_s"] == pytest.approx(5.0) and out["train/data_wait_frac"] == pytest.approx(0.25)
    assert out["train/mint_acc_members"] == pytest.approx(0.5) and out["train/mint_acc_external"] == pytest.approx(0.5)
    members, external = stats.mint_scores()
    np.testing.assert_allclose(members, torch.sigmoid(torch.tensor([2.0, -1.0])).numpy(), rtol=1e-6)
    np.testing.assert_allclose(external, torch.sigmoid(torch.tensor([-3.0, 0.5])).numpy(), rtol=1e-6)


def test_step_stats_add_reads_nothing_back_to_the_host(monkeypatch):
    """No .item(), int(), float(), bool(), .tolist(), .numpy() or .cpu() on a tensor in add(): on a GPU each
    would be a host sync per micro-step."""
    stats = StepStats()
    for name in ("item", "tolist", "numpy", "cpu", "__int__", "__float__", "__bool__", "__index__"):
        monkeypatch.setattr(torch.Tensor, name, lambda *a, _n=name, **k: pytest.fail(f"Tensor.{_n} in add()"))
    for _ in range(2):
        stats.add(stats_batch(), LOGITS, MINT_LOGIT, LossParts(torch.tensor(0.7), torch.tensor(0.5)), 0.2, 1.0)
    monkeypatch.undo()
    assert stats.sums_dict()["member_rows"] == 4 and stats.sums_dict()["steps"] == 2


def test_step_sums_stay_on_the_device_while_valid_stays_on_the_host():
    """combine() puts the masks on the device and leaves ``valid`` on the host: the sums must not mix them (on
    an H200 they did: 'Expected all tensors to be on the same device'). The meta device stands in for a GPU."""
    device = torch.device("meta")
    batch = {k: v if k == "valid" else v.to(device) for k, v in stats_batch().items()}
    losses = LossParts(torch.tensor(0.7, device=device), torch.tensor(0.5, device=device))
    for mint_logit in (None, MINT_LOGIT.to(device)):
        sums = step_sums(batch, LOGITS.to(device), mint_logit, losses)
        assert sums.device == device and sums.shape == (len(DEVICE_FIELDS),)


def test_step_stats_ratios_over_two_identical_ranks_equal_one_ranks():
    stats = StepStats()
    stats.add(stats_batch(), LOGITS, MINT_LOGIT, LossParts(torch.tensor(0.7), torch.tensor(0.5)), 0.2, 1.0)
    one, two = stats.reduce(identity), stats.reduce(lambda t: t * 2)
    for key in ("train/task_loss", "train/task_acc", "train/mint_acc_members", "train/mint_acc_external",
                "train/data_wait_frac"):
        assert two[key] == pytest.approx(one[key]), key


def test_step_stats_samples_per_s_counts_all_ranks():
    stats = StepStats()
    stats.add(stats_batch(), LOGITS, None, LossParts(torch.tensor(0.7), None), 0.0, 1.0)  # 5 samples in 1 s
    assert stats.reduce(lambda t: t * 2)["train/samples_per_s"] == pytest.approx(10.0)  # two ranks in parallel


def test_step_stats_mint_loss_is_the_mean_over_mint_rows_with_shifted_negatives():
    stats = StepStats()
    stats.add(stats_batch(), LOGITS, MINT_LOGIT, LossParts(torch.tensor(0.7), torch.tensor(0.5)), 0.0, 1.0)
    assert stats.reduce(identity)["train/mint_loss"] == pytest.approx(0.5)


def test_step_stats_sums_round_trip_and_unknown_fields_are_ignored():
    stats = StepStats()
    stats.add(stats_batch(), LOGITS, MINT_LOGIT, LossParts(torch.tensor(0.7), torch.tensor(0.5)), 0.2, 1.5)
    saved = json.loads(json.dumps(stats.sums_dict()))  # as a checkpoint stores it
    back = StepStats()
    back.load_sums({**saved, "a_field_from_a_newer_version": 9.0})
    assert back.sums_dict() == stats.sums_dict() and list(back.sums_dict()) == list(FIELDS)
    assert back.reduce(identity) == pytest.approx(stats.reduce(identity), nan_ok=True)
    assert [len(s) for s in back.mint_scores()] == [0, 0]  # scores are not part of the sums


# ---- batch sizing: read_batches / check_dataset_fit ----

COUNTS = {"members": 400, "probe": 100, "external": 200, "heldout": 200}


def sizing_cfg(batch=8, grad_accum=1, probe="auto", workers=2, mode="active", external_ratio=0.5) -> JobConfig:
    return JobConfig.from_dict({
        "train": {"batch_size": batch, "grad_accum": grad_accum, "probe_batch_size": probe},
        "data": {"workers": workers},
        "mint": {"mode": mode, "external_ratio": external_ratio, "taps": "middle", "head": {"kind": "conv"}},
        "model": {"name": "resnet18", "img_size": 32}, "optim": {}})


def sizing_manifest(shards: int = 8, counts: dict | None = None, **per_split: int) -> dict:
    counts = counts or COUNTS
    return {"counts": counts, "splits": {s: {"shards": [{"num_samples": 1}] * per_split.get(s, shards)}
                                         for s in counts}}


def test_read_batches_sizes_every_split():
    assert read_batches(sizing_cfg(), COUNTS) == {"members": 8, "external": 4, "probe": 2}  # probe 8 x 100 / 400
    assert read_batches(sizing_cfg(mode="passive", external_ratio=0.01), COUNTS)["external"] == 1  # at least one
    assert read_batches(sizing_cfg(mode="off"), COUNTS)["external"] == 0  # no MINT: external never read
    assert read_batches(sizing_cfg(probe=3), COUNTS)["probe"] == 3
    assert read_batches(sizing_cfg(batch=10), {**COUNTS, "probe": 0}) == {"members": 10, "external": 5, "probe": 0}
    # auto never rounds a non-empty probe split down to 0 rows (it would go unread: no task training on it)
    assert read_batches(sizing_cfg(batch=1), COUNTS)["probe"] == 1  # 1 x 100 / 400 = 0.25
    assert read_batches(sizing_cfg(probe=0), COUNTS)["probe"] == 0  # asked for explicitly: unread


def test_dataset_fit_accepts_a_config_that_fits():
    check_dataset_fit(sizing_cfg(), sizing_manifest(), world=4)  # 8 readers, 8 shards each
    check_dataset_fit(sizing_cfg(workers=8), sizing_manifest(shards=1), world=4)  # 32 readers share 1 shard
    check_dataset_fit(sizing_cfg(mode="off"), sizing_manifest(external=1), world=4)  # an unread split needs no shards
    check_dataset_fit(sizing_cfg(grad_accum=25), sizing_manifest(), world=2)  # exactly 400 / (2 x 8) = 25 batches


@pytest.mark.parametrize("cfg, world, manifest, message", [
    (sizing_cfg(batch=201), 2, sizing_manifest(),
     "train.batch_size=201: 201 members rows per rank x 2 rank(s) is more than the members split holds (400 samples)"),
    (sizing_cfg(external_ratio=13), 2, sizing_manifest(),
     "mint.external_ratio=13.0: 104 external rows per rank x 2 rank(s) is more than the external split holds "
     "(200 samples)"),
    (sizing_cfg(probe=51), 2, sizing_manifest(),
     "train.probe_batch_size=51: 51 probe rows per rank x 2 rank(s) is more than the probe split holds (100 samples)"),
    (sizing_cfg(grad_accum=26), 2, sizing_manifest(),
     "train.grad_accum=26: an epoch has about 25 member batches per rank, fewer than one optimizer step needs"),
])
def test_dataset_fit_refusals_name_the_key_and_the_numbers(cfg, world, manifest, message):
    with pytest.raises(ConfigError) as info:
        check_dataset_fit(cfg, manifest, world)
    assert str(info.value).startswith(message) and "\n" not in str(info.value)


def test_an_auto_probe_batch_is_never_refused_for_its_size():
    # batch 3 -> auto probe round(3 x 100 / 400) = 1 row per rank; 133 ranks read 133 > 100 probe rows
    check_dataset_fit(sizing_cfg(batch=3, workers=0, mode="off"), sizing_manifest(shards=133), world=133)
    with pytest.raises(ConfigError, match=r"train.probe_batch_size=1: 1 probe rows per rank x 133 rank\(s\)"):
        check_dataset_fit(sizing_cfg(batch=3, workers=0, mode="off", probe=1), sizing_manifest(shards=133), world=133)


@pytest.fixture
def fresh_accelerate(monkeypatch):
    """No launcher precision unless a test sets one; Accelerate's process-wide state reset around the test."""
    from accelerate.state import AcceleratorState

    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    AcceleratorState._reset_state(True)
    yield monkeypatch
    AcceleratorState._reset_state(True)


@pytest.mark.parametrize("launcher, setting, expected", [
    (None, "auto", "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"),
    ("no", "auto", "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"),
    ("bf16", "auto", "bf16"),  # accelerate launch --mixed_precision bf16 (or the accelerate config file)
    ("fp16", "auto", "fp16"),
    ("bf16", "bf16", "bf16"),  # the same value: no conflict
    (None, "fp16", "fp16"),  # explicit, nothing from Accelerate
    ("no", "bf16", "bf16"),  # 'no' is the launcher's default: no setting of its own
])
def test_precision_auto_takes_accelerates_setting(fresh_accelerate, launcher, setting, expected):
    from amint_dist.train.accelerator import resolve_precision

    if launcher:
        fresh_accelerate.setenv("ACCELERATE_MIXED_PRECISION", launcher)
    assert resolve_precision(setting) == expected


def test_precision_contradicting_accelerate_is_refused_in_one_line(fresh_accelerate):
    from amint_dist.config import ConfigError
    from amint_dist.train.accelerator import resolve_precision

    fresh_accelerate.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    with pytest.raises(ConfigError, match=r"^train.precision='fp16': accelerate launch set mixed_precision bf16") as e:
        resolve_precision("fp16")
    assert "\n" not in str(e.value)


def test_accelerate_launch_bf16_gives_a_bf16_accelerator_and_deepspeed_autocast(fresh_accelerate):
    from amint_dist.train.accelerator import deepspeed_config, make_accelerator, resolve_precision
    from amint_dist.train.config import OptimConfig, TrainConfig

    fresh_accelerate.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    assert make_accelerator(TrainConfig(precision="auto"), OptimConfig()).mixed_precision == "bf16"
    ds = deepspeed_config(TrainConfig(), OptimConfig(), resolve_precision("auto"),
                          Path(__file__).resolve().parents[1] / "configs" / "deepspeed" / "zero2.json")
    assert ds["torch_autocast"] == {"enabled": True, "dtype": "bfloat16"} and not ds["bf16"]["enabled"]


def test_dist_timeout_reaches_the_process_group_kwargs(fresh_accelerate):
    from datetime import timedelta

    from amint_dist.train.accelerator import make_accelerator
    from amint_dist.train.config import OptimConfig, TrainConfig

    accelerator = make_accelerator(TrainConfig(precision="no", dist_timeout_s=77), OptimConfig())
    assert accelerator.init_handler.to_kwargs() == {"timeout": timedelta(seconds=77)}  # what init_process_group gets


def test_typed_config_names_the_dotted_key_in_one_line():
    from amint_dist.config import ConfigError, help_lines
    from amint_dist.train.config import JobConfig

    good = {"model": {"name": "resnet18", "img_size": 32}, "mint": {"mode": "off"}, "data": {}, "optim": {},
            "train": {}}
    config = JobConfig.from_dict(good)
    assert config.train.precision == "auto" and config.optim.betas == (0.9, 0.999) and not config.mint.on
    for bad, message in [
        ({"train": {"epochs": "3"}}, "train.epochs='3': expected a positive integer"),
        ({"optim": {"betas": [0.9]}}, "optim.betas=[0.9]: expected 2 values, each a number >= 0 and < 1"),
        ({"mint": {"mode": "active", "head": {"kind": "conv", "width": 3}, "taps": "middle"}},
         "mint.head: unknown key(s) width; valid keys: channels, dropout, grid, hidden, kind"),
        ({"data": {"fractions": {"members": 2}}}, "data.fractions={'members': 2}: split fraction members=2.0"),
        ({"model": {"name": "resnet18", "img_size": 32, "in_chans": 2}}, "model.in_chans=2: expected one of [1, 3]"),
    ]:
        with pytest.raises(ConfigError) as e:
            JobConfig.from_dict({**good, **bad})
        assert str(e.value).startswith(message) and "\n" not in str(e.value), str(e.value)
    lines = help_lines(JobConfig)
    assert "train.precision: auto: Accelerate's mixed_precision if set, else bf16 on GPUs that have it, else no" in lines
    assert any(line.startswith("mint.head.kind: ") for line in lines) and not any(line.startswith("mint.head: ") for line in lines)
