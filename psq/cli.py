"""The ``psq`` command line: the composition root.

It parses flags and environment (through :mod:`psq.config`) and starts what was asked for.
It is the only part of ``psq`` that reaches the ``broker`` and ``workers`` packages, and only
lazily, so ``import psq`` stays light.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import psq
from psq import command, config
from psq.bench.settings import CodecBench, LayerBench, LoadBench, TransportBench
from psq.config import AggregatorSettings, BrokerSettings, SettingsError, StatusSettings


def _trainer_settings() -> dict[str, type]:
    """The trainer's and its benchmarks' settings (torch-free; registering the trainer's
    variables with the environment check)."""
    from workers.settings import AccuracyBench, EmulateBench, StepBench, TrainSettings

    return {"worker": TrainSettings, "step": StepBench, "accuracy": AccuracyBench, "emulate": EmulateBench}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="psq", description=psq.__doc__)
    parser.add_argument("--version", action="version", version=f"psq {psq.__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    trainer = _trainer_settings()
    for name, cls, help_text in (
        ("broker", BrokerSettings, "route statistics between workers and aggregators"),
        ("aggregator", AggregatorSettings, "own one shard of the statistics"),
        ("worker", trainer["worker"], "train the digits CNN as one or more DDP workers"),
        ("status", StatusSettings, "what the broker and the aggregators hold"),
    ):
        config.add_arguments(commands.add_parser(name, help=help_text), cls)
    commands.choices["status"].add_argument("--json", action="store_true", help="print the report as JSON")
    keys = commands.add_parser("keys", help="CurveZMQ key pairs").add_subparsers(dest="keys", required=True)
    generate = keys.add_parser("generate", help="write NAME.key (public) and NAME.key_secret into DIR")
    generate.add_argument("dir", type=Path, help="folder for the key files")
    generate.add_argument(
        "name",
        type=config.argparse_type(config.name, "name"),
        help="the key pair's name (letters, digits, '.', '_', '-')",
    )
    bench = commands.add_parser("bench", help="benchmarks, each side by side with its reference")
    benches = bench.add_subparsers(dest="bench", metavar="BENCH", required=True)
    for name, cls in BENCHES.items():
        config.add_arguments(benches.add_parser(name, help=cls.__doc__), cls)
    for name in ("step", "accuracy", "emulate"):
        config.add_arguments(benches.add_parser(name, help=trainer[name].__doc__), trainer[name])
    return parser


BENCHES: dict[str, type] = {
    "codec": CodecBench,
    "transport": TransportBench,
    "load": LoadBench,
    "layer": LayerBench,
}


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    return command.run(parser, argv, lambda args: _dispatch(parser, args), label=lambda a: f"psq {a.command}")


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

        return train.main(config.load(_trainer_settings()["worker"], args, os.environ))
    if args.command == "bench":
        cls = BENCHES.get(args.bench) or _trainer_settings()[args.bench]
        _bench(args.bench, config.load(cls, args, os.environ))
        return 0
    parser.print_help(sys.stderr)
    return 2


def _bench(name: str, s: Any) -> None:
    """The benchmarks; each module is imported only when asked for (some need torch)."""
    if name == "codec":
        from psq.bench import codec

        codec.run(s.rounds, s.per_round, s.json)
    elif name == "transport":
        from psq.bench import transport

        transport.run(s.round_trips, s.seconds, s.json)
    elif name == "load":
        from psq.bench import load

        load.run(tuple(int(c) for c in s.shards), s.step_ms / 1000, s.seconds, s.max_workers, s.json)
    elif name == "layer":
        from psq.bench import layer

        layer.run(s.shapes, s.rounds, s.min_round_s, s.compile, s.json)
    elif name == "step":
        from workers import step_bench

        step_bench.run(s.steps, s.rounds, s.batch, s.json, s.delays_ms)
    elif name == "accuracy":
        from workers import accuracy_bench

        methods = s.methods or tuple(accuracy_bench.method(m) for m in accuracy_bench.DEFAULT_METHODS)
        accuracy_bench.run(
            tuple(s.settings),
            tuple(range(s.first_seed, s.first_seed + s.seeds)),
            s.epochs,
            methods,
            s.out,
            s.json,
            s.max_steps_per_epoch,
        )
    elif name == "emulate":
        from workers import emulation

        variants = s.methods or (emulation.variant("sync"), emulation.variant("psq"))
        seeds = tuple(range(s.first_seed, s.first_seed + s.seeds))
        emulation.run(tuple(s.settings), seeds, s.epochs, variants, s.json, s.max_steps_per_epoch)


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
