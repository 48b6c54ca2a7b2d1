"""Run inputs and outputs around the loop: the dataset root, final weights and model config."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path

import safetensors.torch
import torch
from accelerate import Accelerator
from timm.utils.model_ema import ModelEmaV3

from amint_dist import __version__
from amint_dist.data.config import DataConfig
from amint_dist.data.prepare import load_manifest, prepare_dataset
from amint_dist.io import atomic_write_bytes, atomic_write_json, sha256_file
from amint_dist.models.config import MintConfig, ModelConfig
from amint_dist.records.artifacts import EMA_WEIGHTS
from amint_dist.train.ema import ema_file_bytes

MODEL_FORMAT = "amint-dist-model/1"


def ensure_dataset(data_cfg: DataConfig, accelerator: Accelerator) -> dict:
    """Load the dataset root's manifest; prepare the embedded digits there first when missing."""
    root = Path(data_cfg.root)
    with accelerator.main_process_first():
        if not (root / "splits.json").exists():
            if data_cfg.kind != "digits":
                raise FileNotFoundError(
                    f"dataset root not prepared: {root} (run python launch/prepare_data.py data={data_cfg.kind} "
                    f"data.source=... data.root={root})")
            if accelerator.is_main_process:
                prepare_dataset(data_cfg)
    return load_manifest(root)


def save_final_model(accelerator: Accelerator, model, run_dir: Path, model_cfg: ModelConfig, mint_cfg: MintConfig,
                     data_config: Mapping, data_root: str, manifest: Mapping, init: Mapping | None,
                     ema: ModelEmaV3 | None = None) -> None:
    """Write ``model.safetensors`` (consolidated from every rank, e.g. ZeRO-3), with ``ema`` the EMA weights as
    ``model_ema.safetensors`` (the same keys), and ``model_config.json`` recording their sha256 and rank 0's
    ``init`` (what the weights started from, ``models.init_weights.init_record``)."""
    state_dict = accelerator.get_state_dict(model)  # a collective: every rank calls it
    if not accelerator.is_main_process:
        return
    record = {"model": asdict(model_cfg), "init": dict(init or {}), "mint": mint_cfg.model_record()}
    ema_record = {}
    if ema is not None:
        atomic_write_bytes(run_dir / EMA_WEIGHTS, ema_file_bytes(ema, metadata={"format": MODEL_FORMAT}))
        ema_record = {"ema": {"decay": ema.decay, "warmup": ema.use_warmup},
                      "ema_weights_sha256": sha256_file(run_dir / EMA_WEIGHTS)}
    write_model(run_dir, state_dict, record, accelerator.unwrap_model(model).taps, data_config, data_root, manifest,
                ema_record)


def write_model(directory: Path, state_dict: Mapping[str, torch.Tensor], record: Mapping, taps: Sequence[int],
                data_config: Mapping, data_root: str | Path, manifest: Mapping, extra: Mapping | None = None) -> None:
    """``model.safetensors`` and ``model_config.json``: the model, init and mint ``record``, taps, eval data config,
    dataset identity, the weights' sha256 (what the audit rebuilds and checks the model from) and ``extra`` keys
    (the EMA weights' record)."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in state_dict.items()}
    atomic_write_bytes(directory / "model.safetensors",
                       safetensors.torch.save(tensors, metadata={"format": MODEL_FORMAT}))
    atomic_write_json(directory / "model_config.json", {
        "format": MODEL_FORMAT,
        "tool_version": __version__,
        "model": record["model"],
        "init": dict(record.get("init") or {}),
        "mint": record["mint"],
        "taps": list(taps),
        "data_config": {k: list(v) if isinstance(v, tuple) else v for k, v in data_config.items()},
        "dataset": {"root": str(Path(data_root).resolve()),
                    "splits_sha256": sha256_file(Path(data_root) / "splits.json"),
                    "num_classes": manifest["num_classes"]},
        "weights_sha256": sha256_file(directory / "model.safetensors"),
        **dict(extra or {}),
    })
