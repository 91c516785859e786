"""`python -m bench.cold_start SOURCE TAG`: process start → model ready, artifact vs bf16 + quantize at start-up.

Each path runs in a fresh Python process, timed from launch to a ready pipeline; the server path is
timed from `bentoml serve` launch to a 200 on /readyz (load, sha256 check and warm-up included).
"""

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from service.launcher import REPO, running_server

LOAD_ARTIFACT = "import bentoml; from models.artifact import load_pipeline; load_pipeline(bentoml.models.get({tag!r}).path)"
QUANTIZE_AT_START = ("from models.source import resolve_source, load_source_pipeline; "
                     "from quantize.recipes import RECIPES, apply_recipe; "
                     "apply_recipe(load_source_pipeline(resolve_source({source!r})), RECIPES[{recipe!r}])")


def time_fresh_process(code: str) -> float:
    started = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, capture_output=True)
    return time.perf_counter() - started


def time_server_ready(tag: str, port: int) -> float:
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as folder:
        with running_server(port, Path(folder) / "server.log", env={"FLUX_ARTIFACT": tag,
                                                                    "FLUX_GRPC_ADDRESS": f"127.0.0.1:{port + 1}"}):
            return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.cold_start", description=__doc__)
    parser.add_argument("source", help="the bf16 checkpoint the artifact was made from")
    parser.add_argument("tag", help="the artifact's model-store tag")
    parser.add_argument("--port", type=int, default=3456)
    args = parser.parse_args()
    import bentoml

    recipe = bentoml.models.get(args.tag).info.labels["recipe"]
    artifact_s = time_fresh_process(LOAD_ARTIFACT.format(tag=args.tag))
    quantize_s = time_fresh_process(QUANTIZE_AT_START.format(source=args.source, recipe=recipe))
    server_s = time_server_ready(args.tag, args.port)
    print(f"load {recipe} artifact (sha256 checked):  {artifact_s:7.2f} s")
    print(f"load bf16 + quantize {recipe} at start-up:  {quantize_s:7.2f} s")
    print(f"cold-start ratio (bf16+quantize / artifact): {quantize_s / artifact_s:.2f}x")
    print(f"server launch → /readyz with the artifact:  {server_s:7.2f} s")


if __name__ == "__main__":
    main()
