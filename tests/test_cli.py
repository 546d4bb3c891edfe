"""The ``psq`` command line, run as users run it: a separate process."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

import psq


def run_psq(*args: str, timeout_s: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "psq", *args], capture_output=True, text=True, timeout=timeout_s)


def test_version():
    out = run_psq("--version")
    assert out.returncode == 0 and out.stdout.strip() == f"psq {psq.__version__}"


def test_import_psq_does_not_import_torch():
    code = "import sys, psq, psq.protocol, psq.stats, psq.cli; assert 'torch' not in sys.modules, 'torch imported'"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr


def test_bench_codec_prints_its_table_with_the_reference_rows():
    out = run_psq("bench", "codec", "--rounds", "2", "--per-round", "3", "--json")
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    methods = ["floor: one numpy copy", "psq: encode + decode + validate", "plain msgpack of the bytes"]
    assert [row[:2] for row in result["rows"]] == [[m, k] for m in ("moments", "moments + gradients") for k in methods]
    assert all(row[2] > 0 and row[4] > 212_000 for row in result["rows"])
    assert all(row[4] > 425_000 for row in result["rows"] if row[0] == "moments + gradients")


def test_bad_flag_value_gets_a_clear_error():
    out = run_psq("bench", "codec", "--rounds", "zero")
    assert out.returncode == 2 and "expected a positive integer, got 'zero'" in out.stderr


@pytest.mark.slow
def test_bench_transport_prints_psq_beside_its_floor():
    out = run_psq("bench", "transport", "--round-trips", "5", "--seconds", "0.2", "--json", timeout_s=240)
    assert out.returncode == 0, out.stderr
    rows = json.loads(out.stdout)["rows"]
    paths = [(row[0], row[1]) for row in rows]
    messages = ("resnet50 (53 layers, 26,560 ch)", "resnet50 + gradient means", "small (1 layer, 64 ch)")
    assert paths == [(m, p) for m in messages for p in ("floor: zmq.proxy + echo", "psq, 1 shard", "psq, 2 shards")]
    assert all(row[2] > 0 and row[5] > 0 for row in rows)


def test_bench_layer_times_every_variant_beside_batchnorm():
    out = run_psq("bench", "layer", "--shapes", "small", "--rounds", "1", "--min-round-s", "0.001", "--json")
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result["columns"][2:] == ["bn µs", "psq µs", "psq / bn", "w=0 / bn", "psq torch / bn", "floor / bn"]
    shapes = ["1x16x8x8", "8x16x32x32", "8x64x8x8", "32x64x16x16"]
    assert [row[:2] for row in result["rows"]] == [[s, f] for s in shapes for f in ("contiguous", "channels_last")]
    assert all(row[2] > 0 and row[3] > 0 and row[4] == row[3] / row[2] for row in result["rows"])
    assert all(v > 0 for row in result["rows"] for v in row[5:])


def test_bench_emulate_prints_each_method_with_its_losses():
    out = run_psq(
        "bench", "emulate", "--settings", "a", "--seeds", "2", "--epochs", "1", "--max-steps-per-epoch", "4",
        "--methods", "sync", "psq:sync_layers=1-2", "--json",
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result["columns"] == ["setting", "method", "test acc %", "per seed", "test loss", "train loss", "s/run"]
    assert [row[1] for row in result["rows"]] == ["sync", "psq:sync_layers=1-2"]
    assert all(len(row[3].split()) == 2 and row[6] > 0 for row in result["rows"])


def test_bench_emulate_refuses_an_unknown_probe():
    out = run_psq("bench", "emulate", "--methods", "psq:staleness=2")
    assert out.returncode == 2 and "an emulated variant takes key=value pairs of" in out.stderr
