"""Timing and reporting shared by the benchmarks: interleaved rounds, medians, ratios."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np


def interleaved(cases: Mapping[str, Callable[[], object]], rounds: int, per_round: int) -> dict[str, np.ndarray]:
    """Seconds per call of each case, one sample per round.

    The cases take turns within every round, so drift on a noisy machine (another process,
    frequency changes) falls on all of them alike and their ratios stay meaningful.
    """
    samples: dict[str, list[float]] = {name: [] for name in cases}
    for fn in cases.values():  # warm caches and lazy initialization
        fn()
    for _ in range(rounds):
        for name, fn in cases.items():
            t0 = time.perf_counter()
            for _ in range(per_round):
                fn()
            samples[name].append((time.perf_counter() - t0) / per_round)
    return {name: np.asarray(s) for name, s in samples.items()}


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A plain-text table, numbers right-aligned."""
    cells = [[_fmt(c) for c in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]

    def line(r: Sequence[str]) -> str:
        return "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths)))

    return "\n".join([line(headers), line(["-" * w for w in widths]), *(line(r) for r in cells)])


def _fmt(value: Any) -> str:
    if value is None:  # a figure this run has no reference for
        return "-"
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 10 else f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.1f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def emit(title: str, headers: Sequence[str], rows: Sequence[Sequence[Any]], as_json: bool, **extra: Any) -> None:
    """Print the table, or one JSON object with the same rows."""
    if as_json:
        print(json.dumps({"title": title, "columns": list(headers), "rows": [list(r) for r in rows], **extra}))
    else:
        print(f"{title}\n\n{table(headers, rows)}")
        for key, value in extra.items():
            print(f"{key}: {value}")
