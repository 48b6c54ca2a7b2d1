"""Intake limits: oversized images, implausible labels, symlinks out of the source, empty classes.

Real files throughout: PNG/JPEG written by PIL, tar shards by webdataset.TarWriter, prepared roots.
"""

import io
import json
import logging
import os
import shutil
import subprocess
import sys
import tarfile
import tracemalloc
import warnings
from functools import cache
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import prep_cfg, wds_samples, write_image_tree, write_wds_source
from PIL import Image

from amint_dist.data.pipeline import ShardedSplitStream, SplitShards, make_loader
from amint_dist.data.prepare import prepare_dataset

HUGE = (12000, 12000)  # 144 M pixels: over PIL's 89 M limit, under twice it (where PIL only warns)
PIL_LIMIT = 89_478_485


@cache
def png(size: tuple[int, int]) -> bytes:
    """A black grayscale PNG of ``size``; 12000x12000 compresses to ~140 KB."""
    buf = io.BytesIO()
    Image.new("L", size).save(buf, format="PNG")
    return buf.getvalue()


def one_line(exc_type, cfg, *needles) -> str:
    """prepare_dataset(cfg) raises ``exc_type`` with a one-line message holding every needle."""
    with pytest.raises(exc_type) as info:
        prepare_dataset(cfg)
    message = str(info.value)
    assert "\n" not in message and all(str(n) in message for n in needles), message
    return message


def skipped(manifest: dict) -> dict[str, str]:
    assert manifest["num_skipped"] == len(manifest["skipped"])
    return {s["key"]: s["reason"] for s in manifest["skipped"]}


# --- image size, checked from the header before decoding -------------------------------------------------

def test_oversized_images_are_skipped_in_prepare(tmp_path):
    """A 12000x12000 PNG (PIL only warns) is a counted skip in an image folder and a wds source; a lower
    data.max_pixels skips a 40x40 image too; the 12x10 images pass either way; no PIL warning escapes."""
    write_image_tree(tmp_path / "tree", classes=2, per_class=4)
    (tmp_path / "tree/class0/huge.png").write_bytes(png(HUGE))
    (tmp_path / "tree/class1/mid.png").write_bytes(png((40, 40)))
    samples = wds_samples(8, classes=2) + [{"__key__": "huge", "png": png(HUGE), "cls": b"0"},
                                           {"__key__": "mid", "png": png((40, 40)), "cls": b"1"}]
    sources = {"imagefolder": str(tmp_path / "tree"), "wds": write_wds_source(tmp_path / "shards", samples, 5)}
    fields = {"imagefolder": {}, "wds": {"image_field": "jpg;png"}}
    too_large = "image too large: 12000x12000 > max_pixels"
    for n, (kind, source) in enumerate(sources.items()):
        huge, mid = ("class0__huge", "class1__mid") if kind == "imagefolder" else ("huge", "mid")
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)  # would fail the prepare
            default = prepare_dataset(prep_cfg(kind, tmp_path / f"d{n}", source=source, **fields[kind]))
            low = prepare_dataset(prep_cfg(kind, tmp_path / f"l{n}", source=source, max_pixels=1000, **fields[kind]))
        assert skipped(default) == {huge: f"{too_large} {PIL_LIMIT}"} and default["total"] == 9
        assert skipped(low) == {huge: f"{too_large} 1000", mid: "image too large: 40x40 > max_pixels 1000"}
        assert low["total"] == 8 and low["max_pixels"] == 1000


def test_pils_own_limit_still_applies_as_a_skip(tmp_path):
    """data.max_pixels above PIL's Image.MAX_IMAGE_PIXELS: the image PIL would only warn about is a skip
    naming PIL's limit, not a warning."""
    write_image_tree(tmp_path / "tree", classes=2, per_class=3)
    (tmp_path / "tree/class1/huge.png").write_bytes(png(HUGE))
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        manifest = prepare_dataset(prep_cfg("imagefolder", tmp_path / "r", source=str(tmp_path / "tree"),
                                            max_pixels=10**9))
    pil_limit = f"PIL's Image.MAX_IMAGE_PIXELS {PIL_LIMIT}"
    assert skipped(manifest) == {"class1__huge": f"image too large: 12000x12000 > {pil_limit}"}


def test_oversized_image_is_refused_before_any_pixel_is_decoded(tmp_path):
    """Decoding the 12000x12000 PNG would take >= 144 MB (432 MB as RGB); the check reads only its header."""
    path = tmp_path / "huge.png"
    path.write_bytes(png(HUGE))
    code = ("import re, sys\n"  # VmHWM: this process's peak RSS (ru_maxrss would include the forking parent's)
            "from amint_dist.data.images import ImageRefused, decode_image\n"
            "try:\n"
            "    decode_image(open(sys.argv[1], 'rb').read(), 10**9)\n"
            "except ImageRefused as e:\n"
            "    peak = re.search(r'VmHWM:\\s*(\\d+) kB', open('/proc/self/status').read())\n"
            "    print(e.reason, int(peak[1]) // 1024)\n")
    done = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=60, check=False)
    reason, peak_mb = done.stdout.rsplit(maxsplit=1)
    assert reason == "image too large" and int(peak_mb) < 120, done.stdout + done.stderr


def replace_payloads(shard: Path, payloads: dict[str, bytes]) -> None:
    """Rewrite a tar shard with the image bytes of the given keys replaced (everything else unchanged)."""
    with tarfile.open(shard) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    with tarfile.open(shard, "w") as tar:
        for m, data in members:
            key, ext = m.name.split(".", 1)
            if key in payloads and ext == "png":
                data = payloads[key]
                m.size = len(data)
            tar.addfile(m, io.BytesIO(data))


def small_tensor(img) -> torch.Tensor:
    """Any image -> 3x8x8 float tensor (the reader's batches have one shape)."""
    return torch.from_numpy(np.asarray(img.resize((8, 8)), dtype=np.float32) / 255).permute(2, 0, 1)


def test_reader_skips_oversized_images_before_decoding(digits_root, tmp_path):
    """A prepared root whose shard was given a 12000x12000 and a 40x40 image afterwards: the reader skips the
    large one by default ("image too large", counted like any skip), both with max_pixels=1000; 8x8 digits pass."""
    root = tmp_path / "root"
    shutil.copytree(digits_root, root)
    keys = (root / "members/keys.txt").read_text().splitlines()
    huge, mid = keys[1], keys[2]  # both in shard 0
    replace_payloads(root / "members/shard-000000.tar", {huge: png(HUGE), mid: png((40, 40))})
    shards = SplitShards.from_root(root, "members")
    for max_pixels, lost in ((None, {huge}), (1000, {huge, mid})):
        stream = ShardedSplitStream(shards, small_tensor, (3, 8, 8), 64, workers=0,
                                    **({"max_pixels": max_pixels} if max_pixels else {}))
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            batches = list(make_loader(stream))
        delivered = {k for b in batches for k, v in zip(b["key"], b["valid"].tolist()) if v}
        skips = [tuple(s) for b in batches for s in b["skipped"]]
        assert sorted(skips) == sorted((k, "image too large") for k in lost)
        assert delivered == set(keys) - lost


# --- labels -----------------------------------------------------------------------------------------------

def test_implausible_label_is_refused_fast_without_a_class_list(tmp_path):
    """One wds label of 3,000,000 with data.num_classes unset: refused in one line naming the label, the key and
    data.num_classes, during the scan (little memory: no 3M-entry class list), nothing written."""
    samples = wds_samples(6)
    samples[4]["cls"] = b"3000000"
    pattern = write_wds_source(tmp_path / "src", samples, per_shard=6)
    tracemalloc.start()
    try:
        one_line(ValueError, prep_cfg("wds", tmp_path / "r", source=pattern),
                 "label 3000000", "train/n04_00004", "data.num_classes")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 20 * 2**20, peak
    assert sorted(os.listdir(tmp_path)) == ["src"]


def test_mostly_empty_inferred_classes_are_refused_declared_ones_kept(tmp_path, caplog):
    """Labels 0-2 and 900: 901 inferred classes, 897 without a sample: refused naming label, key and
    data.num_classes. Declared (data.num_classes=901) it is kept, the empty classes recorded; a few gaps
    (labels 0, 1, 2, 4) are a logged warning and recorded in splits.json."""
    samples = wds_samples(10, classes=3)
    samples[9]["cls"] = b"900"
    pattern = write_wds_source(tmp_path / "a", samples, per_shard=10)
    one_line(ValueError, prep_cfg("wds", tmp_path / "r", source=pattern),
             "897 of 901 classes have no sample", "label 900", "train/n00_00009", "data.num_classes")
    declared = prepare_dataset(prep_cfg("wds", tmp_path / "declared", source=pattern, num_classes=901))
    assert declared["num_classes"] == 901 and len(declared["empty_classes"]) == 897

    samples[9]["cls"] = b"4"
    pattern = write_wds_source(tmp_path / "b", samples, per_shard=10)
    with caplog.at_level(logging.WARNING, logger="amint_dist.data.prepare"):
        gaps = prepare_dataset(prep_cfg("wds", tmp_path / "gaps", source=pattern))
    assert gaps["num_classes"] == 5 and gaps["empty_classes"] == ["3"]
    assert any("1 of 5 classes have no sample: 3" in r.getMessage() for r in caplog.records)


# --- image folders: symlinks and empty class folders ------------------------------------------------------

def test_symlinks_out_of_the_source_are_skips_inside_are_fine(tmp_path):
    """A file symlink and a folder symlink leading out of data.source are counted skips naming the target;
    a class folder symlinked out is a skip and an empty class; a file and a folder symlink inside are read."""
    tree, outside = tmp_path / "tree", tmp_path / "outside"
    write_image_tree(tree, classes=2, per_class=4)
    write_image_tree(outside, classes=2, per_class=2)
    (tree / "class0/secret.jpg").symlink_to(outside / "class0/img.000.jpg")
    (tree / "class1/elsewhere").symlink_to(outside / "class1")
    (tree / "class2").symlink_to(outside / "class0")
    (tree / "class1/alias.jpg").symlink_to(tree / "class0/img.000.jpg")
    (tree / "class1/again").symlink_to(Path("../class0/sub1"))  # relative, inside
    (tree / "class0/loop").symlink_to(tree)
    manifest = prepare_dataset(prep_cfg("imagefolder", tmp_path / "r", source=str(tree)))
    reasons = skipped(manifest)
    out = "symlink leads out of data.source to "
    assert reasons == {
        "class0__secret": out + str(outside / "class0/img.000.jpg"),
        "class1__elsewhere": out + str(outside / "class1"),
        "class2": out + str(outside / "class0"),
        "class0__loop": f"symlink loop: {tree} encloses it",
    }
    assert manifest["total"] == 8 + 1 + 2 and manifest["empty_classes"] == ["class2"]
    stored = set((tmp_path / "r/members/keys.txt").read_text().split())
    for split in ("probe", "external", "heldout"):
        stored |= set((tmp_path / f"r/{split}/keys.txt").read_text().split())
    assert {"class1__alias", "class1__again__img_001", "class1__again__img_003"} <= stored


def test_empty_class_folders_are_named_and_mostly_empty_refused(tmp_path, caplog):
    """An empty class folder is a logged warning and listed in splits.json `empty_classes` (its index kept);
    3 of 4 empty is refused in one line naming them and data.classes."""
    write_image_tree(tmp_path / "tree", classes=2, per_class=4)
    (tmp_path / "tree/class5").mkdir()
    with caplog.at_level(logging.WARNING, logger="amint_dist.data.prepare"):
        manifest = prepare_dataset(prep_cfg("imagefolder", tmp_path / "r", source=str(tmp_path / "tree")))
    assert manifest["classes"] == ["class0", "class1", "class5"] and manifest["empty_classes"] == ["class5"]
    assert any("1 of 3 classes have no sample: class5" in r.getMessage() for r in caplog.records)
    assert json.loads((tmp_path / "r/splits.json").read_text())["empty_classes"] == ["class5"]

    (tmp_path / "tree/class6").mkdir()
    (tmp_path / "tree/class7").mkdir()
    shutil.rmtree(tmp_path / "tree/class1")
    one_line(ValueError, prep_cfg("imagefolder", tmp_path / "r2", source=str(tmp_path / "tree")),
             "3 of 4 classes have no sample", "class5, class6, class7", tmp_path / "tree", "data.classes")
