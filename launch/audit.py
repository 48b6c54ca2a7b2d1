"""Audit a trained model: ``python launch/audit.py run.dir=RUN [data.root=ROOT] [audit.*=...]``."""

import hydra
from accelerate import PartialState
from omegaconf import DictConfig

from amint_dist.audit.run import run_audit
from amint_dist.cli import one_line_errors, to_dict


@hydra.main(config_path="../configs", config_name="audit", version_base="1.3")
@one_line_errors
def main(cfg: DictConfig) -> None:
    report = run_audit(to_dict(cfg))
    if PartialState().is_main_process:
        print(f"audit report: {report}")


if __name__ == "__main__":
    main()
