"""The null protocol over many halvings: ``python scripts/null_halvings.py RUN/audit [--seeds 20]``.

The audit's ``null`` protocol scores one key-hash halving of heldout (``audit.seed``): both halves are unseen,
so its AUC is ~0.5 up to chance, and one halving's interval can miss 0.5 by chance alone. This re-halves the
same heldout scores (``scores.npz``: the seen protocol's heldout rows, evaluation and calibration) with the
audit's own rule for seeds 0..N-1 and prints each method's AUC spread: a leak shows as a mean away from 0.5,
chance as a spread around it. Nothing is re-scored.
"""

import argparse
from pathlib import Path

import numpy as np
from sklearn.metrics import roc_auc_score

from amint_dist.audit.protocols import NONMEMBER_SPLIT, key_units
from amint_dist.audit.report import SAMPLE_COLUMNS, read_protocol_scores


def heldout_scores(audit_dir: Path) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Keys and per-method scores of every heldout sample the seen protocol scored."""
    parts = [read_protocol_scores(audit_dir, "seen", calibration) for calibration in (False, True)]
    rows = [part["split"] == NONMEMBER_SPLIT for part in parts]
    methods = [c for c in parts[0] if c not in SAMPLE_COLUMNS]
    return (np.concatenate([part["key"][r] for part, r in zip(parts, rows)]),
            {m: np.concatenate([part[m][r] for part, r in zip(parts, rows)]) for m in methods})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("audit_dir", type=Path, help="an audit's output folder (holding scores.npz)")
    parser.add_argument("--seeds", type=int, default=20, help="halvings: the audit's rule with seeds 0..N-1")
    args = parser.parse_args()
    keys, scores = heldout_scores(args.audit_dir)
    halves = [key_units(seed, "null-half", keys) < 0.5 for seed in range(args.seeds)]
    print(f"{keys.size} heldout samples, {args.seeds} halvings")
    for method, s in scores.items():
        aucs = np.array([roc_auc_score(h, s) for h in halves])
        print(f"{method:18s} null AUC mean {aucs.mean():.3f}  sd {aucs.std():.3f}  range [{aucs.min():.3f}, "
              f"{aucs.max():.3f}]  seed 0 {aucs[0]:.3f}")


if __name__ == "__main__":
    main()
