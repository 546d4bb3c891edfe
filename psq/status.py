"""``psq status``: ask the broker, then each live shard, and show what they hold.

Talks the wire protocol from a plain DEALER socket; every wait has a timeout.
"""

from __future__ import annotations

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
    if not sock.poll(timeout_s * 1000, zmq.POLLIN):
        raise StatusError(f"{who} did not answer within {timeout_s} s")
    try:
        msg = protocol.decode(sock.recv_multipart())
        if msg.command is Command.ERROR:
            err = protocol.parse_error(msg)
            raise StatusError(f"{who} answered {err.code.value}: {err.message}")
        return protocol.parse_report(msg)
    except ProtocolError as exc:
        raise StatusError(f"{who} sent an unreadable answer: {exc}") from None


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
            lines += [f"    {name:40s} count {count:14.1f}  version {version}" for name, count, version in layers]
    return "\n".join(lines)
