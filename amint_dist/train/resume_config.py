"""What a resume may change: this start's config against the run's ``config.yaml``, key by key.

``config.yaml`` is written once, by the run's first start, and hashed into the audit trail's start entry: it is
the record of what is trained. A resume whose typed config differs from it in any key outside
:data:`MAY_CHANGE` is refused in one line naming every differing key with both values; the keys of
:data:`MAY_CHANGE` that differ are returned, for ``provenance.json`` and the trail's resume entry.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from omegaconf import OmegaConf

from amint_dist.config import ConfigError, leaves
from amint_dist.train.config import JobConfig

# Keys (or whole sections) that change no optimizer step, no sample read and no recorded output: how the same
# steps are run, logged, checkpointed and followed up. Everything else is the recipe (docs/training.md, "What a
# resume may change").
MAY_CHANGE = (
    "resume",
    "run",  # where the run is, and what follows training (audit, validation)
    "data.root",  # the dataset may move: the audit trail refuses another splits.json
    "data.workers",  # another reader layout resumes from the newest epoch-boundary checkpoint (train.elastic)
    "data.prepare_workers", "data.overwrite",  # read by prepare only
    "data.max_skip_fraction",  # a guard: it stops a run, it changes no step
    "train.max_steps",  # where the run stops; the LR schedule follows train.epochs
    "train.compile", "train.grad_checkpointing", "train.channels_last",  # the same step's kernels (rounding only)
    "train.log_every", "train.log_with", "train.dist_timeout_s",
    "train.ckpt_every_steps", "train.ckpt_every_epochs", "train.keep_checkpoints",
    "train.ema.device",  # where the EMA weights live
)


def may_change(key: str) -> bool:
    return any(key == k or key.startswith(f"{k}.") for k in MAY_CHANGE)


def config_changes(saved_path: Path, config: JobConfig) -> dict[str, list]:
    """``{key: [saved, now]}`` of the allowed keys in which ``config`` differs from the run's ``saved_path``
    (``config.yaml``); a difference in any other key is a :class:`ConfigError` naming them all."""
    saved = JobConfig.from_dict(OmegaConf.to_container(OmegaConf.load(saved_path), resolve=True))
    before, now = dict(leaves(dataclasses.asdict(saved))), dict(leaves(dataclasses.asdict(config)))
    differ = {k: [before.get(k), now.get(k)] for k in sorted(before.keys() | now.keys()) if before.get(k) != now.get(k)}
    refused = [f"{k}={old!r} -> {new!r}" for k, (old, new) in differ.items() if not may_change(k)]
    if refused:
        raise ConfigError(f"resume={config.resume}: {', '.join(refused)} differ from {saved_path}, the record of what "
                          "this run trained: resume with its values, or start a new run.dir (docs/training.md, "
                          "'What a resume may change')")
    return {k: change for k, change in differ.items() if k != "resume"}
