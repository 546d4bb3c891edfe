"""psq.config: flags over environment over defaults, and one meaning per variable."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import pytest

from psq import config
from psq.config import AggregatorSettings, BrokerSettings, SettingsError, setting
from workers.settings import TrainSettings


def parse(cls: type, argv: list[str], environ: dict[str, str]):
    parser = argparse.ArgumentParser()
    config.add_arguments(parser, cls)
    return config.load(cls, parser.parse_args(argv), environ)


def test_a_flag_wins_over_the_environment_which_wins_over_the_default():
    assert parse(BrokerSettings, [], {}).hwm == 100
    assert parse(BrokerSettings, [], {"PSQ_HWM": "7"}).hwm == 7
    assert parse(BrokerSettings, ["--hwm", "9"], {"PSQ_HWM": "7"}).hwm == 9
    with pytest.raises(SettingsError, match="PSQ_HWM: expected a positive integer, got '0'"):
        parse(BrokerSettings, [], {"PSQ_HWM": "0"})


def test_one_environment_configures_every_role_without_collisions():
    env = {
        "PSQ_FRONTEND": "tcp://127.0.0.1:7000",
        "PSQ_BACKEND": "tcp://127.0.0.1:7001",
        "PSQ_BROKER_METRICS_PORT": "9100",
        "PSQ_AGGREGATOR_METRICS_PORT": "9110",
        "PSQ_BROKER_SECRET_KEY": "keys/broker.key_secret",
        "PSQ_WORKER_KEYS": "keys/workers",
        "PSQ_AGGREGATOR_KEYS": "keys/aggregators",
        "PSQ_AGGREGATOR_SECRET_KEY": "keys/aggregator.key_secret",
        "PSQ_WORKER_SECRET_KEY": "keys/worker.key_secret",
        "PSQ_SERVER_KEY": "keys/broker.key",
        "PSQ_SNAPSHOT": "runs/aggregator-{shard}.snap",
        "PSQ_WORKERS": "4",
    }
    config.check_environment(env)
    broker = parse(BrokerSettings, [], env)
    shards = [parse(AggregatorSettings, ["--shard", f"{i}/2"], env) for i in range(2)]
    trainer = parse(TrainSettings, [], env)
    assert (broker.frontend, trainer.frontend, shards[0].backend) == (
        "tcp://127.0.0.1:7000",
        "tcp://127.0.0.1:7000",
        "tcp://127.0.0.1:7001",
    )
    assert [broker.metrics_port, *(s.shard_metrics_port for s in shards)] == [9100, 9110, 9111]
    assert [s.snapshot_path for s in shards] == [Path("runs/aggregator-0.snap"), Path("runs/aggregator-1.snap")]
    assert (broker.secret_key, shards[0].secret_key, trainer.secret_key) == (
        Path("keys/broker.key_secret"),
        Path("keys/aggregator.key_secret"),
        Path("keys/worker.key_secret"),
    )
    assert trainer.workers == 4 and shards[0].sync_workers is None  # PSQ_WORKERS is the trainer's alone


def test_shards_sharing_a_snapshot_path_from_the_environment_need_its_placeholder():
    with pytest.raises(SettingsError, match=r"PSQ_SNAPSHOT=runs/agg.snap is read by every shard's aggregator"):
        parse(AggregatorSettings, ["--shard", "1/2"], {"PSQ_SNAPSHOT": "runs/agg.snap"})
    # one shard, or a path of each aggregator's own on its command line, is fine
    assert parse(AggregatorSettings, [], {"PSQ_SNAPSHOT": "runs/agg.snap"}).snapshot_path == Path("runs/agg.snap")
    own = parse(AggregatorSettings, ["--shard", "1/2", "--snapshot", "runs/agg-1.snap"], {"PSQ_SNAPSHOT": "x"})
    assert own.snapshot_path == Path("runs/agg-1.snap")
    with pytest.raises(SettingsError, match="metrics port 65535 \\+ shard 1 is past 65535"):
        parse(AggregatorSettings, ["--shard", "1/2", "--metrics-port", "65535"], {})


def test_an_unknown_or_retired_variable_is_an_error_that_lists_the_known_ones():
    for retired in ("PSQ_METRICS_PORT", "PSQ_SECRET_KEY"):
        with pytest.raises(SettingsError, match=rf"unknown environment variable\(s\) {retired}; psq knows .*PSQ_"):
            config.check_environment({retired: "1"})


def test_a_variable_two_roles_would_read_differently_is_refused():
    @dataclass(frozen=True)
    class One:
        port: int = setting(1, "one's port", config.positive_int)

    @dataclass(frozen=True)
    class Other:
        port: int = setting(2, "another port", config.positive_int)

    @dataclass(frozen=True)
    class Same:
        port: int = setting(2, "the same port", config.positive_int, shared=True)

    @dataclass(frozen=True)
    class SameOtherDefault:
        port: int = setting(3, "the same port", config.positive_int, shared=True)

    with pytest.raises(SettingsError, match=r"PSQ_PORT is read by One\.port, Other\.port: mark it shared"):
        config.check_unambiguous((One, Other))
    with pytest.raises(SettingsError, match="PSQ_PORT is read by"):
        config.check_unambiguous((One, Same))  # shared on one side only
    with pytest.raises(SettingsError, match="PSQ_PORT is read by"):
        config.check_unambiguous((Same, SameOtherDefault))  # unset, the two would differ
    config.check_unambiguous((Same, Same))
    config.check_unambiguous(config.SETTINGS)


def test_a_benchmarks_settings_are_flags_only_and_take_several_values_where_declared():
    from psq.bench.settings import LoadBench
    from workers.settings import AccuracyBench

    assert parse(LoadBench, ["--shards", "421"], {"PSQ_SECONDS": "9"}).shards == "421"  # not read
    assert parse(LoadBench, [], {}).seconds == 5.0
    with pytest.raises(SystemExit):
        parse(LoadBench, ["--shards", "3"], {})  # argparse reports the letters it takes
    acc = parse(AccuracyBench, ["--methods", "local", "psq:history_weight=0.8"], {})
    assert [m.name for m in acc.methods] == ["local", "psq:history_weight=0.8"]
    assert config.known_environment().isdisjoint({"PSQ_SHARDS", "PSQ_METHODS", "PSQ_ROUNDS"})
