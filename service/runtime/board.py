"""Per-request progress and cancellation, shared between the batching worker and its callers."""

from collections import OrderedDict

MAX_REMEMBERED = 10_000  # cancellations of requests that already finished are forgotten past this many


class Board:
    def __init__(self) -> None:
        self.steps_done: dict[str, int] = {}
        self.cancelled: OrderedDict[str, int] = OrderedDict()  # request id -> steps it had done when cancelled

    def start(self, request_ids: list[str]) -> None:
        self.steps_done.update({rid: 0 for rid in request_ids if rid})

    def report(self, request_ids: list[str], steps: int) -> None:
        self.steps_done.update({rid: steps for rid in request_ids if rid})

    def finish(self, request_ids: list[str]) -> None:
        for rid in request_ids:
            self.steps_done.pop(rid, None)
            self.cancelled.pop(rid, None)

    def cancel(self, request_id: str) -> None:
        self.cancelled[request_id] = self.steps_done.get(request_id, 0)
        while len(self.cancelled) > MAX_REMEMBERED:
            self.cancelled.popitem(last=False)

    def is_cancelled(self, request_id: str) -> bool:
        return bool(request_id) and request_id in self.cancelled

    def steps_after_cancel(self, request_ids: list[str], steps: int) -> int:
        """Steps run since the last of these (cancelled) requests was cancelled."""
        return steps - max(self.cancelled[rid] for rid in request_ids)

    def progress(self, request_id: str) -> int:
        """Steps done, or -1 for a request that is queued, finished or unknown."""
        return self.steps_done.get(request_id, -1)
