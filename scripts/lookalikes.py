"""Do non-members that the MINT head scores like members look like members? ``python scripts/lookalikes.py ROOT
RUN/audit [--protocol seen] [--method amint]``.

For every evaluation row of the protocol, the pixel-space (L2, images as stored, greyscale) distance to its
nearest sample of the dataset root's ``members`` split (a member's own copy excluded), then: the median of that
distance for members and for non-members, and the Spearman correlation between the non-members' scores and their
closeness to the member set. A positive correlation says the head's false positives are look-alikes of trained
samples. Brute force over the member split: meant for small roots (digits, test sets), not ImageNet.
"""

import argparse
from pathlib import Path

import numpy as np
import webdataset as wds
from scipy.stats import spearmanr

from amint_dist.audit.report import read_protocol_scores
from amint_dist.data.images import DEFAULT_MAX_PIXELS, IMAGE_EXTENSIONS, decode_image
from amint_dist.data.pipeline import SplitShards


def split_pixels(root: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Keys and flattened greyscale pixels of every image in ``root``'s ``split`` (the shards its ``_info.json``
    lists, decoded with the reader's size checks; one image size)."""
    keys, pixels = [], []
    for sample in wds.WebDataset(list(SplitShards.from_root(root, split).urls), shardshuffle=False, empty_check=False):
        payload = next(sample[ext] for ext in IMAGE_EXTENSIONS if ext in sample)
        keys.append(sample["__key__"])
        pixels.append(np.asarray(decode_image(payload, DEFAULT_MAX_PIXELS).convert("L"), np.float32).ravel())
    return np.array(keys), np.stack(pixels)


def nearest_member_distance(rows: np.ndarray, row_keys: np.ndarray, members: np.ndarray,
                            member_keys: np.ndarray) -> np.ndarray:
    """Each row's L2 distance to its nearest member, the member with the row's own key excluded."""
    distances = np.sqrt(np.maximum(
        (rows ** 2).sum(1)[:, None] + (members ** 2).sum(1)[None, :] - 2 * rows @ members.T, 0.0))
    distances[row_keys[:, None] == member_keys[None, :]] = np.inf
    return distances.min(1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", type=Path, help="the dataset root the audited run was trained on")
    parser.add_argument("audit_dir", type=Path, help="an audit's output folder (holding scores.npz)")
    parser.add_argument("--protocol", default="seen")
    parser.add_argument("--method", default="amint")
    args = parser.parse_args()
    columns = read_protocol_scores(args.audit_dir, args.protocol)
    keys, labels, scores = columns["key"], columns["label"].astype(bool), columns[args.method]
    pixels = {split: split_pixels(args.root, split) for split in {"members", *map(str, np.unique(columns["split"]))}}
    member_keys, member_pixels = pixels["members"]
    by_key = {key: row for split_keys, rows in pixels.values() for key, row in zip(split_keys, rows)}
    missing = [k for k in keys if k not in by_key]
    if missing:
        raise SystemExit(f"error: {len(missing)} scored samples (e.g. {missing[0]}) are not in {args.root}")
    nearest = nearest_member_distance(np.stack([by_key[k] for k in keys]), keys, member_pixels, member_keys)
    out = spearmanr(scores[~labels], -nearest[~labels])
    print(f"{labels.sum()} members, {(~labels).sum()} non-members ({args.protocol}, {args.method}); "
          f"{len(member_keys)} samples in the members split")
    print(f"nearest-member distance, median: members {np.median(nearest[labels]):.2f}, "
          f"non-members {np.median(nearest[~labels]):.2f}")
    print(f"non-members: Spearman(score, closeness to the member set) = {out.statistic:.3f} (p = {out.pvalue:.2g})")


if __name__ == "__main__":
    main()
