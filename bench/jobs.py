"""`python -m bench --jobs`: the same requests through the job queue and synchronously, at one concurrency.

A job's latency runs from submit (`Prefer: wait=60`) to the result's bytes fetched from its presigned URL.
"""

import statistics
import time
from contextlib import ExitStack
from pathlib import Path

import httpx

from bench.load import CALL_TIMEOUT_S, http_caller, request_stream, run_level
from bench.report import LevelResult, batch_histogram, batches_between
from service.launcher import LocalRedis, free_port, local_s3
from service.schema import GenerationRequest

RESULTS_URL = "s3://flux-results/bench"


def local_backends(stack: ExitStack, folder: Path) -> dict[str, str]:
    """A Redis and a local S3 server for the duration of `stack`; the server's variables that use them."""
    queue = LocalRedis(folder / "redis", free_port())
    queue.start()
    stack.callback(queue.stop)
    aws = stack.enter_context(local_s3("flux-results"))
    return {**aws, "FLUX_JOBS_REDIS_URL": queue.url, "FLUX_RESULTS_URL": RESULTS_URL}


def jobs_caller(url: str, hops: list[dict[str, float]] | None = None):
    """Submit with `Prefer: wait=60`, then fetch the result's bytes (one client each, kept open as a user's
    would be: a fresh client per call costs ~20 ms of TLS set-up on this machine); each succeeded job's hops
    (its record's `timings_ms`, `fetch`: the result's download, and `total`: the whole call) go to `hops`."""
    client = httpx.Client(base_url=url, timeout=CALL_TIMEOUT_S)
    storage = httpx.Client(timeout=CALL_TIMEOUT_S)

    def call(request: GenerationRequest) -> str:
        started = time.perf_counter()
        try:
            answer = client.post("/v1/jobs", json=request.model_dump(mode="json"), headers={"prefer": "wait=60"})
            if answer.status_code != 200 or answer.json()["status"] != "succeeded":
                job = answer.json()
                return f"{answer.status_code} {job.get('status', '')} {(job.get('error') or {}).get('message', '')}"
            fetching = time.perf_counter()
            status = str(storage.get(answer.json()["result"]["url"]).status_code)
            done = time.perf_counter()
            if hops is not None:
                timings = answer.json()["timings_ms"]
                hops.append({**timings, "fetch": 1000 * (done - fetching), "total": 1000 * (done - started)})
            return status
        except httpx.TransportError as error:
            return type(error).__name__

    return call


def hop_means(hops: list[dict[str, float]]) -> dict[str, float]:
    """Mean milliseconds per hop; `outside`: the call's time outside the worker's queue, render, the result's
    store and its fetch (submit, the waiter's wake-up, the answer: what the jobs path adds beyond storage)."""
    names = ("queued", "render", "store", "fetch", "total")
    means = {name: statistics.fmean(hop[name] for hop in hops) for name in names}
    accounted = means["queued"] + means["render"] + means["store"] + means["fetch"]
    return {**means, "outside": means["total"] - accounted}


def jobs_vs_sync(url: str, size: int, steps: int, requests: int, concurrency: int, gpu_usd_per_hour: float) -> dict:
    shape = {"width": size, "height": size, "steps": steps}
    run_level(jobs_caller(url), request_stream([shape], concurrency * 2, seed0=5_000), concurrency)  # warm-up
    levels, hops = {}, []
    for path, caller in (("sync", http_caller(url)), ("jobs", jobs_caller(url, hops))):
        before = batch_histogram(httpx.get(f"{url}/metrics").text)
        wall, latencies, statuses = run_level(caller, request_stream([shape], requests, seed0=6_000), concurrency)
        batches = batches_between(before, batch_histogram(httpx.get(f"{url}/metrics").text))
        levels[path] = LevelResult(path, concurrency, wall, latencies, statuses, batches).summary(gpu_usd_per_hour)
    ratios = {f"{stat}_ratio": levels["jobs"][stat] / levels["sync"][stat] for stat in ("p50_s", "p95_s")}
    overhead_ms = 1000 * (levels["jobs"]["p50_s"] - levels["sync"]["p50_s"])
    return {
        **shape,
        "requests": requests,
        "concurrency": concurrency,
        **levels,
        **ratios,
        "hops_ms": hop_means(hops),
        "overhead_p50_ms": overhead_ms,
    }


def print_jobs(report: dict) -> None:
    for path in ("sync", "jobs"):
        level = report[path]
        print(
            f"{path:>4}: {level['ok']} ok {level['errors_by_status'] or ''} {level['images_per_s']:.2f} img/s, "
            f"p50 {level['p50_s']:.3f} s, p95 {level['p95_s']:.3f} s, batches {level['batches']}"
        )
    print(
        f"jobs/sync at {report['width']}x{report['height']}, {report['steps']} steps, concurrency "
        f"{report['concurrency']}: p50 {report['p50_s_ratio']:.3f}x, p95 {report['p95_s_ratio']:.3f}x, "
        f"{report['overhead_p50_ms']:.0f} ms more at p50"
    )
    print("job hops (mean ms): " + ", ".join(f"{name} {ms:.1f}" for name, ms in report["hops_ms"].items()))
