"""The Python API, for your own training loop (docs/api.md): build an auditable timm model, read a prepared
dataset root, train with the aMINT loss, record exposure, save what the audit reads, audit it.

It sits at the top of the layers, beside ``launch/``: everything here is the package's own parts, named for
a user (``AuditableModel``, ``ExposureLedger``, ``AMintLoss`` are the classes training and the audit use).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from amint_dist.audit.config import CONV_HEAD
from amint_dist.audit.run import run_audit
from amint_dist.data.pipeline import ShardedSplitStream, SplitShards, make_loader
from amint_dist.data.prepare import load_manifest
from amint_dist.data.transforms import data_config_for, make_transform
from amint_dist.io import read_json
from amint_dist.models import AuditableModel, MintConfig, ModelConfig, build_auditable_model
from amint_dist.records.ledger import ExposureLedger
from amint_dist.train.artifacts import write_model
from amint_dist.train.losses import AMintLoss

__all__ = ["AMintLoss", "AuditableModel", "ExposureLedger", "audit", "build_auditable", "exposure_ledger",
           "save_for_audit", "split_batches"]


def build_auditable(name: str, num_classes: int, *, img_size: int = 224, in_chans: int = 3,
                    taps: str | Sequence[int] = "middle", head: Mapping[str, Any] | None = None,
                    mode: str = "active", transform: Mapping[str, Any] | None = None,
                    **timm_kwargs: Any) -> AuditableModel:
    """A timm classifier (never pretrained) with a MINT head on ``taps`` (entry | middle | output, or
    ``forward_intermediates`` indices); ``head`` as ``mint.head`` (default: the paper's conv head), ``mode``
    active | passive | off, ``transform`` timm data-config overrides of its eval transform (what
    :func:`split_batches` and the audit read images with). Checked like the config files (one-line errors)."""
    model_cfg = ModelConfig.from_dict({"name": name, "num_classes": num_classes, "img_size": img_size,
                                       "in_chans": in_chans, "kwargs": timm_kwargs})
    mint_cfg = MintConfig.from_dict({"mode": mode, "taps": taps if isinstance(taps, str) else list(taps),
                                     "head": dict(head) if head else CONV_HEAD.record()})
    model = build_auditable_model(model_cfg, mint_cfg)
    model.record["data_config"] = data_config_for(model.backbone, img_size, in_chans, transform)
    model.check_forward(model.record["data_config"]["input_size"])
    return model


def exposure_ledger(root: str | Path) -> ExposureLedger:
    """An empty ledger sized for every split of a prepared dataset root."""
    manifest = load_manifest(Path(root))
    return ExposureLedger({split: int(meta["num_samples"]) for split, meta in manifest["splits"].items()})


def split_batches(root: str | Path, split: str, model: AuditableModel, batch_size: int, *, epoch: int = 0,
                  shuffle: bool = True, seed: int = 0) -> Iterator[dict[str, Any]]:
    """One epoch of ``split`` in batches ``{image, label, index, key}`` (valid rows only), read with the model's
    eval transform; the order is a pure function of (seed, epoch) (the training reader's)."""
    data_config = model.record["data_config"]
    stream = ShardedSplitStream(SplitShards.from_root(Path(root), split), make_transform(data_config, None),
                                tuple(data_config["input_size"]), batch_size, workers=0, seed=seed, shuffle=shuffle)
    stream.set_epoch(epoch)
    for batch in make_loader(stream):
        valid = batch["valid"]
        if valid.any():
            yield {"image": batch["image"][valid], "label": batch["label"][valid], "index": batch["index"][valid],
                   "key": [k for k, v in zip(batch["key"], valid.tolist()) if v]}


def save_for_audit(model: AuditableModel, directory: str | Path, root: str | Path,
                   ledger: ExposureLedger | None = None) -> Path:
    """Write ``model.safetensors``, ``model_config.json`` and ``ledger.npz`` (when given) into ``directory``:
    what :func:`audit` and ``launch/audit.py run.dir=DIRECTORY`` read. Returns ``directory``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    record = model.record
    write_model(directory, model.state_dict(), record, model.taps, record["data_config"], root,
                load_manifest(Path(root)))
    if ledger is not None:
        ledger.save(directory / "ledger.npz")
    return directory


def audit(run_dir: str | Path | None = None, *, data_root: str | Path | None = None,
          out_dir: str | Path | None = None, model_name: str | None = None, model_file: str | Path | None = None,
          **settings: Any) -> dict[str, Any]:
    """Audit a run dir (or a dir from :func:`save_for_audit`), or a model file by timm name (``model_name``,
    ``model_file``, ``data_root`` and ``out_dir``; further ``audit.model.*`` keys in ``settings["model"]``);
    ``settings``: any other ``audit.*`` key (``n_boot=200``, ``passive={"epochs": 2}``). Returns report.json."""
    model = dict(settings.pop("model", {}))
    if model_file is not None:
        model.update(name=model_name, file=str(model_file))
    cfg = {"run": {"dir": None if run_dir is None else str(run_dir)},
           "data": {"root": None if data_root is None else str(data_root)},
           "audit": {**settings, "out_dir": None if out_dir is None else str(out_dir), "model": model}}
    return read_json(run_audit(cfg).with_name("report.json"), what="audit report")
