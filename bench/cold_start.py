"""`python -m bench.cold_start FOLDER... [--before CHECKOUT]`: artifact load time over the time to read its bytes once.

FOLDER is an artifact (manifest.json: the whole pipeline is loaded, verified) or one component folder of
shards (the full-size transformer `python -m bench.streaming --keep` writes; its sha256s are computed first,
untimed). For each: `cat` of every file to /dev/null, then the loader of this checkout and, with --before,
the loader of another checkout of this repository (e.g. `git worktree add build/before 1398f65`: sha256 of
every file, then load). Each load runs alone in a fresh process, imports excluded. The page cache is dropped
before each timed pass when this runs as root; otherwise the figures say so.
"""

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from models.artifact import MANIFEST, hash_files

REPO = Path(__file__).resolve().parents[1]
LOAD_ARTIFACT = "from models.artifact import load_pipeline; load_pipeline({folder!r})"
LOAD_SHARDS = {  # the shard reader's signature changed: before, it took no digests (files were hashed first)
    "now": (
        "import json; from pathlib import Path; from models.tensors import read_shards; "
        "read_shards(Path({folder!r}), json.loads({hashes!r}))"
    ),
    "before": (
        "from pathlib import Path; from models.artifact import sha256_file; from models.tensors import "
        "read_shards; [sha256_file(p) for p in sorted(Path({folder!r}).iterdir())]; read_shards(Path({folder!r}))"
    ),
}


def drop_page_cache() -> bool:
    subprocess.run(["sync"], check=True)
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def load_seconds(code: str, checkout: Path) -> float:
    """The load alone, in a fresh process of `checkout` (imports excluded: they cost the same either way)."""
    program = (
        "import time, models.artifact, models.tensors\nstarted = time.perf_counter()\n"
        + code.replace("; ", "\n")
        + "\nprint(time.perf_counter() - started)"
    )
    result = subprocess.run(
        [sys.executable, "-c", program],
        cwd=checkout,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(checkout)},
    )
    if result.returncode:
        raise SystemExit(f"{checkout}: the load failed:\n{result.stderr[-2000:]}")
    return float(result.stdout.split()[-1])


def loader_codes(folder: Path, versions: list[str]) -> dict[str, str]:
    if (folder / MANIFEST).is_file():
        return dict.fromkeys(versions, LOAD_ARTIFACT.format(folder=str(folder)))
    hashes = json.dumps({Path(path).name: digest for path, digest in hash_files(folder).items()})
    return {version: LOAD_SHARDS[version].format(folder=str(folder), hashes=hashes) for version in versions}


def measure(folder: Path, before: Path | None) -> dict:
    files = sorted(str(path) for path in folder.rglob("*") if path.is_file())
    checkouts = {"now": REPO, **({"before": before} if before else {})}
    codes = loader_codes(folder, list(checkouts))
    figures = {"folder": str(folder), "bytes": sum(Path(path).stat().st_size for path in files)}
    figures["cache_dropped"] = drop_page_cache()
    started = time.perf_counter()
    subprocess.run(["sh", "-c", 'cat "$@" > /dev/null', "cat", *files], check=True)
    figures["cat_s"] = time.perf_counter() - started
    for version, checkout in checkouts.items():
        drop_page_cache()
        figures[f"{version}_s"] = load_seconds(codes[version], checkout)
        figures[f"{version}_over_cat"] = figures[f"{version}_s"] / figures["cat_s"]
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.cold_start", description=__doc__)
    parser.add_argument("folders", nargs="+", type=Path)
    parser.add_argument("--before", type=Path, help="a checkout of this repository with the earlier loader")
    args = parser.parse_args()
    for folder in args.folders:
        f = measure(folder.resolve(), args.before.resolve() if args.before else None)
        line = (
            f"{folder} ({f['bytes'] / 1e9:.2f} GB, page cache dropped: {f['cache_dropped']}): cat {f['cat_s']:.2f} s; "
            f"load now {f['now_s']:.2f} s ({f['now_over_cat']:.2f}x)"
        )
        if args.before:
            line += f"; load before {f['before_s']:.2f} s ({f['before_over_cat']:.2f}x)"
        print(line, flush=True)


if __name__ == "__main__":
    main()
