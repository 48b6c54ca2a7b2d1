"""Where a backbone's starting weights come from: random (the default), pretrained weights through timm's own
loader (``model.pretrained``), or a whole timm model's weights loaded strictly (``model.checkpoint``).

Only local files are read, never downloaded: ``model.pretrained_file``, else timm's own file for the model when
the local Hugging Face cache already holds it. timm reads them: safetensors, or torch files with
``weights_only=True`` (no pickled code runs). timm's pretrained loader adapts the file to the model (classifier
re-initialised when the file's class count differs from ``num_classes``, input conv to ``in_chans``, position
embeddings resampled to ``img_size``); any other tensor the model has and the file lacks, or the reverse, is
refused (timm would leave it random and only log it). :func:`init_record` names the file and its sha256, which
training records; the audit and resume load the run's own weights into ``ModelConfig.architecture()`` and never
read this file.
"""

from __future__ import annotations

from pathlib import Path

import huggingface_hub
import timm
from torch import Tensor, nn

from amint_dist.io import sha256_file

from .backbone import config_error, create_backbone, timm_kwargs
from .config import ModelConfig

KEYS_SHOWN = 4  # names listed in a missing/unexpected tensors error


def init_record(cfg: ModelConfig) -> dict:
    """What the backbone starts from: ``{"from": "random"}``, or ``{"from": "pretrained" | "checkpoint", "file":
    absolute path, "sha256": of its bytes}`` (the file must exist)."""
    source = _source(cfg)
    if source is None:
        return {"from": "random"}
    kind, path = source
    return {"from": kind, "file": str(path.resolve()), "sha256": sha256_file(path)}


def build_backbone(cfg: ModelConfig) -> nn.Module:
    """``cfg``'s timm backbone with its starting weights (``cfg.num_classes`` resolved)."""
    args = (cfg.name, cfg.num_classes, cfg.img_size, cfg.in_chans, cfg.kwargs)
    source = _source(cfg)
    if source is None:
        return create_backbone(*args)
    kind, path = source
    key = f"model.{'pretrained_file' if kind == 'pretrained' else 'checkpoint'}={path}"
    if kind == "checkpoint":
        backbone = create_backbone(*args)
        config_error(key, f"not the weights of this {cfg.name} (strict load; a run's model.safetensors needs "
                          "launch/export.py first)",
                     lambda: timm.models.load_checkpoint(backbone, str(path), strict=True, weights_only=True))
        return backbone
    state = config_error(key, "timm cannot read it (safetensors, or a torch file of tensors only)",
                         lambda: timm.models.load_state_dict(str(path), weights_only=True))
    return _pretrained(cfg, state, key)


def pretrained_file(cfg: ModelConfig) -> Path:
    """The local file ``model.pretrained`` loads: ``model.pretrained_file``, else timm's cached one."""
    if cfg.pretrained_file is not None:
        return _existing(cfg, "pretrained_file")
    cached = _cached_timm_file(cfg.name)
    if cached is None:
        raise FileNotFoundError(
            f"model.pretrained=true: no model.pretrained_file given and timm's weights for {cfg.name!r} are not in "
            f"the local Hugging Face cache ({huggingface_hub.constants.HF_HUB_CACHE}); nothing is downloaded here: "
            "pass model.pretrained_file=PATH")
    return cached


def _source(cfg: ModelConfig) -> tuple[str, Path] | None:
    if cfg.checkpoint is not None:
        return "checkpoint", _existing(cfg, "checkpoint")
    if cfg.pretrained:
        return "pretrained", pretrained_file(cfg)
    return None


def _existing(cfg: ModelConfig, field: str) -> Path:
    path = Path(getattr(cfg, field))
    if not path.is_file():
        raise FileNotFoundError(f"{cfg.key(field)}: no such file")
    return path


def _cached_timm_file(name: str) -> Path | None:
    """timm's Hugging Face hub file for ``name`` when the local cache holds it (timm's order of file names)."""
    timm_cfg = timm.models.get_pretrained_cfg(name)
    if timm_cfg is None or not timm_cfg.hf_hub_id:
        return None
    names = [timm_cfg.hf_hub_filename] if timm_cfg.hf_hub_filename else ["model.safetensors", "pytorch_model.bin"]
    for filename in names:
        found = huggingface_hub.try_to_load_from_cache(timm_cfg.hf_hub_id, filename)
        if isinstance(found, str):
            return Path(found)
    return None


def _pretrained(cfg: ModelConfig, state: dict[str, Tensor], key: str) -> nn.Module:
    """timm.create_model(pretrained=True) on ``state``, told the file's own class count (so that timm keeps the
    classifier when it fits and re-initialises it otherwise); then every other tensor must have come from it."""
    timm_cfg = timm.models.get_pretrained_cfg(cfg.name)
    classifiers = (timm_cfg.classifier if timm_cfg else None) or ()
    classifiers = (classifiers,) if isinstance(classifiers, str) else tuple(classifiers)
    head = {f"{c}.{p}" for c in classifiers for p in ("weight", "bias")}
    file_classes = next((state[f"{c}.weight"].shape[0] for c in classifiers if f"{c}.weight" in state), 0)
    in_file = set(state)  # before timm filters the dict (it may pop the classifier from it)
    overlay = {"state_dict": state, "num_classes": file_classes}
    kwargs = timm_kwargs(cfg.name, cfg.num_classes, cfg.img_size, cfg.in_chans, cfg.kwargs)
    backbone = config_error(key, f"does not load into model.name={cfg.name!r}", lambda: timm.create_model(
        cfg.name, pretrained=True, pretrained_cfg_overlay=overlay, **kwargs))
    in_model = set(backbone.state_dict())
    fresh = head if file_classes != cfg.num_classes else set()
    missing, unexpected = sorted(in_model - in_file - fresh), sorted(in_file - in_model - head)
    if missing or unexpected:
        raise ValueError(f"{key}: not weights of model.name={cfg.name!r}: "
                         f"{_listed('missing', missing)}{'; ' if missing and unexpected else ''}"
                         f"{_listed('unexpected', unexpected)}")
    return backbone


def _listed(what: str, names: list[str]) -> str:
    if not names:
        return ""
    more = f" and {len(names) - KEYS_SHOWN} more" if len(names) > KEYS_SHOWN else ""
    return f"{len(names)} {what} tensor(s) ({', '.join(names[:KEYS_SHOWN])}{more})"
