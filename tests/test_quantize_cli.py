"""`python -m quantize` as a user runs it (refusals that end before any work: its `main`, in this process)."""

import bentoml
import pytest

from quantize.__main__ import main as quantize_main
from tests.conftest import run_cli, run_module


def test_quantize_prints_size_table_then_tag(tiny_source):
    result = run_module(
        "quantize",
        str(tiny_source),
        "--recipe",
        "int4",
        "--group-size",
        "64",
        "--name",
        "cli-check",
        "--skip-validation",
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    tag = lines[-1]
    assert tag.startswith("cli-check:") and " " not in tag
    assert any(line.startswith("│ transformer") and "qint4" in line for line in lines)
    model = bentoml.models.get(tag)
    assert model.info.labels == {"recipe": "int4", "backend": "quanto", "source": "flux-tiny", "variant": "dev"}
    assert model.path_of("manifest.json")


def test_int8_and_int4_shrink_the_quantized_components(tiny_int8_tag, tiny_int4_tag):
    from pathlib import Path

    from models.artifact import read_manifest

    int8 = read_manifest(Path(bentoml.models.get(tiny_int8_tag).path))
    int4 = read_manifest(Path(bentoml.models.get(tiny_int4_tag).path))
    for name in ("transformer", "text_encoder_2"):
        assert int4.components[name].bytes < int8.components[name].bytes
    assert int8.components["vae"].bytes == int4.components["vae"].bytes


def test_bad_source_fails_clearly_and_stores_nothing(tmp_path):
    before = {str(model.tag) for model in bentoml.models.list()}
    result = run_cli(quantize_main, str(tmp_path / "nowhere"), "--recipe", "int8")
    assert result.returncode == 2
    assert "nowhere" in result.stderr and "Traceback" not in result.stderr
    assert {str(model.tag) for model in bentoml.models.list()} == before


def test_unknown_recipe_is_refused(tiny_source):
    result = run_cli(quantize_main, str(tiny_source), "--recipe", "int3")
    assert result.returncode == 2 and "--recipe" in result.stderr


def test_recipe_list_shows_flux_dev_bytes():
    result = run_cli(quantize_main, "--list-recipes")
    assert result.returncode == 0, result.stderr
    rows = {line.split("│")[1].strip(): line for line in result.stdout.splitlines() if line.startswith("│")}
    assert "11.90 GB" in rows["int8"] and "6.33 GB" in rows["int4"]  # 11.9 B parameters at 1 and ~0.53 bytes
    assert "11.90 GB" in rows["int8-bnb"] and "6.14 GB" in rows["nf4"]  # nf4: 0.516 bytes with double quant
    assert set(rows) >= {"int8", "int4", "fp8", "int8-bnb", "nf4", "fp4"}


def test_missing_source_is_a_usage_error():
    result = run_cli(quantize_main, "--recipe", "int8")
    assert result.returncode == 2 and "SOURCE and --recipe are required" in result.stderr


def test_same_source_and_recipe_give_the_same_bytes(tiny_source, tiny_int8_tag):
    from pathlib import Path

    from models.artifact import read_manifest

    again = run_module(
        "quantize", str(tiny_source), "--recipe", "int8", "--name", "reproducible", "--validation-size", "64"
    )
    assert again.returncode == 0, again.stderr
    first = read_manifest(Path(bentoml.models.get(tiny_int8_tag).path))
    second = read_manifest(Path(bentoml.models.get(again.stdout.strip().splitlines()[-1]).path))
    assert first.files == second.files


def test_an_interrupted_run_leaves_nothing_behind(medium_source, tmp_path):
    """SIGTERM while the medium artifact is being written: no model in the store, no staging folder."""
    import os
    import signal
    import subprocess
    import sys

    from tests.conftest import REPO

    staging = tmp_path / "tmp"
    staging.mkdir()
    process = subprocess.Popen(
        [sys.executable, "-m", "quantize", str(medium_source), "--recipe", "int8", "--name", "cut"],
        cwd=REPO,
        env={**os.environ, "TMPDIR": str(staging)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    for line in process.stderr:
        if "writing text_encoder_2" in line:
            process.send_signal(signal.SIGTERM)
            break
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 130, stderr
    assert "nothing was stored" in stderr
    assert not [model for model in bentoml.models.list() if model.tag.name == "cut"]
    assert not [path for path in staging.iterdir() if path.name.startswith("bentoml-model-cut")]


def test_free_disk_is_checked_before_writing(tmp_path):
    import pytest

    from quantize.store import InsufficientDisk, check_free_disk

    check_free_disk(1000, [tmp_path])
    with pytest.raises(InsufficientDisk, match=f"{tmp_path}: .* GB free, the artifact needs about"):
        check_free_disk(10**18, [tmp_path])


def test_quality_gate_passes_records_metrics_and_a_contact_sheet(tiny_source):
    import io
    from pathlib import Path

    from PIL import Image

    from models.artifact import read_manifest

    result = run_module(
        "quantize",
        str(tiny_source),
        "--recipe",
        "int8",
        "--name",
        "gated",
        "--min-psnr",
        "20",
        "--validation-size",
        "64",
    )
    assert result.returncode == 0, result.stderr
    assert "image PSNR" in result.stdout
    folder = Path(bentoml.models.get(result.stdout.strip().splitlines()[-1]).path)
    manifest = read_manifest(folder)
    assert manifest.quality["image_psnr_db"] >= 20 and 0 < manifest.quality["image_ssim"] <= 1
    assert len(manifest.quality["per_prompt"]) == 3 and manifest.estimated_peak_gib_1024 > 0
    assert "validation/contact_sheet.png" in manifest.files  # hashed like every other file
    sheet = Image.open(io.BytesIO((folder / "validation/contact_sheet.png").read_bytes()))
    assert sheet.size == (3 * 64, 2 * 64)


def test_quality_gate_fails_below_the_bar_and_stores_nothing(tiny_source):
    result = run_module(
        "quantize",
        str(tiny_source),
        "--recipe",
        "nf4",
        "--name",
        "below-bar",
        "--min-psnr",
        "99",
        "--validation-size",
        "64",
    )
    assert result.returncode == 3
    assert "quality gate failed" in result.stderr and "nothing was stored" in result.stderr
    assert not [model for model in bentoml.models.list() if model.tag.name == "below-bar"]


def test_skip_validation(tiny_source):
    from pathlib import Path

    from models.artifact import read_manifest

    result = run_module("quantize", str(tiny_source), "--recipe", "int8", "--name", "unvalidated", "--skip-validation")
    assert result.returncode == 0, result.stderr
    folder = Path(bentoml.models.get(result.stdout.strip().splitlines()[-1]).path)
    assert read_manifest(folder).quality is None and not (folder / "validation").exists()


def test_per_component_choice_of_what_to_quantize_and_what_to_keep(tiny_source):
    import json
    from pathlib import Path

    from models.artifact import load_pipeline, read_manifest

    result = run_module(
        "quantize",
        str(tiny_source),
        "--recipe",
        "int8",
        "--name",
        "tailored",
        "--components",
        "transformer",
        "--keep",
        "transformer=x_embedder,context_embedder",
        "--skip-validation",
    )
    assert result.returncode == 0, result.stderr
    folder = Path(bentoml.models.get(result.stdout.strip().splitlines()[-1]).path)
    manifest = read_manifest(folder)
    assert manifest.components["text_encoder_2"].quantization is None  # T5 stayed bf16
    kept = manifest.components["transformer"].quantization["kept_in_bf16"].split(",")
    assert sorted(kept) == ["context_embedder", "proj_out", "x_embedder"]
    quantized = json.loads((folder / "transformer/quantization_map.json").read_text())
    assert not {"proj_out", "x_embedder", "context_embedder"} & set(quantized)
    assert any(name.startswith("transformer_blocks.0.") for name in quantized)
    import torch

    pipe, _ = load_pipeline(folder)
    assert type(pipe.transformer.x_embedder) is torch.nn.Linear  # not a quanto QLinear
    assert type(pipe.transformer.transformer_blocks[0].attn.to_q) is not torch.nn.Linear


@pytest.mark.slow  # over half a minute: `make test-all`
def test_unknown_component_is_refused(tiny_source):
    result = run_cli(quantize_main, str(tiny_source), "--recipe", "int8", "--keep", "unet=conv_in")
    assert result.returncode == 2 and "unknown component(s) ['unet']" in result.stderr
    result = run_cli(quantize_main, str(tiny_source), "--recipe", "int8", "--keep", "transformer")
    assert result.returncode == 2 and "expected COMPONENT=PATTERN" in result.stderr


def test_group_size_only_for_grouped_formats(tiny_source):
    result = run_cli(quantize_main, str(tiny_source), "--recipe", "int8", "--group-size", "64")
    assert result.returncode == 2 and "has no groups" in result.stderr
    result = run_cli(quantize_main, str(tiny_source), "--recipe", "int4", "--group-size", "100")
    assert result.returncode == 2 and "power of two" in result.stderr


def test_single_file_checkpoint_on_a_diffusers_base(single_file, medium_source, tmp_path):
    """flux1-dev.safetensors + --base: keys converted as diffusers converts them, streamed, gated, loadable."""
    from pathlib import Path

    import torch
    from diffusers import FluxTransformer2DModel

    from models.artifact import load_pipeline
    from quantize.recipes import RECIPES, quantize_model
    from tests.test_artifact import transformer_inputs

    result = run_module(
        "quantize",
        str(single_file),
        "--base",
        str(medium_source),
        "--recipe",
        "int8",
        "--validation-size",
        "64",
        "--validation-steps",
        "2",
        "--min-psnr",
        "20",
    )
    assert result.returncode == 0, result.stderr
    tag = result.stdout.strip().splitlines()[-1]
    assert tag.startswith("flux1-medium-int8:")
    pipe, manifest = load_pipeline(Path(bentoml.models.get(tag).path))
    assert manifest.source == str(single_file) and "+sha256:" in manifest.source_revision
    reference = FluxTransformer2DModel.from_single_file(
        str(single_file), config=str(medium_source), subfolder="transformer", dtype=torch.bfloat16
    ).eval()
    quantize_model(reference, "transformer", RECIPES["int8"])
    inputs = transformer_inputs(reference.config)
    with torch.no_grad():
        assert torch.equal(pipe.transformer(**inputs).sample, reference(**inputs).sample)


def test_tar_export_import_keeps_tag_labels_and_hashes(tiny_tag, tmp_path):
    import json
    from pathlib import Path

    from models.artifact import load_pipeline, read_manifest

    tag = tiny_tag("nf4")
    archive = tmp_path / "nf4.tar"  # absolute: BentoML resolves relative export paths against /
    assert run_module("bentoml", "models", "export", tag, str(archive)).returncode == 0
    other = {"BENTOML_HOME": str(tmp_path / "other-store")}
    imported = run_module("bentoml", "models", "import", str(archive), env=other)
    assert imported.returncode == 0, imported.stderr
    listed = json.loads(run_module("bentoml", "models", "get", tag, "-o", "json", env=other).stdout)
    assert listed["labels"] == {"recipe": "nf4", "backend": "bitsandbytes", "source": "flux-tiny", "variant": "dev"}
    name, version = tag.split(":")
    moved = tmp_path / "other-store" / "models" / name / version
    _, manifest = load_pipeline(moved)  # every sha256 checked
    assert manifest.files == read_manifest(Path(bentoml.models.get(tag).path)).files
