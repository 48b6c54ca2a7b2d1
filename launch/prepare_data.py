"""Prepare a dataset root: ``python launch/prepare_data.py data=<source> [data.*=...]``."""

import hydra
from omegaconf import DictConfig

from amint_dist.cli import one_line_errors, to_dict
from amint_dist.data.prepare import prepare_dataset


@hydra.main(config_path="../configs", config_name="prepare_data", version_base="1.3")
@one_line_errors
def main(cfg: DictConfig) -> None:
    manifest = prepare_dataset(to_dict(cfg.data))
    print(f"dataset root {cfg.data.root}: {manifest['total']} samples {manifest['counts']}, "
          f"{manifest['num_skipped']} skipped")


if __name__ == "__main__":
    main()
