"""From a command line to a running program, the same way for every entry point.

``psq`` and each of its subcommands (services, status, keys, benchmarks) and
``python -m workers.train`` run through :func:`run`: parse the flags, configure logging from
``PSQ_LOG_LEVEL``, check that every ``PSQ_*`` variable is one some setting knows, then start.  A
settings error (a flag or a variable psq cannot use) ends the program with its message and exit
code 2, before anything starts.  :func:`settings_main` makes the ``main`` of a program whose
command line is one settings class.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from psq import config
from psq.config import SettingsError

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
config.EXTRA_ENVIRONMENT.add("PSQ_LOG_LEVEL")


def run(
    parser: argparse.ArgumentParser,
    argv: Sequence[str] | None,
    start: Callable[[argparse.Namespace], int],
    label: Callable[[argparse.Namespace], str] | None = None,
    environ: Mapping[str, str] = os.environ,
) -> int:
    """Parse ``argv`` and ``start`` the program; its exit code, or 2 on a settings error
    (reported as ``label(args): message``, by default the parser's name)."""
    args = parser.parse_args(argv)
    level = environ.get("PSQ_LOG_LEVEL", "INFO").upper()
    if level not in LOG_LEVELS:
        print(f"{parser.prog}: PSQ_LOG_LEVEL: expected {', '.join(LOG_LEVELS)}, got {level!r}", file=sys.stderr)
        return 2
    logging.basicConfig(level=level, stream=sys.stderr, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        config.check_environment(environ)
        return start(args)
    except SettingsError as exc:
        print(f"{label(args) if label else parser.prog}: {exc}", file=sys.stderr)
        return 2


def settings_main(cls: type, prog: str, description: str, start: Callable[[Any], int]) -> Callable[..., int]:
    """``main(argv=None)`` for a program configured by ``cls``: its flags and ``PSQ_*`` variables."""

    def main(argv: Sequence[str] | None = None) -> int:
        parser = argparse.ArgumentParser(prog=prog, description=description)
        config.add_arguments(parser, cls)
        return run(parser, argv, lambda args: start(config.load(cls, args, os.environ)))

    return main
