"""`python -m bench.recipes [--budget-gb 16]`: seconds per image and peak memory per recipe, on the device at hand.

On a CUDA machine it builds the `full` FLUX.1-dev architecture with random weights (timings and memory
do not depend on the values) at 1024², 28 steps; on a CPU it runs the same flow on `medium` at 256².
Each recipe runs in its own process so peak memory is its own. With --budget-gb each recipe also runs
as the serving planner places it on that budget, so the 16 GB claim is measured against all-resident.
"""

import argparse
import json
import subprocess
import sys
import time

import torch
from rich.console import Console
from rich.table import Table

from bench.report import peak_rss_bytes
from models.architecture import build_pipeline
from models.sizes import module_bytes
from quantize.recipes import RECIPES, apply_recipe
from service.runtime.placement import Placement, plan_placement
from service.runtime.render import Renderer
from service.schema import WorkItem

GIB = 1024**3
CARD_GIB = 16


def placement(pipe, device: torch.device, budget_gib: float | None, size: int, batches: list[int]) -> Placement:
    """All resident, or what the serving planner chooses for this budget (enforced on a bigger GPU)."""
    if budget_gib is None:
        return Placement.resident(device)
    weights = {
        name: module_bytes(getattr(pipe, name)) for name in ("transformer", "text_encoder_2", "text_encoder", "vae")
    }
    plan = plan_placement(weights, int(budget_gib * GIB), size, max(batches))
    if device.type == "cuda":
        torch.cuda.set_per_process_memory_fraction(budget_gib * GIB / torch.cuda.get_device_properties(0).total_memory)
    return Placement(plan, device)


def measure(recipe: str, preset: str, size: int, steps: int, batches: list[int], budget_gib: float | None) -> dict:
    """Build, quantize, place, warm up, then time one render per batch size."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    with device if budget_gib is None else torch.device("cpu"):  # on a budget, build in host memory
        pipe = build_pipeline(preset)
    if recipe != "bf16":
        apply_recipe(pipe, RECIPES[recipe])
    where = placement(pipe, device, budget_gib, size, batches)
    renderer = Renderer(pipe, where)
    batches = [b for b in batches if b <= where.max_batch(size)]
    requests = [
        WorkItem(prompt=f"bench {i}", width=size, height=size, steps=steps, guidance=3.5, seed=i)
        for i in range(max(batches))
    ]
    renderer.render(requests[:1])
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    per_image = {}
    for batch in batches:
        started = time.perf_counter()
        renderer.render(requests[:batch])
        if device.type == "cuda":
            torch.cuda.synchronize()
        per_image[batch] = (time.perf_counter() - started) / batch
    result = {
        "recipe": recipe,
        "device": str(device),
        "preset": preset,
        "size": size,
        "steps": steps,
        "budget_gib": budget_gib,
        "strategy": where.plan.strategy,
        "s_per_image": per_image,
        "best_batch": min(per_image, key=per_image.get),
    }
    if device.type == "cuda":
        result |= {
            "peak_allocated_gib": torch.cuda.max_memory_allocated() / GIB,
            "peak_reserved_gib": torch.cuda.max_memory_reserved() / GIB,
        }
        result["fits_16gb"] = result["peak_reserved_gib"] <= CARD_GIB
    else:
        result["peak_rss_gib"] = peak_rss_bytes() / GIB
    return result


def table(results: list[dict]) -> Table:
    table = Table(
        title=f"recipes on {results[0]['device']}: {results[0]['preset']}, "
        f"{results[0]['size']}², {results[0]['steps']} steps"
    )
    for column in (
        "recipe",
        "budget GiB",
        "placement",
        "s/image, batch 1",
        "best batch",
        "s/image there",
        "peak memory GiB",
        "fits 16 GB",
    ):
        table.add_column(column, justify="right")
    for r in results:
        memory = r.get("peak_reserved_gib", r.get("peak_rss_gib"))
        best = r["best_batch"]
        table.add_row(
            r["recipe"],
            str(r["budget_gib"] or "-"),
            r["strategy"],
            f"{r['s_per_image'][1]:.2f}",
            str(best),
            f"{r['s_per_image'][best]:.2f}",
            f"{memory:.2f}" + ("" if "peak_reserved_gib" in r else " (RSS)"),
            str(r.get("fits_16gb", "-")),
        )
    return table


def main() -> None:
    cuda = torch.cuda.is_available()
    parser = argparse.ArgumentParser(prog="python -m bench.recipes", description=__doc__)
    parser.add_argument("--recipes", default="bf16,int8,int4")
    parser.add_argument("--preset", default="full" if cuda else "medium")
    parser.add_argument("--size", type=int, default=1024 if cuda else 256)
    parser.add_argument("--steps", type=int, default=28 if cuda else 4)
    parser.add_argument("--batches", default="1,2,4" if cuda else "1,2")
    parser.add_argument(
        "--budget-gb",
        type=float,
        help="also run each recipe as the planner places it on this "
        "budget (e.g. 16), enforced with set_per_process_memory_fraction on a bigger GPU",
    )
    parser.add_argument("--out", default="build/bench/recipes.json")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # run a single recipe in this process
    args = parser.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    if args.one:
        print(json.dumps(measure(args.one, args.preset, args.size, args.steps, batches, args.budget_gb)))
        return
    results = []
    for recipe in args.recipes.split(","):
        for budget in (None, args.budget_gb) if args.budget_gb else (None,):
            command = [
                sys.executable,
                "-m",
                "bench.recipes",
                "--one",
                recipe,
                "--preset",
                args.preset,
                "--size",
                str(args.size),
                "--steps",
                str(args.steps),
                "--batches",
                args.batches,
            ]
            child = subprocess.run(
                command + (["--budget-gb", str(budget)] if budget else []), capture_output=True, text=True, check=True
            )
            results.append(json.loads(child.stdout.strip().splitlines()[-1]))
            results[-1]["s_per_image"] = {int(k): v for k, v in results[-1]["s_per_image"].items()}
    Console(width=140).print(table(results))
    with open(args.out, "w") as stream:
        json.dump(results, stream, indent=2)


if __name__ == "__main__":
    main()
