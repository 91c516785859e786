"""Observability shared by fronts and worker: Prometheus metrics, and a request id in every log line."""

import logging
import uuid
from contextvars import ContextVar

import bentoml

_SECONDS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)

STAGE_SECONDS = bentoml.metrics.Histogram(
    name="flux_stage_seconds",
    documentation="Time per stage (queue_wait, image_encode: per request; text_encode, "
    "denoise: per pipeline call; decode: per image)",
    labelnames=["stage", "bucket"],
    buckets=_SECONDS,
)
REQUESTS = bentoml.metrics.Counter(
    name="flux_requests", documentation="Requests ended, by protocol and outcome", labelnames=["protocol", "outcome"]
)
IN_FLIGHT = bentoml.metrics.Gauge(
    name="flux_requests_in_flight",
    documentation="Requests admitted and not yet answered, every protocol, each call counted once",
    multiprocess_mode="livesum",
)
REFUSALS = bentoml.metrics.Counter(
    name="flux_refusals", documentation="Requests refused before queueing", labelnames=["reason"]
)
CANCELLATIONS = bentoml.metrics.Counter(
    name="flux_cancellations",
    documentation="Requests whose caller left, by where the worker dropped them",
    labelnames=["stage"],
)
STEPS_AFTER_CANCEL = bentoml.metrics.Histogram(
    name="flux_steps_after_cancel",
    documentation="Denoising steps a batch ran after its last caller left",
    buckets=(0, 1, 2, 3, 5, 10, 20, 50, 100),
)
OOM_SPLITS = bentoml.metrics.Counter(name="flux_oom_splits", documentation="Batches split after running out of memory")
PROMPT_CACHE = bentoml.metrics.Counter(
    name="flux_prompt_cache", documentation="Prompt-embedding cache lookups", labelnames=["result"]
)
BATCHES = bentoml.metrics.Counter(
    name="flux_batches", documentation="Batches run, by the protocols they mixed", labelnames=["protocols"]
)
STEPS = bentoml.metrics.Counter(
    name="flux_steps",
    documentation="Denoising steps per image: computed, or reused by step caching (the remaining blocks skipped)",
    labelnames=["result"],
)
LORA_CACHE = bentoml.metrics.Counter(
    name="flux_lora_cache", documentation="LoRA adapter lookups in the device cache, per batch", labelnames=["result"]
)
LORA_LOAD_SECONDS = bentoml.metrics.Histogram(
    name="flux_lora_load_seconds",
    documentation="Reading an adapter from the store onto the device (a cache miss)",
    buckets=_SECONDS,
)
JOBS_WAITING = bentoml.metrics.Gauge(
    name="flux_jobs_waiting",
    documentation="Jobs in the stream no replica has read yet (the stream's lag)",
    multiprocess_mode="mostrecent",
)
JOBS_PENDING = bentoml.metrics.Gauge(
    name="flux_jobs_pending",
    documentation="Jobs read and not yet acknowledged, by consumer (replica)",
    labelnames=["consumer"],
    multiprocess_mode="mostrecent",
)
JOBS_RECLAIMED = bentoml.metrics.Counter(
    name="flux_jobs_reclaimed", documentation="Jobs taken over from a replica that went silent"
)
JOBS_FINISHED = bentoml.metrics.Counter(
    name="flux_jobs_finished", documentation="Jobs finished by this replica", labelnames=["status"]
)
WEBHOOK_FAILURES = bentoml.metrics.Counter(
    name="flux_webhook_failures",
    documentation="Webhook attempts that failed, and webhooks given up",
    labelnames=["reason"],
)

request_id: ContextVar[str] = ContextVar("request_id", default="")
REQUEST_ID_HEADER = "x-request-id"


def new_request_id(offered: str | None = None) -> str:
    """The caller's id when it offered a sane one, else a fresh one."""
    if offered and len(offered) <= 128 and offered.isprintable():
        return offered
    return uuid.uuid4().hex


class _RequestIdFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if rid := request_id.get():
            record.msg = f"[request {rid}] {record.msg}"
        return True


logger = logging.getLogger("bentoml.flux")
logger.addFilter(_RequestIdFilter())
