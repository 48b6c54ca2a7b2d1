"""The ``launch/`` entry points' command line: Hydra overrides and flags, one-line errors, sweeps, help.

Hydra's compose API behind a small argparse front instead of ``@hydra.main``: ``@hydra.main`` reports a bad
override or config group over several lines with exit code 1, before any code of ours runs, and its job runner
makes output dirs and log files per process (per rank under ``accelerate launch``). Here every user error is one
``error:`` line and exit code 2, nothing is written but the run's own files, and Hydra's flags are served from
Hydra's own parts: ``--info`` is Hydra's, ``-m`` expands sweeps with Hydra's basic sweeper and runs the jobs one
after the other in this process, ``--cfg job`` prints the composed config, ``--help`` lists the config groups
and prints the config files with their comments.
"""

from __future__ import annotations

import argparse
import functools
import logging
import os
import re
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, NoReturn

import yaml
from hydra import compose, initialize_config_dir
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException, MissingConfigException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException

from amint_dist.provenance import record_command

USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, KeyError, MissingMandatoryValue)
OPEN_MAPPINGS = ("model.kwargs", "audit.model.kwargs", "audit.model.transform", "data.augment")  # timm arguments:
# where overrides may add keys (the model build, timm's data config and create_transform check them)
INFO_CHOICES = ("all", "config", "defaults", "defaults-tree", "plugins", "searchpath")  # Hydra's --info
QUIET_LOGGERS = ("accelerate",)  # per-checkpoint "Saving current state ..." INFO lines: shown with -v only


class OverrideError(ValueError):
    """A command-line override or flag that would have no effect, or would add a key the config does not have."""


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
            message = _missing(e) if isinstance(e, MissingMandatoryValue) else \
                e.args[0] if isinstance(e, KeyError) and e.args else e
            logging.getLogger("amint_dist").debug("user error", exc_info=True)
            print(f"error: {message}", file=sys.stderr)
            sys.exit(2)

    return wrapper


def run_cli(config_dir: str, config_name: str, main: Callable[[dict[str, Any]], Any], argv: list[str] | None = None,
            sweep_dir_key: str | None = None, fields: Sequence[str] = ()) -> Any:
    """Parse flags and Hydra overrides, compose ``config_name`` and call ``main(cfg_dict)`` (or serve a flag).

    ``sweep_dir_key`` (``run.dir`` for training) is the output key each job of a ``-m`` sweep gets its own value
    of; without it ``-m`` is refused. ``fields``: ``key: meaning`` lines of the typed configs (``--help``).
    Returns what ``main`` returned (a list, one per job, under ``-m``).
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        args = _parser(config_name).parse_intermixed_args(_info_default(argv))
    except OverrideError as e:
        _fail(str(e))
    _configure_logging(args.verbose)
    args.flags = [a for a in argv if a not in args.overrides]
    record_command(config_name, args.overrides, args.flags)
    if args.help:
        print(help_text(config_dir, config_name, sweeps=sweep_dir_key is not None, fields=fields))
        return None
    try:
        if args.multirun:
            return _multirun(config_dir, config_name, args, main, sweep_dir_key)
        with initialize_config_dir(config_dir=config_dir, version_base="1.3"):
            cfg = _compose_checked(config_name, args.overrides)
            if args.info:
                logging.getLogger().handlers.clear()  # show_info sets up its own stdout handler
                GlobalHydra.instance().hydra.show_info(args.info, config_name, args.overrides)
                return None
        if args.cfg:
            print(OmegaConf.to_yaml(cfg, resolve=True), end="")
            return None
        return one_line_errors(main)(to_dict(cfg))
    except (HydraException, OmegaConfBaseException, OverrideError) as e:
        _fail(_one_line(e))


def _info_default(argv: list[str]) -> list[str]:
    """``--info`` followed by an override (not one of Hydra's info words) means ``--info all``."""
    return [f"{a}=all" if a == "--info" and (i + 1 == len(argv) or argv[i + 1] not in INFO_CHOICES) else a
            for i, a in enumerate(argv)]


def _fail(message: str) -> NoReturn:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # argparse prints usage and exits; here one error line, exit 2
        raise OverrideError(f"{message} (see --help)")


def _parser(config_name: str) -> argparse.ArgumentParser:
    parser = _Parser(add_help=False, allow_abbrev=False, prog=Path(sys.argv[0]).name or config_name)
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    parser.add_argument("-h", "--help", action="store_true")
    parser.add_argument("--cfg", choices=["job"])
    parser.add_argument("--resolve", action="store_true")  # accepted as Hydra's: --cfg job always resolves
    parser.add_argument("--info", nargs="?", const="all", choices=INFO_CHOICES)
    parser.add_argument("-m", "--multirun", action="store_true")
    parser.add_argument("-v", "--verbose", action="store_true")
    return parser


FLAGS = """flags:
  -h, --help        this text
  --cfg job         print the composed config (overrides applied, resolved) and exit
  --info [WHAT]     Hydra's information: all (default), config, defaults, defaults-tree, plugins, searchpath
{multirun}
  -v, --verbose     also Accelerate's INFO lines (per-checkpoint "Saving current state ...") and debug details

Overrides use Hydra's syntax: key=value changes a value, group=option picks a file of a config group
(experiment=vit_b16_imagenet), ++key=value forces an existing key, +model.kwargs.NAME=VALUE (or
+data.augment.NAME=VALUE) adds a timm argument. Other added keys and hydra.* settings are refused: they would have no effect."""
MULTIRUN = """  -m, --multirun    a sweep: every combination of comma-separated values (train.epochs=1,2 mint.weight=1,3)
                    runs one after the other in this process, each in its own run dir (see docs/training.md);
                    not under a multi-process launcher (WORLD_SIZE>1: every rank would run the whole sweep)"""
NO_MULTIRUN = "  -m, --multirun    refused here: sweeps are for training runs (launch/train.py)"


def help_text(config_dir: str, config_name: str, sweeps: bool = False, fields: Sequence[str] = ()) -> str:
    """Usage, flags, every config group of ``config_name``'s defaults list with its options (each with the first
    line of its comments), every typed field with its meaning, then the default config's files as written."""
    root = Path(config_dir)
    primary = root / f"{config_name}.yaml"
    defaults = [d for d in (yaml.safe_load(primary.read_text()) or {}).get("defaults", []) if isinstance(d, dict)]
    lines = [f"usage: {Path(sys.argv[0]).name or config_name} [-h] [--cfg job] [--info [WHAT]] [-m] [-v] "
             "[key=value ...]", "", FLAGS.format(multirun=MULTIRUN if sweeps else NO_MULTIRUN)]
    chosen = [(group, option) for d in defaults for group, option in d.items()]
    if chosen:
        lines += ["", "config groups (group=option; * the default):"]
        for group, default in chosen:
            lines.append(f"  {group}:")
            options = sorted(p.stem for p in (root / group).glob("*.yaml"))
            width = max(map(len, options))
            for option in options:
                mark = "*" if option == default else " "
                lines.append(f"   {mark}{option.ljust(width)}  {_first_comment(root / group / f'{option}.yaml')}")
    if fields:
        lines += ["", "keys (key: meaning; types and ranges are checked before any work):",
                  *(f"  {line}" for line in fields)]
    files = [(primary, ""), *((root / group / f"{option}.yaml", f" ({group}={option})") for group, option in chosen)]
    lines += ["", f"default config: {primary.name} and the files its defaults list picks, as written"]
    for path, what in files:
        lines += ["", f"# ==== {root.name}/{path.relative_to(root).as_posix()}{what} ====", path.read_text().rstrip()]
    return "\n".join(lines)


def _first_comment(path: Path) -> str:
    """The first comment line of a config file (Hydra's ``# @package`` directive skipped)."""
    for line in path.read_text().splitlines():
        text = line.strip()
        if text.startswith("#") and not text.startswith("# @package") and text.strip("# "):
            return text.lstrip("# ").strip()
    return ""


def _configure_logging(verbose: bool) -> None:
    """INFO lines on stdout; with -v also this package's debug lines and Accelerate's own INFO lines (one per
    checkpoint saved), hidden by default."""
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    logging.getLogger("amint_dist").setLevel(logging.DEBUG if verbose else logging.NOTSET)
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.INFO if verbose else logging.WARNING)


def _multirun(config_dir: str, config_name: str, args: argparse.Namespace, main: Callable[[dict[str, Any]], Any],
              sweep_dir_key: str | None) -> list[Any] | None:
    """Compose every job of the sweep first (any error before any run), then run them one after the other."""
    if sweep_dir_key is None:
        raise OverrideError(f"-m/--multirun: sweeps are for training runs (launch/train.py), not {config_name}")
    world = os.environ.get("WORLD_SIZE") or "1"
    if world.isdigit() and int(world) > 1:
        raise OverrideError(f"-m/--multirun under a launcher of WORLD_SIZE={world} ranks would run the whole sweep on "
                            "every rank: run the sweep as one process (python launch/train.py -m ...), or launch "
                            "each run with accelerate launch")
    jobs = _sweep_jobs(config_dir, config_name, args.overrides, sweep_dir_key)
    configs = []
    with initialize_config_dir(config_dir=config_dir, version_base="1.3"):
        for job in jobs:
            configs.append(_compose_checked(config_name, job))
    results = []
    for i, (job, cfg) in enumerate(zip(jobs, configs)):
        print(f"[multirun] job {i + 1}/{len(jobs)}: {' '.join(job)}", flush=True)
        if args.cfg:
            print(OmegaConf.to_yaml(cfg, resolve=True), end="")
            continue
        record_command(config_name, job, args.flags, sweep=args.overrides)
        results.append(one_line_errors(main)(to_dict(cfg)))
        _reset_accelerate()
    return None if args.cfg else results


def _sweep_jobs(config_dir: str, config_name: str, overrides: list[str], sweep_dir_key: str) -> list[list[str]]:
    """Every combination of the sweep's values (Hydra's basic sweeper), each with its own ``sweep_dir_key``:
    ``BASE/<swept key-value_...>`` where BASE is the key's value (default ``runs/multirun/<time stamp>``), unless
    the sweep itself sets the key per job."""
    parsed = OverridesParser.create().parse_overrides(overrides)
    jobs = BasicSweeper.split_arguments(parsed, None)[0]
    swept = {o.get_key_element() for o in parsed if o.is_sweep_override()}
    if sweep_dir_key in swept:
        return jobs
    with initialize_config_dir(config_dir=config_dir, version_base="1.3"):
        base = OmegaConf.select(_compose_checked(config_name, jobs[0]), sweep_dir_key)
    base = Path(base or Path("runs") / "multirun" / time.strftime("%Y%m%d-%H%M%S"))
    names = [_job_name(o for o in job if o.split("=", 1)[0] in swept) or str(i) for i, job in enumerate(jobs)]
    if len(set(names)) < len(names):  # two values that read alike once made file-name safe
        names = [f"{i}_{name}" for i, name in enumerate(names)]
    return [[o for o in job if o.split("=", 1)[0].lstrip("+~") != sweep_dir_key]
            + [f"{sweep_dir_key}={_quoted(base / name)}"] for job, name in zip(jobs, names)]


def _job_name(overrides: Iterable[str]) -> str:
    """Swept ``key=value`` overrides as a folder name that Hydra and a shell take unquoted: ``key-value`` joined by
    ``_``, the value's characters other than letters, digits and ``.+`` as ``-`` (``mint.weight=3
    mint.taps=[1,3,5]`` -> ``mint.weight-3_mint.taps-1-3-5``)."""
    parts = []
    for override in overrides:
        key, _, value = override.partition("=")
        parts.append(f"{key.lstrip('+~')}-{re.sub(r'[^A-Za-z0-9.+]+', '-', value).strip('-') or 'null'}")
    return "_".join(parts)


def _quoted(path: Path) -> str:
    """A path as a quoted Hydra override value."""
    return "'" + str(path).replace("\\", "\\\\").replace("'", "\\'") + "'"


def _reset_accelerate() -> None:
    """Forget the finished job's Accelerate state (one process, no process group), so that the next job of a sweep
    may choose its own precision or plugin."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)


def _compose_checked(config_name: str, overrides: list[str]) -> DictConfig:
    """``compose(config_name, overrides)`` (inside ``initialize_config_dir``), refusing overrides that would be
    silently ignored or stored unused: any ``hydra.*`` / ``hydra/...`` (no job runner here), and ``+``/``++``
    additions, except timm arguments under ``OPEN_MAPPINGS`` where the config has it (``++KEY=V`` of an existing
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
            opened = any(key.startswith(f"{m}.") and OmegaConf.select(base, m) is not None for m in OPEN_MAPPINGS)
            if not opened and (o.is_add() or not _has(base, key)):
                raise OverrideError(f"{o.input_line}: adds {key}, refused: the {config_name} config takes changes to "
                                    f"the keys and groups it has (KEY=VALUE); new keys only as timm arguments "
                                    f"under {' or '.join(OPEN_MAPPINGS)}")
    return compose(config_name, overrides=overrides)


def _has(cfg: DictConfig, key: str) -> bool:
    """Whether the dotted ``key`` is in ``cfg`` (a mandatory ``???`` value counts)."""
    parent, _, last = key.rpartition(".")
    node = OmegaConf.select(cfg, parent) if parent else cfg
    return isinstance(node, DictConfig) and last in node.keys()


def _missing(e: MissingMandatoryValue) -> str:
    """OmegaConf's message spans several lines and names the key without its section."""
    return f"missing mandatory value {e.full_key}: pass {e.full_key}=..."


def _one_line(e: BaseException) -> str:
    """First line of an exception and of its cause (Hydra nests the useful part); a missing config file of a group
    keeps Hydra's list of the group's options."""
    if isinstance(e, MissingMandatoryValue):
        return _missing(e)
    parts = [str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__]
    if isinstance(e, MissingConfigException) and e.options:
        where = next((line.strip().rstrip(":") for line in str(e).splitlines() if line.startswith("Available")),
                     "available options")
        parts.append(f"{where[0].lower()}{where[1:]}: {', '.join(e.options)}")
    if e.__cause__ is not None and str(e.__cause__).strip():
        parts.append(str(e.__cause__).strip().splitlines()[0])
    return ": ".join(parts)
