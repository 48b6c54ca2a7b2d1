"""audit.suspect=PATH: score a set of images and test whether it was used to train the audited model.

PATH is an image folder (read recursively; a sample's class is its top folder's name), a tar / WebDataset
shard pattern (``.cls`` = class index), or a text file listing image files (one a line). Every image is decoded
and transformed like the audit's evaluation samples and scored by every method; a file that cannot be read or
decoded is a logged skip. The set-level test (``set_test``) compares the suspect scores with known non-members.
"""

from __future__ import annotations

import io
import logging
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import braceexpand
import numpy as np
import torch

from amint_dist.audit.baselines import BASELINES
from amint_dist.audit.protocols import NONMEMBER_SPLIT, key_units
from amint_dist.audit.scoring import Scored
from amint_dist.audit.set_test import set_test, verdict
from amint_dist.data.images import IMAGE_EXTENSIONS, ImageRefused, decode_image, image_files
from amint_dist.data.sources import ext_of, read_member, tar_groups
from amint_dist.io import atomic_write_bytes
from amint_dist.records.ledger import ExposureLedger

log = logging.getLogger(__name__)
MEMBER_SPLIT = "members"  # the fraction estimate's member distribution: the members split's calibration share
REFERENCE_RULE = ("non-member reference: the heldout split's calibration share (by key hash, never consumed by "
                  "training), never a protocol's evaluation sample; member reference: the members split's "
                  "calibration share (consumed by training)")


@dataclass
class SuspectFile:
    """One suspect sample: its name, its image bytes (None: unreadable, with ``problem``) and its class."""

    name: str
    payload: bytes | None
    label: str | None = None
    problem: str | None = None


def _folder(root: Path) -> Iterator[SuspectFile]:
    paths = (found for child in sorted(root.iterdir()) for found in image_files(child, root))
    for path, why in paths:
        rel = Path(path).relative_to(root)
        label = rel.parts[0] if len(rel.parts) > 1 else None
        yield SuspectFile(str(rel), None, label, why) if why else _read(str(rel), Path(path), label)


def _listed(listing: Path) -> Iterator[SuspectFile]:
    for line in listing.read_text().splitlines():
        if line.strip():
            path = Path(line.strip())
            yield _read(line.strip(), path if path.is_absolute() else listing.parent / path, None)


def _read(name: str, path: Path, label: str | None) -> SuspectFile:
    try:
        return SuspectFile(name, path.read_bytes(), label)
    except OSError as e:
        return SuspectFile(name, None, label, f"unreadable file ({type(e).__name__})")


def _shards(pattern: str) -> Iterator[SuspectFile]:
    for url in braceexpand.braceexpand(pattern):
        try:
            groups = list(tar_groups(url))
        except ValueError:
            yield SuspectFile(url, None, None, "corrupt or truncated tar")
            continue
        with open(url, "rb") as f:
            for key, members in groups:
                fields = {ext_of(m.name): m for m in members}
                ext = next((e for e in IMAGE_EXTENSIONS if e in fields), None)
                label = read_member(f, fields["cls"]).decode("utf-8", "replace").strip() if "cls" in fields else None
                yield (SuspectFile(f"{url}:{key}", read_member(f, fields[ext]), label) if ext
                       else SuspectFile(f"{url}:{key}", None, label, "no image"))


def suspect_files(path: str | Path) -> Iterator[SuspectFile]:
    """Every sample of ``path``: an image folder, a text file listing images, or a tar shard pattern."""
    p = Path(path)
    if p.is_dir():
        return _folder(p)
    if p.is_file() and ext_of(p.name) not in ("tar", *IMAGE_EXTENSIONS):
        return _listed(p)
    return _shards(str(path))


def class_index(labels: Sequence[str | None], classes: Sequence[str]) -> np.ndarray | None:
    """Class indices of the labels (a folder name or an index), or None unless every one maps to a class."""
    names = {name: i for i, name in enumerate(classes)}
    out = [names.get(label, int(label) if label and label.isdigit() and int(label) < len(classes) else None)
           for label in labels]
    return None if any(i is None for i in out) else np.array(out, dtype=np.int64)


def _decoded(item: SuspectFile, transform: Callable, max_pixels: int, skipped: Counter) -> torch.Tensor | None:
    """The transformed image, or None with the skip counted and logged (one reason)."""
    try:
        if item.problem:
            raise ImageRefused(item.problem, "")
        return transform(decode_image(item.payload, max_pixels))
    except ImageRefused as e:
        skipped[e.reason] += 1
        log.warning("suspect %s skipped: %s", item.name, e.reason)
        return None


def decoded_batches(files: Iterable[SuspectFile], transform: Callable, max_pixels: int, batch_size: int,
                    skipped: Counter) -> Iterator[tuple[list[SuspectFile], torch.Tensor]]:
    """Batches of (files, stacked transformed images) of the decodable files; skips counted in ``skipped``."""
    kept, images = [], []
    for item in files:
        image = _decoded(item, transform, max_pixels, skipped)
        if image is not None:
            kept.append(item)
            images.append(image)
        if len(images) == batch_size:
            yield kept, torch.stack(images)
            kept, images = [], []
    if images:
        yield kept, torch.stack(images)


def _joined(parts: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Concatenate the batches' columns present in every batch (baselines only where every class was known)."""
    common = set.intersection(*(set(p) for p in parts)) if parts else set()
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0] if k in common} if parts else {}


def reference_scores(scored: dict[str, Scored], ledger: ExposureLedger | None, seed: int, calibration_fraction: float,
                     methods: Sequence[str]) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """(member, non-member) reference scores per method: the calibration shares of members and heldout."""
    def share(split: str, member: bool) -> dict[str, np.ndarray]:
        rows = scored[split]
        mask = key_units(seed, "calibration", rows["key"]) < calibration_fraction
        if ledger is not None:
            mask &= (ledger.counts[split][rows["index"]] > 0) == member
        return {m: rows[m][mask] for m in methods}
    return share(MEMBER_SPLIT, True), share(NONMEMBER_SPLIT, False)


def suspect_section(scores: dict[str, np.ndarray], n: int, skipped: Counter, members: dict, reference: dict,
                    alpha: float, n_boot: int, seed: int, notes: list[str]) -> dict:
    """report.json's ``suspect`` section: counts, per-method tests and the verdict on the aMINT score."""
    methods = [m for m in members if m in scores]
    results = set_test({m: scores[m] for m in methods}, members, reference, n_boot, seed) if n else {}
    lead = "amint" if "amint" in results else next(iter(results), None)
    return {
        "n": n, "skipped": dict(skipped), "alpha": alpha, "reference": REFERENCE_RULE,
        "n_reference_nonmembers": int(next(iter(reference.values())).size) if reference else 0,
        "n_reference_members": int(next(iter(members.values())).size) if members else 0,
        "verdict_method": lead, "verdict": verdict(results[lead]["p_value"], alpha) if lead else "no evidence",
        "methods": results, "notes": notes,
    }


def label_note(head_names: Sequence[str]) -> list[str]:
    """Why the population baselines are missing."""
    return [
        f"suspect classes unknown or not the dataset's: only {', '.join(head_names) or 'no'} label-free "
        f"methods scored (the baselines {', '.join(BASELINES)} need the true class)"]


def audit_suspect(path: str, classes: Sequence[str], transform: Callable, max_pixels: int, score: Callable,
                  head_names: Sequence[str], references: tuple[dict, dict], settings: dict, out_dir: Path) -> dict:
    """Read, score and test the suspect set; write ``out_dir/suspect_scores.npz``; return the report section.

    ``score(images, labels or None)``: per-method scores of one batch (``scoring.score_batch`` bound to the
    model); ``settings``: alpha, n_boot, seed, batch_size.
    """
    members, reference = references
    if not next(iter(reference.values())).size:
        raise ValueError("audit.suspect needs known non-members, but the heldout calibration share is empty")
    settings = dict(settings)
    names, parts, skipped = [], [], Counter()
    for kept, images in decoded_batches(suspect_files(path), transform, max_pixels, settings.pop("batch_size"),
                                        skipped):
        names += [f.name for f in kept]
        parts.append(score(images, class_index([f.label for f in kept], classes)))
    scores = _joined(parts)
    notes = [] if not names or set(BASELINES) <= set(scores) else label_note(head_names)
    section = suspect_section(scores, len(names), skipped, members, reference, notes=notes, **settings)
    buffer = io.BytesIO()
    np.savez_compressed(buffer, name=np.array(names, dtype=str), **{m: scores[m] for m in section["methods"]})
    atomic_write_bytes(out_dir / "suspect_scores.npz", buffer.getvalue())
    return {**section, "path": str(path), "scores_file": "suspect_scores.npz"}


def _fraction(fraction: dict) -> str:
    if fraction["value"] is None:
        return "n/a (members not separable)"
    lo, hi = fraction["ci95"]
    return f"{fraction['value']:.2f} [{lo:.2f}, {hi:.2f}]"


def suspect_verdict(section: dict) -> str:
    """report.md's first line: the suspect set's verdict, the lead method's p-value and used fraction."""
    lead = section["verdict_method"]
    head = (f"Suspect set `{section['path']}` (n={section['n']}, skipped {sum(section['skipped'].values())}): "
            f"**{section['verdict']}**")
    if lead is None:
        return head + " (nothing scored)."
    best = section["methods"][lead]
    return (f"{head} ({lead} one-sided rank test p = {best['p_value']:.2g}, alpha {section['alpha']}; "
            f"estimated used fraction {_fraction(best['fraction'])}).")


def suspect_markdown(section: dict) -> list[str]:
    """report.md's suspect section: the per-method table and the reference it was tested against."""
    if section["verdict_method"] is None:
        return []
    lines = [f"## Suspect set `{section['path']}`", "",
             "| method | p-value (suspect > non-members) | AUC vs non-members | used fraction [95% CI] |",
             "|---|---|---|---|"]
    lines += [f"| {m} | {r['p_value']:.2g} | {r['auc']:.3f} | {_fraction(r['fraction'])} |"
              for m, r in section["methods"].items()]
    return lines + ["", f"Reference: {section['reference']} ({section['n_reference_nonmembers']} non-members, "
                    f"{section['n_reference_members']} members).", ""]
