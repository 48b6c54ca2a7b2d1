"""Configuration checks run before any work starts: one clear line naming the offending key.

Hydra's struct mode already refuses overrides of unknown keys (``train.epoch=3``); these rules check the
values the composed config holds (types, ranges, choices) and, once the dataset root's manifest is known,
what the config asks of it (batch sizes against split sizes, ranks x workers against shards).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from amint_dist.data.splits import validate_fractions

Check = Callable[[Any], "str | None"]  # None when the value is fine, else what was expected


class ConfigError(ValueError):
    """A config value is of the wrong type, out of range, or impossible for the dataset."""


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _as_number(value: Any) -> float | None:
    """ints, floats and numeric strings (YAML 1.1 reads ``1e-3`` as a string); None for anything else."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    try:
        return float(value) if isinstance(value, str) else None
    except ValueError:
        return None


def _expected(kind: str, lo: float | None, hi: float | None, lo_open: bool = False, hi_open: bool = False) -> str:
    """'expected a positive integer', 'expected a number >= 0 and < 1', ..."""
    if hi is None and lo == 0:
        return f"expected a {'positive' if lo_open else 'non-negative'} {kind}"
    if hi is None and lo == 1 and kind == "integer":
        return "expected a positive integer"
    parts = [f"{'>' if lo_open else '>='} {lo:g}" if lo is not None else "",
             f"{'<' if hi_open else '<='} {hi:g}" if hi is not None else ""]
    return f"expected {'an' if kind == 'integer' else 'a'} {kind} {' and '.join(p for p in parts if p)}".rstrip()


def integer(lo: int | None = None, hi: int | None = None) -> Check:
    def check(value: Any) -> str | None:
        if not _is_int(value) or (lo is not None and value < lo) or (hi is not None and value > hi):
            return _expected("integer", lo, hi)
        return None
    return check


def number(lo: float | None = None, hi: float | None = None, lo_open: bool = False, hi_open: bool = False) -> Check:
    def check(value: Any) -> str | None:
        x = _as_number(value)
        bad = x is None or not math.isfinite(x) or (lo is not None and (x <= lo if lo_open else x < lo)) \
            or (hi is not None and (x >= hi if hi_open else x > hi))
        return _expected("number", lo, hi, lo_open, hi_open) if bad else None
    return check


def boolean(value: Any) -> str | None:
    return None if isinstance(value, bool) else "expected true or false"


def choice(*options: Any) -> Check:
    return lambda value: None if value in options else f"expected one of {list(options)}"


def either(*checks: Check) -> Check:
    def check(value: Any) -> str | None:
        problems = [c(value) for c in checks]
        return None if None in problems else " or ".join(p.removeprefix("expected ") if i else p
                                                          for i, p in enumerate(problems))
    return check


def pair(item: Check) -> Check:
    def check(value: Any) -> str | None:
        if not isinstance(value, (list, tuple)) or len(value) != 2 or any(item(v) for v in value):
            return "expected two values, each " + (item(None) or "valid").removeprefix("expected ")
        return None
    return check


def _resume(value: Any) -> str | None:
    if value is None or value == "latest":
        return None
    if isinstance(value, str) and (Path(value) / "train_state.json").is_file():
        return None
    return "expected latest or a checkpoint directory (holding train_state.json)"


def _fractions(value: Any) -> str | None:
    if not isinstance(value, Mapping):
        return "expected a mapping of split -> fraction"
    bad = next((f"{k}={v!r}" for k, v in value.items() if _as_number(v) is None), None)
    if bad:
        return f"{bad} is not a number"
    try:
        validate_fractions({k: float(v) for k, v in value.items()})
    except ValueError as e:
        return str(e)
    return None


DATA_RULES: dict[str, Check] = {
    "data.seed": integer(0), "data.fractions": _fractions, "data.workers": integer(0),
    "data.shard_maxcount": integer(1), "data.shard_maxsize": integer(1), "data.overwrite": boolean,
    "data.shuffle_buffer": integer(0), "data.max_skip_fraction": number(0, 1),
    "data.num_classes": either(choice(None), integer(1)), "data.max_pixels": integer(1),
}
TRAIN_RULES: dict[str, Check] = {
    **DATA_RULES,
    "train.epochs": integer(1), "train.max_steps": integer(0), "train.batch_size": integer(1),
    "train.probe_batch_size": either(choice("auto"), integer(0)), "train.grad_accum": integer(1),
    "train.precision": choice("auto", "no", "bf16", "fp16"), "train.label_smoothing": number(0, 1, hi_open=True),
    "train.mixup": number(0), "train.cutmix": number(0), "train.seed": integer(0), "train.log_every": integer(1),
    "train.ckpt_every_steps": integer(0), "train.ckpt_every_epochs": integer(0), "train.keep_checkpoints": integer(0),
    "train.exposure_log": boolean, "train.channels_last": either(choice("auto"), boolean),
    "train.compile": boolean,
    "optim.lr": number(0, lo_open=True), "optim.min_lr": number(0), "optim.weight_decay": number(0),
    "optim.warmup_epochs": number(0), "optim.clip_grad": number(0), "optim.betas": pair(number(0, 1, hi_open=True)),
    "mint.mode": choice("active", "passive", "off"), "mint.task_weight": number(0), "mint.weight": number(0),
    "mint.normalize": boolean, "mint.external_ratio": number(0, lo_open=True), "mint.member_shift": integer(0),
    "mint.external_shift": integer(0), "mint.member_weight": number(0, lo_open=True),
    "model.img_size": integer(1), "model.num_classes": either(choice(None), integer(1)),
    "resume": _resume, "audit": boolean,
}
AUDIT_RULES: dict[str, Check] = {
    "audit.batch_size": integer(1), "audit.workers": integer(0), "audit.precision": choice("fp32", "bf16"),
    "audit.seed": integer(0), "audit.n_boot": integer(1), "audit.calibration_fraction": number(0, 1, hi_open=True),
    "audit.passive.enabled": boolean, "audit.passive.epochs": integer(0), "audit.passive.lr": number(0, lo_open=True),
    "audit.passive.batch_size": integer(1),
}
_MISSING = object()


def _lookup(cfg: Mapping[str, Any], dotted: str) -> Any:
    node: Any = cfg
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return _MISSING
        node = node[part]
    return node


def check_values(cfg: Mapping[str, Any], rules: Mapping[str, Check]) -> None:
    """Raise ConfigError for the first key (in ``rules`` order) whose value breaks its rule; absent keys pass."""
    for key, rule in rules.items():
        value = _lookup(cfg, key)
        if value is _MISSING:
            continue
        problem = rule(value)
        if problem:
            raise ConfigError(f"{key}={value!r}: {problem}")


def check_train_config(cfg: Mapping[str, Any]) -> None:
    check_values(cfg, TRAIN_RULES)


def check_data_config(data_cfg: Mapping[str, Any]) -> None:
    """The ``data`` group alone (dataset preparation)."""
    check_values({"data": data_cfg}, DATA_RULES)


def read_batches(cfg: Mapping[str, Any], counts: Mapping[str, int]) -> dict[str, int]:
    """Rows per rank per micro-step of every split training reads (0: not read); as ``_make_streams`` sizes them."""
    batch = int(cfg["train"]["batch_size"])
    probe = cfg["train"].get("probe_batch_size", "auto")
    mint_on = cfg["mint"]["mode"] != "off"  # without MINT no external split is read
    sizes = {"members": batch, "external": max(1, round(batch * float(cfg["mint"]["external_ratio"]))) if mint_on else 0,
             "probe": round(batch * counts["probe"] / max(1, counts["members"])) if probe == "auto" else int(probe)}
    return {split: n if counts.get(split) else 0 for split, n in sizes.items()}


def check_dataset_fit(cfg: Mapping[str, Any], manifest: Mapping[str, Any], world: int) -> None:
    """What the config asks of the dataset root must be possible: shards for every reader, batches no larger
    than their split, at least ``grad_accum`` member batches per rank and epoch."""
    counts, tcfg = manifest["counts"], cfg["train"]
    workers = int(cfg["data"]["workers"])
    readers = world * max(1, workers)
    batches = read_batches(cfg, counts)
    for split, n in batches.items():
        if not n:
            continue
        shards = len(manifest["splits"][split]["shards"])
        if shards < readers:
            raise ConfigError(f"data.workers={workers}: split {split!r} has {shards} shards but {world} rank(s) x "
                              f"{max(1, workers)} reader(s) = {readers} need one each; lower data.workers or "
                              "re-prepare with a smaller data.shard_maxcount")
        key = {"members": "train.batch_size", "probe": "train.probe_batch_size",
               "external": "mint.external_ratio"}[split]
        if n * world > counts[split] and (split != "probe" or tcfg.get("probe_batch_size", "auto") != "auto"):
            raise ConfigError(f"{key}={_lookup(cfg, key)!r}: {n} {split} rows per rank x {world} rank(s) is more than "
                              f"the {split} split holds ({counts[split]} samples)")
    per_rank = math.ceil(counts["members"] / (world * int(tcfg["batch_size"]))) if counts["members"] else 0
    if counts["members"] and int(tcfg["grad_accum"]) > per_rank:
        raise ConfigError(f"train.grad_accum={tcfg['grad_accum']}: an epoch has about {per_rank} member batches per "
                          "rank, fewer than one optimizer step needs")
