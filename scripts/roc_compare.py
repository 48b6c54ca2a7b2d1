"""Several audits' ROC curves in one figure (linear and log-log panels), read from their ``scores.npz``:

    python scripts/roc_compare.py --out curves.png --title "seen, data seed 0" \
        --curve "external 234" runs/a/audit seen/amint --curve "aMINT-LR, K=8" runs/b/audit_k8 seen/amint_lr

Each ``--curve LABEL AUDIT_DIR PROTOCOL/METHOD`` is the protocol's evaluation rows (not its calibration share) and
their labels, exactly what the report's figures are computed on. Nothing is re-scored.
"""

import argparse
from pathlib import Path

from amint_dist.audit.plots import LabelledScores, plot_roc
from amint_dist.audit.report import SAMPLE_COLUMNS, read_protocol_scores


def evaluation_scores(label: str, audit_dir: str, column: str) -> LabelledScores:
    """The evaluation rows' (labels, scores) of ``column`` (PROTOCOL/METHOD); one line naming the curve when absent."""
    protocol, _, method = column.partition("/")
    try:
        columns = read_protocol_scores(audit_dir, protocol)
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"error: curve {label!r}: {e}") from None
    if method in ("", *SAMPLE_COLUMNS) or method not in columns:
        raise SystemExit(f"error: curve {label!r}: {Path(audit_dir) / 'scores.npz'} has no column {column}")
    return columns["label"].astype(bool), columns[method]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--curve", nargs=3, action="append", required=True, metavar=("LABEL", "AUDIT_DIR", "COLUMN"),
                        help="one curve: its legend label, an audit's output folder, PROTOCOL/METHOD (e.g. seen/amint)")
    parser.add_argument("--out", type=Path, required=True, help="the PNG written")
    parser.add_argument("--title", default="ROC")
    args = parser.parse_args()
    curves = {label: evaluation_scores(label, audit_dir, column) for label, audit_dir, column in args.curve}
    plot_roc(curves, args.out, title=args.title)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
