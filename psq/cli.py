"""The ``psq`` command line: the composition root.

It parses flags and environment (through :mod:`psq.config`) and starts what was asked for.
It is the only part of ``psq`` that reaches the ``broker`` and ``workers`` packages, and only
lazily, so ``import psq`` stays light.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import psq


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="psq", description=psq.__doc__)
    parser.add_argument("--version", action="version", version=f"psq {psq.__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    bench = commands.add_parser("bench", help="benchmarks, each side by side with its reference")
    benches = bench.add_subparsers(dest="bench", metavar="BENCH", required=True)
    codec = benches.add_parser("codec", help="encode + decode of one step of ResNet-50 statistics")
    codec.add_argument("--rounds", type=_positive_int, default=30, help="timed rounds (default 30)")
    codec.add_argument("--per-round", type=_positive_int, default=200, help="messages per round (default 200)")
    codec.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "bench" and args.bench == "codec":
        from psq.bench import codec

        codec.run(args.rounds, args.per_round, args.json)
        return 0
    parser.print_help(sys.stderr)
    return 2


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value
