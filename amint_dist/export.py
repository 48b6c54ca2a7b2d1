"""Export a run's audited backbone as a plain timm model file (``python launch/export.py run.dir=RUN``).

``RUN/model.safetensors`` holds the whole AuditableModel: its tensors are named ``backbone.*`` and
``mint_head.*``, so timm's loaders, given that file, find none of their own. The export first verifies the run
as the audit does (``records.run_model``: weights against model_config.json, the run against its audit trail,
model_config.json against config.yaml), and refuses a trail that is broken (with or without a key) or that does
not verify with the key given; then it writes the backbone's tensors without their prefix as safetensors, after
loading them strictly into the timm model model_config.json describes, and beside them a JSON with
``timm.create_model``'s arguments, the file's and the source weights' sha256 and the trail's verdict.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import safetensors.torch

from amint_dist import __version__
from amint_dist.config import Config, option
from amint_dist.io import atomic_write_bytes, atomic_write_json, sha256_file
from amint_dist.models import ModelConfig
from amint_dist.models.backbone import config_error, create_backbone, timm_kwargs
from amint_dist.records.run_model import read_run_configs, required, run_weights, verify_run_model
from amint_dist.records.signing import Verifier
from amint_dist.records.trail import TrailError

EXPORT_FORMAT = "amint-dist-export/1"
PREFIX = "backbone."
@dataclass
class ExportConfig(Config):
    section = "export"

    out: str | None = option(None, help="the exported weights (.safetensors), a .json beside them; default "
                                        "RUN/export/backbone.safetensors (backbone_ema.safetensors for ema)")
    weights: Literal["model", "ema"] = option("model", help="model (the final weights) | ema (the run's "
                                                             "exponential moving average, RUN/model_ema.safetensors)")
    public_key: str | None = option(None, help="the owner's Ed25519 public key (PEM): a trail that does not verify "
                                               "with it is refused")

    def __post_init__(self) -> None:
        if self.out is not None and not self.out.endswith(".safetensors"):
            raise self.error("out", "must end in .safetensors (timm chooses its reader by the file's extension)")


def export_run(cfg: Mapping[str, Any]) -> tuple[Path, str]:
    """Export ``cfg.run.dir``'s verified backbone; return the exported file and the timm line that loads it."""
    run_dir = (cfg.get("run") or {}).get("dir")
    if not run_dir:
        raise ValueError("run.dir is required: the training run dir to export")
    ecfg = ExportConfig.from_dict(cfg["export"])
    run_dir = Path(run_dir)
    model_config, run_config = read_run_configs(run_dir)
    source, integrity = _verified_source(run_dir, model_config, run_config, ecfg)
    model = ModelConfig.from_dict(model_config["model"])
    tensors = safetensors.torch.load_file(source)
    backbone = {k.removeprefix(PREFIX): v.contiguous() for k, v in tensors.items() if k.startswith(PREFIX)}
    config_error(f"{source}", "is not the backbone model_config.json describes", lambda: create_backbone(
        model.name, model.num_classes, model.img_size, model.in_chans, model.kwargs).load_state_dict(backbone))
    out = Path(ecfg.out or run_dir / "export" / f"backbone{'_ema' if ecfg.weights == 'ema' else ''}.safetensors")
    atomic_write_bytes(out, safetensors.torch.save(backbone, metadata={"format": "pt"}))
    create = _create_model_args(model, out.resolve())
    atomic_write_json(out.with_suffix(".json"), {
        "format": EXPORT_FORMAT,
        "tool_version": __version__,
        "sha256": sha256_file(out),
        "create_model": create,
        "data_config": model_config.get("data_config"),
        "source": {"run_dir": str(run_dir.resolve()), "weights": source.name, "weights_sha256": sha256_file(source),
                   "integrity": integrity["status"], "init": model_config.get("init")},
    })
    return out, timm_line(create)


def timm_line(create: Mapping[str, Any]) -> str:
    """The one-line shell command that builds the exported model with timm."""
    args = ", ".join(f"{k}={_literal(v)}" for k, v in create.items() if k != "model_name")
    return f"python -c \"import timm; model = timm.create_model({create['model_name']!r}, {args})\""


def _create_model_args(model: ModelConfig, out: Path) -> dict[str, Any]:
    """``timm.create_model`` arguments loading ``out`` through timm's pretrained loader: the overlay names the file,
    its own class count and input size (so timm keeps its classifier and input conv as they are) and turns off the
    model's custom loader (some timm ViTs would read the file as a JAX .npz)."""
    kwargs = timm_kwargs(model.name, model.num_classes, model.img_size, model.in_chans, model.kwargs)
    overlay = {"file": str(out), "custom_load": False, "num_classes": model.num_classes,
               "input_size": [model.in_chans, model.img_size, model.img_size]}
    return {"model_name": model.name, "pretrained": True, "pretrained_cfg_overlay": overlay, **kwargs}


def _literal(value: Any) -> str:
    """A Python literal of a JSON value (dicts as dict(...), lists as tuples: timm's input_size)."""
    if isinstance(value, Mapping):
        return "dict(" + ", ".join(f"{k}={_literal(v)}" for k, v in value.items()) + ")"
    if isinstance(value, list):
        return "(" + ", ".join(map(_literal, value)) + ("," if len(value) == 1 else "") + ")"
    return repr(value)


def _verified_source(run_dir: Path, model_config: dict, run_config: dict | None,
                     ecfg: ExportConfig) -> tuple[Path, dict]:
    """The weights file to export, verified (see the module docstring), and the trail's verdict."""
    weights = required(run_dir / "model.safetensors", "model weights")
    verifier = Verifier.from_env(ecfg.public_key)
    splits_sha256 = (model_config.get("dataset") or {}).get("splits_sha256", "")
    integrity = verify_run_model(run_dir, model_config, run_config, splits_sha256, verifier, sha256_file(weights),
                                 purpose="export")
    if integrity["status"] == "broken":
        raise TrailError(f"refusing to export {run_dir}: its audit trail is broken: {integrity['problems'][0]}")
    return run_weights(run_dir, model_config, ecfg.weights, "export.weights"), integrity
