"""Dataset preparation: deterministic roots, readable by plain WebDataset and timm, clear refusals."""

import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from conftest import image_bytes, prep_cfg, wds_samples, write_image_tree, write_wds_source
from PIL import Image

from amint_dist.data.prepare import load_manifest, prepare_dataset
from amint_dist.data.splits import SPLITS, assign_split
from amint_dist.io import sha256_file

REPO = Path(__file__).resolve().parents[1]


def root_files(root: Path) -> dict[str, bytes]:
    """Every file of a dataset root by relative path (for byte-for-byte comparison)."""
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def read_split(root: Path, split: str) -> list[dict]:
    """All samples of a split through plain ``webdataset.WebDataset``, in shard order."""
    info = json.loads((root / split / "_info.json").read_text())
    urls = [str(root / split / f) for f in info["filenames"]]
    return list(wds.WebDataset(urls, shardshuffle=False)) if urls else []


def check_manifest(root: Path) -> dict:
    """splits.json agrees with the files: hashes, counts, key lists, per-sample json."""
    manifest = load_manifest(root)
    keys_all = []
    for split in SPLITS:
        meta = manifest["splits"][split]
        keys = (root / split / "keys.txt").read_text().splitlines()
        assert len(keys) == meta["num_samples"] == manifest["counts"][split]
        assert sha256_file(root / split / "keys.txt") == meta["keys_sha256"]
        assert sha256_file(root / split / "_info.json") == meta["info_sha256"]
        info = json.loads((root / split / "_info.json").read_text())
        assert info["splits"][split]["filenames"] == [s["name"] for s in meta["shards"]]  # timm's layout
        assert sum(info["shard_lengths"]) == len(keys)
        for shard in meta["shards"]:
            path = root / split / shard["name"]
            assert sha256_file(path) == shard["sha256"] and path.stat().st_size == shard["bytes"]
        samples = read_split(root, split)
        assert [s["__key__"] for s in samples] == keys  # key of index i on line i
        for i, s in enumerate(samples):
            assert json.loads(s["json"])["index"] == i and json.loads(s["json"])["split"] == split
            assert assign_split(manifest["seed"], s["__key__"], manifest["fractions"]) == split
        keys_all += keys
    assert len(keys_all) == len(set(keys_all)) == manifest["total"]  # no key in two splits
    return manifest


def test_digits_root_is_complete_and_consistent(digits_root):
    """All 1,797 digits land in exactly one split; hashes, key lists, labels and pixels match the source."""
    from sklearn.datasets import load_digits

    manifest = check_manifest(digits_root)
    assert manifest["total"] == 1797 and manifest["num_skipped"] == 0 and manifest["num_classes"] == 10
    digits = load_digits()
    for split in SPLITS:
        for s in read_split(digits_root, split)[:50]:
            i = int(s["__key__"].split("_")[1])
            assert int(s["cls"]) == digits.target[i]
            assert json.loads(s["json"])["source_key"] == s["__key__"]
            pixels = np.asarray(Image.open(io.BytesIO(s["png"])))
            assert (pixels == np.round(digits.images[i] * 255 / 16)).all()


def test_same_seed_reproduces_the_root_byte_for_byte(digits_root, tmp_path):
    """Another root, one writer process instead of two: identical key lists, shards and splits.json."""
    prepare_dataset(prep_cfg("digits", tmp_path / "again", shard_maxcount=64, prepare_workers=1))
    assert root_files(tmp_path / "again") == root_files(digits_root)
    other = prepare_dataset(prep_cfg("digits", tmp_path / "seed1", seed=1, shard_maxcount=64))
    assert (tmp_path / "seed1/members/keys.txt").read_bytes() != (digits_root / "members/keys.txt").read_bytes()
    assert other["total"] == 1797


def test_shards_are_plain_ustar_within_limits(tmp_path):
    """No pax header per member (compact shards) and both shard_maxcount and shard_maxsize hold."""
    write_image_tree(tmp_path / "src", classes=2, per_class=30)
    maxsize = 20 * 1024
    manifest = prepare_dataset(prep_cfg("imagefolder", tmp_path / "root", source=str(tmp_path / "src"),
                                        shard_maxcount=9, shard_maxsize=maxsize))
    for split in SPLITS:
        for shard in manifest["splits"][split]["shards"]:
            assert shard["num_samples"] <= 9 and shard["bytes"] <= maxsize, shard
            with tarfile.open(tmp_path / "root" / split / shard["name"]) as tar:
                members = tar.getmembers()
            assert len(members) == 3 * shard["num_samples"]
            assert all(m.pax_headers == {} and m.mtime == 0 for m in members)
    assert any(s["num_samples"] < 9 for split in SPLITS for s in manifest["splits"][split]["shards"][:-1])


def test_files_get_the_usual_permissions(digits_root):
    """Manifest and key lists are as readable as the shards (umask applies; not mkstemp's 0600)."""
    umask = os.umask(0o022)
    os.umask(umask)
    for path in [digits_root / "splits.json", digits_root / "members/keys.txt", digits_root / "members/_info.json"]:
        assert path.stat().st_mode & 0o777 == 0o666 & ~umask, path


def test_webdataset_and_timm_read_the_shards(digits_root):
    """timm's own wds reader (``wds/...`` with root=<root>/<split>) reads every sample with the right labels."""
    import timm.data

    manifest = load_manifest(digits_root)
    for split in ("members", "heldout"):
        ds = timm.data.create_dataset("wds/amint", root=str(digits_root / split), split=split)
        assert len(ds) == manifest["counts"][split]
        targets = sorted(int(t) for _, t in ds)
        assert targets == sorted(int(s["cls"]) for s in read_split(digits_root, split))
        assert len(targets) == manifest["counts"][split]


def run_cli(*overrides, cwd):
    return subprocess.run([sys.executable, str(REPO / "launch/prepare_data.py"), *overrides],
                          cwd=cwd, capture_output=True, text=True, timeout=120)


def test_cli_prepares_digits_and_refuses_an_existing_root(tmp_path):
    """The launcher writes 1,797 digits; a second run refuses with one `error:` line and exit 2;
    `data.overwrite=true` (a real config key) rebuilds it."""
    root = tmp_path / "digits"
    done = run_cli(f"data.root={root}", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    manifest = check_manifest(root)
    assert manifest["total"] == sum(manifest["counts"].values()) == 1797
    assert sum(len((root / s / "keys.txt").read_text().splitlines()) for s in SPLITS) == 1797

    refused = run_cli(f"data.root={root}", cwd=tmp_path)
    assert refused.returncode == 2
    lines = refused.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and str(root) in lines[0], refused.stderr
    assert "data.overwrite=true" in lines[0]

    again = run_cli(f"data.root={root}", "data.overwrite=true", "data.seed=5", cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert load_manifest(root)["seed"] == 5
    assert sorted(p.name for p in tmp_path.iterdir()) == ["digits"]  # nothing hidden left behind, no hydra outputs


def test_prepare_never_deletes_a_directory_that_is_not_a_dataset(tmp_path):
    """An existing non-empty directory without splits.json is refused, even with overwrite; an empty one is used."""
    precious = tmp_path / "home"
    precious.mkdir()
    (precious / "thesis.tex").write_text("years of work")
    with pytest.raises(FileExistsError, match="not empty"):
        prepare_dataset(prep_cfg("digits", precious))
    with pytest.raises(FileExistsError, match="not a prepared dataset root"):
        prepare_dataset(prep_cfg("digits", precious, overwrite=True))
    assert (precious / "thesis.tex").read_text() == "years of work"
    (tmp_path / "empty").mkdir()
    assert prepare_dataset(prep_cfg("digits", tmp_path / "empty", shard_maxcount=500))["total"] == 1797


def test_prepare_leaves_sibling_folders_alone(tmp_path):
    """User folders named like the old tooling's staging (`X.partial-<pid>`) and set-aside (`X.old`) folders
    survive a prepare and an overwrite; no hidden leftovers; the root gets a plain directory's mode."""
    root = tmp_path / "X"
    siblings = [tmp_path / "X.old", tmp_path / f"X.partial-{os.getpid()}"]
    for folder in siblings:
        folder.mkdir()
        (folder / "keep.txt").write_text("mine")
    prepare_dataset(prep_cfg("digits", root, shard_maxcount=500))
    prepare_dataset(prep_cfg("digits", root, shard_maxcount=500, seed=3, overwrite=True))
    assert load_manifest(root)["seed"] == 3
    assert sorted(os.listdir(tmp_path)) == ["X", "X.old", f"X.partial-{os.getpid()}"]
    assert all((folder / "keep.txt").read_text() == "mine" for folder in siblings)
    (tmp_path / "plain").mkdir()
    assert root.stat().st_mode == (tmp_path / "plain").stat().st_mode


def test_a_failure_while_staging_removes_only_the_staging_folder(tmp_path):
    """An error once the staging folder holds files (a full disk, say) removes that folder; the root stays."""
    from amint_dist.data.prepare import _staged

    (tmp_path / "X").mkdir()
    (tmp_path / "X/splits.json").write_text("old")
    with pytest.raises(OSError, match="disk full"), _staged(tmp_path / "X") as staging:
        (staging / "members").mkdir()
        (staging / "members/shard-000000.tar").write_bytes(b"half")
        raise OSError("disk full")
    assert sorted(os.listdir(tmp_path)) == ["X"] and (tmp_path / "X/splits.json").read_text() == "old"


def test_imagefolder_round_trip(tmp_path):
    """A nested 3-class JPEG tree: every image once, key from its path, label from its class folder,
    bytes copied verbatim, classes recorded."""
    expected = write_image_tree(tmp_path / "src", classes=3, per_class=20)
    manifest = prepare_dataset(prep_cfg("imagefolder", tmp_path / "root", source=str(tmp_path / "src"), prepare_workers=2))
    check_manifest(tmp_path / "root")
    assert manifest["classes"] == ["class0", "class1", "class2"] and manifest["total"] == 60
    seen = {}
    for split in SPLITS:
        for s in read_split(tmp_path / "root", split):
            source_key = json.loads(s["json"])["source_key"]
            assert s["jpg"] == (tmp_path / "src" / source_key).read_bytes()
            seen[s["__key__"]] = int(s["cls"])
    assert seen == expected
    assert any("__sub1__" in k for k in seen)


def test_wds_round_trip_with_configured_fields(tmp_path):
    """WebDataset source shards (TarWriter) with png images under `.png`, labels under `.label`:
    the configured fields are used; output holds `.png` and `.cls`; nested keys become safe keys."""
    samples = [{"__key__": s["__key__"], "png": image_bytes(i, "PNG"), "label": s["cls"], "txt": b"ignored"}
               for i, s in enumerate(wds_samples(40))]
    pattern = write_wds_source(tmp_path / "src", samples, per_shard=15)
    manifest = prepare_dataset(prep_cfg("wds", tmp_path / "root", source=pattern, image_field="webp;png",
                                        label_field="label", num_classes=5, prepare_workers=2))
    check_manifest(tmp_path / "root")
    assert manifest["total"] == 40 and manifest["classes"] == [str(c) for c in range(5)]
    by_key = {s["__key__"].replace("/", "__"): s for s in samples}
    for split in SPLITS:
        for s in read_split(tmp_path / "root", split):
            original = by_key[s["__key__"]]
            assert set(s) >= {"png", "cls", "json"} and "txt" not in s
            assert s["png"] == original["png"] and s["cls"] == original["label"]
            assert json.loads(s["json"])["source_key"] == original["__key__"]


def test_jpeg_extension_is_normalised(tmp_path):
    """A `.jpeg` image field is stored as `.jpg` (the default image_field list covers both)."""
    samples = [{"__key__": f"k{i}", ("jpeg" if i % 2 else "jpg"): image_bytes(i), "cls": b"1"} for i in range(8)]
    pattern = write_wds_source(tmp_path / "src", samples, per_shard=8)
    prepare_dataset(prep_cfg("wds", tmp_path / "root", source=pattern, image_field="jpg;jpeg;png"))
    stored = [s for split in SPLITS for s in read_split(tmp_path / "root", split)]
    assert len(stored) == 8 and all("jpg" in s and "jpeg" not in s for s in stored)


def test_source_order_does_not_matter(tmp_path):
    """The same keys in another order inside the source shards, scanned by 1 or 2 processes, give a
    byte-identical root (shards, key lists, splits.json including its `skipped` list); samples moved
    between source shards change nothing but the source file named by a skip."""
    samples = wds_samples(90)
    samples[7]["jpg"] = b"not an image"
    samples[50]["jpg"] = image_bytes(50)[:200]  # truncated JPEG
    roots = []
    for attempt, (shuffle, across, workers) in enumerate([(None, False, 1), (11, False, 2), (12, True, 2)]):
        pattern = write_wds_source(tmp_path / "src", samples, per_shard=30, shuffle_seed=shuffle, across=across)
        roots.append(tmp_path / f"root{attempt}")
        prepare_dataset(prep_cfg("wds", roots[-1], source=pattern, prepare_workers=workers, shard_maxcount=7))
    files = [root_files(r) for r in roots]
    assert files[0] == files[1]
    manifests = [json.loads(f.pop("splits.json")) for f in files]
    assert files[0] == files[2]
    assert manifests[0]["num_skipped"] == 2 and len(manifests[0]["splits"]["members"]["shards"]) > 2
    for m in manifests:
        for skip in m["skipped"]:
            skip.pop("file")
    assert manifests[0] == manifests[2]


def test_undecodable_source_images_are_counted_skips(tmp_path):
    """A garbage file and a truncated JPEG in an image folder are listed in splits.json `skipped`
    (key, file, reason); all other images are written."""
    write_image_tree(tmp_path / "src", classes=3, per_class=20)
    garbage = tmp_path / "src/class1/img.004.jpg"
    garbage.write_bytes(b"\x00garbage" * 50)
    truncated = tmp_path / "src/class2/sub1/img.007.jpg"
    truncated.write_bytes(truncated.read_bytes()[:150])
    manifest = prepare_dataset(prep_cfg("imagefolder", tmp_path / "root", source=str(tmp_path / "src")))
    check_manifest(tmp_path / "root")
    assert manifest["total"] == 58 and manifest["num_skipped"] == 2
    skipped = {s["key"]: s for s in manifest["skipped"]}
    assert set(skipped) == {"class1__img_004", "class2__sub1__img_007"}
    assert skipped["class1__img_004"]["file"] == str(garbage)
    assert all(s["reason"].startswith("undecodable image") for s in skipped.values())


def one_line_error(exc_type, cfg, *needles):
    """prepare_dataset(cfg) fails with ``exc_type`` whose single-line message contains every needle."""
    with pytest.raises(exc_type) as info:
        prepare_dataset(cfg)
    message = str(info.value)
    assert "\n" not in message, message
    for needle in needles:
        assert str(needle) in message, (needle, message)
    return message


def test_bad_sources_fail_with_one_clear_line(tmp_path):
    """Missing paths, unknown kinds and unusable fractions name the culprit; nothing is written."""
    one_line_error(FileNotFoundError, prep_cfg("imagefolder", tmp_path / "r", source=str(tmp_path / "nope")),
                   tmp_path / "nope")
    pattern = write_wds_source(tmp_path / "src", wds_samples(4), per_shard=2)
    missing = pattern.replace("{000..001}", "{000..002}")
    one_line_error(FileNotFoundError, prep_cfg("wds", tmp_path / "r", source=missing), tmp_path / "src/src-002.tar")
    one_line_error(ValueError, prep_cfg("lmdb", tmp_path / "r"), "data.kind='lmdb': expected one of")
    one_line_error(ValueError, prep_cfg("digits", tmp_path / "r", fractions={"members": 0.5, "probe": 0.6}),
                   "sum to 1")
    one_line_error(ValueError, prep_cfg("digits", tmp_path / "r", shard_maxcount=0), "positive")
    empty = tmp_path / "empty_classes"
    (empty / "a").mkdir(parents=True)
    one_line_error(ValueError, prep_cfg("imagefolder", tmp_path / "r", source=str(empty)), "no usable samples")
    assert sorted(os.listdir(tmp_path)) == ["empty_classes", "src"]  # no root, no hidden staging folder


def test_duplicate_keys_are_refused(tmp_path):
    """Two source shards holding the same key: the error names the key and both files."""
    write_wds_source(tmp_path / "a", wds_samples(5), per_shard=5)
    write_wds_source(tmp_path / "b", wds_samples(3), per_shard=3)
    pattern = str(tmp_path / "{a,b}/src-000.tar")
    one_line_error(ValueError, prep_cfg("wds", tmp_path / "r", source=pattern, prepare_workers=2),
                   "duplicate key 'train__n00_00000'", tmp_path / "a/src-000.tar", tmp_path / "b/src-000.tar")


def test_unknown_labels_are_refused(tmp_path):
    """Non-integer or out-of-range labels name the sample and file; a top-level image names the image."""
    bad = wds_samples(6)
    bad[3]["cls"] = b"cat"
    pattern = write_wds_source(tmp_path / "s1", bad, per_shard=6)
    one_line_error(ValueError, prep_cfg("wds", tmp_path / "r", source=pattern),
                   "unknown label", "train/n03_00003", tmp_path / "s1/src-000.tar")

    pattern = write_wds_source(tmp_path / "s2", wds_samples(6, classes=6), per_shard=6)
    one_line_error(ValueError, prep_cfg("wds", tmp_path / "r", source=pattern, num_classes=5),
                   "unknown label", "train/n05_00005", "outside [0, 5)")

    nolabel = [{k: v for k, v in s.items() if k != "cls"} for s in wds_samples(2)]
    pattern = write_wds_source(tmp_path / "s3", nolabel, per_shard=2)
    one_line_error(ValueError, prep_cfg("wds", tmp_path / "r", source=pattern), "unknown label", "no .cls field")

    write_image_tree(tmp_path / "tree", classes=2, per_class=2)
    (tmp_path / "tree/stray.png").write_bytes(image_bytes(1, "PNG"))
    one_line_error(ValueError, prep_cfg("imagefolder", tmp_path / "r", source=str(tmp_path / "tree")),
                   "unknown label", tmp_path / "tree/stray.png")
    (tmp_path / "tree/stray.png").unlink()
    one_line_error(ValueError, prep_cfg("imagefolder", tmp_path / "r", source=str(tmp_path / "tree"),
                                        classes=["class0"]), "unknown label", tmp_path / "tree/class1")


@pytest.mark.parametrize("damage", ["half", "inside_header", "at_member_boundary", "garbled_header", "garbage"])
def test_corrupt_or_truncated_source_tars_are_refused(tmp_path, damage):
    """A cut or garbled source shard is an error naming the shard, wherever the damage falls
    (tarfile alone stops silently at a cut header and would lose the tail unnoticed)."""
    pattern = write_wds_source(tmp_path / "src", wds_samples(12), per_shard=6)
    victim = tmp_path / "src/src-001.tar"
    data = victim.read_bytes()
    with tarfile.open(victim) as tar:
        header = tar.getmembers()[9].offset  # a member in the middle
    damaged = {
        "half": data[: len(data) // 2],
        "inside_header": data[: header + 100],
        "at_member_boundary": data[:header],
        "garbled_header": data[:header] + b"\x17" * 512 + data[header + 512 :],
        "garbage": os.urandom(3000),
    }[damage]
    victim.write_bytes(damaged)
    one_line_error(ValueError, prep_cfg("wds", tmp_path / "r", source=pattern), "corrupt or truncated tar", victim)


def test_load_manifest_refuses_non_roots(tmp_path):
    """load_manifest names a directory that is not a prepared root, and a foreign format."""
    with pytest.raises(FileNotFoundError, match="not a prepared dataset root"):
        load_manifest(tmp_path)
    (tmp_path / "splits.json").write_text(json.dumps({"format": "other/9"}))
    with pytest.raises(ValueError, match="unsupported dataset format"):
        load_manifest(tmp_path)
