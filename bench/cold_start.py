"""`python -m bench.cold_start FOLDER...`: artifact load time over the time to read its bytes once.

FOLDER is an artifact (manifest.json: the whole pipeline is loaded) or one component folder of shards (the
full-size transformer `python -m bench.streaming --keep` writes; its sha256s are computed first, untimed).
For each: `cat` of every file to /dev/null; the loader as it was (sha256 of every file, then load: every
byte read twice); the loader now (each shard hashed on other cores while it is turned into tensors). The
page cache is dropped before each timed pass when this runs as root; otherwise say so in the figures.
"""

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from models.artifact import MANIFEST, hash_files

LOAD = {
    "one_pass": "from models.artifact import load_pipeline; load_pipeline({folder!r})",
    "two_pass": ("from pathlib import Path; from models.artifact import sha256_file, load_pipeline; "
                 "[sha256_file(p) for p in sorted(Path({folder!r}).rglob('*')) if p.is_file()]; "
                 "load_pipeline({folder!r}, verify=False)"),
}
LOAD_SHARDS = {
    "one_pass": "import json; from pathlib import Path; from models.tensors import read_shards; read_shards(Path({folder!r}), json.loads({hashes!r}))",
    "two_pass": ("from pathlib import Path; from models.artifact import sha256_file; from models.tensors import "
                 "read_shards; [sha256_file(p) for p in sorted(Path({folder!r}).iterdir())]; read_shards(Path({folder!r}))"),
}


def drop_page_cache() -> bool:
    subprocess.run(["sync"], check=True)
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def load_seconds(code: str) -> float:
    """The load alone, in a fresh process (imports excluded: they cost the same either way)."""
    program = ("import time, models.artifact, models.tensors\nstarted = time.perf_counter()\n" + code.replace("; ", "\n")
               + "\nprint(time.perf_counter() - started)")
    return float(subprocess.run([sys.executable, "-c", program], check=True, capture_output=True,
                                text=True).stdout.split()[-1])


def measure(folder: Path) -> dict:
    files = sorted(str(path) for path in folder.rglob("*") if path.is_file())
    if (folder / MANIFEST).is_file():
        codes = {name: code.format(folder=str(folder)) for name, code in LOAD.items()}
    else:
        hashes = json.dumps({Path(path).name: digest for path, digest in hash_files(folder).items()})
        codes = {name: code.format(folder=str(folder), hashes=hashes) for name, code in LOAD_SHARDS.items()}
    figures = {"folder": str(folder), "bytes": sum(Path(path).stat().st_size for path in files)}
    figures["cache_dropped"] = drop_page_cache()
    started = time.perf_counter()
    subprocess.run(["sh", "-c", 'cat "$@" > /dev/null', "cat", *files], check=True)
    figures["cat_s"] = time.perf_counter() - started
    for name, code in codes.items():
        drop_page_cache()
        figures[f"{name}_s"] = load_seconds(code)
    figures["one_pass_over_cat"] = figures["one_pass_s"] / figures["cat_s"]
    figures["two_pass_over_cat"] = figures["two_pass_s"] / figures["cat_s"]
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.cold_start", description=__doc__)
    parser.add_argument("folders", nargs="+", type=Path)
    args = parser.parse_args()
    for folder in args.folders:
        f = measure(folder)
        print(f"{folder} ({f['bytes'] / 1e9:.2f} GB, page cache dropped: {f['cache_dropped']}): cat {f['cat_s']:.2f} s; "
              f"load hashing while reading {f['one_pass_s']:.2f} s ({f['one_pass_over_cat']:.2f}x); "
              f"sha256 pass then load {f['two_pass_s']:.2f} s ({f['two_pass_over_cat']:.2f}x)")


if __name__ == "__main__":
    main()
