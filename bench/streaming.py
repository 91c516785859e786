"""`python -m bench.streaming`: quantize a full-size FLUX.1-dev transformer checkpoint with bounded memory.

Writes a synthetic checkpoint in the diffusers sharded layout (random bf16 weights, the real 11.9 B
parameter architecture, shard by shard), then streams it through `write_component` once per recipe,
each in a fresh process, and prints wall time, peak RSS and artifact bytes against the bf16 bytes. Peak RSS
(the kernel's high-water mark) is split by sampling: anonymous memory (what the process allocated) and
file-backed pages (mapped files it touched, which the kernel can drop and read again).
"""

import argparse
import json
import math
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import track
from rich.table import Table

from models.architecture import PRESETS, build_module
from models.gguf_file import write_gguf
from models.single_file import original_layout_shapes
from models.tensors import ShardWriter

QUANTIZE = """
import json, sys, threading, time
from pathlib import Path
from bench.report import peak_rss_bytes
from models.source import Source
from quantize.recipes import RECIPES
from quantize.stream import write_component

peaks = {"RssAnon": 0, "RssFile": 0, "RssShmem": 0}
def sample():  # /proc/self/status every 20 ms: anonymous memory and mapped file pages, peak of each
    while True:
        for line in open("/proc/self/status"):
            key, _, value = line.partition(":")
            if key in peaks:
                peaks[key] = max(peaks[key], int(value.split()[0]) * 1024)
        time.sleep(0.02)
threading.Thread(target=sample, daemon=True).start()
gguf = Path(sys.argv[4]) if len(sys.argv) > 4 else None  # a GGUF transformer in place of the diffusers shards
source = Source(id=str(gguf or sys.argv[1]), revision="synthetic", path=Path(sys.argv[1]), transformer_file=gguf)
write_component(source, "transformer", Path(sys.argv[2]), RECIPES[sys.argv[3]])
print(json.dumps({"peak_rss_bytes": peak_rss_bytes(),
                  "peak_anon_bytes": peaks["RssAnon"], "peak_file_bytes": peaks["RssFile"]}))
"""


def write_config(folder: Path) -> torch.nn.Module:
    """The full transformer's config.json, and the transformer on the meta device."""
    with torch.device("meta"):
        model = build_module("full", "transformer")
    model.save_config(folder)
    return model


def write_synthetic_transformer(folder: Path, shard_bytes: int = 2 << 30) -> int:
    """The full transformer's config and random bf16 weights, one tensor in memory at a time (kept and
    reused when a previous run wrote it completely)."""
    index = folder / "diffusion_pytorch_model.safetensors.index.json"
    if index.is_file():
        return json.loads(index.read_text())["metadata"]["total_size"]
    model = write_config(folder)
    writer = ShardWriter(folder, shard_bytes, name="diffusion_pytorch_model")
    generator = torch.Generator().manual_seed(0)
    for name, meta in track(list(model.state_dict().items()), description="writing synthetic checkpoint"):
        writer.add({name: (torch.randn(meta.shape, generator=generator) * 0.02).to(torch.bfloat16)})
    writer.close()
    return writer.total


def write_synthetic_gguf(path: Path, ggml_type: str) -> int:
    """The full transformer in city96's GGUF layout, random weights (std 0.02), one tensor in memory at a
    time; returns its bytes in bf16 (kept and reused when a previous run wrote it)."""
    shapes = original_layout_shapes(PRESETS["full"].transformer_config())
    if not path.is_file():
        generator = torch.Generator().manual_seed(0)
        write_gguf(path, shapes, lambda name: torch.randn(shapes[name], generator=generator) * 0.02, ggml_type)
    return sum(math.prod(shape) * 2 for shape in shapes.values())


def quantize_in_fresh_process(source: Path, out: Path, recipe: str, gguf: Path | None = None) -> dict:
    started = time.perf_counter()
    run = subprocess.run(
        [sys.executable, "-c", QUANTIZE, str(source), str(out), recipe, *([str(gguf)] if gguf else [])],
        check=True,
        capture_output=True,
        text=True,
    )
    wall = time.perf_counter() - started
    peaks = json.loads(run.stdout.splitlines()[-1])
    artifact = sum(path.stat().st_size for path in out.iterdir() if path.suffix == ".safetensors")
    return {"recipe": recipe, "wall_s": round(wall, 1), **peaks, "artifact_bytes": artifact}


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.streaming", description=__doc__)
    parser.add_argument("--work", type=Path, default=Path("build/streaming"), help="scratch folder (~45 GB)")
    parser.add_argument("--recipes", default="int8,int4", help="comma-separated recipe names")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    parser.add_argument("--keep", action="store_true", help="keep the artifacts (bench.cold_start reads them)")
    parser.add_argument(
        "--gguf",
        metavar="TYPE",
        help="stream a synthetic GGUF file of this GGML type (Q8_0, Q4_0, "
        "...) instead of the diffusers shards (the transformer config still comes from them)",
    )
    args = parser.parse_args()
    source = args.work / "source" / "transformer"
    started = time.perf_counter()
    gguf = args.work / f"flux1-dev-synthetic-{args.gguf}.gguf" if args.gguf else None
    if gguf:
        write_config(source)
        bf16_bytes = write_synthetic_gguf(gguf, args.gguf)
    else:
        bf16_bytes = write_synthetic_transformer(source)
    print(f"synthetic checkpoint: {bf16_bytes:,} bytes in bf16, ready in {time.perf_counter() - started:.0f} s")
    results = []
    for recipe in args.recipes.split(","):
        out = args.work / recipe
        shutil.rmtree(out, ignore_errors=True)
        results.append(quantize_in_fresh_process(args.work / "source", out, recipe, gguf) | {"bf16_bytes": bf16_bytes})
        if not args.keep:
            shutil.rmtree(out)
    table = Table(title=f"full FLUX.1-dev transformer, streamed from {gguf.name if gguf else 'bf16 shards'}")
    for column in ("recipe", "wall", "peak RSS", "peak anon", "peak file-backed", "artifact bytes", "× bf16"):
        table.add_column(column, justify="right")
    for r in results:
        table.add_row(
            r["recipe"],
            f"{r['wall_s']:.0f} s",
            *(f"{r[key] / 1024**3:.2f} GiB" for key in ("peak_rss_bytes", "peak_anon_bytes", "peak_file_bytes")),
            f"{r['artifact_bytes']:,}",
            f"{r['artifact_bytes'] / bf16_bytes:.3f}",
        )
    Console().print(table)
    if args.out:
        args.out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
