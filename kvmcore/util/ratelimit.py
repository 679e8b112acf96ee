"""Logging that a guest cannot turn into a host denial of service."""

from __future__ import annotations

import logging
import time


class RateLimitedLog:
    """At most ``per_second`` records per second; the rest are counted and summarised in the next record."""

    def __init__(self, logger: logging.Logger, per_second: int = 10) -> None:
        self._logger = logger
        self._per_second = per_second
        self._window = 0.0
        self._count = 0
        self.suppressed = 0

    def _allow(self) -> bool:
        now = time.monotonic()
        if now - self._window >= 1.0:
            self._window = now
            self._count = 0
        self._count += 1
        if self._count > self._per_second:
            self.suppressed += 1
            return False
        return True

    def log(self, level: int, msg: str, *args: object) -> None:
        if not self._logger.isEnabledFor(level):
            return
        if self._allow():
            if self.suppressed:
                msg = msg + " (%d similar messages suppressed)"
                args = (*args, self.suppressed)
                self.suppressed = 0
            self._logger.log(level, msg, *args)

    def debug(self, msg: str, *args: object) -> None:
        self.log(logging.DEBUG, msg, *args)

    def info(self, msg: str, *args: object) -> None:
        self.log(logging.INFO, msg, *args)

    def warning(self, msg: str, *args: object) -> None:
        self.log(logging.WARNING, msg, *args)
