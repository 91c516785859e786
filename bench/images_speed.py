"""`python -m bench.images_speed`: what an image request costs against its text-to-image twin, through the
renderer (one request at a time, the same size and steps): the denoising milliseconds of img2img at each
strength over text-to-image's (the goal: about the strength), inpainting's over text-to-image's (the goal: no
more), and the input's encode. Medians of `--repeats` runs, interleaved. One run; writes images_speed.json.
"""

import argparse
import base64
import json
import statistics
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from rich.console import Console

from models.architecture import build_pipeline
from service.pictures import png
from service.runtime.placement import Placement
from service.runtime.render import Renderer
from service.schema import Conditioning, WorkItem

STRENGTHS = (0.25, 0.5, 0.75, 1.0)


def requests(size: int, steps: int) -> dict[str, WorkItem]:
    picture = Image.fromarray(np.random.default_rng(0).integers(0, 256, (size, size, 3), dtype=np.uint8))
    mask = Image.new("L", (size, size), 0)
    mask.paste(255, (0, 0, size // 2, size // 2))
    image, masked = base64.b64encode(png(picture)).decode(), base64.b64encode(png(mask)).decode()
    text = WorkItem(prompt="a lighthouse", width=size, height=size, steps=steps, seed=1)
    kinds = {"text-to-image": text}
    for strength in STRENGTHS:
        kinds[f"img2img {strength}"] = text.model_copy(
            update={"conditioning": Conditioning(image=image, strength=strength)}
        )
    kinds["inpainting 1.0"] = text.model_copy(
        update={"conditioning": Conditioning(image=image, mask=masked, strength=1.0)}
    )
    return kinds


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.images_speed", description=__doc__)
    parser.add_argument("--preset", default="medium", help="models.architecture preset (random weights)")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=28)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("build/bench-images-speed"))
    args = parser.parse_args()
    renderer = Renderer(build_pipeline(args.preset, dtype=torch.bfloat16), Placement.resident(torch.device("cpu")))
    kinds = requests(args.size, args.steps)
    renderer.render([kinds["text-to-image"]])  # warm-up
    timings: dict[str, list[dict]] = {name: [] for name in kinds}
    for _ in range(args.repeats):
        for name, item in kinds.items():
            (result,) = renderer.render([item])
            assert result.ok, result.message
            timings[name].append(result.timings_ms)
    median = {
        name: {stage: statistics.median(t[stage] for t in runs) for stage in runs[0]} for name, runs in timings.items()
    }
    text_ms = median["text-to-image"]["denoise"]
    rows = [
        {
            "request": name,
            "denoise_ms": stages["denoise"],
            "denoise_ratio": stages["denoise"] / text_ms,
            "image_in_ms": stages.get("image_in", 0.0),
            "total_ratio": sum(stages.values()) / sum(median["text-to-image"].values()),
        }
        for name, stages in median.items()
    ]
    for row in rows:
        Console().print({k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()})
    args.out.mkdir(parents=True, exist_ok=True)
    record = {"preset": args.preset, "size": args.size, "steps": args.steps, "repeats": args.repeats, "rows": rows}
    (args.out / "images_speed.json").write_text(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
