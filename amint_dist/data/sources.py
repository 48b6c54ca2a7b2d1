"""Image sources for dataset preparation: the embedded digits, class-per-folder trees, WebDataset shards.

A source lists its samples as `Record`s in parallel-scannable *units*; each record carries a
locator from which the writer re-reads the exact payload bytes later (constant memory).
"""

from __future__ import annotations

import io
import os
import re
import tarfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import braceexpand
import numpy as np
from PIL import Image

from amint_dist.data.config import DataConfig
from amint_dist.data.images import IMAGE_EXTENSIONS, ImageRefused, decode_image, image_files, normalise_ext

MAX_INFERRED_CLASSES = 1_000_000  # without data.num_classes, a larger label is refused
_UNSAFE = re.compile(r"[^A-Za-z0-9_-]+")


@dataclass(frozen=True)
class Record:
    """One sample of a source: its key, label and where its image bytes live."""

    key: str
    label: int
    ext: str
    size: int
    locator: tuple
    source_key: str


@dataclass(frozen=True)
class Skip:
    """A sample left out of the dataset, with the file it came from and why."""

    key: str
    file: str
    reason: str


@dataclass
class ScanResult:
    records: list[Record] = field(default_factory=list)
    skipped: list[Skip] = field(default_factory=list)


def sanitize_key(raw: str) -> str:
    """Make a WebDataset-safe key: no dots, no path traversal; path components joined by '__'."""
    parts = [_UNSAFE.sub("_", p) for p in raw.replace(os.sep, "/").split("/") if p not in ("", ".")]
    key = "__".join(p.strip("_") or "_" for p in parts)
    if not key:
        raise ValueError(f"empty key after sanitising {raw!r}")
    return key


def image_skip(key: str, file: str, payload: bytes, max_pixels: int) -> Skip | None:
    """A Skip when ``payload`` is too large or does not decode (as the reader would decode it), else None."""
    try:
        decode_image(payload, max_pixels)
    except ImageRefused as e:
        return Skip(key, file, str(e))
    return None


class DigitsSource:
    """scikit-learn's bundled 1,797 real 8x8 handwritten digits, stored as 8-bit grayscale PNG."""

    kind = "digits"
    chunk = 256

    def __init__(self, cfg: DataConfig):
        self.classes = [str(c) for c in range(10)]

    def describe(self) -> dict:
        return {"kind": self.kind, "origin": "sklearn.datasets.load_digits"}

    def inferred_classes(self, top: Record) -> str | None:
        """The ten digits are declared, never inferred (see WdsSource.inferred_classes)."""
        return None

    def units(self) -> list[range]:
        n = len(_digits()[1])
        return [range(i, min(i + self.chunk, n)) for i in range(0, n, self.chunk)]

    def scan(self, unit: range) -> ScanResult:
        out = ScanResult()
        for i in unit:
            payload = self.read((i,))
            key = f"digit_{i:04d}"
            out.records.append(Record(key, int(_digits()[1][i]), "png", len(payload), (i,), key))
        return out

    def read(self, locator: tuple) -> bytes:
        images, _ = _digits()
        pixels = np.round(images[locator[0]] * (255.0 / 16.0)).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(pixels, mode="L").save(buf, format="PNG", optimize=False)
        return buf.getvalue()


@lru_cache(maxsize=1)
def _digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    return bunch.images, bunch.target


class ImageFolderSource:
    """Class-per-folder images (ImageNet ``train/`` layout); class index = rank of the sorted folder name.

    Symlinks are followed while they stay inside data.source; one leading out of it, or a folder link to
    an enclosing folder (a loop), is a Skip.
    """

    kind = "imagefolder"
    chunk = 512

    def __init__(self, cfg: DataConfig):
        self.root = _existing_dir(cfg.source, "imagefolder source")
        self.max_pixels = cfg.max_pixels
        folders = sorted(p.name for p in self.root.iterdir() if p.is_dir())
        self.declared = bool(cfg.classes)
        self.classes = list(cfg.classes or folders)
        unknown = sorted(set(folders) - set(self.classes))
        if unknown:
            raise ValueError(f"unknown label: folder {self.root / unknown[0]} is not in data.classes")
        if not folders:
            raise ValueError(f"imagefolder source has no class folders: {self.root}")
        stray = [p for p in self.root.iterdir() if p.is_file() and normalise_ext(p.suffix) in IMAGE_EXTENSIONS]
        if stray:
            raise ValueError(f"unknown label: image {stray[0]} is not inside a class folder")
        index = {c: i for i, c in enumerate(self.classes)}
        self.files = [(path, index[folder], refusal) for folder in folders
                      for path, refusal in image_files(self.root / folder, self.root)]

    def describe(self) -> dict:
        return {"kind": self.kind, "source": str(self.root), "num_files": len(self.files)}

    def inferred_classes(self, top: Record) -> str | None:
        """How the class list was inferred and how to declare it instead (None when data.classes declares it)."""
        if self.declared:
            return None
        return f"inferred from the class folders of {self.root}; remove the empty ones or list data.classes"

    def units(self) -> list[list[tuple[str, int, str | None]]]:
        return [self.files[i : i + self.chunk] for i in range(0, len(self.files), self.chunk)]

    def scan(self, unit: Sequence[tuple[str, int, str | None]]) -> ScanResult:
        out = ScanResult()
        for path, label, refusal in unit:
            rel = os.path.relpath(path, self.root)
            key = sanitize_key(os.path.splitext(rel)[0])
            if refusal:
                out.skipped.append(Skip(key, path, refusal))
                continue
            payload = self.read((path,))
            skip = image_skip(key, path, payload, self.max_pixels)
            if skip:
                out.skipped.append(skip)
                continue
            out.records.append(Record(key, label, normalise_ext(Path(path).suffix), len(payload), (path,), rel))
        return out

    def read(self, locator: tuple) -> bytes:
        with open(locator[0], "rb") as f:
            return f.read()


class WdsSource:
    """Existing WebDataset shards (e.g. ImageNet's): image and label fields configurable."""

    kind = "wds"

    def __init__(self, cfg: DataConfig):
        pattern = cfg.source
        if not pattern:
            raise ValueError("data.source must name the shards, e.g. '/data/train-{000000..000099}.tar'")
        self.urls = list(braceexpand.braceexpand(str(pattern)))
        missing = [u for u in self.urls if not os.path.isfile(u)]
        if missing:
            raise FileNotFoundError(f"wds source shard not found: {missing[0]} ({len(missing)} missing)")
        self.image_fields = [normalise_ext(e) for e in cfg.image_field.split(";")]
        self.label_field = cfg.label_field
        self.num_classes = cfg.num_classes
        self.classes = [str(c) for c in range(self.num_classes)] if self.num_classes else None
        self.max_pixels = cfg.max_pixels
        self.pattern = str(pattern)

    def describe(self) -> dict:
        return {"kind": self.kind, "source": self.pattern, "num_shards": len(self.urls),
                "image_field": ";".join(self.image_fields), "label_field": self.label_field}

    def inferred_classes(self, top: Record) -> str | None:
        """How the classes were inferred from ``top``, the sample of the largest label (None when declared)."""
        if self.num_classes:
            return None
        return (f"inferred from label {top.label} of sample {top.source_key!r} in {top.locator[0]}; "
                "set data.num_classes to declare them")

    def units(self) -> list[str]:
        return self.urls

    def scan(self, url: str) -> ScanResult:
        out = ScanResult()
        with open(url, "rb") as f:
            for raw_key, members in tar_groups(url):
                key = sanitize_key(raw_key)
                image = next(((e, m) for e in self.image_fields for m in members if ext_of(m.name) == e), None)
                label_member = next((m for m in members if ext_of(m.name) == self.label_field), None)
                if image is None:
                    out.skipped.append(Skip(key, url, f"no image field {'/'.join(self.image_fields)}"))
                    continue
                if label_member is None:
                    raise ValueError(f"unknown label: sample {raw_key!r} in {url} has no .{self.label_field} field")
                label = self._parse_label(read_member(f, label_member), raw_key, url)
                ext, member = image
                payload = read_member(f, member)
                skip = image_skip(key, url, payload, self.max_pixels)
                if skip:
                    out.skipped.append(skip)
                    continue
                out.records.append(Record(key, label, ext, member.size, (url, member.offset_data, member.size), raw_key))
        return out

    def _parse_label(self, raw: bytes, key: str, url: str) -> int:
        try:
            label = int(raw.decode("utf-8").strip())
        except (UnicodeDecodeError, ValueError):
            raise ValueError(f"unknown label: sample {key!r} in {url} has label {raw[:20]!r}") from None
        limit = self.num_classes or MAX_INFERRED_CLASSES
        if not 0 <= label < limit:
            inferring = "" if self.num_classes else " (more classes are never inferred: set data.num_classes)"
            raise ValueError(f"unknown label: sample {key!r} in {url} has label {label} outside [0, {limit})"
                             + inferring)
        return label

    def read(self, locator: tuple) -> bytes:
        url, offset, size = locator
        with open(url, "rb") as f:
            f.seek(offset)
            return f.read(size)


def ext_of(name: str) -> str:
    base = os.path.basename(name)
    return normalise_ext(base.split(".", 1)[1]) if "." in base else ""


def read_member(f, member: tarfile.TarInfo) -> bytes:
    f.seek(member.offset_data)
    return f.read(member.size)


def tar_groups(url: str) -> Iterator[tuple[str, list[tarfile.TarInfo]]]:
    """Group a tar's file members by WebDataset key (path up to the first dot of the basename)."""
    try:
        with tarfile.open(url, "r:") as tar:
            groups: dict[str, list[tarfile.TarInfo]] = {}
            for member in tar:
                if not member.isfile():
                    continue
                directory, base = os.path.split(member.name)
                groups.setdefault(os.path.join(directory, base.split(".", 1)[0]), []).append(member)
            # tarfile stops silently at a cut or garbled header after the first member: demand the end marker
            tar.fileobj.seek(tar.offset)
            if tar.fileobj.read(tarfile.BLOCKSIZE) != tarfile.NUL * tarfile.BLOCKSIZE:
                raise tarfile.ReadError(f"no end-of-archive marker at byte {tar.offset} (cut or garbled header)")
    except (tarfile.TarError, EOFError, OSError) as e:
        raise ValueError(f"corrupt or truncated tar: {url} ({type(e).__name__}: {e})") from None
    yield from groups.items()


def _existing_dir(path: Any, what: str) -> Path:
    if not path:
        raise ValueError(f"{what}: data.source is not set")
    p = Path(str(path)).expanduser()
    if not p.is_dir():
        raise FileNotFoundError(f"{what} not found: {p}")
    return p


SOURCES = {"digits": DigitsSource, "imagefolder": ImageFolderSource, "wds": WdsSource}


def make_source(cfg: DataConfig):
    """Build the source named by ``data.kind``."""
    return SOURCES[cfg.kind](cfg)
