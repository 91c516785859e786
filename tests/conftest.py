"""Shared fixtures: a private BentoML home, the tiny FLUX checkpoint, and its quantized artifacts."""

import atexit
import contextlib
import io
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

# Before anything imports bentoml: every test run gets its own model store.
os.environ["BENTOML_HOME"] = tempfile.mkdtemp(prefix="flux-tests-bentoml-")
# Removed when the process ends: each run stores GBs of artifacts, and left behind they filled the disk.
atexit.register(shutil.rmtree, os.environ["BENTOML_HOME"], ignore_errors=True)
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("BENTOML_DO_NOT_TRACK", "true")
# One compute thread per process, the servers and subprocesses the tests start included: two pytest workers
# on two cores, each with torch's spinning OpenMP threads and a server's, made every render several times slower.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from models.architecture import PRESETS, build_pipeline  # noqa: E402
from models.single_file import original_layout_shapes  # noqa: E402
from quantize.__main__ import main as quantize_main  # noqa: E402
from service.launcher import free_port  # noqa: E402,F401 - tests import it from here

REPO = Path(__file__).resolve().parent.parent


# Tests that build or read `medium` (real FLUX.1-dev layer widths, ~2 GB) need minutes each: `make test-all`.
HEAVY_FIXTURES = {"medium_source", "single_file"}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark every test that uses a heavy fixture, directly or through another fixture, `slow`."""
    for item in items:
        if HEAVY_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


def run_cli(main: Callable[[list[str]], int], *args: str) -> subprocess.CompletedProcess:
    """A command's `main` called in this process, its output and exit status as `run_module` returns them: an
    interpreter start and its imports (seconds each) saved, for refusals and for fixtures that quantize or add
    an adapter (the command itself is tested as users run it, `python -m quantize`, in test_quantize_cli)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(list(args))
        except SystemExit as exit_:  # argparse's usage errors
            code = exit_.code
    return subprocess.CompletedProcess(list(args), code, out.getvalue(), err.getvalue())


def run_module(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run `python -m ...` from the repo root, as a user would."""
    return subprocess.run(
        [sys.executable, "-m", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        timeout=900,
    )


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
            result = run_cli(
                quantize_main,
                str(tiny_source),
                "--recipe",
                recipe,
                "--validation-size",
                "64",
                *TINY_OPTIONS.get(recipe, []),
            )
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


@pytest.fixture(scope="session")
def medium_source(tmp_path_factory) -> Path:
    """The medium pipeline (real FLUX.1-dev layer shapes, 1 + 1 blocks) as a diffusers folder (~2 GB)."""
    folder = tmp_path_factory.mktemp("checkpoints") / "flux-medium"
    build_pipeline("medium").save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def single_file(tmp_path_factory) -> Path:
    """A medium-sized (1 + 1 blocks, real widths) transformer in the single-file layout, random weights."""
    generator = torch.Generator().manual_seed(0)
    shapes = original_layout_shapes(PRESETS["medium"].transformer_config())
    tensors = {
        f"model.diffusion_model.{name}": torch.randn(shape, generator=generator).to(torch.bfloat16)
        for name, shape in shapes.items()
    }
    path = tmp_path_factory.mktemp("single") / "flux1-medium.safetensors"
    save_file(tensors, path)
    return path


def private_home(folder: Path) -> dict[str, str]:
    """A BentoML home of the server's own (its Prometheus files live there: shared, servers' metrics mix)
    that sees the session's model and Bento stores."""
    folder.mkdir(parents=True, exist_ok=True)
    for store in ("models", "bentos"):
        (Path(os.environ["BENTOML_HOME"]) / store).mkdir(parents=True, exist_ok=True)
        (folder / store).symlink_to(Path(os.environ["BENTOML_HOME"]) / store)
    return {"BENTOML_HOME": str(folder)}
