"""The tuning table of a sweep whose runs were scored on the validation share:
``python launch/tune.py SWEEP_DIR [--max-task-drop 0.01]`` -> SWEEP_DIR/tuning.md and tuning.json.

Make the sweep first, every run scored on validation only (the audit is not needed to choose):
``python launch/train.py -m run.dir=SWEEP_DIR run.audit=false run.validate=true mint.mode=off,active train.seed=0,1 ...``
Runs that differ only in ``train.seed`` are one point of the table, scored by their means.
"""

import argparse

from amint_dist.audit.pareto import render, tuning_table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sweep", help="a directory holding the sweep's runs (searched recursively)")
    parser.add_argument("--max-task-drop", type=float, default=0.01,
                        help="task accuracy an aMINT run may lose against the sweep's best mint.mode=off run")
    args = parser.parse_args()
    try:
        print(render(tuning_table(args.sweep, args.max_task_drop)), end="")
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
    main()
