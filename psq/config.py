"""Settings: frozen dataclasses, read from flags and ``PSQ_*`` environment in one place.

Each field declares its flag, its environment variable and how to parse and check it.  A flag
wins over the environment, the environment over the default.  A ``PSQ_*`` variable that no
setting knows is an error (a typo must not silently fall back to a default).

One ``.env`` configures a whole deployment (broker, aggregators, trainers), so a variable means
one thing to every process that reads it: a setting of several roles is either ``shared`` (the
same value for all, like the broker's addresses) or named per role (``PSQ_BROKER_SECRET_KEY``,
``PSQ_AGGREGATOR_METRICS_PORT``).  :func:`check_unambiguous` enforces it at import.
"""

from __future__ import annotations

import argparse
import dataclasses
import ipaddress
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from psq.protocol import DEFAULT_MAX_BYTES, MAX_SHARDS
from psq.stats import HALF_LIFE_UNITS

ENV_PREFIX = "PSQ_"
DEFAULT_FRONTEND = "tcp://127.0.0.1:5555"
DEFAULT_BACKEND = "tcp://127.0.0.1:5556"
DEFAULT_HALF_LIFE_IMAGES = 128.0  # chosen on digits settings (a) and (b): docs/accuracy.md


class SettingsError(ValueError):
    """A flag or environment value that psq cannot use; the text says what was expected."""


def setting(
    default: Any,
    help: str,
    parse: Callable[[str], Any] = str,
    env: str | None = None,
    metavar: str | None = None,
    shared: bool = False,
    many: bool = False,
) -> Any:
    """A settings field: ``env`` defaults to ``PSQ_<NAME>``; ``shared``: other roles read the
    same variable for the same value; ``many``: a flag taking one or more values (a tuple)."""
    meta = {"help": help, "parse": parse, "env": env, "metavar": metavar, "shared": shared, "many": many}
    return field(default=default, metadata=meta)


def reads_environment(cls: type) -> bool:
    """Whether ``cls`` takes ``PSQ_*`` variables too: a service's settings do, a benchmark's
    (``environment = False``, flags only) do not."""
    return getattr(cls, "environment", True)


# -- parsers: text in, value out, SettingsError with what was expected ---------------------------


def _number(convert: Callable[[str], Any], ok: Callable[[Any], bool], expected: str, name: str) -> Callable[[str], Any]:
    """A parser of one kind of number: text in, value out, or what was expected and what came."""

    def parse(text: str) -> Any:
        try:
            value = convert(text)
        except ValueError:
            raise SettingsError(f"expected {expected}, got {text!r}") from None
        if not ok(value):
            raise SettingsError(f"expected {expected}, got {text!r}")
        return value

    parse.__name__ = name
    return parse


_INF = float("inf")
positive_float = _number(float, lambda v: 0 < v < _INF, "a positive number", "positive_float")
non_negative_float = _number(float, lambda v: 0 <= v < _INF, "a non-negative number", "non_negative_float")
unit_interval = _number(float, lambda v: 0 <= v < 1, "a number in [0, 1)", "unit_interval")


def is_core_share(v: float) -> bool:
    """A share of one core's time (push_cpu_share): in (0, 1]."""
    return 0 < v <= 1


share_of_core = _number(float, is_core_share, "a number in (0, 1]", "share_of_core")
positive_int = _number(int, lambda v: v > 0, "a positive integer", "positive_int")
non_negative_int = _number(int, lambda v: v >= 0, "a non-negative integer", "non_negative_int")


def shard_spec(text: str) -> tuple[int, int]:
    """``"i/n"``: this process owns shard ``i`` of ``n``."""
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
    if not m or not 0 <= int(m[1]) < int(m[2]) <= MAX_SHARDS:
        raise SettingsError(f"expected a shard as i/n with 0 <= i < n <= {MAX_SHARDS}, got {text!r}")
    return int(m[1]), int(m[2])


def choice(*options: str) -> Callable[[str], str]:
    def parse(text: str) -> str:
        if text not in options:
            raise SettingsError(f"expected one of {', '.join(options)}, got {text!r}")
        return text

    return parse


def endpoint(text: str) -> str:
    """A ZeroMQ endpoint psq can use: ``tcp://host:port`` or ``ipc://path``."""
    if re.fullmatch(r"tcp://(\*|[^\s:/]+|\[[0-9a-fA-F:]+\]):\d{1,5}", text) or re.fullmatch(r"ipc://\S+", text):
        return text
    raise SettingsError(f"expected a ZeroMQ endpoint like tcp://127.0.0.1:5555 or ipc:///tmp/psq.sock, got {text!r}")


def is_loopback(address: str) -> bool:
    """Whether a bind address reaches only this machine (ipc, 127.0.0.0/8, ::1, localhost)."""
    if address.startswith("ipc://"):
        return True
    host = address[len("tcp://") :].rsplit(":", 1)[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


MAX_PORT = 65535
port = _number(int, lambda v: 0 < v <= MAX_PORT, f"a TCP port in 1..{MAX_PORT}", "port")


def optional_path(text: str) -> Path | None:
    return Path(text) if text else None


def flag(text: str) -> bool:
    """An on/off setting from the environment: 1/true/yes/on or 0/false/no/off."""
    value = text.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off", ""):
        return False
    raise SettingsError(f"expected 1/true/yes/on or 0/false/no/off, got {text!r}")


def name(text: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}", text):
        raise SettingsError(f"expected a name of letters, digits, '.', '_' and '-' (up to 128), got {text!r}")
    return text


# -- the settings of each process -----------------------------------------------------------------


@dataclass(frozen=True)
class BrokerSettings:
    frontend: str = setting(DEFAULT_FRONTEND, "address the workers connect to (bound here)", endpoint, shared=True)
    backend: str = setting(DEFAULT_BACKEND, "address the aggregators connect to (bound here)", endpoint, shared=True)
    heartbeat_s: float = setting(1.0, "aggregator heartbeat interval in seconds", positive_float, shared=True)
    liveness: int = setting(3, "missed heartbeats after which an aggregator counts as gone", positive_int)
    max_message_bytes: int = setting(DEFAULT_MAX_BYTES, "largest message accepted, in bytes", positive_int, shared=True)
    hwm: int = setting(100, "high-water mark (messages queued per peer) of each socket: bounds memory", positive_int)
    secret_key: Path | None = setting(
        None, "the broker's CurveZMQ secret key file (psq keys generate)", optional_path, "PSQ_BROKER_SECRET_KEY"
    )
    worker_keys: Path | None = setting(None, "folder of the public key files of allowed workers", optional_path)
    aggregator_keys: Path | None = setting(None, "folder of the public key files of allowed aggregators", optional_path)
    insecure: bool = setting(False, "allow binding a non-loopback address without keys", flag)
    metrics_port: int | None = setting(
        None, "serve Prometheus metrics on this port (loopback)", port, "PSQ_BROKER_METRICS_PORT"
    )

    def __post_init__(self) -> None:
        given = [self.secret_key, self.worker_keys, self.aggregator_keys]
        if any(given) and not all(given):
            raise SettingsError("CurveZMQ on the broker needs --secret-key, --worker-keys and --aggregator-keys")


@dataclass(frozen=True)
class AggregatorSettings:
    shard: tuple[int, int] = setting((0, 1), "the shard this aggregator owns, as i/n", shard_spec, metavar="I/N")
    backend: str = setting(DEFAULT_BACKEND, "the broker's backend address (connected to)", endpoint, shared=True)
    half_life: float = setting(
        DEFAULT_HALF_LIFE_IMAGES,
        "history half-life: a batch's weight halves with every this many images the job sends after it",
        positive_float,
    )
    half_life_unit: str = setting(
        "images",
        "what --half-life counts: images (batch items), or elements (per-channel values, N*H*W; advanced)",
        choice(*HALF_LIFE_UNITS),
    )
    snapshot: Path | None = setting(
        None,
        "snapshot file, resumed from at start and written atomically; {shard} in it becomes the shard index",
        optional_path,
    )
    snapshot_interval_s: float = setting(5.0, "seconds between snapshots (and one on SIGTERM)", positive_float)
    mode: str = setting(
        "async", "async: reply with the history at once; sync: wait for every worker's step", choice("async", "sync")
    )
    sync_workers: int | None = setting(
        None, "sync mode: the number of workers whose statistics make a step", positive_int
    )
    sync_timeout_s: float = setting(10.0, "sync mode: how long a step waits for every worker", positive_float)
    heartbeat_s: float = setting(1.0, "heartbeat interval in seconds", positive_float, shared=True)
    max_message_bytes: int = setting(DEFAULT_MAX_BYTES, "largest message accepted, in bytes", positive_int, shared=True)
    secret_key: Path | None = setting(
        None, "this aggregator's CurveZMQ secret key file", optional_path, "PSQ_AGGREGATOR_SECRET_KEY"
    )
    server_key: Path | None = setting(None, "the broker's CurveZMQ public key file", optional_path, shared=True)
    metrics_port: int | None = setting(
        None,
        "serve Prometheus metrics on this port plus the shard index (loopback): one value serves every shard",
        port,
        "PSQ_AGGREGATOR_METRICS_PORT",
    )

    def __post_init__(self) -> None:
        if self.mode == "sync" and self.sync_workers is None:
            raise SettingsError("--mode sync needs --sync-workers N (PSQ_SYNC_WORKERS): the workers that make a step")
        if self.metrics_port is not None and self.metrics_port + self.shard[0] > MAX_PORT:
            raise SettingsError(f"metrics port {self.metrics_port} + shard {self.shard[0]} is past {MAX_PORT}")

    def check_sources(self, from_environment: set[str]) -> None:
        """Refuse a snapshot path from the environment that every shard reading it would share."""
        if "snapshot" in from_environment and self.shard[1] > 1 and "{shard}" not in str(self.snapshot):
            raise SettingsError(
                f"PSQ_SNAPSHOT={self.snapshot} is read by every shard's aggregator: put {{shard}} in it "
                "(e.g. runs/aggregator-{shard}.snap), or give each its own --snapshot"
            )

    @property
    def snapshot_path(self) -> Path | None:
        """This shard's snapshot file."""
        return Path(str(self.snapshot).replace("{shard}", str(self.shard[0]))) if self.snapshot else None

    @property
    def shard_metrics_port(self) -> int | None:
        """This shard's metrics port: aggregators sharing one setting do not collide."""
        return None if self.metrics_port is None else self.metrics_port + self.shard[0]


@dataclass(frozen=True)
class StatusSettings:
    frontend: str = setting(DEFAULT_FRONTEND, "the broker's frontend address", endpoint, shared=True)
    timeout_s: float = setting(2.0, "how long to wait for each answer", positive_float, "PSQ_STATUS_TIMEOUT_S")
    secret_key: Path | None = setting(
        None, "a worker's CurveZMQ secret key file", optional_path, "PSQ_WORKER_SECRET_KEY", shared=True
    )
    server_key: Path | None = setting(None, "the broker's CurveZMQ public key file", optional_path, shared=True)


SETTINGS: tuple[type, ...] = (BrokerSettings, AggregatorSettings, StatusSettings)
# Settings of the processes built on psq (the digits trainer: workers/settings.py), registered
# so that one environment check and one collision check cover them too.
_REGISTERED: list[type] = []


def register(cls: type) -> type:
    """Add a settings class of a program built on psq to the environment and collision checks."""
    if cls not in _REGISTERED:
        check_unambiguous((*all_settings(), cls))
        _REGISTERED.append(cls)
    return cls


def all_settings() -> tuple[type, ...]:
    return (*SETTINGS, *_REGISTERED)


# -- reading flags and environment -----------------------------------------------------------------


def env_name(f: dataclasses.Field[Any]) -> str:
    return f.metadata["env"] or ENV_PREFIX + f.name.upper()


def check_unambiguous(classes: tuple[type, ...]) -> None:
    """Refuse a variable that two roles would read for different things: one read by several
    settings classes must be ``shared`` by each, with one parser and one default."""
    readers: dict[str, list[tuple[type, dataclasses.Field[Any]]]] = {}
    for cls in classes:
        for f in dataclasses.fields(cls):
            readers.setdefault(env_name(f), []).append((cls, f))
    for variable, fields in readers.items():
        ok = (
            all(f.metadata["shared"] for _, f in fields)
            and len({f.metadata["parse"] for _, f in fields}) == 1
            and len({repr(f.default) for _, f in fields}) == 1  # unset, every role must agree too
        )
        if len(fields) > 1 and not ok:
            roles = ", ".join(f"{cls.__name__}.{f.name}" for cls, f in fields)
            raise SettingsError(f"{variable} is read by {roles}: mark it shared, or give each its own variable")


def known_environment() -> set[str]:
    return {env_name(f) for cls in all_settings() for f in dataclasses.fields(cls)} | set(EXTRA_ENVIRONMENT)


# Variables read outside these dataclasses (the trainer's, the key files'), registered so that
# check_environment knows them.
EXTRA_ENVIRONMENT: set[str] = set()


def check_environment(environ: Mapping[str, str]) -> None:
    unknown = sorted(k for k in environ if k.startswith(ENV_PREFIX) and k not in known_environment())
    if unknown:
        raise SettingsError(
            f"unknown environment variable(s) {', '.join(unknown)}; psq knows {', '.join(sorted(known_environment()))}"
        )


def add_arguments(parser: argparse.ArgumentParser, cls: type) -> None:
    """One flag per field (``--heartbeat-s`` for ``heartbeat_s``), default None = not given;
    an on/off setting is a flag without a value (``--insecure``)."""
    for f in dataclasses.fields(cls):
        option = "--" + f.name.replace("_", "-")
        source = f"env {env_name(f)}; " if reads_environment(cls) else ""
        help_text = f"{f.metadata['help']} ({source}default {_show(f.default)})"
        if f.metadata["parse"] is flag:
            parser.add_argument(option, dest=f.name, default=None, action="store_const", const=True, help=help_text)
        else:
            parser.add_argument(
                option,
                dest=f.name,
                default=None,
                type=_argparse(f),
                nargs="+" if f.metadata["many"] else None,
                metavar=f.metadata["metavar"],
                help=help_text,
            )


def load(cls: type, flags: argparse.Namespace | Mapping[str, Any], environ: Mapping[str, str]) -> Any:
    """Build ``cls`` from parsed flags (already typed), then the environment, then defaults."""
    given = vars(flags) if isinstance(flags, argparse.Namespace) else dict(flags)
    values, from_environment = {}, set()
    for f in dataclasses.fields(cls):
        if given.get(f.name) is not None:
            values[f.name] = tuple(given[f.name]) if f.metadata["many"] else given[f.name]
        elif reads_environment(cls) and env_name(f) in environ:
            try:
                values[f.name] = f.metadata["parse"](environ[env_name(f)])
            except SettingsError as exc:
                raise SettingsError(f"{env_name(f)}: {exc}") from None
            from_environment.add(f.name)
    settings = cls(**values)
    if hasattr(settings, "check_sources"):  # a rule about where a value came from
        settings.check_sources(from_environment)
    return settings


def argparse_type(parse: Callable[[str], Any], name: str) -> Callable[[str], Any]:
    """A parser as an argparse ``type``: its SettingsError becomes argparse's usage error."""

    def convert(text: str) -> Any:
        try:
            return parse(text)
        except SettingsError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    convert.__name__ = name  # argparse names the converter in its error messages
    return convert


def _argparse(f: dataclasses.Field[Any]) -> Callable[[str], Any]:
    return argparse_type(f.metadata["parse"], f.name)


def _show(value: Any) -> str:
    if isinstance(value, tuple):
        return "/".join(map(str, value)) if value else "none"
    return "none" if value is None else str(value)


check_unambiguous(SETTINGS)
