"""Logging a refusal that repeats: once per interval with a count, so a stranger cannot fill a disk.

A peer without keys reconnects about 8 times a second, a refused aggregator retries every
heartbeat: each such refusal is worth one line, not one per attempt.  ``Throttled.log(key, ...)``
logs the first of its ``key`` (say: the refusal and the peer), drops the repeats within
``interval_s``, and the next after that says how many it dropped; so does :meth:`Throttled.flush`
(called from a service's tick) once the interval is over, when the repeats have stopped.  The
keys it remembers are bounded (the longest quiet forgotten first, with its count logged), so
many strangers cost bounded memory and log lines too.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Any

DEFAULT_INTERVAL_S = 60.0
MAX_KEYS = 1024


@dataclass
class _Seen:
    logged_at: float
    level: int
    msg: str
    args: tuple[Any, ...]
    dropped: int = 0


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
        self._last: OrderedDict[Hashable, _Seen] = OrderedDict()
        self._lock = threading.Lock()  # a ZAP handler logs from its own thread

    def log(self, level: int, key: Hashable, msg: str, *args: Any) -> bool:
        """Log ``msg % args`` unless ``key`` was logged within ``interval_s``; True if logged."""
        now = self._clock()
        with self._lock:
            seen = self._last.get(key)
            if seen is not None and now - seen.logged_at < self.interval_s:
                seen.dropped += 1
                self._last.move_to_end(key)  # a peer that keeps at it stays remembered
                return False
            self._last[key] = _Seen(now, level, msg, args)
            self._last.move_to_end(key)
            evicted = [self._last.popitem(last=False)[1] for _ in range(len(self._last) - self.max_keys)]
        for old in evicted:
            self._report(old, now)
        if seen is not None and seen.dropped:
            self._report(seen, now, level, msg, args)
        else:
            self.logger.log(level, msg, *args)
        return True

    def flush(self) -> None:
        """Log the counts of repeats whose interval is over (the peer has gone quiet since)."""
        now = self._clock()
        due = []
        with self._lock:
            for seen in self._last.values():
                if seen.dropped and now - seen.logged_at >= self.interval_s:
                    due.append(_Seen(seen.logged_at, seen.level, seen.msg, seen.args, seen.dropped))
                    seen.logged_at, seen.dropped = now, 0
        for seen in due:
            self._report(seen, now)

    def _report(self, seen: _Seen, now: float, *line: Any) -> None:
        """``line`` (level, msg, args), else the remembered one, with the repeats since."""
        level, msg, args = line or (seen.level, seen.msg, seen.args)
        if not seen.dropped:
            return
        self.logger.log(level, f"{msg} (%d more like it in the last %.0f s)", *args, seen.dropped, now - seen.logged_at)

    def warning(self, key: Hashable, msg: str, *args: Any) -> bool:
        return self.log(logging.WARNING, key, msg, *args)

    def error(self, key: Hashable, msg: str, *args: Any) -> bool:
        return self.log(logging.ERROR, key, msg, *args)
