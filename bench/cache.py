"""`python -m bench.cache`: step caching and compiled blocks on the trained toy model, through the renderer.

Step caching: for each policy (off, balanced, fast; `--sweep` adds thresholds), held-out single-object prompts
at 64², 28 steps, in batches of 8: the transformer block evaluations per image (each block's rows counted),
the wall ratio against `off`, PSNR and SSIM of the pictures against `off`'s, and prompt adherence (the
checker). Compiled blocks (`FLUX_COMPILE=blocks`): the render wall ratio compiled/eager for bf16 and int8,
and the seconds the compilation adds at start. One run; writes cache.json and cache.md.
"""

import argparse
import io
import json
import statistics
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import bentoml
import numpy as np
import torch
from PIL import Image
from rich.console import Console
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from bench.gguf import store
from models.artifact import load_pipeline
from models.source import load_source_pipeline, resolve_source
from models.toy import SIZE, STEPS, TRAINED
from models.toy.checker import adherence
from models.toy.scenes import held_out_prompts
from service.runtime.blocks import THRESHOLDS, transformer_blocks
from service.runtime.placement import Placement
from service.runtime.render import Renderer
from service.schema import CachePolicy, WorkItem

BATCH = 8


@contextmanager
def counted_rows(transformer: torch.nn.Module) -> Iterator[list[int]]:
    """[rows through any block's attention so far]: one block evaluation per image per block."""
    count = [0]

    def add(module, args, kwargs) -> None:
        count[0] += len(kwargs["hidden_states"])

    handles = [block.attn.register_forward_pre_hook(add, with_kwargs=True) for block in transformer_blocks(transformer)]
    try:
        yield count
    finally:
        for handle in handles:
            handle.remove()


def items(prompts: list[str], policy: CachePolicy) -> list[WorkItem]:
    return [
        WorkItem(prompt=prompt, width=SIZE, height=SIZE, steps=STEPS, seed=seed, cache=policy)
        for seed, prompt in enumerate(prompts)
    ]


def render_all(renderer: Renderer, work: list[WorkItem]) -> tuple[list[np.ndarray], float]:
    """The pictures, and the seconds it took, BATCH at a time."""
    started, images = time.perf_counter(), []
    for start in range(0, len(work), BATCH):
        for result in renderer.render(work[start : start + BATCH]):
            assert result.ok, result.message
            images.append(np.asarray(Image.open(io.BytesIO(result.image)).convert("RGB")))
    return images, time.perf_counter() - started


def policy_row(renderer: Renderer, name: str, policy: CachePolicy, prompts: list[str], reference: dict | None):
    with counted_rows(renderer.pipe.transformer) as count:
        images, seconds = render_all(renderer, items(prompts, policy))
    blocks = len(transformer_blocks(renderer.pipe.transformer))
    row = {
        "policy": name,
        "threshold": THRESHOLDS[policy],
        "block_evaluations_per_image": count[0] / len(prompts),
        "block_share": count[0] / (len(prompts) * blocks * STEPS),
        "seconds": seconds,
        "adherence": adherence(held_out_prompts(len(prompts)), images)["all"],
        "images": images,
    }
    if reference is not None:
        pairs = list(zip(reference["images"], images, strict=True))
        row["psnr_db"] = float(np.mean([min(100.0, peak_signal_noise_ratio(a, b, data_range=255)) for a, b in pairs]))
        row["ssim"] = float(np.mean([structural_similarity(a, b, channel_axis=2, data_range=255) for a, b in pairs]))
        row["wall_ratio"] = seconds / reference["seconds"]
    return row


def caching(renderer: Renderer, prompts: list[str], sweep: list[float]) -> list[dict]:
    render_all(renderer, items(prompts[:BATCH], CachePolicy.off))  # warm-up: the first rows pay no start-up
    reference = policy_row(renderer, "off", CachePolicy.off, prompts, None)
    rows = [reference]
    for policy in (CachePolicy.balanced, CachePolicy.fast):
        rows.append(policy_row(renderer, policy.value, policy, prompts, reference))
    named = THRESHOLDS[CachePolicy.balanced]
    for threshold in sweep:
        THRESHOLDS[CachePolicy.balanced] = threshold
        rows.append(policy_row(renderer, f"threshold {threshold}", CachePolicy.balanced, prompts, reference))
    THRESHOLDS[CachePolicy.balanced] = named
    for row in rows:
        Console().print({k: round(v, 3) if isinstance(v, float) else v for k, v in row.items() if k != "images"})
    return rows


def compiled_row(name: str, pipe, prompts: list[str]) -> dict:
    """Render seconds eager, then compiled (after warm-up at batch 1 and BATCH), and the compile seconds."""
    renderer = Renderer(pipe, Placement.resident(torch.device("cpu")))
    work = items(prompts, CachePolicy.off)
    render_all(renderer, work[:BATCH])  # eager warm-up
    eager = statistics.median(render_all(renderer, work)[1] for _ in range(2))
    try:
        compile_seconds = renderer.compile_blocks([work[:1], work[:BATCH]])
    except Exception as error:  # noqa: BLE001 - the row says why this recipe does not compile
        return {"recipe": name, "error": f"{type(error).__name__}: {error}"[:300]}
    compiled = statistics.median(render_all(renderer, work)[1] for _ in range(2))
    return {
        "recipe": name,
        "eager_s": eager,
        "compiled_s": compiled,
        "ratio": compiled / eager,
        "compile_s": compile_seconds,
    }


def markdown(rows: list[dict], compiled: list[dict], count: int) -> str:
    lines = [
        f"| policy ({count} prompts, {STEPS} steps) | threshold | block evaluations / image | share of off | "
        "wall ratio | PSNR vs off | SSIM | adherence |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        psnr = f"{r['psnr_db']:.1f} dB" if "psnr_db" in r else "="
        ssim = f"{r['ssim']:.3f}" if "ssim" in r else "="
        wall = f"{r['wall_ratio']:.2f}×" if "wall_ratio" in r else "1"
        lines.append(
            f"| {r['policy']} | {r['threshold']} | {r['block_evaluations_per_image']:.1f} | {r['block_share']:.2f}× | "
            f"{wall} | {psnr} | {ssim} | {r['adherence']:.1%} |"
        )
    lines += ["", "| recipe | eager render | compiled | ratio | compile at start |", "|---|---|---|---|---|"]
    for c in compiled:
        if "error" in c:
            lines.append(f"| {c['recipe']} | refused: {c['error']} | | | |")
        else:
            lines.append(
                f"| {c['recipe']} | {c['eager_s']:.2f} s | {c['compiled_s']:.2f} s | {c['ratio']:.2f}× | "
                f"{c['compile_s']:.1f} s |"
            )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.cache", description=__doc__)
    parser.add_argument("--source", type=Path, default=TRAINED, help="the trained toy model (a diffusers folder)")
    parser.add_argument("--prompts", type=int, default=200, help="held-out single-object prompts")
    parser.add_argument("--sweep", default="", help="more thresholds to measure, comma-separated (e.g. 0.1,0.3)")
    parser.add_argument("--compile-prompts", type=int, default=16, help="prompts timed eager and compiled")
    parser.add_argument("--out", type=Path, default=Path("build/bench-cache"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    prompts = [scene.caption() for scene in held_out_prompts(args.prompts)]
    bf16 = load_source_pipeline(resolve_source(str(args.source)), torch.bfloat16)
    sweep = [float(t) for t in args.sweep.split(",") if t]
    rows = caching(Renderer(bf16, Placement.resident(torch.device("cpu"))), prompts, sweep)
    compiled = [compiled_row("bf16", bf16, prompts[: args.compile_prompts])]
    with tempfile.TemporaryDirectory() as work:
        stored = store(args.source, "int8", Path(work), "bench-cache-int8")
        int8 = load_pipeline(Path(bentoml.models.get(stored.tag).path))[0]
        compiled.append(compiled_row("int8", int8, prompts[: args.compile_prompts]))
    table = markdown(rows, compiled, args.prompts)
    results = {"rows": [{k: v for k, v in r.items() if k != "images"} for r in rows], "compiled": compiled}
    (args.out / "cache.json").write_text(json.dumps(results, indent=2))
    (args.out / "cache.md").write_text(table)
    print(table)
    print(f"wrote {args.out}/cache.json, cache.md")


if __name__ == "__main__":
    main()
