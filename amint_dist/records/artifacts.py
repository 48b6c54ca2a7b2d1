"""What a run and its dataset root recorded of themselves, checked before an audit: dataset files against
splits.json, weights against model_config.json, model_config.json against the run's config.yaml.

Every check raises one clear error naming the offending file; nothing is audited otherwise.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from amint_dist.io import sha256_file
from amint_dist.models.config import MODEL_MINT_KEYS

EMA_WEIGHTS = "model_ema.safetensors"  # a run's EMA weights (train.ema), keyed like model.safetensors
RUN_WEIGHTS = {  # audit.weights / export.weights -> (file in the run dir, model_config.json key of its sha256)
    "model": ("model.safetensors", "weights_sha256"),
    "ema": (EMA_WEIGHTS, "ema_weights_sha256"),
}


class TamperedError(ValueError):
    """A file's content does not match the hash or config it was recorded with."""


def dataset_files(root: str | Path, manifest: Mapping[str, Any]) -> list[tuple[Path, str]]:
    """Every (file, expected sha256) that splits.json records: shards, keys.txt and _info.json."""
    root = Path(root)
    files = []
    for split, meta in manifest["splits"].items():
        files.append((root / split / "keys.txt", meta["keys_sha256"]))
        if "info_sha256" in meta:
            files.append((root / split / "_info.json", meta["info_sha256"]))
        files.extend((root / split / shard["name"], shard["sha256"]) for shard in meta["shards"])
    return files


def file_problem(path: Path, expected: str) -> str | None:
    """None when ``path`` exists with sha256 ``expected``, else a one-line description."""
    if not path.is_file():
        return f"dataset file missing: {path} (listed in splits.json)"
    actual = sha256_file(path)
    if actual != expected:
        return (f"dataset file tampered or corrupted: {path} has sha256 {actual[:16]}..., "
                f"splits.json says {expected[:16]}...")
    return None


def dataset_problems(files: Sequence[tuple[Path, str]], threads: int = 8) -> list[str]:
    """Hash ``files`` (hashlib releases the GIL: threads overlap reads) and list every mismatch in order."""
    with ThreadPoolExecutor(max(1, threads)) as pool:
        return [p for p in pool.map(lambda item: file_problem(*item), files) if p]


def raise_first(problems: Sequence[str]) -> None:
    """Refuse with the first problem (and how many more there are)."""
    if problems:
        more = f" (and {len(problems) - 1} more problem(s))" if len(problems) > 1 else ""
        raise TamperedError(problems[0] + more)


def verify_weights(weights: Path, model_config: Mapping[str, Any], actual: str | None = None,
                   record: str = "weights_sha256") -> None:
    """``model.safetensors`` (sha256 ``actual`` when already known) must hash to the ``weights_sha256``
    recorded next to it (``model_ema.safetensors``: ``record="ema_weights_sha256"``)."""
    expected = model_config.get(record)
    if not expected:
        raise ValueError(f"{weights.parent / 'model_config.json'} records no {record} "
                         f"(add the sha256 of {weights.name} to audit a model trained elsewhere)")
    if (actual or sha256_file(weights)) != expected:
        raise TamperedError(f"{weights} does not match model_config.json {record} "
                            "(another run's checkpoint, or modified weights): refusing to audit")


def verify_dataset_identity(root: Path, splits_sha256: str, model_config: Mapping[str, Any]) -> None:
    """The dataset root must be the one the model was trained on (same splits.json)."""
    expected = model_config.get("dataset", {}).get("splits_sha256")
    if expected and splits_sha256 != expected:
        raise TamperedError(f"{root / 'splits.json'} (sha256 {splits_sha256[:16]}...) is not the dataset the model was "
                            f"trained on (model_config.json dataset.splits_sha256 {expected[:16]}...)")


def first_difference(a: Any, b: Any, path: str = "") -> str | None:
    """Dotted path of the first value that differs between two nested configs (None if equal)."""
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        for key in sorted(set(a) | set(b), key=str):
            found = first_difference(a.get(key), b.get(key), f"{path}.{key}" if path else str(key))
            if found:
                return found
        return None
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)) and len(a) == len(b):
        return next((d for i, (x, y) in enumerate(zip(a, b)) if (d := first_difference(x, y, f"{path}[{i}]"))), None)
    return None if a == b else f"{path}: {a!r} != {b!r}"


def verify_model_config(run_config: Mapping[str, Any], model_config: Mapping[str, Any], config_path: Path) -> None:
    """``model_config.json``'s model and mint sections must be those of the run's resolved config."""
    model = dict(run_config["model"])
    model["num_classes"] = model.get("num_classes") or model_config.get("dataset", {}).get("num_classes")
    mint = {k: run_config["mint"][k] for k in MODEL_MINT_KEYS if k in run_config.get("mint", {})}
    diff = first_difference({"model": model, "mint": mint},
                            {"model": model_config.get("model"), "mint": model_config.get("mint")})
    if diff:
        raise TamperedError(f"model_config.json does not match {config_path} ({diff}): refusing to audit")
