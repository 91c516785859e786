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


# tiny layers have 64 inputs: 4-bit groups of 64 so that they are quantized at all
TINY_OPTIONS = {"int4": ["--group-size", "64"]}


@pytest.fixture(scope="session")
def tiny_tag(tiny_source):
    """`tiny_tag(recipe)`: the tiny checkpoint quantized with that recipe (once per session)."""
    tags: dict[str, str] = {}

    def quantize(recipe: str) -> str:
        if recipe not in tags:
            result = run_module("quantize", str(tiny_source), "--recipe", recipe, "--validation-size", "64",
                                *TINY_OPTIONS.get(recipe, []))
            assert result.returncode == 0, result.stderr
            tags[recipe] = result.stdout.strip().splitlines()[-1]
        return tags[recipe]

    return quantize


@pytest.fixture(scope="session")
def tiny_int8_tag(tiny_tag) -> str:
    return tiny_tag("int8")


@pytest.fixture(scope="session")
def tiny_int4_tag(tiny_tag) -> str:
    return tiny_tag("int4")
