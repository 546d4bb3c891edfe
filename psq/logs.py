"""Logging a refusal that repeats: once per interval with a count, so a stranger cannot fill a disk.

A peer without keys reconnects about 8 times a second, a refused aggregator retries every
heartbeat: each such refusal is worth one line, not one per attempt.  ``Throttled.log(key, ...)``
logs the first of its ``key`` (say: the refusal and the peer), drops the repeats within
``interval_s``, and the next after that says how many it dropped.  The keys it remembers are
bounded (the longest quiet forgotten first), so many strangers cost bounded memory too.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Any

DEFAULT_INTERVAL_S = 60.0
MAX_KEYS = 1024


class Throttled:
    """A logger's view that logs each ``key`` at most once per ``interval_s``, with a count."""

    def __init__(
        self,
        logger: logging.Logger,
        interval_s: float = DEFAULT_INTERVAL_S,
        max_keys: int = MAX_KEYS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.logger, self.interval_s, self.max_keys, self._clock = logger, interval_s, max_keys, clock
        self._last: OrderedDict[Hashable, tuple[float, int]] = OrderedDict()  # key -> (logged at, dropped since)
        self._lock = threading.Lock()  # a ZAP handler logs from its own thread

    def log(self, level: int, key: Hashable, msg: str, *args: Any) -> bool:
        """Log ``msg % args`` unless ``key`` was logged within ``interval_s``; True if logged."""
        now = self._clock()
        with self._lock:
            logged_at, dropped = self._last.get(key, (None, 0))
            if logged_at is not None and now - logged_at < self.interval_s:
                self._last[key] = (logged_at, dropped + 1)
                self._last.move_to_end(key)  # a peer that keeps at it stays remembered
                return False
            self._last[key] = (now, 0)
            self._last.move_to_end(key)
            while len(self._last) > self.max_keys:
                self._last.popitem(last=False)
        if dropped:
            msg, args = f"{msg} (%d more like it in the last %.0f s)", (*args, dropped, now - logged_at)
        self.logger.log(level, msg, *args)
        return True

    def warning(self, key: Hashable, msg: str, *args: Any) -> bool:
        return self.log(logging.WARNING, key, msg, *args)

    def error(self, key: Hashable, msg: str, *args: Any) -> bool:
        return self.log(logging.ERROR, key, msg, *args)
