"""Several audits' ROC curves in one figure (linear and log-log panels), read from their ``scores.npz``:

    python scripts/roc_compare.py --out curves.png --title "seen, data seed 0" \
        "external 234=runs/a/audit:seen/amint" "K=8 aMINT-LR=runs/b/audit_k8:seen/amint_lr"

Each curve is ``LABEL=AUDIT_DIR:PROTOCOL/METHOD``: the protocol's evaluation rows (not its calibration share) and
their labels, exactly what the report's figures are computed on. Nothing is re-scored.
"""

import argparse
from pathlib import Path

import numpy as np

from amint_dist.audit.plots import LabelledScores, plot_roc


def evaluation_scores(spec: str) -> tuple[str, LabelledScores]:
    """``LABEL=AUDIT_DIR:PROTOCOL/METHOD`` -> (label, (labels, scores)); one line naming the spec when absent."""
    label, _, rest = spec.partition("=")
    audit_dir, _, column = rest.rpartition(":")
    protocol, _, method = column.partition("/")
    if not (label and audit_dir and protocol and method):
        raise SystemExit(f"error: curve {spec!r} is not LABEL=AUDIT_DIR:PROTOCOL/METHOD")
    path = Path(audit_dir) / "scores.npz"
    if not path.is_file():
        raise SystemExit(f"error: curve {label!r}: {path} does not exist")
    with np.load(path, allow_pickle=False) as z:
        if f"{protocol}/{method}" not in z.files:
            raise SystemExit(f"error: curve {label!r}: {path} has no column {protocol}/{method}")
        return label, (z[f"{protocol}/label"].astype(bool), z[f"{protocol}/{method}"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("curves", nargs="+", help="LABEL=AUDIT_DIR:PROTOCOL/METHOD, one per curve")
    parser.add_argument("--out", type=Path, required=True, help="the PNG written")
    parser.add_argument("--title", default="ROC")
    args = parser.parse_args()
    curves = dict(evaluation_scores(spec) for spec in args.curves)
    plot_roc(curves, args.out, title=args.title)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
