"""One batch on the device at a time; when the device frees, the smallest resolution bucket waiting goes
first, so a small request does not wait behind large ones queued before it. A batch that has waited past
its bucket's latency budget goes first whatever its size, so large requests are not starved."""

import itertools
import threading
import time
from contextlib import contextmanager


class DeviceTurns:
    def __init__(self, patience_s: dict[int, float]) -> None:
        self.patience_s = patience_s  # bucket -> how long its batches wait before they jump the order
        self._changed = threading.Condition()
        self._busy = False
        self._waiting: dict[int, tuple[int, float]] = {}  # ticket -> (bucket, since)
        self._tickets = itertools.count()

    def _next(self) -> int:
        now = time.monotonic()
        overdue = [t for t, (bucket, since) in self._waiting.items() if now - since > self.patience_s[bucket]]
        return min(overdue) if overdue else min(self._waiting, key=lambda t: (self._waiting[t][0], t))

    @contextmanager
    def turn(self, bucket: int):
        with self._changed:
            ticket = next(self._tickets)
            self._waiting[ticket] = (bucket, time.monotonic())
            while self._busy or self._next() != ticket:
                self._changed.wait(timeout=1.0)  # re-checked each second: waiting batches become overdue
            del self._waiting[ticket]
            self._busy = True
        try:
            yield
        finally:
            with self._changed:
                self._busy = False
                self._changed.notify_all()
