"""Shared glue for the thin ``launch/`` entry points: compose the config, run, one-line errors."""

from __future__ import annotations

import functools
import logging
import re
import sys
from collections.abc import Callable
from typing import Any

from hydra import compose, initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException

USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, KeyError, MissingMandatoryValue)
OPEN_MAPPING = "model.kwargs"  # timm arguments: the one place overrides may add keys (the model build checks them)


class OverrideError(ValueError):
    """A command-line override that would have no effect, or would add a key the config does not have."""


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
    user error (bad override, unknown key, bad path or data) is one ``error:`` line and exit code 2. Overrides
    that would do nothing or add keys are refused (:func:`_compose_checked`).
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
            cfg = _compose_checked(config_name, overrides)
        return one_line_errors(main)(to_dict(cfg))
    except (HydraException, OmegaConfBaseException, OverrideError) as e:
        print(f"error: {_one_line(e)}", file=sys.stderr)
        sys.exit(2)


def _compose_checked(config_name: str, overrides: list[str]) -> DictConfig:
    """``compose(config_name, overrides)`` (inside ``initialize_config_dir``), refusing overrides that would be
    silently ignored or stored unused: any ``hydra.*`` / ``hydra/...`` (no job runner here), and ``+``/``++``
    additions, except timm arguments under ``model.kwargs`` where the config has it (``++KEY=V`` of an existing
    KEY is an ordinary override). Every group is in the entry points' defaults lists: none is appended."""
    parsed = OverridesParser.create().parse_overrides(overrides)
    for o in parsed:
        if re.split(r"[./]", o.key_or_group)[0] == "hydra":
            raise OverrideError(f"{o.input_line}: Hydra's own settings have no effect: the entry points compose "
                                "their config without Hydra's job runner (no output dir, logging or launcher); "
                                "where a run or a dataset goes is run.dir=PATH or data.root=PATH")
    adds = [o.is_add() or o.is_force_add() for o in parsed]
    if any(adds):
        base = compose(config_name, overrides=[o.input_line for o, add in zip(parsed, adds) if not add])
        for o in (o for o, add in zip(parsed, adds) if add):
            key = o.key_or_group
            opened = key.startswith(f"{OPEN_MAPPING}.") and OmegaConf.select(base, OPEN_MAPPING) is not None
            if not opened and (o.is_add() or not _has(base, key)):
                raise OverrideError(f"{o.input_line}: adds {key}, refused: the {config_name} config takes changes to "
                                    f"the keys and groups it has (KEY=VALUE); new keys only as timm arguments "
                                    f"under {OPEN_MAPPING}")
    return compose(config_name, overrides=overrides)


def _has(cfg: DictConfig, key: str) -> bool:
    """Whether the dotted ``key`` is in ``cfg`` (a mandatory ``???`` value counts)."""
    parent, _, last = key.rpartition(".")
    node = OmegaConf.select(cfg, parent) if parent else cfg
    return isinstance(node, DictConfig) and last in node.keys()


def _one_line(e: BaseException) -> str:
    """First line of an exception and of its cause (Hydra nests the useful part)."""
    parts = [str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__]
    if e.__cause__ is not None and str(e.__cause__).strip():
        parts.append(str(e.__cause__).strip().splitlines()[0])
    return ": ".join(parts)
