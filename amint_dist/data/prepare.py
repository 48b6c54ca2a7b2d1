"""Build a dataset root: split a source by key hash and write each split as WebDataset shards.

Two parallel passes with constant image memory: (1) scan the source (list keys, labels, payload
sizes; check that every image decodes), (2) write planned shards from the recorded locators.
Everything is written into a hidden staging folder next to the root, created by this call
(``.<root>.partial-<random>``), and renamed into place only when complete.
"""

from __future__ import annotations

import itertools
import json
import logging
import multiprocessing as mp
import secrets
import shutil
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any

from amint_dist import __version__
from amint_dist.data.config import DataConfig
from amint_dist.data.shards import plan_shards, write_shard
from amint_dist.data.sources import Record, Skip, make_source
from amint_dist.data.splits import HASH_RULE, SPLITS, hash_unit, split_of
from amint_dist.io import atomic_write_json, atomic_write_text, fsync_dir, sha256_file
from amint_dist.progress import progress

log = logging.getLogger(__name__)
DATASET_FORMAT = "amint-dist-dataset/1"
_worker_source = None


def prepare_dataset(data: Mapping[str, Any] | DataConfig) -> dict:
    """Write the dataset root described by ``data`` (the ``data`` config group); return splits.json."""
    cfg = data if isinstance(data, DataConfig) else DataConfig.from_dict(data)
    root = Path(cfg.root)
    _check_root(root, cfg.overwrite)
    seed, workers = cfg.seed, max(1, cfg.prepare_workers)
    maxcount, maxsize = cfg.shard_maxcount, cfg.shard_maxsize
    source = make_source(cfg)
    started = time.time()

    records, skipped = _scan(source, workers)
    if not records:
        raise ValueError(f"no usable samples in source {source.describe()} ({len(skipped)} skipped)")
    classes, empty_classes = _classes(source, records)
    by_split = _assign(records, seed, cfg.fractions)
    with _staged(root) as staging:
        manifest = {
            "format": DATASET_FORMAT,
            "tool_version": __version__,
            "seed": seed,
            "fractions": cfg.fractions,
            "hash_rule": HASH_RULE,
            "source": source.describe(),
            "classes": classes,
            "num_classes": len(classes),
            "empty_classes": empty_classes,
            "max_pixels": cfg.max_pixels,
            "counts": {s: len(by_split[s]) for s in SPLITS},
            "total": len(records),
            "shard_maxcount": maxcount,
            "shard_maxsize": maxsize,
            "num_skipped": len(skipped),
            "skipped": [asdict(s) for s in skipped],
            "splits": _write_splits(staging, by_split, source, workers, maxcount, maxsize),
        }
        atomic_write_json(staging / "splits.json", manifest)
    log.info("prepared %s: %d samples %s, %d skipped, in %.1fs", root, len(records),
             manifest["counts"], len(skipped), time.time() - started)
    return manifest


def _check_root(root: Path, overwrite: bool) -> None:
    """Refuse an existing root unless ``overwrite``; even then, only ever replace a prepared dataset root."""
    if not root.exists():
        return
    if not root.is_dir():
        raise FileExistsError(f"dataset root exists and is not a directory: {root}")
    prepared = (root / "splits.json").is_file()
    if not prepared and not any(root.iterdir()):
        return  # an empty directory is as good as a missing one
    if not overwrite:
        what = "dataset root already prepared" if prepared else "dataset root exists and is not empty"
        raise FileExistsError(f"{what}: {root} (pass data.overwrite=true to rebuild it)")
    if not prepared:
        raise FileExistsError(f"refusing to overwrite {root}: not empty and not a prepared dataset root (no splits.json)")


def _scan(source, workers: int) -> tuple[list[Record], list[Skip]]:
    records: list[Record] = []
    skipped: list[Skip] = []
    for result in _parallel(_scan_unit, source.units(), source, workers, "prepare: scan", "part"):
        records.extend(result.records)
        skipped.extend(result.skipped)
    skipped.sort(key=lambda s: (s.key, s.file, s.reason))  # splits.json independent of source order
    for skip in skipped:
        log.warning("skipped %s (%s): %s", skip.key, skip.file, skip.reason)
    seen: dict[str, Record] = {}
    for record in records:
        if record.key in seen:
            raise ValueError(f"duplicate key {record.key!r}: {seen[record.key].locator[0]} and {record.locator[0]}")
        seen[record.key] = record
    return records, skipped


def _classes(source, records: list[Record]) -> tuple[list[str], list[str]]:
    """Class names and those without a sample (logged); refuse inferred classes that are mostly empty (the
    count is checked before any list of names is built)."""
    labels = {r.label for r in records}
    top = max(records, key=lambda r: (r.label, r.key))
    names = range(top.label + 1) if source.classes is None else source.classes
    n, missing = len(names), len(names) - len(labels)
    unused = (str(names[c]) for c in range(n) if c not in labels)
    inferred = source.inferred_classes(top)
    if inferred and 2 * missing > n:
        raise ValueError(f"{missing} of {n} classes have no sample ({_listing(unused, missing, 5)}): {inferred}")
    empty = list(unused)
    if empty:
        log.warning("%d of %d classes have no sample: %s", missing, n, _listing(empty, missing, 20))
    return [str(c) for c in names], empty


def _listing(names: Iterable[str], count: int, most: int) -> str:
    """The first ``most`` of ``count`` names, comma-separated ("..." when there are more)."""
    return ", ".join(itertools.islice(names, most)) + (", ..." if count > most else "")


def _assign(records: Iterable[Record], seed: int, fractions: Mapping[str, float]) -> dict[str, list[Record]]:
    """Split by key hash; inside a split order by (hash, key) so shards mix classes."""
    keyed: dict[str, list[tuple[float, str, Record]]] = {s: [] for s in SPLITS}
    for record in records:
        u = hash_unit(seed, record.key)
        keyed[split_of(u, fractions)].append((u, record.key, record))
    return {s: [r for _, _, r in sorted(items, key=lambda t: t[:2])] for s, items in keyed.items()}


def _write_splits(staging: Path, by_split: Mapping[str, list[Record]], source, workers: int, maxcount: int,
                  maxsize: int) -> dict[str, dict]:
    """Write every split's shards (in parallel), keys.txt and _info.json under ``staging``; their manifest parts."""
    jobs = {s: plan_shards(staging / s, s, by_split[s], maxcount, maxsize) for s in SPLITS}
    for s in SPLITS:
        (staging / s).mkdir()
    flat = [job for s in SPLITS for job in jobs[s]]
    written = iter(_parallel(_write_job, flat, source, workers, "prepare: write", "shard"))
    manifest_shards = {s: [next(written) for _ in jobs[s]] for s in SPLITS}
    return {s: _write_split_files(staging / s, s, by_split[s], manifest_shards[s]) for s in SPLITS}


def _write_split_files(split_dir: Path, split: str, records: list[Record], shards: list[dict]) -> dict:
    keys_text = "".join(f"{r.key}\n" for r in records)
    atomic_write_text(split_dir / "keys.txt", keys_text)
    info = {
        "name": split,
        "num_samples": len(records),
        "filenames": [s["name"] for s in shards],
        "shard_lengths": [s["num_samples"] for s in shards],
    }
    atomic_write_json(split_dir / "_info.json", {**info, "splits": {split: info}})  # timm's wds reader format
    return {
        "num_samples": len(records),
        "keys_sha256": sha256_file(split_dir / "keys.txt"),
        "info_sha256": sha256_file(split_dir / "_info.json"),
        "shards": shards,
    }


def _new_dir(parent: Path, prefix: str) -> Path:
    """A new empty folder ``parent/<prefix><random>`` made by this call (mkdir fails rather than reuse one)."""
    path = parent / f"{prefix}{secrets.token_hex(8)}"
    path.mkdir()
    return path


@contextmanager
def _staged(root: Path) -> Iterator[Path]:
    """A new hidden staging folder next to ``root``, put in its place when the block completes, removed if it fails."""
    root.parent.mkdir(parents=True, exist_ok=True)
    staging = _new_dir(root.parent, f".{root.name}.partial-")  # ours alone: concurrent preparers never share one
    try:
        yield staging
        _swap_into_place(staging, root)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _swap_into_place(staging: Path, root: Path) -> None:
    """Replace ``root`` with the complete ``staging`` tree. An existing root is first moved into a folder made
    for it (``.<root>.old-<random>/<root>``), removed only once the new root is in place."""
    if not root.exists():
        staging.rename(root)
        fsync_dir(root.parent)
        return
    aside = _new_dir(root.parent, f".{root.name}.old-")
    root.rename(aside / root.name)
    staging.rename(root)
    fsync_dir(root.parent)
    shutil.rmtree(aside, ignore_errors=True)


def _init_worker(source) -> None:
    global _worker_source
    _worker_source = source


def _scan_unit(unit):
    return _worker_source.scan(unit)


def _write_job(job):
    return write_shard(_worker_source, job)


def _parallel(fn: Callable, items: list, source, workers: int, desc: str, unit: str) -> list:
    """Map ``fn`` over ``items`` in order, in ``workers`` forked processes sharing ``source``; a progress bar."""
    if workers == 1 or len(items) <= 1:
        _init_worker(source)
        with progress(items, desc=desc, unit=unit) as bar:
            return [fn(item) for item in bar]
    with mp.get_context("fork").Pool(min(workers, len(items)), initializer=_init_worker, initargs=(source,)) as pool:
        with progress(pool.imap(fn, items, chunksize=1), desc=desc, total=len(items), unit=unit) as bar:
            return list(bar)


def load_manifest(root: str | Path) -> dict:
    """Read ``<root>/splits.json`` with a clear error when the root is not a prepared dataset."""
    path = Path(root) / "splits.json"
    if not path.is_file():
        raise FileNotFoundError(f"not a prepared dataset root (no splits.json): {root}")
    manifest = json.loads(path.read_text())
    if manifest.get("format") != DATASET_FORMAT:
        raise ValueError(f"{path}: unsupported dataset format {manifest.get('format')!r}, expected {DATASET_FORMAT}")
    return manifest
