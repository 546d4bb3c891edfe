"""The broker's shard table: which aggregator owns which shard, and whether it is alive.

Pure bookkeeping, no sockets: the broker feeds it heartbeats and the clock.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Owner:
    identity: bytes  # the backend ROUTER's routing id for this aggregator's connection
    name: str  # the aggregator's own name: host, pid and a nonce, stable across reconnects
    shards: int
    last_seen: float


class Refused(Exception):
    """A heartbeat whose claim the table cannot accept; the text says why."""


class ShardTable:
    def __init__(self, heartbeat_s: float, liveness: int) -> None:
        self.timeout_s = heartbeat_s * liveness
        self._owners: dict[int, Owner] = {}

    def heartbeat(self, identity: bytes, shard: int, shards: int, name: str, now: float) -> bool:
        """Record an aggregator's claim; True when it newly owns the shard.

        Refused when another live aggregator owns the shard, or the live ones count a
        different number of shards.  The same aggregator (by name) reconnecting takes its
        shard back at once.
        """
        live = self.live(now)
        counts = {o.shards for s, o in live.items() if s != shard}
        if counts and shards not in counts:
            raise Refused(
                f"this aggregator claims shard {shard}/{shards} but the live aggregators "
                f"split the statistics into {counts.pop()} shards"
            )
        owner = live.get(shard)
        if owner is not None and owner.name != name:
            raise Refused(
                f"shard {shard}/{shards} is owned by live aggregator {owner.name!r} "
                f"(last heartbeat {now - owner.last_seen:.1f} s ago)"
            )
        new = owner is None or owner.identity != identity
        self._owners[shard] = Owner(identity, name, shards, now)
        return new

    def route(self, shard: int, now: float) -> bytes | None:
        """The live owner's identity, or None."""
        owner = self._owners.get(shard)
        if owner is None or now - owner.last_seen > self.timeout_s:
            return None
        return owner.identity

    def is_aggregator(self, identity: bytes) -> bool:
        return any(o.identity == identity for o in self._owners.values())

    def live(self, now: float) -> dict[int, Owner]:
        # a copy first: the metrics thread reads this while the broker thread updates the table
        return {s: o for s, o in list(self._owners.items()) if now - o.last_seen <= self.timeout_s}

    def shard_count(self, now: float) -> int | None:
        """How many shards the live aggregators split the statistics into, if any is live."""
        live = self.live(now)
        return next(iter(live.values())).shards if live else None

    def expire(self, now: float, forget_after_s: float) -> list[Owner]:
        """Forget owners silent for ``forget_after_s`` (they stay listed as dead until then)."""
        gone = [s for s, o in self._owners.items() if now - o.last_seen > forget_after_s]
        return [self._owners.pop(s) for s in gone]

    def report(self, now: float) -> list[dict[str, object]]:
        return [
            {
                "shard": s,
                "shards": o.shards,
                "name": o.name,
                "alive": now - o.last_seen <= self.timeout_s,
                "last_seen_s": round(now - o.last_seen, 3),
            }
            for s, o in sorted(self._owners.items())
        ]
