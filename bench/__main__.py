"""`python -m bench`: load a running FLUX service over HTTP and gRPC; images/s, latency percentiles, $/image.

Writes bench.json and bench.png under --out, and prints the serving overhead: the same 1024² requests one at
a time over HTTP and in-process through the renderer to an encoded image (HTTP minus in-process, and over).
"""

import argparse
import json
import platform
import statistics
import sys
import time
from contextlib import ExitStack
from pathlib import Path

import bentoml
import httpx
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from bench.jobs import jobs_vs_sync, local_backends, print_jobs
from bench.load import Unreachable, check_reachable, grpc_caller, http_caller, request_stream, run_level
from bench.plot import plot_levels
from bench.report import LevelResult, batch_histogram, batches_between
from models.artifact import load_pipeline
from service.launcher import running_server
from service.runtime.placement import Placement
from service.runtime.render import Renderer
from service.schema import WorkItem

console = Console(stderr=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--url", default="http://127.0.0.1:3000", help="HTTP base URL of a running service")
    parser.add_argument("--grpc-target", default="127.0.0.1:50051")
    parser.add_argument("--serve", metavar="TAG", help="start a local server for this artifact tag first")
    parser.add_argument("--protocols", default="http,grpc")
    parser.add_argument("--concurrency", default="1,2,4,8", help="comma-separated levels")
    parser.add_argument("--requests", type=int, default=24, help="requests per level and protocol")
    parser.add_argument("--warmup", type=int, default=4, help="requests sent first and not measured")
    parser.add_argument("--mix", type=Path, default=Path(__file__).with_name("mix.json"), help="request shapes")
    parser.add_argument("--overhead-requests", type=int, default=6)
    parser.add_argument("--overhead-size", type=int, default=1024, help="side of the overhead requests")
    parser.add_argument("--overhead-steps", type=int, default=4)
    parser.add_argument("--gpu-usd-per-hour", type=float, default=2.0, help="what one replica's GPU costs")
    parser.add_argument(
        "--jobs",
        action="store_true",
        help="compare the job queue with the synchronous path "
        "instead (with --serve: starts a local Redis and S3 server for it)",
    )
    parser.add_argument("--jobs-size", type=int, default=256)
    parser.add_argument("--jobs-steps", type=int, default=4)
    parser.add_argument("--jobs-concurrency", type=int, default=4)
    parser.add_argument("--out", type=Path, default=Path("build/bench"))
    return parser.parse_args(argv)


def sweep(args, mix: list[dict]) -> list[LevelResult]:
    """Every protocol at every concurrency level, after a warm-up that is not measured."""
    levels = [int(level) for level in args.concurrency.split(",")]
    callers = {"http": http_caller(args.url), "grpc": grpc_caller(args.grpc_target)}
    protocols = args.protocols.split(",")
    results = []
    run_level(callers["http"], request_stream(mix, args.warmup, seed0=10**6), 1)
    with Progress(console=console) as progress:
        task = progress.add_task("load", total=len(levels) * len(protocols) * args.requests)
        for protocol in protocols:
            for concurrency in levels:
                progress.update(task, description=f"{protocol} × {concurrency}")
                before = batch_histogram(httpx.get(f"{args.url}/metrics").text)
                wall, latencies, statuses = run_level(
                    callers[protocol],
                    request_stream(mix, args.requests, seed0=concurrency * 1000),
                    concurrency,
                    on_done=lambda: progress.advance(task),
                )
                after = batch_histogram(httpx.get(f"{args.url}/metrics").text)
                results.append(
                    LevelResult(protocol, concurrency, wall, latencies, statuses, batches_between(before, after))
                )
    return results


def serving_overhead(args, artifact_tag: str) -> dict:
    """The same requests, one at a time: in-process to an encoded image vs through the server (HTTP)."""
    shape = {"width": args.overhead_size, "height": args.overhead_size, "steps": args.overhead_steps}
    requests = request_stream([shape], args.overhead_requests, seed0=99_000)
    pipe, _ = load_pipeline(bentoml.models.get(artifact_tag).path)
    renderer = Renderer(pipe, Placement.resident(pipe.device))
    renderer.render([WorkItem(**requests[0].model_dump())])  # warm-up
    direct, served = [], []
    for request in requests:
        started = time.perf_counter()
        renderer.render([WorkItem(**request.model_dump())])
        direct.append(time.perf_counter() - started)
    for request in requests:
        started = time.perf_counter()
        httpx.post(f"{args.url}/txt2img", json=request.model_dump(), timeout=900).raise_for_status()
        served.append(time.perf_counter() - started)
    median_direct, median_served = statistics.median(direct), statistics.median(served)
    return {
        "requests": len(requests),
        **shape,
        "in_process_median_s": median_direct,
        "served_median_s": median_served,
        "overhead_s": median_served - median_direct,
        "ratio": median_served / median_direct,
    }


def print_table(summaries: list[dict], overhead: dict) -> None:
    table = Table(title="flux-serve benchmark")
    for column in ("protocol", "conc.", "ok", "errors", "img/s", "p50 s", "p95 s", "p99 s", "$/image", "batches"):
        table.add_column(column, justify="right")
    for s in summaries:
        table.add_row(
            s["protocol"],
            str(s["concurrency"]),
            str(s["ok"]),
            str(s["errors_by_status"] or "-"),
            f"{s['images_per_s']:.2f}",
            f"{s['p50_s']:.3f}",
            f"{s['p95_s']:.3f}",
            f"{s['p99_s']:.3f}",
            f"{s['usd_per_image']:.6f}",
            " ".join(f"{k}:{v}" for k, v in s["batches"].items()),
        )
    Console(width=160).print(table)
    print(
        f"serving overhead at {overhead['width']}x{overhead['height']}, {overhead['steps']} steps: "
        f"+{overhead['overhead_s'] * 1000:.0f} ms, {overhead['ratio']:.3f}x  "
        f"(median {overhead['served_median_s']:.3f} s "
        f"over HTTP vs {overhead['in_process_median_s']:.3f} s in-process to an encoded image, "
        f"{overhead['requests']} requests, one at a time)"
    )


def run(args: argparse.Namespace) -> dict:
    mix = json.loads(args.mix.read_text())
    info = httpx.post(f"{args.url}/info", json={}, timeout=60).json()
    summaries = [level.summary(args.gpu_usd_per_hour) for level in sweep(args, mix)]
    overhead = serving_overhead(args, info["artifact"])
    print_table(summaries, overhead)
    return {
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "device": info["device"]},
        "artifact": info["artifact"],
        "recipe": info["recipe"],
        "gpu_usd_per_hour": args.gpu_usd_per_hour,
        "mix": mix,
        "levels": summaries,
        "overhead": overhead,
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    with ExitStack() as stack:
        if args.serve:
            env = {"FLUX_ARTIFACT": args.serve, "FLUX_GRPC_ADDRESS": args.grpc_target}
            if args.jobs:
                env |= local_backends(stack, args.out)
            args.url = stack.enter_context(
                running_server(int(args.url.rsplit(":", 1)[1]), args.out / "server.log", env)
            )
        try:
            check_reachable(args.url)
            if args.jobs:
                report = jobs_vs_sync(
                    args.url,
                    args.jobs_size,
                    args.jobs_steps,
                    args.requests,
                    args.jobs_concurrency,
                    args.gpu_usd_per_hour,
                )
                print_jobs(report)
                (args.out / "bench-jobs.json").write_text(json.dumps(report, indent=2))
                return 0
            report = run(args)
        except Unreachable as error:
            console.print(f"[red]error:[/red] {error}")
            return 2
    (args.out / "bench.json").write_text(json.dumps(report, indent=2))
    plot_levels(
        report["levels"], args.out / "bench.png", title=f"{report['artifact']} on {report['machine']['device']}"
    )
    print(f"wrote {args.out / 'bench.json'} and {args.out / 'bench.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
