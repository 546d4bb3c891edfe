"""Prometheus metrics for the broker and the aggregator (``--metrics-port``).

Collectors read the services' own counters when Prometheus scrapes, so the hot paths pay
nothing for them.  They run on the HTTP server's thread while the service changes its state:
each mapping is copied in one call (atomic under the GIL) and arrays are read up to the
length they all have.  The HTTP server listens on loopback only.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

from psq.counters import Counters

if TYPE_CHECKING:
    from broker.aggregator import Aggregator
    from broker.broker import Broker


def serve(port: int, collector: Any) -> CollectorRegistry:
    registry = CollectorRegistry()
    registry.register(collector)
    start_http_server(port, addr="127.0.0.1", registry=registry)
    return registry


def _traffic(role: str, counters: Counters) -> Iterator[Any]:
    messages = CounterMetricFamily("psq_messages", "Messages handled, by command", labels=["role", "command"])
    for command, n in list(counters.messages.items()):
        messages.add_metric([role, command], n)
    yield messages
    sizes = CounterMetricFamily("psq_bytes", "Bytes received, by command", labels=["role", "command"])
    for command, n in list(counters.bytes.items()):
        sizes.add_metric([role, command], n)
    yield sizes
    errors = CounterMetricFamily("psq_errors", "Refused or failed messages, by code", labels=["role", "code"])
    for code, n in list(counters.errors.items()):
        errors.add_metric([role, code], n)
    yield errors


class BrokerCollector:
    def __init__(self, broker: Broker) -> None:
        self.broker = broker

    def collect(self) -> Iterator[Any]:
        b, now = self.broker, time.monotonic()
        yield from _traffic("broker", b.counters)
        rtt = HistogramMetricFamily(
            "psq_round_trip_seconds",
            "From forwarding a request to an aggregator to forwarding its reply",
            labels=["role"],
        )
        rtt.add_metric(["broker"], b.round_trips.buckets(), b.round_trips.total)
        yield rtt
        live = GaugeMetricFamily("psq_aggregators_live", "Aggregators whose heartbeats arrive")
        live.add_metric([], len(b.table.live(now)))
        yield live
        workers = GaugeMetricFamily("psq_workers_live", "Workers seen in the last minute")
        workers.add_metric([], b.workers_seen())
        yield workers


class AggregatorCollector:
    def __init__(self, aggregator: Aggregator) -> None:
        self.aggregator = aggregator

    def collect(self) -> Iterator[Any]:
        a = self.aggregator
        yield from _traffic("aggregator", a.counters)
        labels = ["shard", "job", "layer"]
        version = GaugeMetricFamily("psq_layer_version", "Updates applied to a layer's history", labels=labels)
        count = GaugeMetricFamily("psq_layer_count", "A layer's history count (decayed samples)", labels=labels)
        age = GaugeMetricFamily("psq_layer_staleness_seconds", "Seconds since a layer's last update", labels=labels)
        grads = GaugeMetricFamily(
            "psq_layer_gradient_count", "A layer's gradient history count (decayed samples)", labels=labels
        )
        shard, now = str(a.shard), time.monotonic()
        for job_name, job in list(a.store.jobs.items()):
            names, versions, counts, updated = list(job.names), job.versions, job.counts, job.updated
            grad_counts = job.grad_counts
            for i in range(min(len(names), versions.size, counts.size, updated.size, grad_counts.size)):
                key = [shard, job_name, names[i]]
                version.add_metric(key, float(versions[i]))
                count.add_metric(key, float(counts[i]))
                age.add_metric(key, now - updated[i] if updated[i] else float("nan"))
                grads.add_metric(key, float(grad_counts[i]))
        yield from (version, count, age, grads)
