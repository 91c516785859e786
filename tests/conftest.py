"""Shared fixtures: a private BentoML home, the tiny FLUX checkpoint, and its quantized artifacts."""

import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

# Before anything imports bentoml: every test run gets its own model store.
os.environ["BENTOML_HOME"] = tempfile.mkdtemp(prefix="flux-tests-bentoml-")
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("BENTOML_DO_NOT_TRACK", "true")

import pytest  # noqa: E402

from models.architecture import build_pipeline  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


def run_module(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run `python -m ...` from the repo root, as a user would."""
    return subprocess.run([sys.executable, "-m", *args], cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=900)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def tiny_source(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("checkpoints") / "flux-tiny"
    build_pipeline("tiny").save_pretrained(folder)
    return folder


def quantize_tiny(source: Path, recipe: str) -> str:
    result = run_module("quantize", str(source), "--recipe", recipe)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip().splitlines()[-1]


@pytest.fixture(scope="session")
def tiny_int8_tag(tiny_source) -> str:
    return quantize_tiny(tiny_source, "int8")


@pytest.fixture(scope="session")
def tiny_int4_tag(tiny_source) -> str:
    return quantize_tiny(tiny_source, "int4")


@pytest.fixture(scope="session")
def tiny_fp8_tag(tiny_source) -> str:
    return quantize_tiny(tiny_source, "fp8")
