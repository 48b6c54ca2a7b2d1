"""Score a trained run on the validation share (what tuning compares runs by; the audit never reads it):
``python launch/validate.py run.dir=RUN [data.root=ROOT] [audit.batch_size=...]`` -> ``RUN/validation.json``."""

from pathlib import Path

from accelerate import PartialState

from amint_dist.audit.config import AuditConfig
from amint_dist.audit.validation import run_validation
from amint_dist.cli import run_cli
from amint_dist.config import help_lines


def main(cfg: dict) -> None:
    figures = run_validation(cfg)
    if PartialState().is_main_process:
        print(f"validation figures: {figures}")


if __name__ == "__main__":
    run_cli(str(Path(__file__).resolve().parents[1] / "configs"), "audit", main, fields=help_lines(AuditConfig))
