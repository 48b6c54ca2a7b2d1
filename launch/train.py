"""Train an auditable model: ``accelerate launch launch/train.py [hydra overrides]``."""

import hydra
from omegaconf import DictConfig

from amint_dist.cli import one_line_errors, to_dict
from amint_dist.train.loop import train


@hydra.main(config_path="../configs", config_name="train", version_base="1.3")
@one_line_errors
def main(cfg: DictConfig) -> None:
    run_dir = train(to_dict(cfg))
    print(f"run finished: {run_dir}")


if __name__ == "__main__":
    main()
