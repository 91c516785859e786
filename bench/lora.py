"""`python -m bench.lora`: what LoRA stacks cost on `medium` (real FLUX layer shapes), on the device at hand.

1. Denoise step time of a batch of 4 whose items use 4 different adapters, against the same batch without
   LoRA, at rank 16 and 64, on a bf16 and a quanto int8 base (the transformer's forward, median of runs).
2. First use of an adapter not in the device cache (read from disk, checked, moved), against a cache hit.
3. The anchor, in the same run: diffusers + PEFT on bf16 switching adapters per request (`set_adapters`
   between requests, all adapters loaded beforehand), against our batch of the 4 stacks: images/s for 4
   requests at once with 4 different LoRAs, each through the same renderer stages.
"""

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
from diffusers import FluxPipeline
from rich.console import Console
from rich.table import Table

from models.architecture import build_pipeline
from models.lora import describe_pairs, read_lora_file, write_adapter
from models.random_lora import write_diffusers_lora
from quantize.recipes import RECIPES, apply_recipe
from service.runtime.adapters import AdapterCache, stacks_applied
from service.runtime.blocks import Rows
from service.runtime.placement import Placement
from service.runtime.render import Renderer
from service.schema import LoraWeight, WorkItem

BATCH = 4
console = Console(stderr=True)


def make_adapters(folder: Path, transformer: torch.nn.Module, rank: int) -> dict[str, Path]:
    """BATCH random adapters of `rank` on every block Linear, stored as the service reads them."""
    adapters = {}
    for index in range(BATCH):
        name = f"r{rank}-{index}"
        file = write_diffusers_lora(folder / f"{name}.safetensors", transformer, rank, seed=index, strength=0.5)
        pairs, layout, _ = read_lora_file(file, transformer)
        write_adapter(folder / name, pairs, describe_pairs(pairs, "bench", file, layout))
        adapters[name] = folder / name
    return adapters


def cache_for(adapters: dict[str, Path]) -> AdapterCache:
    return AdapterCache(adapters.get, lambda: sorted(adapters), 1 << 34, torch.device("cpu"), torch.bfloat16)


def step_inputs(size: int, text_tokens: int = 512) -> dict:
    """A batch of BATCH latents at `size`² with 512 T5 tokens: one denoising step's forward arguments."""
    generator, tokens = torch.Generator().manual_seed(0), (size // 16) ** 2
    ids = torch.zeros(tokens, 3)
    ids[:, 1], ids[:, 2] = torch.arange(tokens) // (size // 16), torch.arange(tokens) % (size // 16)
    return dict(
        hidden_states=torch.randn(BATCH, tokens, 64, generator=generator).bfloat16(),
        encoder_hidden_states=torch.randn(BATCH, text_tokens, 4096, generator=generator).bfloat16(),
        pooled_projections=torch.randn(BATCH, 768, generator=generator).bfloat16(),
        timestep=torch.full((BATCH,), 0.7).bfloat16(),
        img_ids=ids,
        txt_ids=torch.zeros(text_tokens, 3),
        guidance=torch.full((BATCH,), 3.5),
    )


def loaded_stacks(cache: AdapterCache, names: list[str]) -> list:
    """One item per adapter name, each with its adapter on the device: their stacks."""
    items = [WorkItem(prompt="x", loras=[LoraWeight(name=name)]) for name in names]
    if broken := cache.load(items):
        raise SystemExit(f"adapters that cannot be read: {broken}")
    return cache.stacks(items)


@torch.no_grad()
def step_seconds(
    transformer: torch.nn.Module, inputs: dict, adapters: dict[int, dict[str, Path]], repeats: int
) -> dict[str, float]:
    """Median forward seconds without LoRA and with BATCH different adapters per rank, runs interleaved."""
    runs: dict[str, list[float]] = {"none": []} | {f"rank {rank}": [] for rank in adapters}
    stacks = {rank: loaded_stacks(cache_for(found), sorted(found)) for rank, found in adapters.items()}
    transformer(**inputs)  # warm-up
    for _ in range(repeats):
        for label in runs:
            started = time.perf_counter()
            if label == "none":
                transformer(**inputs)
            else:
                with stacks_applied(transformer, stacks[int(label.split()[1])], Rows(BATCH)):
                    transformer(**inputs)
            runs[label].append(time.perf_counter() - started)
    return {label: statistics.median(times) for label, times in runs.items()}


def first_use_ms(adapters: dict[str, Path]) -> dict[str, float]:
    """Milliseconds to bring one adapter onto the device: a miss (disk, sha256, move), then a hit."""
    cache, item = cache_for(adapters), WorkItem(prompt="x", loras=[LoraWeight(name=sorted(adapters)[0])])
    started = time.perf_counter()
    cache.load([item])
    miss = time.perf_counter() - started
    started = time.perf_counter()
    cache.load([item])
    return {"miss_ms": 1000 * miss, "hit_ms": 1000 * (time.perf_counter() - started), "mb": cache.bytes / 2**20}


def requests(size: int, steps: int, names: list[str]) -> list[WorkItem]:
    return [
        WorkItem(
            prompt=f"a product photo {i}", seed=i, width=size, height=size, steps=steps, loras=[LoraWeight(name=name)]
        )
        for i, name in enumerate(names)
    ]


def ours_images_per_s(pipe: FluxPipeline, adapters: dict[str, Path], size: int, steps: int) -> float:
    """The 4 requests with 4 different stacks, batched together by our renderer."""
    renderer = Renderer(pipe, Placement.resident(torch.device("cpu")), adapters=cache_for(adapters))
    items = requests(size, steps, sorted(adapters))
    renderer.render(items[:1])  # warm-up, and the first adapter's load
    started = time.perf_counter()
    assert all(result.ok for result in renderer.render(items))
    return BATCH / (time.perf_counter() - started)


def peft_images_per_s(pipe: FluxPipeline, files: dict[str, Path], size: int, steps: int) -> tuple[float, float]:
    """diffusers + PEFT: every adapter loaded, then one request at a time with `set_adapters` before each.
    Also returns the seconds `load_lora_weights` took per adapter."""
    started = time.perf_counter()
    for name, file in files.items():
        pipe.load_lora_weights(str(file), adapter_name=name)
    load_s = (time.perf_counter() - started) / len(files)
    renderer = Renderer(pipe, Placement.resident(torch.device("cpu")))
    items = [item.model_copy(update={"loras": []}) for item in requests(size, steps, sorted(files))]
    pipe.set_adapters(sorted(files)[0])
    renderer.render(items[:1])  # warm-up
    started = time.perf_counter()
    for name, item in zip(sorted(files), items, strict=True):
        pipe.set_adapters(name)
        assert renderer.render([item])[0].ok
    return BATCH / (time.perf_counter() - started), load_s


def run(size: int, steps: int, repeats: int) -> dict:
    folder = Path(tempfile.mkdtemp(prefix="bench-lora-"))
    bf16 = build_pipeline("medium")
    adapters = {rank: make_adapters(folder, bf16.transformer, rank) for rank in (16, 64)}
    result = {"device": "cpu", "preset": "medium", "batch": BATCH, "size": size, "steps": steps, "step_s": {}}
    inputs = step_inputs(size)
    console.log("denoise step, bf16 base")
    result["step_s"]["bf16"] = step_seconds(bf16.transformer, inputs, adapters, repeats)
    int8 = build_pipeline("medium")
    apply_recipe(int8, RECIPES["int8"])
    console.log("denoise step, int8 (quanto) base")
    result["step_s"]["int8"] = step_seconds(int8.transformer, inputs, adapters, repeats)
    del int8
    result["first_use"] = {f"rank {rank}": first_use_ms(found) for rank, found in adapters.items()}
    console.log("anchor: ours batched against diffusers + PEFT switching per request")
    result["ours_images_per_s"] = ours_images_per_s(bf16, adapters[16], size, steps)
    files = {name: folder / f"{name}.safetensors" for name in adapters[16]}
    result["peft_images_per_s"], result["peft_load_s"] = peft_images_per_s(build_pipeline("medium"), files, size, steps)
    return result


def report(result: dict) -> Table:
    table = Table(
        title=f"LoRA on {result['preset']} ({result['device']}), batch of {result['batch']} with "
        f"{result['batch']} different adapters, {result['size']}²"
    )
    for column in ("base", "no LoRA s/step", "rank 16 s/step", "ratio", "rank 64 s/step", "ratio"):
        table.add_column(column, justify="right")
    for base, times in result["step_s"].items():
        table.add_row(
            base,
            f"{times['none']:.3f}",
            f"{times['rank 16']:.3f}",
            f"{times['rank 16'] / times['none']:.3f}×",
            f"{times['rank 64']:.3f}",
            f"{times['rank 64'] / times['none']:.3f}×",
        )
    return table


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.lora", description=__doc__)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=4, help="steps of the anchor's renders")
    parser.add_argument("--repeats", type=int, default=3, help="forward passes timed per configuration")
    parser.add_argument("--out", type=Path, default=Path("build/bench/lora.json"))
    args = parser.parse_args(argv)
    result = run(args.size, args.steps, args.repeats)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    Console(width=140).print(report(result))
    for rank, first in result["first_use"].items():
        print(
            f"first use, {rank} ({first['mb']:.1f} MB): {first['miss_ms']:.0f} ms (cache hit {first['hit_ms']:.2f} ms)"
        )
    print(
        f"4 requests, 4 different LoRAs, {args.size}², {args.steps} steps, bf16: "
        f"ours {result['ours_images_per_s']:.3f} "
        f"img/s, diffusers + PEFT switching {result['peft_images_per_s']:.3f} img/s "
        f"({result['ours_images_per_s'] / result['peft_images_per_s']:.2f}×); PEFT load_lora_weights "
        f"{result['peft_load_s']:.2f} s per adapter"
    )


if __name__ == "__main__":
    main()
