"""The command line every job shares.

    python -m jobs.<job> --config configs/<file>.yaml [the job's flags] section.key=value ...

:func:`job_parser` builds the parser (``--config`` and the dotted overrides; a job adds its own
flags), :func:`run_job` loads the config and the job's options, runs the job's ``main`` and turns
the outcome into an exit status that scripts and ``ray job submit`` can act on:

* ``0``: the job did its work; its result is printed (JSON for structured results);
* ``1``: the job ran and decided not to finish (for example too little data) — :class:`JobNotDone`
  or one of the job's own "not done" exceptions;
* ``2``: a bad option or input (a config error naming its key, a missing file, an output id that
  is taken, a package that is not installed); the message names what to fix and no traceback is
  printed.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from collections.abc import Callable, Sequence
from typing import Any

from pydantic import BaseModel

from app.config import ConfigError, KaizenConfig, load_config, load_job_config, resolve_paths

__all__ = ["EXIT_BAD_INPUT", "EXIT_NOT_DONE", "EXIT_OK", "JobNotDone", "job_parser", "run_job", "to_jsonable"]

EXIT_OK = 0
EXIT_NOT_DONE = 1
EXIT_BAD_INPUT = 2


class JobNotDone(RuntimeError):
    """The job ran and stopped short on purpose (exit status 1); the message says why."""


JobMain = Callable[[argparse.Namespace, KaizenConfig, Any], Any]
"""A job's entry point on parsed arguments, the config (paths resolved) and its options
(None for a job without an options section); what it returns is printed."""


def job_parser(module: str, doc: str | None, *, overrides_help: str | None = None) -> argparse.ArgumentParser:
    """A parser with ``--config`` and the dotted overrides; the job adds its own flags to it.

    Args:
        module: the job's module (``jobs.finetune``): the program name is ``python -m <module>``.
        doc: the job's module docstring; its first paragraph is the description.
        overrides_help: what the overrides may name (default: any ``section.key=value``).
    """
    description = (doc or "").strip().split("\n\n")[0] or None
    parser = argparse.ArgumentParser(prog=f"python -m {module}", description=description)
    parser.add_argument("--config", default=None, help="config file (default: configs/default.yaml)")
    parser.add_argument("overrides", nargs="*", help=overrides_help or "dotted config overrides, section.key=value")
    return parser


def run_job(
    parser: argparse.ArgumentParser,
    main: JobMain,
    argv: Sequence[str] | None = None,
    *,
    section: str | None = None,
    not_done: tuple[type[BaseException], ...] = (),
) -> int:
    """Parse ``argv``, load the config (and the ``section`` options), run ``main`` and return the
    exit status (see the module docstring). Logging goes to stderr as plain lines."""
    args = parser.parse_args(argv)
    try:
        if section is None:
            cfg, opts = resolve_paths(load_config(args.config, args.overrides)), None
        else:
            cfg, opts = load_job_config(args.config, args.overrides, section)
    except ConfigError as exc:
        print(f"{parser.prog}: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        result = main(args, cfg, opts)
    except (JobNotDone, *not_done) as exc:
        print(f"{parser.prog}: {exc}", file=sys.stderr)
        return EXIT_NOT_DONE
    except (ValueError, ImportError, FileNotFoundError, FileExistsError) as exc:
        print(f"{parser.prog}: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    if result is not None:
        print(result if isinstance(result, str) else json.dumps(to_jsonable(result), indent=2, default=str))
    return EXIT_OK


def to_jsonable(value: Any) -> Any:
    """A job's result as plain JSON values: pydantic models and dataclasses become dicts."""
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    return value
