"""The timm backbone: its ``timm.create_model`` arguments, a random build, and one-line errors for what fails."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TypeVar

import timm
from torch import nn

SET_BY_US = {"pretrained", "pretrained_cfg_overlay", "checkpoint_path", "num_classes", "in_chans", "img_size"}
T = TypeVar("T")
LINE_MAX = 300  # characters of an error's line kept (torch lists every missing tensor on one line)


def first_line(e: BaseException) -> str:
    """An exception's first line; a heading that ends in ':' (torch's load_state_dict errors) with the line after."""
    lines = [line.strip() for line in str(e).strip().splitlines() if line.strip()]
    if not lines:
        return ""
    line = f"{lines[0]} {lines[1]}" if lines[0].endswith(":") and len(lines) > 1 else lines[0]
    return line if len(line) <= LINE_MAX else line[:LINE_MAX] + "..."


def config_error(where: str, what: str, call: Callable[[], T]) -> T:
    """``call()``; whatever it raises (timm's assertions, torch's shape errors) becomes one ValueError naming
    the config keys ``where`` and the error's first line."""
    try:
        return call()
    except Exception as e:
        raise ValueError(f"{where}: {what}: {type(e).__name__}: {first_line(e)}") from e


def timm_kwargs(name: str, num_classes: int, img_size: int, in_chans: int = 3, kwargs: Mapping | None = None) -> dict:
    """``timm.create_model`` keyword arguments of a backbone: ``img_size`` only for fixed-input-size models (ViTs)."""
    if not timm.is_model(name):
        raise ValueError(f"model.name: unknown timm model {name!r}")
    kwargs = dict(kwargs or {})
    clash = sorted(SET_BY_US & set(kwargs))
    if clash:
        raise ValueError(f"model.kwargs: {', '.join(clash)} not allowed here (set at model level or fixed)")
    pretrained_cfg = timm.models.get_pretrained_cfg(name)
    if pretrained_cfg is not None and pretrained_cfg.fixed_input_size:
        kwargs["img_size"] = img_size
    return {"num_classes": num_classes, "in_chans": in_chans, **kwargs}


def create_backbone(name: str, num_classes: int, img_size: int, in_chans: int = 3,
                    kwargs: Mapping | None = None) -> nn.Module:
    """timm classifier, randomly initialised (``models.init_weights`` gives it starting weights)."""
    create_kwargs = timm_kwargs(name, num_classes, img_size, in_chans, kwargs)
    where = f"model.name={name!r}, model.kwargs={dict(kwargs or {})}"
    return config_error(where, "timm cannot build it", lambda: timm.create_model(
        name, pretrained=False, **create_kwargs))
