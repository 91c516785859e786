"""`python -m bench.queue`: does batching hold a lone request back? Lone requests against in-process renders.

Starts a server for the artifact and sends, one at a time over gRPC, the 1st to `--lone`th request after
start, then `--burst` requests at `--concurrency`, then `--after` lone requests again. Each lone request's
latency is set against its own render in the worker process (the worker's stage times: text encode,
denoise, decode, image encode), and its queue wait (the worker's `queue_wait`) against the bucket's bound
(FLUX_BATCH_WAIT_MS). Target: every lone request within 1.10x its render plus the bound, and batches of
more than one under the burst. For scale, the same request rendered in this process before the server
starts (the renderer alone, prompt embeddings cached) is shown too. Writes bench-queue.json under --out.
"""

import argparse
import json
import statistics
import time
from pathlib import Path

import bentoml
import httpx
from rich.console import Console
from rich.table import Table

from bench.load import grpc_caller, request_stream, run_level
from bench.report import batch_histogram, batches_between
from models.artifact import load_pipeline
from service.client import FluxGrpcClient
from service.launcher import free_port, running_server
from service.runtime.placement import Placement
from service.runtime.prompts import PromptCache
from service.runtime.render import Renderer
from service.schema import GenerationRequest, WorkItem
from service.settings import Settings, bucket_of

TARGET_RATIO = 1.10


def in_process_seconds(tag: str, request: GenerationRequest, repeats: int) -> float:
    """Median seconds of the renderer alone for `request` (after one warm-up that fills the prompt cache)."""
    pipe, _ = load_pipeline(bentoml.models.get(tag).path)
    renderer = Renderer(pipe, Placement.resident(pipe.device), PromptCache("bench", 1 << 28))
    item = WorkItem(**request.model_dump())
    renderer.render([item])
    seconds = []
    for _ in range(repeats):
        started = time.perf_counter()
        renderer.render([item])
        seconds.append(time.perf_counter() - started)
    return statistics.median(seconds)


def lone_requests(client: FluxGrpcClient, request: GenerationRequest, count: int, seed0: int) -> list[dict]:
    """`count` requests one after another: latency seen by the caller, queue wait reported by the worker."""
    rows = []
    for k in range(count):
        started = time.perf_counter()
        reply = client.generate(request.model_copy(update={"seed": seed0 + k}))
        latency, stages = time.perf_counter() - started, dict(reply.timings.stages_ms)
        queue = stages.pop("queue_wait") / 1000
        rows.append({"latency_s": latency, "queue_s": queue, "render_s": sum(stages.values()) / 1000})
    return rows


def measure(args: argparse.Namespace) -> dict:
    request = GenerationRequest(prompt="a lone request", width=args.size, height=args.size, steps=args.steps)
    render_s = in_process_seconds(args.artifact, request, args.repeats)
    bound_s = Settings().wait_ms(bucket_of(args.size)) / 1000
    grpc_target = f"127.0.0.1:{free_port()}"
    env = {"FLUX_ARTIFACT": args.artifact, "FLUX_GRPC_ADDRESS": grpc_target}
    with running_server(free_port(), args.out / "queue-server.log", env) as url:
        client = FluxGrpcClient(grpc_target)
        after_start = lone_requests(client, request, args.lone, seed0=0)
        before = batch_histogram(httpx.get(f"{url}/metrics").text)
        burst = request_stream([{"width": args.size, "height": args.size, "steps": args.steps}], args.burst, 10_000)
        wall, _, statuses = run_level(grpc_caller(grpc_target), burst, args.concurrency)
        batches = batches_between(before, batch_histogram(httpx.get(f"{url}/metrics").text))
        after_burst = lone_requests(client, request, args.after, seed0=20_000)
    lone = after_start + after_burst
    return {
        **request.model_dump(include={"width", "height", "steps"}),
        "artifact": args.artifact,
        "in_process_s": render_s,
        "bound_s": bound_s,
        "after_start": after_start,
        "burst": {"requests": args.burst, "concurrency": args.concurrency, "wall_s": wall, "statuses": statuses},
        "burst_batches": batches,
        "after_burst": after_burst,
        "worst_ratio": max(row["latency_s"] / row["render_s"] for row in lone),
        "worst_queue_s": max(row["queue_s"] for row in lone),
        "met": all(row["latency_s"] <= TARGET_RATIO * row["render_s"] + bound_s for row in lone)
        and any(size != "<=1" for size in batches),
    }


def print_report(report: dict) -> None:
    table = Table(title=f"lone requests, {report['width']}² {report['steps']} steps: {report['artifact']}")
    for column in ("request", "latency s", "its render s", "latency / render", "queue wait s"):
        table.add_column(column, justify="right")
    rows = [(f"#{k + 1} after start", row) for k, row in enumerate(report["after_start"])]
    rows += [(f"#{k + 1} after the burst", row) for k, row in enumerate(report["after_burst"])]
    for name, row in rows:
        ratio = row["latency_s"] / row["render_s"]
        table.add_row(
            name, *(f"{row[key]:.3f}" for key in ("latency_s", "render_s")), f"{ratio:.3f}×", f"{row['queue_s']:.3f}"
        )
    console = Console()
    console.print(table)
    console.print(
        f"render in this process before the server: {report['in_process_s']:.3f} s; bound "
        f"{report['bound_s'] * 1000:.0f} ms; worst latency/render {report['worst_ratio']:.3f}×, worst queue wait "
        f"{report['worst_queue_s'] * 1000:.0f} ms; burst batches {report['burst_batches']}; target met: {report['met']}"
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.queue", description=__doc__)
    parser.add_argument("--artifact", default="flux-tiny-int8:latest", help="model-store tag to serve")
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--lone", type=int, default=20, help="lone requests right after start")
    parser.add_argument("--burst", type=int, default=300)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--after", type=int, default=5, help="lone requests after the burst")
    parser.add_argument("--repeats", type=int, default=5, help="in-process renders (the median is used)")
    parser.add_argument("--out", type=Path, default=Path("build/bench"))
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    report = measure(args)
    (args.out / "bench-queue.json").write_text(json.dumps(report, indent=2))
    print_report(report)


if __name__ == "__main__":
    main()
