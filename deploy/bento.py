"""`python deploy/bento.py --artifact TAG [--mode baked|slim]`: build a versioned Bento and export its build context.

The version is derived (`<git revision>-<artifact version>`) and the labels say what is inside. The
exported tar holds the Dockerfile, the source, the Python environment and, in `baked` mode, the model:
`docker build` it anywhere (`bentoml containerize` does the same where a container engine runs).
"""

import argparse
import os
import subprocess
import sys
import tarfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def git_revision() -> str:
    revision = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=REPO, capture_output=True, text=True)
    dirty = subprocess.run(["git", "status", "--porcelain"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    return (revision.stdout.strip() or "nogit") + ("-dirty" if dirty else "")


def bentoml(*args: str, artifact: str) -> str:
    result = subprocess.run(
        [sys.executable, "-m", "bentoml", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        env={**os.environ, "FLUX_ARTIFACT": artifact},
    )
    if result.returncode:
        raise SystemExit(f"bentoml {' '.join(args)} failed:\n{result.stderr[-3000:]}")
    return result.stdout


def build(artifact: str) -> str:
    import bentoml as bentoml_sdk

    model = bentoml_sdk.models.get(artifact)
    revision = git_revision()
    version = f"{revision}-{model.tag.version}"
    labels = {
        "artifact": str(model.tag),
        **model.info.labels,
        "source_revision": str(model.info.metadata.get("source_revision", "unknown")).removeprefix("sha256:")[:63],
    }
    tag = f"flux-serve:{version}"
    try:
        existing = bentoml_sdk.get(tag)
    except bentoml_sdk.exceptions.NotFound:
        existing = None
    if existing and not revision.endswith("-dirty"):
        return tag  # same source, same artifact: the same Bento
    if existing:
        bentoml_sdk.delete(tag)  # uncommitted changes: rebuild
    label_args = [arg for key, value in labels.items() for arg in ("--label", f"{key}={value}")]
    bentoml("build", ".", "--version", version, *label_args, artifact=str(model.tag))
    return tag


def export_context(tag: str, out: Path, mode: str, artifact: str) -> None:
    """Export the Bento; `slim` drops the models, which an init container then imports."""
    out = out.resolve()  # bentoml resolves relative export paths against /
    bentoml("export", tag, str(out), artifact=artifact)
    if mode == "slim":
        staged = out.with_suffix(".full.tar")
        out.rename(staged)
        with tarfile.open(staged) as source, tarfile.open(out, "w") as target:
            for member in source.getmembers():
                name = member.name.lstrip("./")
                if name.rstrip("/") == "models" or not name.startswith("models"):  # the folder stays, empty
                    target.addfile(member, source.extractfile(member) if member.isfile() else None)
        staged.unlink()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--artifact", required=True, help="model-store tag the Bento serves")
    parser.add_argument("--mode", choices=("baked", "slim"), default="baked")
    parser.add_argument("--out", type=Path, default=Path("build/bento-context.tar"))
    args = parser.parse_args()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tag = build(args.artifact)
    export_context(tag, args.out, args.mode, args.artifact)
    print(f"docker build -t {tag} - < {args.out}")
    print(tag)


if __name__ == "__main__":
    main()
