"""Checkpoints: Accelerate state on every rank + ledger per rank + rank agreement + train state; ``latest`` last."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from accelerate import Accelerator

from amint_dist.dist import check_ranks_agree
from amint_dist.io import atomic_write_json, atomic_write_text
from amint_dist.train.ledger import ExposureLedger
from amint_dist.train.state import TrainState

LATEST = "latest"


def checkpoint_root(run_dir: Path) -> Path:
    return run_dir / "checkpoints"


def save_checkpoint(accelerator: Accelerator, run_dir: Path, state: TrainState, ledger: ExposureLedger,
                    keep_last: int, model=None) -> Path:
    """Save on every rank (DeepSpeed needs it); the checkpoint counts only once ``latest`` names it.

    With ``model``, every rank's parameter checksum is gathered into ``distributed.json`` (world, engine,
    hosts) and a checkpoint of diverged ranks is refused.
    """
    root = checkpoint_root(run_dir)
    path = root / f"step-{state.step:08d}"
    agreement = check_ranks_agree(accelerator, model) if model is not None else None  # a collective
    accelerator.save_state(str(path))
    ledger.save(path / f"ledger-rank{accelerator.process_index:05d}.npz")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if agreement is not None:
            atomic_write_json(path / "distributed.json", {"step": state.step, **agreement})
        atomic_write_json(path / "train_state.json", state.to_dict())
        atomic_write_text(root / LATEST, path.name + "\n")
        _prune(root, keep_last, keep=path.name)
    accelerator.wait_for_everyone()
    return path


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The last complete checkpoint, or None when the run has none."""
    pointer = checkpoint_root(run_dir) / LATEST
    if not pointer.is_file():
        return None
    path = checkpoint_root(run_dir) / pointer.read_text().strip()
    if not (path / "train_state.json").is_file():
        raise FileNotFoundError(f"{pointer} names {path.name}, which is missing or incomplete")
    return path


def load_checkpoint(accelerator: Accelerator, path: Path, ledger_sizes: dict[str, int]) -> tuple[TrainState, ExposureLedger]:
    """Restore model/optimizer/RNG state; each rank gets its own ledger back (rank 0 the sum if world changed)."""
    accelerator.load_state(str(path))
    state = TrainState.from_dict(json.loads((path / "train_state.json").read_text()))
    ledger = ExposureLedger(ledger_sizes)
    rank_files = sorted(path.glob("ledger-rank*.npz"))
    if state.world_size == accelerator.num_processes:
        ledger = ExposureLedger.load(path / f"ledger-rank{accelerator.process_index:05d}.npz", ledger_sizes)
    elif accelerator.is_main_process:
        for f in rank_files:
            ledger += ExposureLedger.load(f, ledger_sizes)
    if state.world_size != accelerator.num_processes:
        state.batch_in_epoch, state.epoch = 0, state.epoch + (1 if state.batch_in_epoch else 0)
        state.world_size = accelerator.num_processes
    return state, ledger


def _prune(root: Path, keep_last: int, keep: str) -> None:
    done = sorted(p for p in root.glob("step-*") if p.is_dir() and (p / "train_state.json").is_file())
    for old in done[:-keep_last] if keep_last > 0 else []:
        if old.name != keep:
            shutil.rmtree(old, ignore_errors=True)
