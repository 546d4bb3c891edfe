"""The command lines of psq's own benchmarks (``psq bench codec|transport|load|layer``), as
settings classes: flags only (``environment = False``), generated and checked by
:mod:`psq.config` like every other setting.  The trainer's benchmarks are in workers/settings.py.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

from psq.config import SettingsError, choice, flag, positive_float, positive_int, setting

JSON_HELP = "print one JSON object instead of a table"


def letters(allowed: str) -> Callable[[str], str]:
    """A parser of a selection written as letters from ``allowed`` (``"124"``, ``"abcdef"``)."""

    def parse(text: str) -> str:
        if not text or any(c not in allowed for c in text):
            raise SettingsError(f"expected letters from {allowed!r}, got {text!r}")
        return "".join(dict.fromkeys(text))

    parse.__name__ = "letters"
    return parse


@dataclass(frozen=True)
class Bench:
    """What every benchmark's command line has: flags only, and a JSON report instead of a table."""

    environment: ClassVar[bool] = False
    json: bool = setting(False, JSON_HELP, flag)


@dataclass(frozen=True)
class CodecBench(Bench):
    """encode + decode of one step of ResNet-50 statistics"""

    rounds: int = setting(30, "timed rounds", positive_int)
    per_round: int = setting(200, "messages per round", positive_int)


@dataclass(frozen=True)
class TransportBench(Bench):
    """round trips and pushes/s through broker and aggregators"""

    round_trips: int = setting(300, "timed round trips", positive_int)
    seconds: float = setting(3.0, "seconds per rate measurement", positive_float)


@dataclass(frozen=True)
class LoadBench(Bench):
    """many simulated workers through 1, 2 and 4 shards"""

    step_ms: int = setting(250, "simulated step time in milliseconds", positive_int)
    seconds: float = setting(5.0, "seconds per measurement", positive_float)
    max_workers: int = setting(512, "stop there", positive_int)
    shards: str = setting("124", "shard counts to try, as digits", letters("124"))


@dataclass(frozen=True)
class LayerBench(Bench):
    """forward + backward of one PSBatchNorm against nn.BatchNorm2d"""

    shapes: str = setting("all", "which shapes: small, resnet50 or all", choice("small", "resnet50", "all"))
    rounds: int = setting(7, "timed rounds", positive_int)
    min_round_s: float = setting(0.05, "least seconds per variant per round", positive_float)
    compile: bool = setting(False, "also bn and psq under torch.compile (inductor)", flag)
