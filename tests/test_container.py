"""The Bento's image, run the way the Kubernetes base runs it (`make container-test`; needs podman and the images
`make container` builds): non-root UID from the Deployment, read-only root filesystem with the Deployment's
writable mounts, the Deployment's environment; baked and from S3; scraped by a real Prometheus."""

import io
import json
import os
import resource
import shutil
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from PIL import Image

from service.client import FluxGrpcClient
from service.launcher import REPO, ServerFailed, local_s3, poll_ready
from service.schema import GenerationRequest
from tests.conftest import free_port, run_module
from tests.test_deploy import by_kind, container, render

pytestmark = pytest.mark.container
PODMAN = ["podman", "--runtime", "runc"]
# This machine's sandbox refuses podman's default rlimits (nofile and nproc above the host's): the host's own.
NOFILE = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
LIMITS = ["--ulimit", f"nofile={NOFILE}:{NOFILE}", "--ulimit", "nproc=32768:32768"]
IMAGES = (
    json.loads((REPO / "build/container/images.json").read_text())
    if (REPO / "build/container/images.json").exists()
    else {}
)
SLOW = GenerationRequest(prompt="in flight", width=1024, height=1024, steps=24)


def pod_spec(overlay: str) -> tuple[dict, dict]:
    objects = render(overlay)
    return by_kind(objects, "Deployment")["spec"]["template"]["spec"], container(objects)


def manifest_env(spec: dict, **overrides: str) -> dict[str, str]:
    return {item["name"]: item["value"] for item in spec["env"] if "value" in item} | overrides


class Running:
    """`podman run` of an image as the pod runs it; host network, so ports are the host's."""

    def __init__(
        self, image: str, pod: dict, main: dict, env: dict[str, str], volumes: dict[str, Path], name: str
    ) -> None:
        user = pod["securityContext"]
        mounts = [arg for mount in main["volumeMounts"] for arg in self._mount(mount, volumes)]
        assert main["securityContext"]["readOnlyRootFilesystem"] is True
        self.name, self.started = name, time.monotonic()
        subprocess.run([*PODMAN, "rm", "-f", name], capture_output=True)
        subprocess.run(
            [
                *PODMAN,
                "run",
                *LIMITS,
                "-d",
                "--name",
                name,
                "--network",
                "host",
                "--read-only",
                "--user",
                f"{user['runAsUser']}:{user['runAsGroup']}",
                "--cap-drop",
                "ALL",
                "--security-opt",
                "no-new-privileges",
                *mounts,
                *[arg for key, value in env.items() for arg in ("-e", f"{key}={value}")],
                image,
            ],
            check=True,
            capture_output=True,
        )

    @staticmethod
    def _mount(mount: dict, volumes: dict[str, Path]) -> list[str]:
        """An emptyDir becomes a tmpfs; a named host folder stands in for a shared volume."""
        if mount["name"] in volumes:
            return ["-v", f"{volumes[mount['name']]}:{mount['mountPath']}"]
        return ["--tmpfs", f"{mount['mountPath']}:rw,mode=1777"]

    def wait_ready(self, url: str, timeout_s: float = 300) -> float:
        """Seconds from `podman run` to /readyz answering 200."""
        try:
            poll_ready(url, timeout_s, lambda: None if (state := self.state()) == "running" else f"container {state}")
        except ServerFailed as error:
            raise AssertionError(f"{error}\n{self.logs()}") from None
        return time.monotonic() - self.started

    def state(self) -> str:
        return subprocess.run(
            [*PODMAN, "inspect", "-f", "{{.State.Status}}", self.name], capture_output=True, text=True
        ).stdout.strip()

    def exit_code(self) -> int:
        return int(
            subprocess.run(
                [*PODMAN, "inspect", "-f", "{{.State.ExitCode}}", self.name], capture_output=True, text=True
            ).stdout.strip()
        )

    def logs(self) -> str:
        logged = subprocess.run([*PODMAN, "logs", self.name], capture_output=True, text=True)
        return (logged.stdout + logged.stderr)[-4000:]  # podman logs gives the container's stderr on its own

    def remove(self) -> None:
        subprocess.run([*PODMAN, "rm", "-f", "-t", "0", self.name], capture_output=True)


def serve_env(main: dict, artifact: str, port: int, grpc_port: int, **extra: str) -> dict[str, str]:
    """The Deployment's variables; the artifact is the tiny one, ports are free host ports (host network)."""
    return manifest_env(main, FLUX_ARTIFACT=artifact, FLUX_GRPC_ADDRESS=f"0.0.0.0:{grpc_port}", PORT=str(port), **extra)


def check_serves(url: str, grpc_target: str) -> None:
    answer = httpx.post(
        f"{url}/txt2img", json={"prompt": "a container", "width": 256, "height": 256, "steps": 2}, timeout=120
    )
    assert answer.status_code == 200 and answer.content[:4] == b"\x89PNG", answer.text[:500]
    health = health_pb2_grpc.HealthStub(grpc.insecure_channel(grpc_target)).Check(
        health_pb2.HealthCheckRequest(service="flux.v1.TextToImage"), timeout=10
    )
    assert health.status == health_pb2.HealthCheckResponse.SERVING
    reply = FluxGrpcClient(grpc_target).generate(GenerationRequest(prompt="over grpc", width=256, height=256, steps=2))
    assert Image.open(io.BytesIO(reply.image)).format == "PNG"


def check_drains(running: Running, url: str, grace_s: int) -> None:
    """SIGTERM with a request in flight: it completes; the process exits 0 within the pod's grace period."""
    with ThreadPoolExecutor(1) as pool:
        in_flight = pool.submit(httpx.post, f"{url}/txt2img", json=SLOW.model_dump(mode="json"), timeout=300)
        time.sleep(1.5)
        assert not in_flight.done()
        subprocess.run([*PODMAN, "kill", "--signal", "TERM", running.name], check=True, capture_output=True)
        signalled = time.monotonic()
        answer = in_flight.result(timeout=grace_s)
        assert answer.status_code == 200 and answer.content[:4] == b"\x89PNG", answer.text[:500]
    while running.state() != "exited" and time.monotonic() - signalled < grace_s:  # podman: stopping, stopped
        time.sleep(0.2)
    assert running.state() == "exited", running.logs()
    assert running.exit_code() == 0, running.logs()


@pytest.fixture(scope="module")
def tiny_artifact() -> str:
    return IMAGES["artifact"]


def test_the_deployments_user_is_the_images_user():
    pod, _ = pod_spec("baked")
    for image in (IMAGES["baked"], IMAGES["slim"]):
        user = subprocess.run(
            [*PODMAN, "image", "inspect", "-f", "{{.Config.User}}", image], capture_output=True, text=True, check=True
        ).stdout.strip()
        ids = subprocess.run(
            [*PODMAN, "run", *LIMITS, "--rm", "--entrypoint", "id", image], capture_output=True, text=True, check=True
        ).stdout
        assert f"uid={pod['securityContext']['runAsUser']}({user})" in ids, ids
        assert f"gid={pod['securityContext']['runAsGroup']}({user})" in ids, ids


def test_baked_image_serves_and_drains_as_the_deployment_runs_it(tiny_artifact):
    pod, main = pod_spec("baked")
    port, grpc_port = free_port(), free_port()
    running = Running(IMAGES["baked"], pod, main, serve_env(main, tiny_artifact, port, grpc_port), {}, "flux-baked")
    url = f"http://127.0.0.1:{port}"
    try:
        ready_s = running.wait_ready(url)
        print(f"baked: podman run -> /readyz {ready_s:.1f} s")
        check_serves(url, f"127.0.0.1:{grpc_port}")
        check_drains(running, url, pod["terminationGracePeriodSeconds"])
    finally:
        running.remove()


def test_slim_image_serves_the_artifact_its_init_container_imported_from_s3(tiny_artifact, tmp_path):
    pod, main = pod_spec("artifact-from-s3")
    init = pod["initContainers"][0]
    store = tmp_path / "model-store"  # the emptyDir shared by the init container and the server
    store.mkdir()
    os.chown(store, pod["securityContext"]["runAsUser"], pod["securityContext"]["runAsGroup"])
    with local_s3("flux-artifacts") as aws:
        url = "s3://flux-artifacts/flux-tiny-int8.tar"
        exported = run_module(
            "bentoml", "models", "export", tiny_artifact, url, env={**aws, "BENTOML_HOME": IMAGES["bentoml_home"]}
        )  # the store `make container` used
        assert exported.returncode == 0, exported.stderr
        command = [arg.replace("$(ARTIFACT_URL)", url) for arg in init["command"] + init["args"]]
        init_env = manifest_env(init, ARTIFACT_URL=url) | aws
        mounts = [arg for mount in init["volumeMounts"] for arg in Running._mount(mount, {"model-store": store})]
        imported = subprocess.run(
            [
                *PODMAN,
                "run",
                *LIMITS,
                "--rm",
                "--network",
                "host",
                "--read-only",
                "--cap-drop",
                "ALL",
                "--user",
                f"{pod['securityContext']['runAsUser']}:{pod['securityContext']['runAsGroup']}",
                *mounts,
                *[arg for key, value in init_env.items() for arg in ("-e", f"{key}={value}")],
                "--entrypoint",
                command[0],
                IMAGES["slim"],
                *command[1:],
            ],
            capture_output=True,
            text=True,
        )
        assert imported.returncode == 0, imported.stderr[-3000:]
    port, grpc_port = free_port(), free_port()
    running = Running(
        IMAGES["slim"], pod, main, serve_env(main, tiny_artifact, port, grpc_port), {"model-store": store}, "flux-slim"
    )
    url = f"http://127.0.0.1:{port}"
    try:
        print(f"slim: podman run -> /readyz {running.wait_ready(url):.1f} s")
        check_serves(url, f"127.0.0.1:{grpc_port}")
    finally:
        running.remove()


def test_prometheus_answers_the_keda_query_with_the_requests_in_flight(tiny_artifact, tmp_path):
    pod, main = pod_spec("baked")
    query = by_kind(render("baked"), "ScaledObject")["spec"]["triggers"][0]["metadata"]["query"]
    port, grpc_port, prometheus_port = free_port(), free_port(), free_port()
    running = Running(IMAGES["baked"], pod, main, serve_env(main, tiny_artifact, port, grpc_port), {}, "flux-keda")
    url = f"http://127.0.0.1:{port}"
    config = tmp_path / "prometheus.yml"
    config.write_text(
        f"global: {{scrape_interval: 1s}}\nscrape_configs:\n  - job_name: flux-serve\n"
        f"    static_configs: [{{targets: ['127.0.0.1:{port}']}}]\n"
    )
    prometheus = subprocess.Popen(
        [
            shutil.which("prometheus") or "/usr/bin/prometheus",
            f"--config.file={config}",
            f"--storage.tsdb.path={tmp_path / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{prometheus_port}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )

    def ask() -> float | None:
        answer = httpx.get(f"http://127.0.0.1:{prometheus_port}/api/v1/query", params={"query": query}).json()
        assert answer["status"] == "success", answer
        return float(answer["data"]["result"][0]["value"][1]) if answer["data"]["result"] else None

    def settle(expected: float, timeout_s: float = 20) -> float | None:
        deadline, value = time.monotonic() + timeout_s, None
        while time.monotonic() < deadline:
            try:
                value = ask()
            except httpx.TransportError:
                value = None
            if value == expected:
                return value
            time.sleep(0.5)
        return value

    try:
        running.wait_ready(url)
        assert settle(0) == 0
        with ThreadPoolExecutor(3) as pool:
            calls = [
                pool.submit(httpx.post, f"{url}/txt2img", json=SLOW.model_dump(mode="json"), timeout=300),
                pool.submit(httpx.post, f"{url}/txt2img", json=SLOW.model_dump(mode="json"), timeout=300),
                pool.submit(FluxGrpcClient(f"127.0.0.1:{grpc_port}").generate, SLOW),
            ]
            assert settle(3) == 3  # two HTTP + one gRPC, each once
            assert not all(call.done() for call in calls)
            assert [call.result().status_code for call in calls[:2]] == [200, 200] and calls[2].result().image
        assert settle(0) == 0
    finally:
        prometheus.terminate()
        prometheus.wait()
        running.remove()
