"""Prepare a dataset root: ``python launch/prepare_data.py data=<source> [data.*=...]``."""

from pathlib import Path

from amint_dist.cli import run_cli
from amint_dist.config import help_lines
from amint_dist.data.config import DataConfig
from amint_dist.data.prepare import prepare_dataset


def main(cfg: dict) -> None:
    manifest = prepare_dataset(cfg["data"])
    print(f"dataset root {cfg['data']['root']}: {manifest['total']} samples {manifest['counts']}, "
          f"{manifest['num_skipped']} skipped")


if __name__ == "__main__":
    run_cli(str(Path(__file__).resolve().parents[1] / "configs"), "prepare_data", main,
            fields=help_lines(DataConfig))
