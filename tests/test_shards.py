"""broker.shards: who owns which shard, and for how long."""

from __future__ import annotations

import pytest

from broker.shards import Refused, ShardTable


def test_a_live_owner_keeps_its_shard_against_another_claim():
    table = ShardTable(heartbeat_s=1.0, liveness=3)
    assert table.heartbeat(b"a", 0, 2, "agg-a", now=0.0)
    with pytest.raises(Refused, match="owned by live aggregator 'agg-a'"):
        table.heartbeat(b"b", 0, 2, "agg-b", now=1.0)
    assert table.route(0, now=1.0) == b"a"


def test_a_silent_owner_loses_its_shard_after_the_liveness_window():
    table = ShardTable(heartbeat_s=1.0, liveness=3)
    table.heartbeat(b"a", 0, 1, "agg-a", now=0.0)
    assert table.route(0, now=2.9) == b"a"
    assert table.route(0, now=3.1) is None
    assert table.heartbeat(b"b", 0, 1, "agg-b", now=3.1)
    assert table.route(0, now=3.2) == b"b"


def test_the_same_aggregator_reconnecting_takes_its_shard_back_at_once():
    table = ShardTable(heartbeat_s=1.0, liveness=3)
    table.heartbeat(b"old-connection", 1, 2, "agg-a", now=0.0)
    assert table.heartbeat(b"new-connection", 1, 2, "agg-a", now=0.5)
    assert table.route(1, now=0.6) == b"new-connection"
    assert not table.heartbeat(b"new-connection", 1, 2, "agg-a", now=1.5)  # a refresh, not new


def test_a_claim_with_another_shard_count_is_refused():
    table = ShardTable(heartbeat_s=1.0, liveness=3)
    table.heartbeat(b"a", 0, 2, "agg-a", now=0.0)
    with pytest.raises(Refused, match="into 2 shards"):
        table.heartbeat(b"b", 1, 3, "agg-b", now=0.1)
    assert table.shard_count(now=0.2) == 2


def test_shard_count_is_unknown_without_live_aggregators_and_expire_forgets():
    table = ShardTable(heartbeat_s=1.0, liveness=3)
    assert table.shard_count(now=0.0) is None
    table.heartbeat(b"a", 0, 1, "agg-a", now=0.0)
    assert [o.name for o in table.expire(now=40.0, forget_after_s=30.0)] == ["agg-a"]
    assert table.report(now=40.0) == []
