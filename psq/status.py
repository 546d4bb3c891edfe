"""``psq status``: ask the broker, then each live shard, and show what they hold.

Talks the wire protocol from a plain DEALER socket; every wait has a timeout.
"""

from __future__ import annotations

import time
from typing import Any

import zmq

from psq import protocol
from psq.protocol import BROKER_KEY, Command, ProtocolError
from psq.security import ClientKeys
from psq.sockets import tune


class StatusError(Exception):
    """The broker did not answer, or answered with an error."""


def query(frontend: str, timeout_s: float, keys: ClientKeys | None = None) -> dict[str, Any]:
    """The broker's report, with each live shard's report under ``"shard_reports"``."""
    sock = tune(zmq.Context.instance().socket(zmq.DEALER), 100, protocol.DEFAULT_MAX_BYTES)
    if keys is not None:
        keys.apply(sock)
    try:
        sock.connect(frontend)
        report = _ask(sock, BROKER_KEY, timeout_s, f"the broker at {frontend}")
        shards: dict[str, Any] = {}
        for agg in report.get("aggregators", []):
            if agg.get("alive"):
                shard = agg["shard"]
                try:
                    shards[str(shard)] = _ask(sock, shard, timeout_s, f"shard {shard}")
                except StatusError as exc:
                    shards[str(shard)] = {"error": str(exc)}
        report["shard_reports"] = shards
        return report
    finally:
        sock.close(linger=0)


def _ask(sock: zmq.Socket, key: int, timeout_s: float, who: str) -> dict[str, Any]:
    try:
        sock.send_multipart(protocol.encode_status(key), zmq.NOBLOCK)
    except zmq.Again:
        raise StatusError(f"cannot reach {who}: no connection could take the request") from None
    deadline = time.monotonic() + timeout_s
    while sock.poll(max(deadline - time.monotonic(), 0) * 1000, zmq.POLLIN):
        try:
            msg = protocol.decode(sock.recv_multipart())
            if msg.key != key:
                continue  # a late answer to an earlier question
            if msg.command is Command.ERROR:
                err = protocol.parse_error(msg)
                raise StatusError(f"{who} answered {err.code.value}: {err.message}")
            report = protocol.parse_report(msg)
        except ProtocolError as exc:
            raise StatusError(f"{who} sent an unreadable answer: {exc}") from None
        _check_report(report, key, who)
        return report
    raise StatusError(f"{who} did not answer within {timeout_s} s")


_BROKER_FIELDS = {"broker": dict, "shards": (int, type(None)), "aggregators": list, "workers": list}
_AGGREGATOR_FIELDS = {"shard": int, "shards": int, "name": str, "alive": bool, "last_seen_s": (int, float)}
_SHARD_FIELDS = {"jobs": dict, "updates": int, "duplicates": int, "errors": dict}


def _check_report(report: dict[str, Any], key: int, who: str) -> None:
    """The fields this tool reads, with their types: a report is input from a socket too."""
    if key == BROKER_KEY:
        _expect_fields(report, _BROKER_FIELDS, who)
        for agg in report["aggregators"]:
            _expect_fields(agg, _AGGREGATOR_FIELDS, who)
            if not 0 <= agg["shard"] < agg["shards"] <= protocol.MAX_SHARDS:
                raise StatusError(f"{who} reported an impossible shard {agg['shard']}/{agg['shards']}")
        return
    _expect_fields(report, _SHARD_FIELDS, who)
    for layers in report["jobs"].values():
        if not isinstance(layers, list) or not all(_is_layer(x) for x in layers):
            raise StatusError(f"{who} reported layers that are not [name, count, version, gradient count] lists")


def _is_layer(entry: Any) -> bool:
    if not isinstance(entry, list) or len(entry) != 4:
        return False
    name, count, version, gradient_count = entry
    numbers = (count, gradient_count)
    return isinstance(name, str) and type(version) is int and all(type(n) in (int, float) for n in numbers)


def _expect_fields(data: Any, fields: dict[str, Any], who: str) -> None:
    if not isinstance(data, dict) or any(not isinstance(data.get(k), t) for k, t in fields.items()):
        raise StatusError(f"{who} sent a report without the expected fields {sorted(fields)}")


def render(report: dict[str, Any]) -> str:
    """The report as text for a terminal."""
    b = report["broker"]
    lines = [
        f"broker  frontend {b['frontend']}  backend {b['backend']}  up {b['uptime_s']:.0f} s  "
        f"{b['messages_per_s']:.1f} msg/s  {b['errors_per_s']:.2f} errors/s",
        f"shards  {report['shards'] if report['shards'] is not None else 'none live'}",
        "",
        "aggregators",
    ]
    for a in report["aggregators"]:
        state = "alive" if a["alive"] else f"GONE (silent {a['last_seen_s']:.1f} s)"
        lines.append(f"  shard {a['shard']}/{a['shards']}  {state}  {a['name']}")
    lines += ["", f"workers seen in the last minute: {len(report['workers'])}"]
    lines += [f"  {w['job']}/{w['worker']}  {w['last_seen_s']:.1f} s ago" for w in report["workers"]]
    for shard, rep in sorted(report.get("shard_reports", {}).items()):
        lines += ["", f"shard {shard}"]
        if "error" in rep:
            lines.append(f"  {rep['error']}")
            continue
        lines.append(f"  updates {rep['updates']}  duplicates {rep['duplicates']}  errors {rep['errors']}")
        for job, layers in rep["jobs"].items():
            lines.append(f"  job {job}: {len(layers)} layers")
            lines += [
                f"    {name:40s} count {count:14.1f}  version {version:8d}  gradient count {grads:14.1f}"
                for name, count, version, grads in layers
            ]
    return "\n".join(lines)
