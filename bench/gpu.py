"""`python -m bench.gpu [--dry-run] [--out build/gpu]`: the GPU claims measured in one call, in priority order.

Each part is written to `report.jsonl` and `report.md` under --out as soon as it ends, so a run cut short
still returns what it measured; a part that fails is recorded with its error and the next one runs.
1. weights: FLUX.1-dev's real shapes with random weights, built on the device, saved as a diffusers folder;
2. service: that folder quantized to int8 by `python -m quantize` and served by the real `Flux` service on a
   16 GB budget (`FLUX_GPU_MEMORY_GB=16`): plan, peak memory, s/image at batch 1 and at the plan's batch,
   4 requests with 4 different LoRA stacks against none, 4 img2img requests (strength 0.5) and 4 inpainting
   requests against 4 text-to-image ones (POST /img2img, the picture sent at the full size);
3. recipes: each recipe's transformer, in-process on the 16 GB budget: peak memory, s/image (the denoising
   steps; T5 and the VAE excluded), the kernel `models/kernels.py` expects and the modules that actually ran;
4. anchors: diffusers' own pipeline on the same folder and budget: model CPU offload, group offload (with
   streams on a GPU), quanto int8 and bitsandbytes nf4 through diffusers' quantization configs;
5. schnell: its int8 transformer at 4 steps; 6. the step cache; 7. $/image at --usd-per-hour.
--dry-run runs every part on the CPU with `tiny` in about a minute (`make test` does), so the script cannot rot.
"""

import argparse
import base64
import gc
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import diffusers
import httpx
import numpy as np
import torch
import transformers
from diffusers import FluxPipeline, PipelineQuantizationConfig
from gguf import GGMLQuantizationType, quants
from PIL import Image

from bench.report import usd_per_image
from models.architecture import build_module, build_pipeline
from models.backends.gguf import gguf_linear
from models.kernels import kernel_note
from models.random_lora import write_diffusers_lora
from quantize.lora import add_lora
from quantize.recipes import RECIPES, quantize_model
from service.launcher import free_port, running_server
from service.pictures import png
from service.runtime.device import hold_to_budget, peak_memory

GIB = 1024**3
RECIPE_ROWS = ("int8", "int4", "fp8", "int8-bnb", "nf4", "gguf Q8_0", "gguf Q4_0")


@dataclass(frozen=True)
class Scale:
    preset: str
    size: int
    steps: int
    schnell_steps: int
    lora_rank: int
    budget_gib: float


GPU = Scale("full", 1024, 28, 4, 16, 16.0)
DRY = Scale("tiny", 64, 2, 1, 4, 16.0)


class Report:
    """report.jsonl (one line per part) and report.md (one section per part), rewritten as parts end."""

    def __init__(self, out: Path, header: dict) -> None:
        out.mkdir(parents=True, exist_ok=True)
        self.jsonl, self.md = out / "report.jsonl", out / "report.md"
        self.jsonl.write_text(json.dumps({"part": "machine", **header}) + "\n")
        self.md.write_text("# GPU check\n\n" + "".join(f"- {k}: {v}\n" for k, v in header.items()))

    @contextmanager
    def part(self, name: str, title: str) -> Iterator[dict]:
        row, started = {"part": name, "status": "ok"}, time.perf_counter()
        print(f"== {title}", flush=True)
        try:
            yield row
        except Exception as error:  # noqa: BLE001 - recorded; the next part still runs
            row |= {"status": "error", "error": f"{type(error).__name__}: {error}"[:500]}
        row["seconds"] = round(time.perf_counter() - started, 2)
        with self.jsonl.open("a") as stream:
            stream.write(json.dumps(row, default=str) + "\n")
        with self.md.open("a") as stream:
            stream.write(markdown(title, row))
        print(json.dumps(row, default=str), flush=True)
        free_memory()


def markdown(title: str, row: dict) -> str:
    lines = [f"\n## {title}\n"]
    rows = row.get("rows")
    for key, value in row.items():
        if key != "rows":
            lines.append(f"- {key}: {value}")
    if rows:
        columns = list(dict.fromkeys(key for r in rows for key in r))
        lines += ["", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
        lines += ["| " + " | ".join(str(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


@contextmanager
def budget(device: torch.device, gib: float) -> Iterator[None]:
    """Hold this process to `gib` of the GPU (a 16 GB card on a bigger one), as the worker does; peaks reset."""
    hold_to_budget(device, int(gib * GIB))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    try:
        yield
    finally:
        hold_to_budget(device, 1 << 62)  # the whole device again


def in_gib(memory: dict[str, int] | None) -> dict:
    """`peak_memory`'s bytes as the report's GiB columns (nothing on a CPU)."""
    return {f"peak_{kind}_gib": round(value / GIB, 2) for kind, value in (memory or {}).items()}


# --- 1. weights -----------------------------------------------------------------------------------------


def part_weights(scale: Scale, device: torch.device, source: Path) -> dict:
    started = time.perf_counter()
    with device:
        pipe = build_pipeline(scale.preset)
    synchronize(device)
    built = time.perf_counter() - started
    pipe.save_pretrained(source)
    parameters = sum(p.numel() for name in ("transformer", "text_encoder_2") for p in getattr(pipe, name).parameters())
    return {
        "preset": scale.preset,
        "built_on": str(device),
        "build_s": round(built, 1),
        "save_s": round(time.perf_counter() - started - built, 1),
        "transformer_and_t5_parameters": parameters,
    }


# --- 2. the service on a 16 GB budget -------------------------------------------------------------------


def part_service(scale: Scale, device: torch.device, source: Path, work: Path) -> dict:
    command = ["quantize", str(source), "--recipe", "int8", "--skip-validation", "--name", "gpu-check-int8"]
    result = subprocess.run([sys.executable, "-m", *command], capture_output=True, text=True)
    if result.returncode:
        raise RuntimeError(f"quantize failed: {result.stderr[-400:]}")
    tag = result.stdout.strip().splitlines()[-1]
    loras = stored_loras(tag, scale, work)
    env = {
        "FLUX_ARTIFACT": tag,
        "FLUX_MAX_RESOLUTION": str(scale.size),
        "FLUX_WARMUP_SIZE": str(scale.size),
        "FLUX_WARMUP_STEPS": "2",
        "FLUX_GRPC_ADDRESS": f"127.0.0.1:{free_port()}",
        **({"FLUX_GPU_MEMORY_GB": str(scale.budget_gib)} if device.type == "cuda" else {}),
    }
    with running_server(free_port(), work / "server.log", env, timeout_s=600) as url:
        info = httpx.post(f"{url}/info", json={}, timeout=60).json()
        largest = info["placement"]["max_batch"][str(scale.size)]
        one = renders(url, scale, 1)
        many = renders(url, scale, largest)
        plain = renders(url, scale, 4)
        stacked = renders(url, scale, 4, loras)
        half = renders(url, scale, 4, images=pictures_in(scale.size, strength=0.5))
        repainted = renders(url, scale, 4, images=pictures_in(scale.size, strength=1.0, masked=True))
        info = httpx.post(f"{url}/info", json={}, timeout=60).json()
        metrics = httpx.get(f"{url}/metrics", timeout=60).text
    return {
        "artifact": tag,
        "strategy": info["placement"]["strategy"],
        "plan_peak_gib": round(info["placement"]["peak_bytes"] / GIB, 2),
        **in_gib(info["card"]["peak_memory_bytes"]),
        "kernel": info["card"]["kernels"],
        "s_per_image_batch_1": round(one, 2),
        "plan_batch": largest,
        f"s_per_image_batch_{largest}": round(many, 2),
        "lora_4_stacks_over_none": round(stacked / plain, 3),
        "img2img_0.5_over_text": round(half / plain, 3),
        "inpainting_over_text": round(repainted / plain, 3),
        "oom_splits": sum(
            float(line.split()[-1]) for line in metrics.splitlines() if line.startswith("flux_oom_splits_total")
        ),
    }


def stored_loras(tag: str, scale: Scale, work: Path) -> list[str]:
    """Four random rank-`lora_rank` adapters for the artifact's transformer, in the model store."""
    with torch.device("meta"):
        transformer = build_module(scale.preset, "transformer")
    names = []
    for seed in range(4):
        path = write_diffusers_lora(work / f"lora-{seed}.safetensors", transformer, rank=scale.lora_rank, seed=seed)
        names.append(add_lora(path, f"gpu-check-lora-{seed}", tag)[0].split(":")[0])
    return names


def pictures_in(size: int, strength: float, masked: bool = False) -> dict:
    """/img2img's picture fields: a `size`² picture (and the top left quarter masked), at `strength`."""
    picture = Image.fromarray(np.random.default_rng(0).integers(0, 256, (size, size, 3), dtype=np.uint8))
    fields = {"image": base64.b64encode(png(picture)).decode(), "strength": strength}
    if masked:
        mask = Image.new("L", (size, size), 0)
        mask.paste(255, (0, 0, size // 2, size // 2))
        fields["mask"] = base64.b64encode(png(mask)).decode()
    return fields


def renders(url: str, scale: Scale, count: int, loras: list[str] | None = None, images: dict | None = None) -> float:
    """Seconds per image for `count` concurrent requests (each with its own LoRA when given; img2img or
    inpainting with `images`, /img2img's picture fields)."""

    def one(i: int) -> None:
        body = {
            **(images or {}),
            "prompt": f"gpu check {i}",
            "width": scale.size,
            "height": scale.size,
            "steps": scale.steps,
            "seed": i,
            "loras": [{"name": loras[i % len(loras)]}] if loras else [],
        }
        httpx.post(f"{url}/{'img2img' if images else 'txt2img'}", json=body, timeout=1200).raise_for_status()

    started = time.perf_counter()
    with ThreadPoolExecutor(count) as pool:
        list(pool.map(one, range(count)))
    return (time.perf_counter() - started) / count


# --- 3. every recipe's transformer, 5. schnell --------------------------------------------------------


def part_recipes(scale: Scale, device: torch.device, preset: str, rows: tuple[str, ...], steps: int) -> dict:
    return {"rows": [transformer_row(scale, device, preset, row, steps) for row in rows]}


def transformer_row(scale: Scale, device: torch.device, preset: str, row: str, steps: int) -> dict:
    recipe, _, ggml = row.partition(" ")
    try:
        transformer = quantized_transformer(preset, recipe, ggml, device)
        with budget(device, scale.budget_gib):
            inputs = transformer_inputs(transformer, scale.size, device)
            with torch.inference_mode():
                transformer(**inputs)  # warm-up: kernels picked, caches filled
                synchronize(device)
                started = time.perf_counter()
                for _ in range(steps):
                    transformer(**inputs)
                synchronize(device)
            seconds = time.perf_counter() - started
            measured = in_gib(peak_memory(device))
    except torch.OutOfMemoryError:
        return {"recipe": row, "error": f"out of memory on {scale.budget_gib:g} GiB"}
    capability = torch.cuda.get_device_capability() if device.type == "cuda" else None
    return {
        "recipe": row,
        "s_per_image": round(seconds, 2),
        **measured,
        "kernel_expected": kernel_note(recipe, capability, torch.bfloat16),
        "modules_that_ran": modules_that_ran(transformer),
    }


def quantized_transformer(preset: str, recipe: str, ggml: str, device: torch.device) -> torch.nn.Module:
    with device:
        transformer = build_module(preset, "transformer").to(torch.bfloat16).eval()
    if ggml:
        keep_gguf_blocks(transformer, ggml)
    else:
        quantize_model(transformer, "transformer", RECIPES[recipe])
    free_memory()
    return transformer


def keep_gguf_blocks(transformer: torch.nn.Module, ggml_type: str) -> None:
    """Every block Linear as GGML blocks of `ggml_type`, as the `gguf` recipe serves them: one row-chunk
    quantized by the gguf package and repeated (timings and memory do not depend on the values)."""
    kind = GGMLQuantizationType[ggml_type]
    for name, linear in list(transformer.named_modules()):
        if isinstance(linear, torch.nn.Linear) and name.startswith(("transformer_blocks", "single_transformer")):
            chunk = quants.quantize(
                np.random.default_rng(0).standard_normal((8, linear.in_features)).astype(np.float32), kind
            )
            blocks = torch.from_numpy(np.tile(chunk, (linear.out_features // 8 + 1, 1))[: linear.out_features])
            module = gguf_linear(linear, blocks.to(linear.weight.device), ggml_type, torch.bfloat16)
            if linear.bias is not None:
                module.bias = linear.bias
            transformer.set_submodule(name, module)


def transformer_inputs(transformer: torch.nn.Module, size: int, device: torch.device) -> dict:
    """One denoising step's arguments at `size`², batch 1, 512 T5 tokens."""
    config, side, text = transformer.config, size // 16, 512
    ids = torch.zeros(side * side, 3, device=device)
    ids[:, 1], ids[:, 2] = torch.arange(side * side) // side, torch.arange(side * side) % side
    inputs = {
        "hidden_states": torch.randn(1, side * side, config.in_channels, device=device, dtype=torch.bfloat16),
        "encoder_hidden_states": torch.randn(1, text, config.joint_attention_dim, device=device, dtype=torch.bfloat16),
        "pooled_projections": torch.randn(1, config.pooled_projection_dim, device=device, dtype=torch.bfloat16),
        "timestep": torch.tensor([0.7], device=device, dtype=torch.bfloat16),
        "img_ids": ids,
        "txt_ids": torch.zeros(text, 3, device=device),
    }
    if config.guidance_embeds:
        inputs["guidance"] = torch.tensor([3.5], device=device, dtype=torch.bfloat16)
    return inputs


def modules_that_ran(transformer: torch.nn.Module) -> str:
    """The quantized layers' module and weight classes, counted (quanto picks a weight class per kernel)."""
    kinds: dict[str, int] = {}
    for module in transformer.modules():
        if isinstance(module, torch.nn.Linear):  # quanto's, bitsandbytes' and GGUF Linears subclass it
            kind = f"{type(module).__name__}/{type(module.weight).__name__}"
            kinds[kind] = kinds.get(kind, 0) + 1
    return ", ".join(f"{kind}×{count}" for kind, count in sorted(kinds.items()))


# --- 4. the anchors: diffusers' own pipeline ------------------------------------------------------------


ANCHORS = (
    "model CPU offload, bf16",
    "group offload, bf16",
    "quanto int8 + model CPU offload",
    "bitsandbytes nf4 + model CPU offload",
)


def part_anchors(scale: Scale, device: torch.device, source: Path) -> dict:
    return {"rows": [anchor_row(scale, device, source, anchor) for anchor in ANCHORS]}


def anchor_row(scale: Scale, device: torch.device, source: Path, anchor: str) -> dict:
    try:
        pipe = anchor_pipeline(source, anchor, device)
        with budget(device, scale.budget_gib):
            pipe("warm-up", width=scale.size, height=scale.size, num_inference_steps=1)
            started = time.perf_counter()
            pipe(
                "gpu check",
                width=scale.size,
                height=scale.size,
                num_inference_steps=scale.steps,
                generator=torch.Generator().manual_seed(0),
            )
            synchronize(device)
            return {
                "anchor": anchor,
                "s_per_image": round(time.perf_counter() - started, 2),
                **in_gib(peak_memory(device)),
            }
    except torch.OutOfMemoryError:
        return {"anchor": anchor, "error": f"out of memory on {scale.budget_gib:g} GiB"}
    except Exception as error:  # noqa: BLE001 - an anchor that refuses this machine is a result too
        return {"anchor": anchor, "error": f"{type(error).__name__}: {error}"[:300]}


def anchor_pipeline(source: Path, anchor: str, device: torch.device) -> FluxPipeline:
    """diffusers' pipeline as a user sets it up for a 16 GB card, quantized through its own configs."""
    quantization = None
    if anchor.startswith("quanto"):  # quant_backend="quanto" fails on mismatched signatures; a mapping works
        quantization = PipelineQuantizationConfig(
            quant_mapping={
                "transformer": diffusers.QuantoConfig(weights_dtype="int8"),
                "text_encoder_2": transformers.QuantoConfig(weights="int8"),
            }
        )
    elif anchor.startswith("bitsandbytes"):
        nf4 = {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "bnb_4bit_compute_dtype": torch.bfloat16}
        quantization = PipelineQuantizationConfig(
            quant_mapping={
                "transformer": diffusers.BitsAndBytesConfig(**nf4),
                "text_encoder_2": transformers.BitsAndBytesConfig(**nf4),
            }
        )
    pipe = FluxPipeline.from_pretrained(source, dtype=torch.bfloat16, quantization_config=quantization)
    if anchor.startswith("group offload"):
        pipe.enable_group_offload(
            onload_device=device,
            offload_device=torch.device("cpu"),
            offload_type="leaf_level",
            use_stream=device.type == "cuda",
        )
    else:
        pipe.enable_model_cpu_offload(device=device)
    return pipe


# --- 6, 7 ------------------------------------------------------------------------------------------------


def part_cost(service: dict, usd_per_hour: float) -> dict:
    best = min(value for key, value in service.items() if key.startswith("s_per_image_batch_"))
    return {
        "usd_per_hour": usd_per_hour,
        "s_per_image": best,
        "usd_per_image": round(usd_per_image(usd_per_hour, 1 / best), 6),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.gpu", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--dry-run", action="store_true", help="every part on the CPU with `tiny` (seconds)")
    parser.add_argument("--out", type=Path, default=Path("build/gpu"))
    parser.add_argument("--usd-per-hour", type=float, default=2.0, help="GPU price for the $/image column")
    args = parser.parse_args(argv)
    scale = DRY if args.dry_run else GPU
    device = torch.device("cpu" if args.dry_run or not torch.cuda.is_available() else "cuda")
    if device.type == "cpu" and not args.dry_run:
        parser.error("no CUDA device: use --dry-run on a CPU")
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    report = Report(args.out, {"device": name, "torch": torch.__version__, **asdict(scale)})
    source = args.out / ("source-tiny" if args.dry_run else "source")
    with report.part("weights", "1. Full-size weights without a download") as row:
        row |= part_weights(scale, device, source)
    service: dict = {}
    with report.part("service", f"2. The int8 artifact served on a {scale.budget_gib:g} GB budget") as row:
        service = part_service(scale, device, source, args.out)
        row |= service
    with report.part("recipes", "3. Every recipe's transformer on the budget") as row:
        row |= part_recipes(scale, device, scale.preset, RECIPE_ROWS, scale.steps)
    with report.part("anchors", "4. diffusers' own pipeline on the same budget") as row:
        row |= part_anchors(scale, device, source)
    with report.part("schnell", f"5. FLUX.1-schnell int8, {scale.schnell_steps} steps") as row:
        row |= part_recipes(scale, device, f"{scale.preset}-schnell", ("int8",), scale.schnell_steps)
    with report.part("lora_and_cache", "6. LoRA stacks and the step cache") as row:
        row |= {
            "lora_4_stacks_over_none": service.get("lora_4_stacks_over_none"),
            "step_cache": "not in this version: no step cache exists yet",
        }
    with report.part("cost", f"7. $/image at ${args.usd_per_hour:g}/GPU-hour") as row:
        row |= part_cost(service, args.usd_per_hour)
    print(f"wrote {report.jsonl} and {report.md}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
