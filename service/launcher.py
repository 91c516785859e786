"""Start `bentoml serve` in the background, wait until it is ready, stop it cleanly."""

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import psutil

REPO = Path(__file__).resolve().parent.parent


class ServerFailed(RuntimeError):
    """The server exited or did not become ready; the message holds its log's tail."""


def _log_tail(log: Path, lines: int = 30) -> str:
    return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])


def poll_ready(url: str, timeout_s: float, gone: Callable[[], str | None] = lambda: None) -> float:
    """Seconds until `url`/readyz answers 200. ServerFailed when `gone()` names why the server is not running,
    or when time runs out."""
    started = time.monotonic()
    while time.monotonic() - started < timeout_s:
        if (reason := gone()) is not None:
            raise ServerFailed(reason)
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return time.monotonic() - started
        except httpx.TransportError:
            pass
        time.sleep(0.25)
    raise ServerFailed(f"server not ready after {timeout_s:.0f} s")


def wait_ready(url: str, process: subprocess.Popen, log: Path, timeout_s: float) -> None:
    """`poll_ready` for a `start_server` process; a failure carries its log's tail."""
    try:
        poll_ready(
            url, timeout_s, lambda: None if process.poll() is None else f"server exited with {process.returncode}"
        )
    except ServerFailed as error:
        raise ServerFailed(f"{error}:\n{_log_tail(log)}") from None


def serve_command(port: int, target: str = "service.service:Flux") -> list[str]:
    return [sys.executable, "-m", "bentoml", "serve", target, "--host", "127.0.0.1", "--port", str(port)]


def start_server(
    port: int, log: Path, env: dict[str, str] | None = None, target: str = "service.service:Flux"
) -> subprocess.Popen:
    """Launch `bentoml serve` (of the source, or of a built Bento's tag) in its own process group, logging to
    `log`; does not wait for readiness."""
    with log.open("wb") as log_stream:
        return subprocess.Popen(
            serve_command(port, target),
            cwd=REPO,
            env={**os.environ, **(env or {})},
            stdout=log_stream,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


@contextmanager
def running_server(port: int, log: Path, env: dict[str, str] | None = None, timeout_s: float = 300) -> Iterator[str]:
    """Serve the FLUX service on 127.0.0.1:`port`; yields the base URL once ready; stops the server on exit."""
    process = start_server(port, log, env)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, process, log, timeout_s)
        yield url
    finally:
        stop(process)


def stop(process: subprocess.Popen, grace_s: float = 20) -> None:
    """SIGTERM, then SIGKILL after `grace_s`; BentoML's workers run in sessions of their own, so the
    whole process tree is collected first and nothing is left running."""
    if process.poll() is not None:
        return
    tree = psutil.Process(process.pid).children(recursive=True)
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(grace_s)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    _, alive = psutil.wait_procs(tree, timeout=grace_s)
    for child in alive:
        child.kill()


class LocalRedis:
    """A redis-server of our own (Debian's package) on 127.0.0.1:`port`, persisting every write to an
    append-only file in `folder`, so it can be stopped and started again without losing the queue."""

    def __init__(self, folder: Path, port: int) -> None:
        self.folder, self.port, self.process = folder, port, None
        folder.mkdir(parents=True, exist_ok=True)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout_s: float = 20) -> None:
        command = [
            "redis-server",
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--dir",
            str(self.folder),
            "--appendonly",
            "yes",
            "--appendfsync",
            "always",
            "--save",
            "",
            "--protected-mode",
            "no",
        ]
        with (self.folder / "redis.log").open("ab") as log:
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            ping = subprocess.run(["redis-cli", "-p", str(self.port), "ping"], capture_output=True, text=True)
            if ping.stdout.strip() == "PONG":
                return
            time.sleep(0.1)
        raise ServerFailed(f"redis-server not answering on {self.port}:\n{_log_tail(self.folder / 'redis.log')}")

    def stop(self) -> None:
        """SIGTERM: Redis flushes its append-only file and exits."""
        self.process.terminate()
        self.process.wait(30)


@contextmanager
def local_s3(bucket: str) -> Iterator[dict[str, str]]:
    """A local S3 server (moto's server mode, a test dependency) with `bucket`; yields the AWS_* variables
    that point boto3, s3fs and the service at it."""
    import boto3

    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-p", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    variables = {
        "AWS_ACCESS_KEY_ID": "test",
        "AWS_SECRET_ACCESS_KEY": "test",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
    }
    client = boto3.client(
        "s3",
        endpoint_url=variables["AWS_ENDPOINT_URL"],
        aws_access_key_id="test",
        aws_secret_access_key="test",
        region_name="us-east-1",
    )
    try:
        for _ in range(200):
            try:
                client.create_bucket(Bucket=bucket)
                break
            except Exception:  # noqa: BLE001 - not listening yet
                time.sleep(0.1)
        yield variables
    finally:
        server.terminate()
        server.wait()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
