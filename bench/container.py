"""`python -m bench.container IMAGE BENTO_TAG`: the same requests, one at a time, to the image under podman (host
network, read-only root filesystem, the Deployment's user) and to `bentoml serve BENTO_TAG` on the host.

Prints the median latency of each and their ratio (container / host). Needs podman and runc (Debian packages).
"""

import argparse
import json
import resource
import statistics
import subprocess
import time
from pathlib import Path

import httpx

from service.launcher import free_port, poll_ready, start_server, stop, wait_ready

PODMAN = ["podman", "--runtime", "runc"]
NOFILE = resource.getrlimit(resource.RLIMIT_NOFILE)[1]


def run_container(image: str, artifact: str, port: int) -> str:
    name = f"flux-bench-{port}"
    subprocess.run(
        [
            *PODMAN,
            "run",
            "-d",
            "--rm",
            "--name",
            name,
            "--network",
            "host",
            "--read-only",
            "--user",
            "1034:1034",
            "--ulimit",
            f"nofile={NOFILE}:{NOFILE}",
            "--ulimit",
            "nproc=32768:32768",
            "--tmpfs",
            "/tmp:rw,mode=1777",
            "--tmpfs",
            "/home/bentoml/prometheus_multiproc_dir:rw,mode=1777",
            "-e",
            f"FLUX_ARTIFACT={artifact}",
            "-e",
            f"PORT={port}",
            "-e",
            f"FLUX_GRPC_ADDRESS=127.0.0.1:{free_port()}",
            image,
        ],
        check=True,
        capture_output=True,
    )
    return name


def latencies(url: str, body: dict, count: int) -> list[float]:
    httpx.post(f"{url}/txt2img", json={**body, "seed": 10**6}, timeout=300).raise_for_status()  # warm-up
    measured = []
    for seed in range(count):
        started = time.perf_counter()
        httpx.post(f"{url}/txt2img", json={**body, "seed": seed}, timeout=300).raise_for_status()
        measured.append(time.perf_counter() - started)
    return measured


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.container", description=__doc__)
    parser.add_argument("image")
    parser.add_argument("bento", help="the Bento tag the image was built from (served on the host)")
    parser.add_argument("--artifact", required=True)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--requests", type=int, default=10)
    parser.add_argument("--out", type=Path, default=Path("build/bench"))
    args = parser.parse_args()
    body = {"prompt": "container bench", "width": args.size, "height": args.size, "steps": args.steps}
    args.out.mkdir(parents=True, exist_ok=True)
    port = free_port()
    name = run_container(args.image, args.artifact, port)
    try:
        poll_ready(f"http://127.0.0.1:{port}", timeout_s=300)
        container = latencies(f"http://127.0.0.1:{port}", body, args.requests)
    finally:
        subprocess.run([*PODMAN, "rm", "-f", "-t", "0", name], capture_output=True)
    port = free_port()
    host_env = {"FLUX_ARTIFACT": args.artifact, "FLUX_GRPC_ADDRESS": f"127.0.0.1:{free_port()}"}
    process = start_server(port, args.out / "host-server.log", host_env, target=args.bento)
    try:
        wait_ready(f"http://127.0.0.1:{port}", process, args.out / "host-server.log", timeout_s=300)
        host = latencies(f"http://127.0.0.1:{port}", body, args.requests)
    finally:
        stop(process)
    report = {
        **body,
        "requests": args.requests,
        "container_median_s": statistics.median(container),
        "host_median_s": statistics.median(host),
    }
    report["ratio"] = report["container_median_s"] / report["host_median_s"]
    (args.out / "container.json").write_text(json.dumps(report, indent=2))
    print(
        f"{args.size}², {args.steps} steps, {args.requests} requests one at a time: container "
        f"{report['container_median_s']:.3f} s, host {report['host_median_s']:.3f} s (medians), "
        f"container/host {report['ratio']:.3f}x"
    )


if __name__ == "__main__":
    main()
