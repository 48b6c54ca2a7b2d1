"""Elastic resume: a checkpoint resumed at another world size (DDP, DeepSpeed ZeRO-2/3), the data position exact.

Rules, stated once:
- A checkpoint resumes at another world size, or another reader layout (readers per rank: ``data.workers``; batch
  sizes), only at an epoch boundary (``batch_in_epoch == 0``): each rank's share of an epoch is a function of the
  world size, and which samples a rank's first batches hold a function of its readers, so a mid-epoch position of
  one layout names no position of another. A newer mid-epoch checkpoint is passed over for the newest
  epoch-boundary checkpoint (its later steps are trained again, and its ledger, which counts them, is discarded
  with its weights): the exposure ledger then counts every member exactly once per epoch trained, as an
  uninterrupted run's does. A checkpoint that records no layout (``TrainState.layout`` None) counts as this one's.
- The LR schedule and the run's end continue as an uninterrupted run at the new world size would
  (``TrainState.schedule_shift``): its steps per epoch differ.
- ``external`` and ``probe`` cycle at their own pace: a cursor inside one of their epochs moves to the start of
  the next (the ledger counts what was consumed, so it stays exact; that epoch of theirs is cut short).
- DeepSpeed refuses ZeRO shards of another data-parallel size: the checkpoint (already verified against the
  audit trail, every pickle opened weights-only) is converted by DeepSpeed's ``ds_to_universal`` into a
  private temporary directory, never into the run dir, and loaded as a universal checkpoint: fp32 weights
  and the Adam moments and step counts are all carried over. The loaded parameters' sha256 must equal the
  one the checkpoint's ranks recorded in ``distributed.json``, else the resume is refused.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

from accelerate import Accelerator
from accelerate.utils import DistributedType, gather_object

from amint_dist.dist import rank_report
from amint_dist.train.state import TrainState

log = logging.getLogger(__name__)
DEEPSPEED_TAG = "pytorch_model"  # the folder Accelerate's save_state gives DeepSpeed's checkpoint


def _train_state(checkpoint: Path) -> dict:
    return json.loads((checkpoint / "train_state.json").read_text())


def is_epoch_boundary(checkpoint: Path) -> bool:
    return _train_state(checkpoint)["batch_in_epoch"] == 0


def layout_change(saved: dict, world: int, layout: dict | None) -> str:
    """What differs between a checkpoint's reader layout (its ``train_state.json``) and ``world`` ranks with
    ``layout`` (``TrainState.layout``), e.g. ``world size 2 -> 1``; "" when nothing does."""
    old = saved.get("layout") or layout or {}
    changes = [f"world size {saved['world_size']} -> {world}"] if saved["world_size"] != world else []
    changes += [layout_text({key: f"{old.get(key)} -> {value}"}) for key, value in (layout or {}).items()
                if old.get(key) != value]
    return ", ".join(changes)


def layout_text(layout: dict) -> str:
    """``readers per rank 2, batch sizes {...}``: a ``TrainState.layout`` in a log line."""
    ordered = sorted(layout.items(), key=lambda kv: kv[0] != "readers")  # as written, or read back key-sorted
    return ", ".join(f"{key.replace('_', ' ')}{' per rank' * (key == 'readers')} "
                     f"{dict(sorted(value.items())) if isinstance(value, dict) else value}" for key, value in ordered)


def resume_point(latest: Path, world: int, layout: dict | None = None) -> Path:
    """``latest``, or when it is mid-epoch at another reader layout (:func:`layout_change`) the newest
    epoch-boundary checkpoint beside it."""
    saved = _train_state(latest)
    change = layout_change(saved, world, layout)
    if not change or saved["batch_in_epoch"] == 0:
        return latest
    older = sorted((p for p in latest.parent.glob("step-*") if (p / "train_state.json").is_file()
                    and is_epoch_boundary(p) and _train_state(p)["step"] < saved["step"]),
                   key=lambda p: _train_state(p)["step"])
    if not older:
        readers = (saved.get("layout") or {}).get("readers")
        raise ValueError(f"resume with {change}: {latest.name} is mid-epoch and no epoch-boundary checkpoint is "
                         f"kept; resume with --num_processes {saved['world_size']}"
                         + (f" and data.workers giving {readers} reader(s) per rank" if readers else ""))
    return older[-1]


def state_at(state: TrainState, world: int, layout: dict | None) -> TrainState:
    """The position of an epoch-boundary ``state`` at ``world`` ranks with reader ``layout``: cycling splits start
    their next epoch; at another world size the trainer sets the schedule shift."""
    if state.batch_in_epoch:
        raise ValueError(f"step {state.step} is mid-epoch: it cannot resume at another world size or reader layout")
    state.cursors = {s: [e + 1, 0] if pos else [e, 0] for s, (e, pos) in state.cursors.items()}
    if state.world_size != world:
        state.world_size, state.schedule_shift = world, None  # the trainer knows this world's steps per epoch
    state.layout = layout
    return state


def load_engine_state(accelerator: Accelerator, checkpoint: Path) -> dict:
    """``accelerator.load_state`` of a checkpoint of another world size (verified already); the resume's
    record for the trail: parameters' sha256 as loaded and what became of the optimizer state."""
    engine = accelerator.deepspeed_engine_wrapped.engine if accelerator.distributed_type == DistributedType.DEEPSPEED \
        else None
    if engine is None:  # DDP / single: Accelerate's optimizer.bin holds the full state on every rank
        accelerator.load_state(str(checkpoint))
        optimizer = "carried over (full state)"
    else:
        with _universal_copy(accelerator, checkpoint) as universal:
            engine._config.load_universal_checkpoint = True  # read by engine.load_checkpoint and nothing else
            try:
                accelerator.load_state(str(universal))
            finally:
                engine._config.load_universal_checkpoint = False
        optimizer = "carried over (DeepSpeed universal checkpoint: fp32 weights, Adam moments, steps)"
    model = accelerator._models[0]
    loaded = rank_report(accelerator, model)["param_sha256"]  # a collective under ZeRO-3
    saved = json.loads((checkpoint / "distributed.json").read_text())["ranks"][0]["param_sha256"]
    if loaded != saved:
        raise RuntimeError(f"resume of {checkpoint.name} at world size {accelerator.num_processes}: the loaded "
                           f"parameters (sha256 {loaded[:12]}) differ from the saved ones ({saved[:12]})")
    return {"params_sha256": loaded, "optimizer_state": optimizer}


@contextlib.contextmanager
def _universal_copy(accelerator: Accelerator, checkpoint: Path) -> Iterator[Path]:
    """A private copy of ``checkpoint`` with its DeepSpeed folder converted to a universal checkpoint, made by
    each machine's first process (a collective), removed after."""
    made = None
    if accelerator.is_local_main_process:
        made = Path(tempfile.mkdtemp(prefix="amint-universal-")) / checkpoint.name
        try:
            shutil.copytree(checkpoint, made, ignore=shutil.ignore_patterns(DEEPSPEED_TAG))
            _ds_to_universal(checkpoint / DEEPSPEED_TAG, made / DEEPSPEED_TAG)
        except Exception:
            shutil.rmtree(made.parent, ignore_errors=True)
            made = None
    host = socket.gethostname()
    mine = [(host, str(made) if made else None)] if accelerator.is_local_main_process else []
    everyone = gather_object(mine) if accelerator.num_processes > 1 else mine
    paths = [p for h, p in everyone if h == host]
    if not paths or None in paths:
        if made:
            shutil.rmtree(made.parent, ignore_errors=True)
        raise RuntimeError(f"converting {checkpoint / DEEPSPEED_TAG} to a universal checkpoint failed (see the "
                           "log of each machine's first process)")
    try:
        yield Path(paths[0])
    finally:
        accelerator.wait_for_everyone()
        if made:
            shutil.rmtree(made.parent, ignore_errors=True)


def _ds_to_universal(source: Path, target: Path) -> None:
    """DeepSpeed's own converter (its command line, the documented interface); its log on failure."""
    workers = str(min(4, os.cpu_count() or 1))
    cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(source),
           "--output_folder", str(target), "--num_extract_workers", workers, "--num_merge_workers", workers,
           "--inject_missing_state"]  # adds the version record our plain (no TP/PP) model needs
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        log.error("ds_to_universal failed:\n%s", (proc.stdout + proc.stderr)[-4000:])
        raise RuntimeError(f"ds_to_universal exited {proc.returncode}")
