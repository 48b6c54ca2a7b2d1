"""A WebDataset tar read from its k-th sample on: the headers before it are read, the contents skipped by seeking.

Samples are counted as ``webdataset`` groups them (``tar_file_iterator`` + ``group_by_keys``): regular files
only, WebDataset's meta entries left out, a new sample wherever the key (``base_plus_ext``) changes. The
samples are then read with WebDataset's own tar iterator from the first header of sample k, so what a reader
gets from position k is exactly what reading the shard from its start and dropping k samples gives.
"""

from __future__ import annotations

import re
import tarfile
from collections.abc import Callable, Iterator

from webdataset.tariterators import base_plus_ext, group_by_keys, meta_prefix, meta_suffix, tar_file_expander

_SKIP_META = re.compile(r"__[^/]*__($|/)")  # tar_file_iterator's default skip_meta


def _webdataset_file(member: tarfile.TarInfo) -> bool:
    """Whether ``tar_file_iterator`` passes ``member`` on."""
    name = member.name
    meta = "/" not in name and name.startswith(meta_prefix) and name.endswith(meta_suffix)
    return member.isreg() and not meta and not _SKIP_META.match(name)


def sample_offset(path: str, position: int) -> int | None:
    """Byte offset of the first header of sample ``position`` in the tar at ``path`` (0 for the first); None when
    the tar holds fewer samples or cannot be read up to there. Reads headers only (``tarfile`` seeks over the
    contents of a seekable file; an unbuffered file reads 512 bytes per header, not a buffer's worth)."""
    if position == 0:
        return 0
    count, current = 0, None
    try:
        with open(path, "rb", buffering=0) as raw, tarfile.open(fileobj=raw, mode="r:") as tar:  # unbuffered: 512 B reads
            for member in tar:
                prefix = base_plus_ext(member.name)[0] if _webdataset_file(member) else None
                if prefix is None or prefix == current:
                    continue
                if count == position:
                    return member.offset
                count, current = count + 1, prefix
    except (OSError, tarfile.TarError):
        return None
    return None


def samples_from(path: str, position: int, handler: Callable[[Exception], bool]) -> Iterator[dict]:
    """Raw WebDataset samples (``__key__``, ``__url__``, one field per file) of the tar at ``path`` from sample
    ``position`` on; read errors go to ``handler`` (WebDataset's convention), and a tar holding fewer samples
    yields none. The file is closed when the iterator is closed or exhausted."""
    offset = sample_offset(path, position)
    if offset is None:
        return
    try:
        stream = open(path, "rb")
    except OSError as exn:
        handler(exn)
        return
    with stream:
        stream.seek(offset)
        yield from group_by_keys(tar_file_expander([{"url": path, "stream": stream}], handler=handler),
                                 handler=handler)
