"""Export a run's verified backbone as a plain timm model file: ``python launch/export.py run.dir=RUN
[export.out=PATH] [export.weights=model|ema] [export.public_key=PEM]``; prints the timm line that loads it."""

from pathlib import Path

from amint_dist.cli import run_cli
from amint_dist.config import help_lines
from amint_dist.export import ExportConfig, export_run


def main(cfg: dict) -> None:
    out, line = export_run(cfg)
    print(f"exported: {out} (timm.create_model arguments in {out.with_suffix('.json')})")
    print(line)


if __name__ == "__main__":
    run_cli(str(Path(__file__).resolve().parents[1] / "configs"), "export", main, fields=help_lines(ExportConfig))
