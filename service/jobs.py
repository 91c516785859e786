"""Per-request progress and cancellation, shared between the batching worker and its callers."""

from collections import OrderedDict

MAX_REMEMBERED = 10_000  # cancellations of jobs that already finished are forgotten past this many


class JobBoard:
    def __init__(self) -> None:
        self.steps_done: dict[str, int] = {}
        self.cancelled: OrderedDict[str, None] = OrderedDict()

    def start(self, job_ids: list[str]) -> None:
        self.steps_done.update({job_id: 0 for job_id in job_ids if job_id})

    def report(self, job_ids: list[str], steps: int) -> None:
        self.steps_done.update({job_id: steps for job_id in job_ids if job_id})

    def finish(self, job_ids: list[str]) -> None:
        for job_id in job_ids:
            self.steps_done.pop(job_id, None)
            self.cancelled.pop(job_id, None)

    def cancel(self, job_id: str) -> None:
        self.cancelled[job_id] = None
        while len(self.cancelled) > MAX_REMEMBERED:
            self.cancelled.popitem(last=False)

    def is_cancelled(self, job_id: str) -> bool:
        return bool(job_id) and job_id in self.cancelled

    def progress(self, job_id: str) -> int:
        """Steps done, or -1 for a job that is queued, finished or unknown."""
        return self.steps_done.get(job_id, -1)
