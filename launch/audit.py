"""Audit a trained model: ``python launch/audit.py run.dir=RUN [data.root=ROOT] [audit.*=...]``
(or ``accelerate launch launch/audit.py ...``: every rank scores its own shards, rank 0 writes)."""

from pathlib import Path

from accelerate import PartialState

from amint_dist.audit.run import run_audit
from amint_dist.audit.config import AuditConfig
from amint_dist.cli import run_cli
from amint_dist.config import help_lines


def main(cfg: dict) -> None:
    report = run_audit(cfg)
    if PartialState().is_main_process:
        print(f"audit report: {report}")


if __name__ == "__main__":
    run_cli(str(Path(__file__).resolve().parents[1] / "configs"), "audit", main, fields=help_lines(AuditConfig))
