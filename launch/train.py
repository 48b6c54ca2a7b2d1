"""Train an auditable model: ``accelerate launch launch/train.py [hydra overrides]``."""

import hydra
from accelerate import PartialState
from hydra import compose
from omegaconf import DictConfig

from amint_dist.audit.run import run_audit
from amint_dist.cli import one_line_errors, to_dict
from amint_dist.train.loop import train


@hydra.main(config_path="../configs", config_name="train", version_base="1.3")
@one_line_errors
def main(cfg: DictConfig) -> None:
    run_dir = train(to_dict(cfg))
    print(f"run finished: {run_dir}")
    if cfg.audit:  # configs/audit.yaml defaults, on this run and the dataset root it was trained on
        audit_cfg = compose("audit")
        audit_cfg.run.dir = str(run_dir)
        report = run_audit(to_dict(audit_cfg))
        if PartialState().is_main_process:
            print(f"audit report: {report}")


if __name__ == "__main__":
    main()
