"""Checkpoints: Accelerate state on every rank + ledger per rank + rank agreement + train state; ``latest`` last.

A checkpoint is written into a hidden ``.step-N.partial`` directory, every file is fsynced and hashed, and
the directory is renamed into place whole: a ``step-*`` directory is always complete, and a kill during the
write leaves only the hidden partial, which resume ignores (and the next save at that step removes). Its
files' sha256 go to the audit trail before ``latest`` names it; resume checks them before Accelerate or
DeepSpeed unpickles anything (``amint_dist.records``).
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from accelerate import Accelerator
from accelerate.utils import broadcast_object_list, gather_object

from amint_dist.dist import check_ranks_agree
from amint_dist.io import atomic_write_bytes, atomic_write_json, atomic_write_text, fsync_dir, read_json
from amint_dist.records.pickles import unsafe_pickle_problems
from amint_dist.records.trail import AuditTrail, TrailError
from amint_dist.records.verification import (checkpoint_file_problems, checkpoint_ledger_digest, hash_files,
                                             relative_files)
from amint_dist.records.ledger import ExposureLedger
from amint_dist.train.elastic import is_epoch_boundary, load_engine_state, state_at
from amint_dist.train.state import TrainState

log = logging.getLogger(__name__)
LATEST = "latest"
PARTIAL = ".partial"


def checkpoint_root(run_dir: Path) -> Path:
    return run_dir / "checkpoints"


def save_checkpoint(accelerator: Accelerator, run_dir: Path, state: TrainState, ledger: ExposureLedger,
                    keep_last: int, model=None, trail: AuditTrail | None = None,
                    rank_state: dict | None = None, agree: Mapping[str, Any] | None = None,
                    files: Mapping[str, Callable[[], bytes]] | None = None) -> Path:
    """Save on every rank (DeepSpeed needs it); the checkpoint counts only once ``latest`` names it.

    With ``model``, every rank's parameter checksum (and its ``agree`` values) is gathered into
    ``distributed.json`` (world, engine, hosts) and a checkpoint of diverged ranks is refused. ``rank_state``
    (JSON) is saved per rank; ``files`` (name -> its bytes) are written by rank 0; ``trail`` (rank 0) records
    the checkpoint's files and ledger digest.
    """
    root = checkpoint_root(run_dir)
    agreement = check_ranks_agree(accelerator, model, agree) if model is not None else None  # a collective
    name = [_free_name(root, state.step) if accelerator.is_main_process else None]
    if accelerator.num_processes > 1:
        broadcast_object_list(name, from_process=0)
    tmp, final = root / f".{name[0]}{PARTIAL}", root / name[0]
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)  # left by a run killed while writing this step
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    rank = accelerator.process_index
    ledger.save(tmp / f"ledger-rank{rank:05d}.npz")
    if rank_state is not None:
        atomic_write_json(tmp / f"rank-{rank:05d}.json", rank_state)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if agreement is not None:
            atomic_write_json(tmp / "distributed.json", {"step": state.step, **agreement})
        atomic_write_json(tmp / "train_state.json", state.to_dict())
        for name, content in (files or {}).items():
            atomic_write_bytes(tmp / name, content())
    accelerator.wait_for_everyone()
    names = relative_files(tmp)  # every rank fsyncs and hashes its share of the files
    share = hash_files(tmp, names[rank::accelerator.num_processes], fsync=True)
    shares = gather_object([share]) if accelerator.num_processes > 1 else [share]
    if accelerator.is_main_process:
        for d in {tmp, *((tmp / n).parent for n in names)}:
            fsync_dir(d)
        tmp.rename(final)
        fsync_dir(root)
        if trail is not None:
            trail.append("checkpoint", checkpoint=final.name, step=state.step, epoch=state.epoch,
                         batch_in_epoch=state.batch_in_epoch, world_size=accelerator.num_processes,
                         ledger_sha256=checkpoint_ledger_digest(final),
                         files=dict(sorted(kv for s in shares for kv in s.items())))
        atomic_write_text(root / LATEST, final.name + "\n")
        _prune(root, keep_last, keep=final.name)
    accelerator.wait_for_everyone()
    return final


def _free_name(root: Path, step: int) -> str:
    """``step-N``, or ``step-N-K`` when a checkpoint of that step exists (never rewrite one in place)."""
    name = f"step-{step:08d}"
    k = 0
    while (root / (name if k == 0 else f"{name}-{k:03d}")).exists():
        k += 1
    return name if k == 0 else f"{name}-{k:03d}"


def clean_partials(run_dir: Path) -> list[Path]:
    """Remove what a killed run left half written: ``.step-*.partial`` dirs and atomic-write temp files."""
    root = checkpoint_root(run_dir)
    stale = [*root.glob(f".step-*{PARTIAL}"), *root.glob(".*.tmp"), *Path(run_dir).glob(".*.tmp")]
    for path in stale:
        shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
    return stale


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The last complete checkpoint, or None when the run has none."""
    pointer = checkpoint_root(run_dir) / LATEST
    if not pointer.is_file():
        return None
    path = checkpoint_root(run_dir) / pointer.read_text().strip()
    if not (path / "train_state.json").is_file():
        raise FileNotFoundError(f"{pointer} names {path.name}, which is missing or incomplete")
    return path


def verify_checkpoint(accelerator: Accelerator, path: Path, trail: AuditTrail) -> None:
    """Refuse (on every rank together) a checkpoint whose files differ from its run's audit trail entry.

    Accelerate and DeepSpeed unpickle parts of a checkpoint (optimizer and RNG states, DeepSpeed's model
    states): nothing there is loaded unless its sha256 matches the trail, whose every entry must carry a valid
    signature of each key the run signs with (unsigned: the chain alone, a risk the docs state), and every
    pickle in it opens with the weights-only unpickler (``records.pickles``).
    """
    problems: list[str] = []
    if not trail.signer.verifier.holds_key and accelerator.is_main_process:
        log.warning("resuming under an unsigned audit trail: %s is checked against the hash chain only, which "
                    "anyone able to write the run dir could have rewritten (sign runs: docs/reliability.md)", path)
    try:
        chain = AuditTrail(path.parent.parent, trail.splits_sha256, trail.signer).verified()
        entry = chain.last("checkpoint", checkpoint=path.name)
        if entry is None:
            raise TrailError(f"{path} is not recorded in the audit trail: its files cannot be verified")
        recorded, rank, world = entry.get("files") or {}, accelerator.process_index, accelerator.num_processes
        problems = checkpoint_file_problems(path, recorded, rank, world)
        problems = problems or unsafe_pickle_problems(path, sorted(recorded)[rank::world])
    except TrailError as e:
        problems = [str(e)]
    everyone = gather_object(problems) if accelerator.num_processes > 1 else problems
    if everyone:
        more = f" (and {len(everyone) - 1} more)" if len(everyone) > 1 else ""
        raise TrailError(f"refusing to resume from {path.name}: {everyone[0]}{more}")


def load_checkpoint(accelerator: Accelerator, path: Path, ledger_sizes: dict[str, int], layout: dict | None = None,
                    trail: AuditTrail | None = None) -> tuple[TrainState, ExposureLedger, dict]:
    """Restore model/optimizer/RNG state; each rank gets its own ledger back (rank 0 the sum if world changed).

    With ``trail``, the checkpoint is verified against it first (``verify_checkpoint``). Another world size or
    reader ``layout`` resumes only at an epoch boundary (``train.elastic``); the third value is then its record
    for the trail (the world size and layout resumed from; at another world size the loaded parameters' sha256
    and the optimizer state's fate), else {}.
    """
    if trail is not None:
        verify_checkpoint(accelerator, path, trail)
    state = TrainState.from_dict(json.loads((path / "train_state.json").read_text()))
    moved = {"from_layout": state.layout} if state.layout not in (None, layout) else {}
    if state.world_size == accelerator.num_processes:
        accelerator.load_state(str(path))
        ledger = ExposureLedger.load(path / f"ledger-rank{accelerator.process_index:05d}.npz", ledger_sizes)
        return (state_at(state, state.world_size, layout), ledger, moved) if moved else (state, ledger, {})
    elastic = {"from_world_size": state.world_size, **moved, **load_engine_state(accelerator, path)}
    ledger = ExposureLedger(ledger_sizes)
    if accelerator.is_main_process:
        for f in sorted(path.glob("ledger-rank*.npz")):
            ledger += ExposureLedger.load(f, ledger_sizes)
    return state_at(state, accelerator.num_processes, layout), ledger, elastic


def load_rank_state(path: Path, rank: int) -> dict:
    """This rank's ``rank_state`` of a checkpoint ({} when it has none, e.g. another world size)."""
    f = path / f"rank-{rank:05d}.json"
    return read_json(f, what="rank state") if f.is_file() else {}


def _prune(root: Path, keep_last: int, keep: str) -> None:
    """Keep the last ``keep_last`` checkpoints, ``keep`` and the newest epoch-boundary one (where another world
    size can resume)."""
    done = sorted(p for p in root.glob("step-*") if p.is_dir() and (p / "train_state.json").is_file())
    boundaries = [p.name for p in done if is_epoch_boundary(p)]
    for old in done[:-keep_last] if keep_last > 0 else []:
        if old.name not in {keep, *boundaries[-1:]}:
            shutil.rmtree(old, ignore_errors=True)
