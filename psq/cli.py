"""The ``psq`` command line: the composition root.

It parses flags and environment (through :mod:`psq.config`) and starts what was asked for.
It is the only part of ``psq`` that reaches the ``broker`` and ``workers`` packages, and only
lazily, so ``import psq`` stays light.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable, Sequence
from pathlib import Path

import psq
from psq import config
from psq.config import AggregatorSettings, BrokerSettings, SettingsError, StatusSettings, TrainSettings

config.EXTRA_ENVIRONMENT.add("PSQ_LOG_LEVEL")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="psq", description=psq.__doc__)
    parser.add_argument("--version", action="version", version=f"psq {psq.__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    config.add_arguments(
        commands.add_parser("broker", help="route statistics between workers and aggregators"), BrokerSettings
    )
    config.add_arguments(commands.add_parser("aggregator", help="own one shard of the statistics"), AggregatorSettings)
    config.add_arguments(
        commands.add_parser("worker", help="train the digits CNN as one or more DDP workers"), TrainSettings
    )
    keys = commands.add_parser("keys", help="CurveZMQ key pairs").add_subparsers(dest="keys", required=True)
    generate = keys.add_parser("generate", help="write NAME.key (public) and NAME.key_secret into DIR")
    generate.add_argument("dir", type=Path, help="folder for the key files")
    generate.add_argument(
        "name", type=_checked(config.name), help="the key pair's name (letters, digits, '.', '_', '-')"
    )
    status = commands.add_parser("status", help="what the broker and the aggregators hold")
    config.add_arguments(status, StatusSettings)
    status.add_argument("--json", action="store_true", help="print the report as JSON")
    bench = commands.add_parser("bench", help="benchmarks, each side by side with its reference")
    benches = bench.add_subparsers(dest="bench", metavar="BENCH", required=True)
    codec = benches.add_parser("codec", help="encode + decode of one step of ResNet-50 statistics")
    codec.add_argument("--rounds", type=_checked(config.positive_int), default=30, help="timed rounds (default 30)")
    codec.add_argument(
        "--per-round", type=_checked(config.positive_int), default=200, help="messages per round (default 200)"
    )
    codec.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    transport = benches.add_parser("transport", help="round trips and pushes/s through broker and aggregators")
    transport.add_argument(
        "--round-trips", type=_checked(config.positive_int), default=300, help="timed round trips (default 300)"
    )
    transport.add_argument(
        "--seconds", type=_checked(config.positive_float), default=3.0, help="seconds per rate measurement (default 3)"
    )
    transport.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    step = benches.add_parser("step", help="per-step time: plain BN, synchronized BN, psq (2 DDP workers)")
    step.add_argument(
        "--steps", type=_checked(config.positive_int), default=20, help="steps per method per round (default 20)"
    )
    step.add_argument("--rounds", type=_checked(config.positive_int), default=5, help="timed rounds (default 5)")
    step.add_argument("--batch", type=_checked(config.positive_int), default=8, help="per-worker batch (default 8)")
    step.add_argument(
        "--delays-ms",
        type=_delays,
        default=None,
        help="one-way delays to run across, e.g. 0,0.5,2 (needs root: network namespaces)",
    )
    step.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    layer = benches.add_parser("layer", help="forward + backward of one PSBatchNorm against nn.BatchNorm2d")
    layer.add_argument(
        "--shapes", choices=("small", "resnet50", "all"), default="all", help="which shapes (default all)"
    )
    layer.add_argument("--rounds", type=_checked(config.positive_int), default=7, help="timed rounds (default 7)")
    layer.add_argument(
        "--min-round-s",
        type=_checked(config.positive_float),
        default=0.05,
        help="least seconds per variant per round (default 0.05)",
    )
    layer.add_argument("--compile", action="store_true", help="also bn and psq under torch.compile (inductor)")
    layer.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    load = benches.add_parser("load", help="many simulated workers through 1, 2 and 4 shards")
    load.add_argument(
        "--step-ms", type=_checked(config.positive_int), default=250, help="simulated step time (default 250)"
    )
    load.add_argument(
        "--seconds", type=_checked(config.positive_float), default=5.0, help="seconds per measurement (default 5)"
    )
    load.add_argument("--max-workers", type=_checked(config.positive_int), default=512, help="stop there (default 512)")
    load.add_argument("--shards", type=_choices("124"), default="124", help="shard counts to try (default 124)")
    load.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    acc = benches.add_parser("accuracy", help="test accuracy on digits: per-worker, synchronized and psq batch norm")
    acc.add_argument(
        "--settings", type=_choices("abcdef"), default="abcdef", help="which of settings a-f (default all)"
    )
    acc.add_argument(
        "--seeds", type=_checked(config.positive_int), default=3, help="seeds per setting and method (default 3)"
    )
    acc.add_argument("--epochs", type=_checked(config.positive_int), default=5, help="epochs per run (default 5)")
    acc.add_argument(
        "--methods",
        nargs="+",
        type=_lazy_checked("workers.accuracy_bench", "method"),
        default=None,
        help="local, syncbn, psq, psq-renorm, or variants like psq:history_weight=0.8,half_life=64 "
        "(default: local syncbn psq psq-renorm)",
    )
    acc.add_argument(
        "--max-steps-per-epoch",
        type=_checked(config.non_negative_int),
        default=0,
        help="cut every epoch short, for a quick sanity run (default 0: whole epochs)",
    )
    acc.add_argument("--out", type=Path, default=Path("runs/accuracy"), help="folder for the table, JSON and PNG")
    acc.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    level = os.environ.get("PSQ_LOG_LEVEL", "INFO").upper()
    if level not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
        print(f"psq: PSQ_LOG_LEVEL: expected DEBUG, INFO, WARNING, ERROR or CRITICAL, got {level!r}", file=sys.stderr)
        return 2
    logging.basicConfig(level=level, stream=sys.stderr, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        config.check_environment(os.environ)
        return _dispatch(parser, args)
    except SettingsError as exc:
        print(f"psq {args.command}: {exc}", file=sys.stderr)
        return 2


def _dispatch(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    if args.command == "broker":
        return _broker(config.load(BrokerSettings, args, os.environ))
    if args.command == "aggregator":
        return _aggregator(config.load(AggregatorSettings, args, os.environ))
    if args.command == "status":
        return _status(config.load(StatusSettings, args, os.environ), args.json)
    if args.command == "keys":
        from psq.security import generate

        public, secret = generate(args.dir, args.name)
        print(f"public key (share it: put it in the broker's allow-list): {public}")
        print(f"secret key (keep it private; pass it with --secret-key): {secret}")
        return 0
    if args.command == "worker":
        from workers import train

        return train.main(config.load(TrainSettings, args, os.environ))
    if args.command == "bench":
        _bench(args)
        return 0
    parser.print_help(sys.stderr)
    return 2


def _bench(args: argparse.Namespace) -> None:
    """The benchmarks; each module is imported only when asked for (some need torch)."""
    if args.bench == "codec":
        from psq.bench import codec

        codec.run(args.rounds, args.per_round, args.json)
    elif args.bench == "transport":
        from psq.bench import transport

        transport.run(args.round_trips, args.seconds, args.json)
    elif args.bench == "load":
        from psq.bench import load

        load.run(tuple(int(c) for c in args.shards), args.step_ms / 1000, args.seconds, args.max_workers, args.json)
    elif args.bench == "layer":
        from psq.bench import layer

        layer.run(args.shapes, args.rounds, args.min_round_s, args.compile, args.json)
    elif args.bench == "step":
        from workers import step_bench

        step_bench.run(args.steps, args.rounds, args.batch, args.json, args.delays_ms)
    elif args.bench == "accuracy":
        from workers import accuracy_bench

        methods = args.methods or [accuracy_bench.method(m) for m in accuracy_bench.DEFAULT_METHODS]
        accuracy_bench.run(
            tuple(args.settings),
            tuple(range(args.seeds)),
            args.epochs,
            tuple(methods),
            args.out,
            args.json,
            args.max_steps_per_epoch,
        )


def _until_signalled(serve: Callable[[Callable[[], bool]], None]) -> None:
    """Run a service until SIGTERM or SIGINT (the service checks the flag every tick)."""
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    serve(stop.is_set)


def _broker(settings: BrokerSettings) -> int:
    import zmq

    from broker.broker import Broker

    broker = Broker(settings)
    try:
        if settings.metrics_port:
            _serve_metrics(settings.metrics_port, "BrokerCollector", broker)
        _until_signalled(broker.run)
    except zmq.ZMQError as exc:
        print(f"psq broker: cannot bind {settings.frontend} / {settings.backend}: {exc}", file=sys.stderr)
        return 1
    return 0


def _aggregator(settings: AggregatorSettings) -> int:
    from broker.aggregator import Aggregator, ShardTaken
    from broker.snapshot import SnapshotError

    try:
        aggregator = Aggregator(settings)
        if settings.shard_metrics_port:
            _serve_metrics(settings.shard_metrics_port, "AggregatorCollector", aggregator)
        _until_signalled(aggregator.run)
    except (SnapshotError, ShardTaken) as exc:
        print(f"psq aggregator: {exc}", file=sys.stderr)
        return 1
    return 0


def _serve_metrics(port: int, collector: str, service: object) -> None:
    try:
        from broker import metrics
    except ImportError as exc:
        raise SettingsError(f"--metrics-port needs prometheus-client (pip install 'psq[metrics]'): {exc}") from None
    try:
        metrics.serve(port, getattr(metrics, collector)(service))
    except OSError as exc:
        raise SettingsError(f"cannot serve metrics on 127.0.0.1:{port}: {exc}") from None


def _status(settings: StatusSettings, as_json: bool) -> int:
    from psq.status import StatusError, query, render

    try:
        from psq.security import ClientKeys

        report = query(settings.frontend, settings.timeout_s, ClientKeys.load(settings.secret_key, settings.server_key))
    except StatusError as exc:
        print(f"psq status: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(report, indent=2) if as_json else render(report))
    return 0


def _delays(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated milliseconds like 0,0.5,2, got {text!r}") from None
    if not values or any(not 0 <= v <= 1000 for v in values):
        raise argparse.ArgumentTypeError(f"delays must be between 0 and 1000 ms, got {text!r}")
    return values


def _checked(parse: Callable[[str], object]) -> Callable[[str], object]:
    """A psq.config parser as an argparse type: its SettingsError becomes argparse's error."""

    def convert(text: str) -> object:
        try:
            return parse(text)
        except SettingsError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    convert.__name__ = parse.__name__
    return convert


def _lazy_checked(module: str, parser: str) -> Callable[[str], object]:
    """:func:`_checked` for a parser in a module imported only when a flag needs it."""

    def convert(text: str) -> object:
        import importlib

        return _checked(getattr(importlib.import_module(module), parser))(text)

    convert.__name__ = parser
    return convert


def _choices(allowed: str) -> Callable[[str], str]:
    def parse(text: str) -> str:
        if not text or any(c not in allowed for c in text):
            raise argparse.ArgumentTypeError(f"expected letters from {allowed!r}, got {text!r}")
        return "".join(dict.fromkeys(text))

    return parse
