"""`python -m bench.quality`: every recipe's pictures read back by the checker, on the trained toy model.

For bf16 (the source), float16, each quanto and bitsandbytes recipe and GGUF Q8_0 / Q4_0: prompt adherence on
held-out prompts (single objects: the share with colour, shape, size, position and background all right, and
per attribute; several objects: per attribute), PSNR and SSIM against the bf16 pictures, and a contact sheet
(prompts × recipes). Same prompts and seeds for every row.

Also, on bf16: the steps table (the single-object prompts at 1, 2, 4, 8 and 28 steps: adherence, and PSNR against
28 steps), and diversity (prompts drawn with 8 seeds each: the spread of the objects' centres and half-widths as
the checker reads them, against the spread of the generator's own pictures of the same captions).
Images in (bench/images_in.py): on bf16 the img2img curve over strengths; on every recipe inpainting (both
objects as asked, PSNR outside the mask against the VAE round trip's) and img2img at strength 0.6.
Writes quality.json, quality.md and sheet.png.
"""

import argparse
import json
import random
import tempfile
from pathlib import Path

import bentoml
import numpy as np
import torch
from PIL import Image, ImageDraw
from rich.console import Console

from bench import images_in
from bench.gguf import store
from models.artifact import load_pipeline
from models.source import load_source_pipeline, resolve_source
from models.toy import SIZE, STEPS, TRAINED
from models.toy.checker import ATTRIBUTES, adherence, read
from models.toy.scenes import SIZES, Scene, held_out_prompts, vary
from quantize.validate import Renders, compare, render

ROWS = ("bf16", "float16", "int8", "int4", "fp8", "int8-bnb", "nf4", "fp4", "Q8_0", "Q4_0")  # Q*: GGUF files
SHEET_COLUMNS = 12
STEP_COUNTS = (1, 2, 4, 8, STEPS)
SEEDS = 8  # pictures of one caption, for diversity


def scenes(singles: int, multiples: int) -> list[Scene]:
    """Held-out single-object prompts, then scenes of two and three objects (each with a held-out object)."""
    return [
        *held_out_prompts(singles, things=1, seed=1),
        *held_out_prompts(multiples // 2, things=2, seed=2),
        *held_out_prompts(multiples - multiples // 2, things=3, seed=3),
    ]


def pipeline_for(row: str, source_folder: Path, work: Path):
    if row in ("bf16", "float16"):
        dtype = torch.bfloat16 if row == "bf16" else torch.float16
        return load_source_pipeline(resolve_source(str(source_folder)), dtype)
    stored = store(source_folder, row, work, f"bench-quality-{row.lower()}")
    return load_pipeline(Path(bentoml.models.get(stored.tag).path))[0]


def measure(row: str, renders: Renders, reference: Renders, asked: list[Scene], prompts: tuple) -> dict:
    single = [i for i, scene in enumerate(asked) if len(scene.things) == 1]
    multi = [i for i, scene in enumerate(asked) if len(scene.things) > 1]
    quality = compare(reference, renders, SIZE, STEPS, prompts)
    return {
        "row": row,
        "single": adherence([asked[i] for i in single], [renders.images[i] for i in single]),
        "multiple": adherence([asked[i] for i in multi], [renders.images[i] for i in multi]),
        "image_psnr_db": quality.image_psnr_db,
        "image_ssim": quality.image_ssim,
    }


def markdown(results: list[dict], singles: int, multiples: int) -> str:
    head = ["recipe", f"single: all ({singles})", *ATTRIBUTES, f"several: all ({multiples})", "colour", "shape"]
    lines = ["| " + " | ".join(head) + " | PSNR vs bf16 | SSIM |", "|" + "---|" * (len(head) + 2)]
    for r in results:
        cells = [r["single"]["all"], *(r["single"][a] for a in ATTRIBUTES), r["multiple"]["all"]]
        cells += [r["multiple"]["colour"], r["multiple"]["shape"]]
        psnr = "=" if r["row"] == "bf16" else f"{r['image_psnr_db']:.1f} dB"
        ssim = "=" if r["row"] == "bf16" else f"{r['image_ssim']:.3f}"
        lines.append(f"| {r['row']} | " + " | ".join(f"{c:.1%}" for c in cells) + f" | {psnr} | {ssim} |")
    return "\n".join(lines) + "\n"


def steps_table(pipe, asked: list[Scene], full: Renders) -> list[dict]:
    """The single-object prompts at each step count: adherence, and PSNR against `full` (their pictures at
    STEPS); the same seeds."""
    prompts = tuple((scene.caption(), seed) for seed, scene in enumerate(asked))
    rows = []
    for steps in STEP_COUNTS:
        renders = full if steps == STEPS else render(pipe, SIZE, steps, prompts, batch=50)
        psnr = compare(full, renders, SIZE, steps, prompts).image_psnr_db
        rows.append({"steps": steps, "single": adherence(asked, renders.images), "image_psnr_db": psnr})
        Console().print(f"{steps} steps", {k: round(v, 3) for k, v in rows[-1]["single"].items()})
    return rows


def diversity(pipe, captions: list[Scene], steps: int = STEPS, seeds: int = SEEDS) -> dict:
    """The spread of the asked object's centre (px) and half-width (px) over `seeds` pictures of each caption, as
    the checker reads them, for the model and for the generator's own pictures of the same captions."""
    prompts = tuple((scene.caption(), seed) for scene in captions for seed in range(seeds))
    images = render(pipe, SIZE, steps, prompts, batch=50).images
    rng = random.Random(0)
    drawn = [np.asarray(vary(scene, rng).draw()) for scene in captions for _ in range(seeds)]
    return {"model": spread(captions, images, seeds), "generator": spread(captions, drawn, seeds)}


def spread(captions: list[Scene], images: list[np.ndarray], seeds: int) -> dict[str, float]:
    """Root mean over captions of the variance across seeds of the object found at the asked place: its centre
    (x and y together) and its half-width; `found` is the share of pictures with an object there."""
    centre, half, found = [], [], 0
    for index, scene in enumerate(captions):
        asked = scene.things[0]
        seen = [read(Image.fromarray(image)) for image in images[index * seeds : (index + 1) * seeds]]
        things = [next((t for t in s.things if t.position == asked.position), None) for s in seen]
        things = [t for t in things if t is not None]
        found += len(things)
        if len(things) > 1:
            centre.append((np.var([t.look.shift[0] for t in things]) + np.var([t.look.shift[1] for t in things])) / 2)
            half.append(np.var([SIZES[t.size] * t.look.growth for t in things]))
    return {
        "centre_px": float(np.sqrt(np.mean(centre))),
        "half_width_px": float(np.sqrt(np.mean(half))),
        "found": found / (len(captions) * seeds),
    }


def steps_markdown(rows: list[dict]) -> str:
    lines = ["| steps | single: all | shape | size | position | PSNR vs 28 steps |", "|---|---|---|---|---|---|"]
    for r in rows:
        psnr = "=" if r["steps"] == STEPS else f"{r['image_psnr_db']:.1f} dB"
        cells = " | ".join(f"{r['single'][a]:.1%}" for a in ("all", "shape", "size", "position"))
        lines.append(f"| {r['steps']} | {cells} | {psnr} |")
    return "\n".join(lines) + "\n"


def diversity_markdown(figures: dict, captions: int) -> str:
    lines = [
        f"| {captions} captions × {SEEDS} seeds | centre spread | half-width spread | object found |",
        "|---|---|---|---|",
    ]
    for name, row in figures.items():
        lines.append(f"| {name} | {row['centre_px']:.2f} px | {row['half_width_px']:.2f} px | {row['found']:.1%} |")
    return "\n".join(lines) + "\n"


def contact_sheet(rows: dict[str, Renders], asked: list[Scene], path: Path) -> None:
    """The first prompts (columns) as each recipe draws them (rows), labelled."""
    columns = [*range(SHEET_COLUMNS - 3), *range(len(asked) - 3, len(asked))]  # singles, then a few multiples
    cell, label = 2 * SIZE, 70
    sheet = Image.new("RGB", (label + cell * len(columns), cell * len(rows)), "white")
    pen = ImageDraw.Draw(sheet)
    for r, (name, renders) in enumerate(rows.items()):
        pen.text((4, r * cell + cell // 2 - 6), name, fill="black")
        for c, index in enumerate(columns):
            image = Image.fromarray(renders.images[index]).resize((cell, cell), Image.NEAREST)
            sheet.paste(image, (label + c * cell, r * cell))
    sheet.save(path)
    path.with_suffix(".txt").write_text("\n".join(asked[i].caption() for i in columns) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.quality", description=__doc__)
    parser.add_argument("--source", type=Path, default=TRAINED, help="the trained toy model (a diffusers folder)")
    parser.add_argument("--singles", type=int, default=200, help="held-out single-object prompts")
    parser.add_argument("--multiples", type=int, default=100, help="held-out prompts of two and three objects")
    parser.add_argument("--rows", default=",".join(ROWS))
    parser.add_argument("--captions", type=int, default=20, help="held-out captions for diversity (×8 seeds)")
    parser.add_argument("--pairs", type=int, default=40, help="img2img pictures (input scene, asked scene)")
    parser.add_argument("--repaints", type=int, default=40, help="inpainting cases (held-out objects asked)")
    parser.add_argument("--out", type=Path, default=Path("build/bench-quality"))
    args = parser.parse_args()
    if not args.rows.startswith("bf16"):
        parser.error("--rows: bf16 comes first (the reference for PSNR, the steps table and diversity)")
    args.out.mkdir(parents=True, exist_ok=True)
    asked = scenes(args.singles, args.multiples)
    prompts = tuple((scene.caption(), seed) for seed, scene in enumerate(asked))
    rows: dict[str, Renders] = {}
    results, repaints = [], {}
    pairs, cases = images_in.img2img_pairs(args.pairs), images_in.repaint_cases(args.repaints)
    with tempfile.TemporaryDirectory() as work:
        for row in args.rows.split(","):
            pipe = pipeline_for(row, args.source, Path(work))
            rows[row] = render(pipe, SIZE, STEPS, prompts, batch=50)
            results.append(measure(row, rows[row], next(iter(rows.values())), asked, prompts))
            Console().print(row, {k: round(v, 3) for k, v in results[-1]["single"].items()})
            repaints[row] = images_in.inpainting(pipe, cases)
            repaints[row]["img2img_0.6"] = images_in.img2img_curve(pipe, pairs, strengths=(0.6,))[0]
            Console().print(row, "images in", repaints[row])
            if row == "bf16":
                curve = images_in.img2img_curve(pipe, pairs)
                singles = Renders(rows[row].images[: args.singles], rows[row].latents[: args.singles])
                steps = steps_table(pipe, asked[: args.singles], singles)
                spreads = diversity(pipe, held_out_prompts(args.captions, things=1, seed=8))
    tables = {
        "recipes": markdown(results, args.singles, args.multiples),
        "steps": steps_markdown(steps),
        "diversity": diversity_markdown(spreads, args.captions),
        "img2img": images_in.curve_markdown(curve, args.pairs),
        "inpainting": images_in.inpainting_markdown(repaints, args.repaints),
    }
    record = {"recipes": results, "steps": steps, "diversity": spreads, "img2img": curve, "images_in": repaints}
    (args.out / "quality.json").write_text(json.dumps(record, indent=2))
    (args.out / "quality.md").write_text("\n".join(tables.values()))
    contact_sheet(rows, asked, args.out / "sheet.png")
    print(*tables.values(), sep="\n")
    print(f"wrote {args.out}/quality.json, quality.md, sheet.png")


if __name__ == "__main__":
    main()
