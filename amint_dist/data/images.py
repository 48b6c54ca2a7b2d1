"""Image intake shared by preparation and the reader: which files are images, a size limit read from the header,
full decode."""

from __future__ import annotations

import io
import re
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

from PIL import Image

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "bmp", "webp", "ppm", "tif", "tiff")
DEFAULT_MAX_PIXELS = 89_478_485  # PIL's default Image.MAX_IMAGE_PIXELS
TOO_LARGE = "image too large"
T = TypeVar("T")
_OBJECT_REPR = re.compile(r"<[^<>]* at 0x[0-9a-fA-F]+>")


class ImageRefused(Exception):
    """An image not decoded: ``reason`` is a fixed phrase (skips are counted by it), str() adds this image's details."""

    def __init__(self, reason: str, details: str):
        super().__init__(f"{reason}: {details}")
        self.reason = reason


def normalise_ext(ext: str) -> str:
    """Lower case, no dot, ``jpeg`` -> ``jpg``."""
    ext = ext.lower().lstrip(".")
    return "jpg" if ext == "jpeg" else ext


def image_files(folder: Path, source: Path) -> Iterator[tuple[str, str | None]]:
    """(path, None) for each image file below ``folder`` of ``source`` (sorted, depth first), (path, why) for a
    symlink not followed: symlinks are followed while they stay inside ``source`` and do not loop."""
    real_source = source.resolve()
    return _walk(folder, real_source / folder.relative_to(source), (real_source,))


def _walk(path: Path, real: Path, enclosing: tuple[Path, ...]) -> Iterator[tuple[str, str | None]]:
    """``image_files`` at or below ``path``; ``real``: ``path`` resolved; ``enclosing``: the resolved source and
    the folders above ``path``."""
    is_image = normalise_ext(path.suffix) in IMAGE_EXTENSIONS
    if path.is_symlink():
        real = path.resolve()
        if not real.is_relative_to(enclosing[0]):
            if is_image or path.is_dir():
                yield str(path), f"symlink leads out of data.source to {real}"
            return
    if path.is_dir():
        if real in enclosing:
            yield str(path), f"symlink loop: {real} encloses it"
            return
        for child in sorted(path.iterdir()):
            yield from _walk(child, real / child.name, (*enclosing, real))
    elif is_image and path.is_file():
        yield str(path), None


def decode_image(payload: bytes, max_pixels: int) -> Image.Image:
    """``payload`` fully decoded as RGB, or ImageRefused.

    The size is read from the header first: more pixels than ``max_pixels`` or than PIL's own
    ``Image.MAX_IMAGE_PIXELS`` is refused before any pixel is decoded. PIL's DecompressionBombWarning
    (also raised by some formats while decoding frames or tiles) is a refusal, never just a warning.
    """
    return _intake(payload, max_pixels, lambda img: img.convert("RGB"))


def check_header(payload: bytes, max_pixels: int) -> None:
    """``payload``'s header parsed and its size checked as :func:`decode_image` does, no pixel decoded
    (``data.decode=device``: the training step decodes); ImageRefused when either fails."""
    _intake(payload, max_pixels, lambda img: None)


def _intake(payload: bytes, max_pixels: int, then: Callable[[Image.Image], T]) -> T:
    """``then(image)`` on the lazily opened, size-checked ``payload``; every failure an ImageRefused."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with _open(payload) as img:
                _check_size(img.size, max_pixels)
                return then(img)
    except ImageRefused:
        raise
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as e:
        raise ImageRefused(TOO_LARGE, _message(e)) from None
    except Exception as e:  # PIL raises many types for bad image bytes
        raise ImageRefused(undecodable(e), _message(e)) from None


def undecodable(error: BaseException) -> str:
    """The skip reason of an image that failed to decode (counted by it: the exception's type, no details)."""
    return f"undecodable image ({type(error).__name__})"


def _open(payload: bytes) -> Image.Image:
    """Open lazily (header only); PIL's warning at open is left to ``_check_size``, which names the size."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        return Image.open(io.BytesIO(payload))


def _check_size(size: tuple[int, int], max_pixels: int) -> None:
    width, height = size
    for name, limit in (("max_pixels", max_pixels), ("PIL's Image.MAX_IMAGE_PIXELS", Image.MAX_IMAGE_PIXELS)):
        if limit and width * height > limit:
            raise ImageRefused(TOO_LARGE, f"{width}x{height} > {name} {limit}")


def _message(error: BaseException) -> str:
    """One line, without memory addresses (skip reasons land in splits.json)."""
    return _OBJECT_REPR.sub("<image bytes>", str(error)).replace("\n", " ")
