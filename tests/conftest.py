"""Shared fixtures: a private BentoML home, the tiny FLUX checkpoint, and its quantized artifacts."""

import os
import subprocess
import sys
import tempfile
from pathlib import Path

# Before anything imports bentoml: every test run gets its own model store.
os.environ["BENTOML_HOME"] = tempfile.mkdtemp(prefix="flux-tests-bentoml-")
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("BENTOML_DO_NOT_TRACK", "true")

import pytest  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from models.architecture import build_pipeline  # noqa: E402
from service.launcher import free_port  # noqa: E402,F401 - tests import it from here

REPO = Path(__file__).resolve().parent.parent


def run_module(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run `python -m ...` from the repo root, as a user would."""
    return subprocess.run([sys.executable, "-m", *args], cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=900)


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


@pytest.fixture(scope="session")
def medium_source(tmp_path_factory) -> Path:
    """The medium pipeline (real FLUX.1-dev layer shapes, 1 + 1 blocks) as a diffusers folder (~2 GB)."""
    folder = tmp_path_factory.mktemp("checkpoints") / "flux-medium"
    build_pipeline("medium").save_pretrained(folder)
    return folder


def original_layout_shapes(double: int = 1, single: int = 1, hidden: int = 3072, mlp: int = 12288) -> dict:
    """Tensor shapes of BFL's single-file FLUX.1-dev layout (`flux1-dev.safetensors`), for a few blocks."""
    shapes = {"img_in.weight": (hidden, 64), "txt_in.weight": (hidden, 4096),
              "final_layer.linear.weight": (64, hidden), "final_layer.adaLN_modulation.1.weight": (2 * hidden, hidden)}
    for embedder, inputs in (("time_in", 256), ("vector_in", 768), ("guidance_in", 256)):
        shapes |= {f"{embedder}.in_layer.weight": (hidden, inputs), f"{embedder}.out_layer.weight": (hidden, hidden)}
    for i in range(double):
        for stream in ("img", "txt"):
            block = f"double_blocks.{i}.{stream}"
            shapes |= {f"{block}_mod.lin.weight": (6 * hidden, hidden), f"{block}_attn.qkv.weight": (3 * hidden, hidden),
                       f"{block}_attn.norm.query_norm.scale": (128,), f"{block}_attn.norm.key_norm.scale": (128,),
                       f"{block}_attn.proj.weight": (hidden, hidden), f"{block}_mlp.0.weight": (mlp, hidden),
                       f"{block}_mlp.2.weight": (hidden, mlp)}
    for i in range(single):
        block = f"single_blocks.{i}"
        shapes |= {f"{block}.linear1.weight": (3 * hidden + mlp, hidden), f"{block}.linear2.weight": (hidden, hidden + mlp),
                   f"{block}.norm.query_norm.scale": (128,), f"{block}.norm.key_norm.scale": (128,),
                   f"{block}.modulation.lin.weight": (3 * hidden, hidden)}
    biases = {name.replace(".weight", ".bias"): shape[:1] for name, shape in shapes.items() if name.endswith(".weight")}
    return shapes | biases


@pytest.fixture(scope="session")
def single_file(tmp_path_factory) -> Path:
    """A medium-sized (1 + 1 blocks, real widths) transformer in the single-file layout, random weights."""
    generator = torch.Generator().manual_seed(0)
    tensors = {f"model.diffusion_model.{name}": torch.randn(shape, generator=generator).to(torch.bfloat16)
               for name, shape in original_layout_shapes().items()}
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
