"""`python -m bench.quality`: every recipe's pictures read back by the checker, on the trained toy model.

For bf16 (the source), float16, each quanto and bitsandbytes recipe and GGUF Q8_0 / Q4_0: prompt adherence on
held-out prompts (single objects: the share with colour, shape, size, position and background all right, and
per attribute; several objects: per attribute), PSNR and SSIM against the bf16 pictures, and a contact sheet
(prompts × recipes). Same prompts and seeds for every row. Writes quality.json, quality.md and sheet.png.
"""

import argparse
import json
import tempfile
from pathlib import Path

import bentoml
import torch
from PIL import Image, ImageDraw
from rich.console import Console

from bench.gguf import store
from models.artifact import load_pipeline
from models.source import load_source_pipeline, resolve_source
from models.toy import SIZE, STEPS, TRAINED
from models.toy.checker import ATTRIBUTES, adherence
from models.toy.scenes import Scene, held_out_prompts
from quantize.validate import Renders, compare, render

ROWS = ("bf16", "float16", "int8", "int4", "fp8", "int8-bnb", "nf4", "fp4", "Q8_0", "Q4_0")  # Q*: GGUF files
SHEET_COLUMNS = 12


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
    parser.add_argument("--out", type=Path, default=Path("build/bench-quality"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    asked = scenes(args.singles, args.multiples)
    prompts = tuple((scene.caption(), seed) for seed, scene in enumerate(asked))
    rows: dict[str, Renders] = {}
    results = []
    with tempfile.TemporaryDirectory() as work:
        for row in args.rows.split(","):
            rows[row] = render(pipeline_for(row, args.source, Path(work)), SIZE, STEPS, prompts, batch=50)
            results.append(measure(row, rows[row], next(iter(rows.values())), asked, prompts))
            Console().print(row, {k: round(v, 3) for k, v in results[-1]["single"].items()})
    table = markdown(results, args.singles, args.multiples)
    (args.out / "quality.json").write_text(json.dumps(results, indent=2))
    (args.out / "quality.md").write_text(table)
    contact_sheet(rows, asked, args.out / "sheet.png")
    print(table)
    print(f"wrote {args.out}/quality.json, quality.md, sheet.png")


if __name__ == "__main__":
    main()
