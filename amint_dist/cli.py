"""Shared glue for the thin ``launch/`` entry points: compose the config, run, one-line errors."""

from __future__ import annotations

import functools
import logging
import sys
from collections.abc import Callable
from typing import Any

from hydra import compose, initialize_config_dir
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException

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
            if isinstance(e, MissingMandatoryValue):  # omegaconf's message spans several lines
                message = f"missing mandatory value {e.full_key}: pass {e.full_key}=..."
            logging.getLogger("amint_dist").debug("user error", exc_info=True)
            print(f"error: {message}", file=sys.stderr)
            sys.exit(2)

    return wrapper


def run_cli(config_dir: str, config_name: str, main: Callable[[dict[str, Any]], Any], argv: list[str] | None = None) -> Any:
    """Compose ``config_name`` with command-line overrides (Hydra syntax) and call ``main(cfg_dict)``.

    Hydra's compose API instead of ``@hydra.main``: no per-rank output dirs or log files, and every
    user error (bad override, unknown key, bad path or data) is one ``error:`` line and exit code 2.
    """
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    overrides = sys.argv[1:] if argv is None else argv
    if {"-h", "--help"} & set(overrides):
        print(f"usage: {sys.argv[0]} [key=value ...]  (Hydra override syntax)\n\ndefault config ({config_name}):")
        with initialize_config_dir(config_dir=config_dir, version_base="1.3"):
            print(OmegaConf.to_yaml(compose(config_name)))
        return None
    try:
        with initialize_config_dir(config_dir=config_dir, version_base="1.3"):
            cfg = compose(config_name, overrides=overrides)
        return one_line_errors(main)(to_dict(cfg))
    except (HydraException, OmegaConfBaseException) as e:
        print(f"error: {_one_line(e)}", file=sys.stderr)
        sys.exit(2)


def _one_line(e: BaseException) -> str:
    """First line of an exception and of its cause (Hydra nests the useful part)."""
    parts = [str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__]
    if e.__cause__ is not None and str(e.__cause__).strip():
        parts.append(str(e.__cause__).strip().splitlines()[0])
    return ": ".join(parts)
