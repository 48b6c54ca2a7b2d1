"""Shared glue for the thin ``launch/`` entry points: config to dict, one-line errors."""

from __future__ import annotations

import functools
import logging
import sys
from collections.abc import Callable
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue

USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, KeyError, MissingMandatoryValue)


def to_dict(cfg: DictConfig) -> dict[str, Any]:
    """Resolve a Hydra config into plain containers; missing mandatory values fail with their key."""
    return OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)


def one_line_errors(main: Callable[[DictConfig], Any]) -> Callable[[DictConfig], Any]:
    """Report a user error (bad path, config or data) as one ``error:`` line and exit 2."""

    @functools.wraps(main)
    def wrapper(cfg: DictConfig) -> Any:
        try:
            return main(cfg)
        except USER_ERRORS as e:
            message = e.args[0] if isinstance(e, KeyError) and e.args else e
            logging.getLogger("amint_dist").debug("user error", exc_info=True)
            print(f"error: {message}", file=sys.stderr)
            sys.exit(2)

    return wrapper
