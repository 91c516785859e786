"""Kubernetes manifests, the GPU Bento's build context, and the artifact-from-S3 path, for real."""

import json
import os
import re
import subprocess
import sys
import tarfile
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import kubernetes_validate
import pytest
import yaml

from service.client import FluxGrpcClient
from service.launcher import REPO, local_s3, running_server, start_server, stop, wait_ready
from service.schema import GenerationRequest
from service.settings import Settings
from tests.conftest import free_port, private_home, run_module

OVERLAYS = ["baked", "artifact-from-s3", "jobs"]
K8S_VERSION = "1.30.0"
CUSTOM_RESOURCES = {("monitoring.coreos.com/v1", "ServiceMonitor"), ("keda.sh/v1alpha1", "ScaledObject")}
OPTIONAL_CUSTOM_RESOURCES = {("keda.sh/v1alpha1", "TriggerAuthentication")}


def render(overlay: str) -> list[dict]:
    rendered = subprocess.run(
        ["kubectl", "kustomize", str(REPO / "deploy/k8s/overlays" / overlay)],
        capture_output=True,
        text=True,
        check=True,
    )
    return [doc for doc in yaml.safe_load_all(rendered.stdout) if doc]


def by_kind(objects: list[dict], kind: str) -> dict:
    return next(o for o in objects if o["kind"] == kind)


def container(objects: list[dict]) -> dict:
    return by_kind(objects, "Deployment")["spec"]["template"]["spec"]["containers"][0]


def env(spec: dict) -> dict[str, str]:
    return {item["name"]: item.get("value") for item in spec.get("env", [])}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_objects_validate_against_kubernetes_schemas(overlay):
    objects = render(overlay)
    kinds = {(o["apiVersion"], o["kind"]) for o in objects}
    assert {("apps/v1", "Deployment"), ("v1", "Service"), ("policy/v1", "PodDisruptionBudget")} <= kinds
    assert CUSTOM_RESOURCES <= kinds
    for obj in objects:
        if (obj["apiVersion"], obj["kind"]) not in CUSTOM_RESOURCES | OPTIONAL_CUSTOM_RESOURCES:
            kubernetes_validate.validate(obj, K8S_VERSION, strict=True)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_manifests_match_the_service(overlay):
    objects = render(overlay)
    main = container(objects)
    ports = {port["name"]: port["containerPort"] for port in main["ports"]}
    assert ports["http"] == 3000  # `bentoml serve`'s port in the Bento image
    assert env(main)["FLUX_ARTIFACT"]  # the variable the service reads
    assert env(main)["FLUX_GRPC_ADDRESS"].endswith(f":{ports['grpc']}")
    assert Settings.model_fields["grpc_address"].default.endswith(f":{ports['grpc']}")  # the service's own default
    assert main["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert main["securityContext"]["readOnlyRootFilesystem"] is True
    pod = by_kind(objects, "Deployment")["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    service_ports = {port["name"]: port["targetPort"] for port in by_kind(objects, "Service")["spec"]["ports"]}
    assert service_ports == {"http": "http", "grpc": "grpc"}
    bento_name = yaml.safe_load((REPO / "bentofile.yaml").read_text())["name"]
    assert main["image"].rsplit("/", 1)[-1].split(":")[0] == bento_name  # the image is the Bento's
    scaler = by_kind(objects, "ScaledObject")
    assert scaler["spec"]["scaleTargetRef"]["name"] == by_kind(objects, "Deployment")["metadata"]["name"]


SECRET_STAND_INS = {
    "FLUX_JOBS_REDIS_URL": "redis://:password@redis:6379/0",
    "FLUX_WEBHOOK_SECRET": "a-webhook-secret-0123456789",
}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_manifests_environment_is_accepted_by_the_service(overlay, monkeypatch):
    """The service reads its settings from the container's FLUX_* variables (values from Secrets stand in)."""
    for item in container(render(overlay))["env"]:
        if item["name"].startswith("FLUX_"):
            monkeypatch.setenv(item["name"], item.get("value", SECRET_STAND_INS.get(item["name"], "")))
    configured = Settings()
    assert configured.artifact and configured.max_latency_ms
    assert bool(configured.jobs_redis_url) == (overlay == "jobs")


def test_the_jobs_trigger_reads_the_services_stream():
    from service.jobs.queue import GROUP

    objects = render("jobs")
    trigger = next(t for t in by_kind(objects, "ScaledObject")["spec"]["triggers"] if t["type"] == "redis-streams")
    assert trigger["metadata"]["stream"] == Settings.model_fields["jobs_stream"].default
    assert trigger["metadata"]["consumerGroup"] == GROUP and int(trigger["metadata"]["lagCount"]) >= 1
    assert trigger["authenticationRef"]["name"] == by_kind(objects, "TriggerAuthentication")["metadata"]["name"]


def probe_paths(objects: list[dict]) -> set[str]:
    main = container(objects)
    return {main[probe]["httpGet"]["path"] for probe in ("startupProbe", "readinessProbe", "livenessProbe")}


@pytest.fixture
def s3():
    """A local S3 server (moto's server mode) with an empty bucket."""
    with local_s3("flux-artifacts") as variables:
        yield variables


def test_artifact_from_s3_init_container_then_serve(tiny_int8_tag, s3, tmp_path):
    url = "s3://flux-artifacts/flux-tiny-int8.tar"
    exported = run_module("bentoml", "models", "export", tiny_int8_tag, url, env=s3)
    assert exported.returncode == 0, exported.stderr
    objects = render("artifact-from-s3")
    init = by_kind(objects, "Deployment")["spec"]["template"]["spec"]["initContainers"][0]
    store = tmp_path / "bentoml"  # the emptyDir volume
    command = [arg.replace("$(ARTIFACT_URL)", url) for arg in init["command"] + init["args"]]
    assert command[0] == "bentoml"
    imported = subprocess.run(
        [sys.executable, "-m", *command],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={**os.environ, **s3, "BENTOML_HOME": str(store)},
    )
    assert imported.returncode == 0, imported.stderr
    listed = run_module("bentoml", "models", "get", tiny_int8_tag, "-o", "json", env={"BENTOML_HOME": str(store)})
    assert json.loads(listed.stdout)["labels"] == {
        "recipe": "int8",
        "backend": "quanto",
        "source": "flux-tiny",
        "variant": "dev",
    }
    serve_env = {
        "BENTOML_HOME": str(store),
        "FLUX_ARTIFACT": tiny_int8_tag,
        "FLUX_GRPC_ADDRESS": f"127.0.0.1:{free_port()}",
    }
    with running_server(free_port(), tmp_path / "server.log", env=serve_env) as base:
        for path in probe_paths(objects):
            assert httpx.get(f"{base}{path}").status_code == 200, path
        response = httpx.post(
            f"{base}/txt2img", json={"prompt": "from s3", "width": 64, "height": 64, "steps": 1}, timeout=120
        )
        assert response.status_code == 200 and response.content[:4] == b"\x89PNG"


@pytest.mark.parametrize("mode", ["baked", "slim"])
def test_gpu_bento_build_context(tiny_int8_tag, tmp_path, mode):
    out = tmp_path / "context.tar"
    secret = "hf_do_not_bake_me_0123456789"
    built = subprocess.run(
        [sys.executable, "deploy/bento.py", "--artifact", tiny_int8_tag, "--mode", mode, "--out", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        env={**os.environ, "HF_TOKEN": secret, "AWS_SECRET_ACCESS_KEY": secret},
    )
    assert built.returncode == 0, built.stderr[-3000:]
    tag = built.stdout.strip().splitlines()[-1]
    assert tag.startswith("flux-serve:") and tag.endswith(tiny_int8_tag.split(":")[1])
    with tarfile.open(out) as context:
        names = [name.lstrip("./") for name in context.getnames()]
        read = lambda name: context.extractfile(f"./{name}").read().decode()  # noqa: E731
        dockerfile, bento = read("env/docker/Dockerfile"), yaml.safe_load(read("bento.yaml"))
        lock = read("env/python/requirements.lock.txt")
        texts = [context.extractfile(m).read() for m in context.getmembers() if m.isfile() and m.size < 5_000_000]
    assert dockerfile.startswith("#") and "FROM nvidia/cuda:" in dockerfile
    assert dockerfile.strip().splitlines()[-1] != "USER root"
    assert "USER bentoml" in dockerfile and "EXPOSE 3000" in dockerfile and "EXPOSE 50051" in dockerfile
    assert "ARG FLUX_ARTIFACT=\n" in dockerfile  # declared, no value baked in
    layers = [dockerfile.index(copy) for copy in ("install.sh", "./models ./models/", "./src ./src/")]
    assert layers == sorted(layers)  # packages, then the model, then the code: a code change leaves the model layer
    assert not any(secret.encode() in text for text in texts)
    for pin in ("torch==2.13.0", "diffusers==0.42.1", "optimum-quanto==0.2.7", "bentoml==1.4.40", "grpcio==1.85.1"):
        assert pin in lock.splitlines()
    assert bento["labels"]["recipe"] == "int8" and bento["labels"]["artifact"] == tiny_int8_tag
    code = {str(path.relative_to(REPO)) for folder in ("models", "service") for path in (REPO / folder).rglob("*.py")}
    assert code - {name.removeprefix("src/") for name in names} == set(), "modules the service imports are missing"
    has_model = any(name.startswith("models/flux-tiny-int8/") for name in names)
    assert has_model == (mode == "baked")


def evaluate_sum(query: str, metrics_text: str) -> float:
    """`sum(name)` or `sum(name{label="value",...})` over one scrape: what Prometheus would answer."""
    from prometheus_client.parser import text_string_to_metric_families

    found = re.fullmatch(r"sum\((\w+)(?:\{(.*)\})?\)", query.strip())
    assert found, f"the check reads sum(metric{{labels}}) queries only: {query}"
    name, matchers = found.group(1), dict(re.findall(r'(\w+)="([^"]*)"', found.group(2) or ""))
    samples = [
        sample
        for family in text_string_to_metric_families(metrics_text)
        for sample in family.samples
        if sample.name == name and matchers.items() <= sample.labels.items()
    ]
    assert samples, f"{name} with {matchers} is not on /metrics"
    return sum(sample.value for sample in samples)


@pytest.mark.slow  # about a minute: `make test-all`
def test_the_autoscaling_query_counts_each_request_once_on_a_built_bento(tiny_int8_tag, tmp_path):
    built = run_module("bentoml", "build", env={"FLUX_ARTIFACT": tiny_int8_tag})
    assert built.returncode == 0, built.stderr[-2000:]
    bento = re.search(r'Successfully built Bento\(tag="([^"]+)"\)', built.stdout + built.stderr).group(1)
    query = by_kind(render("baked"), "ScaledObject")["spec"]["triggers"][0]["metadata"]["query"]
    port, target = free_port(), f"127.0.0.1:{free_port()}"
    env = {"FLUX_ARTIFACT": tiny_int8_tag, "FLUX_GRPC_ADDRESS": target, **private_home(tmp_path / "home")}
    process = start_server(port, tmp_path / "server.log", env, target=bento)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, process, tmp_path / "server.log", timeout_s=300)
        assert evaluate_sum(query, httpx.get(f"{url}/metrics").text) == 0
        slow = dict(prompt="in flight", width=1024, height=1024, steps=24)
        with ThreadPoolExecutor(2) as pool:
            calls = [
                pool.submit(httpx.post, f"{url}/txt2img", json=slow, timeout=300),
                pool.submit(FluxGrpcClient(target).generate, GenerationRequest(**slow)),
            ]
            time.sleep(2.0)
            assert not any(call.done() for call in calls)
            assert evaluate_sum(query, httpx.get(f"{url}/metrics").text) == 2  # one HTTP + one gRPC
            assert calls[0].result().status_code == 200 and calls[1].result().image
        assert evaluate_sum(query, httpx.get(f"{url}/metrics").text) == 0
    finally:
        stop(process)
