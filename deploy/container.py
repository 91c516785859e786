"""`python deploy/container.py --artifact TAG [--mode baked|slim]`: build the Bento's image with podman, here.

The image is the Bento's own Dockerfile (deploy/bento.py exports its build context), with only what a machine
without a GPU or a registry forces changed, each by `for_this_machine`:
- the base: a Debian bookworm root filesystem made by debootstrap (built once, cached as a podman image)
  instead of nvidia/cuda (no registry is reachable);
- Python 3.11 from Debian instead of the deadsnakes PPA (Launchpad is not reachable; bookworm's Python is 3.11);
- torch from the CPU wheel copied into the context instead of PyPI's CUDA build, and the CUDA libraries
  (nvidia-*, cuda-*, triton) left out of the locked requirements;
- the build trusts this machine's CA bundle (its HTTPS to PyPI goes through a proxy with its own CA), as
  build arguments only: nothing of it is in the image's runtime environment.
With `--cuda` (`make container CUDA=1`, on a builder that reaches Docker Hub and PyPI) none of this is changed:
the image is the Bento's own, FROM nvidia/cuda, with PyPI's CUDA torch: the GPU image you push.
"""

import argparse
import glob
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bento import build as build_bento  # noqa: E402
from bento import export_context  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
BASE_IMAGE = "localhost/flux-debian-base:bookworm"
DEBIAN_MIRROR = "http://deb.debian.org/debian"
PODMAN = ["podman", "--runtime", "runc"]  # crun cannot set rlimits in this machine's sandbox
BUILD_CA, HOST_CA = "build-ca.crt", Path("/etc/ssl/certs/ca-certificates.crt")
CUDA_PACKAGES = re.compile(r"^(nvidia-|cuda-|triton)", re.IGNORECASE)


def podman(*args: str, capture: bool = False) -> subprocess.CompletedProcess:
    return subprocess.run([*PODMAN, *args], check=True, text=True, capture_output=capture)


def ensure_base() -> float:
    """The Debian base image, built by debootstrap the first time; seconds it took (0: cached)."""
    if subprocess.run([*PODMAN, "image", "exists", BASE_IMAGE]).returncode == 0:
        return 0.0
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="flux-rootfs-") as rootfs:
        subprocess.run(
            ["debootstrap", "--variant=minbase", "bookworm", rootfs, DEBIAN_MIRROR],
            check=True,
            stdout=subprocess.DEVNULL,
        )
        tar = subprocess.Popen(["tar", "-C", rootfs, "-c", "."], stdout=subprocess.PIPE)
        subprocess.run([*PODMAN, "import", "-", BASE_IMAGE], stdin=tar.stdout, check=True, stdout=subprocess.DEVNULL)
        tar.wait()
    return time.monotonic() - started


def cpu_torch_wheel() -> Path:
    """The CPU torch wheel pip on this machine installs (its find-links folder)."""
    found = sorted(glob.glob("/opt/wheels/torch-2.13.0+cpu-*.whl"))
    if not found:
        raise SystemExit("no CPU torch 2.13.0 wheel in /opt/wheels (pip's find-links on the project's machines)")
    return Path(found[-1])


def for_this_machine(dockerfile: str, wheel_name: str) -> str:
    """The Bento's Dockerfile with the changes this machine forces (module docstring), nothing else."""
    dockerfile, based = re.subn(r"^FROM nvidia/cuda:\S+", f"FROM {BASE_IMAGE}", dockerfile, count=1, flags=re.M)
    dockerfile, python = re.subn(
        r"RUN \\\n\s+set -eux && \\\n\s+apt-get install [^\n]*software-properties-common && \\\n(?:[^\n]*\n)*?"
        r"[^\n]*python3\.11 python3\.11-dev\n",
        "RUN apt-get install -y --no-install-recommends python3.11 python3.11-dev python3.11-venv python3-pip\n"
        "ENV PIP_BREAK_SYSTEM_PACKAGES=1\n"
        f"COPY {BUILD_CA} /tmp/{BUILD_CA}\nARG SSL_CERT_FILE=/tmp/{BUILD_CA}\nARG PIP_CERT=/tmp/{BUILD_CA}\n",
        dockerfile,
        count=1,
    )
    dockerfile, wheel = re.subn(
        r"^(COPY [^\n]* \./env/python \./env/python/\n)",
        rf"\1COPY {wheel_name} /tmp/wheels/{wheel_name}\n",
        dockerfile,
        count=1,
        flags=re.M,
    )
    if (based, python, wheel) != (1, 1, 1):
        raise SystemExit(f"the Bento's Dockerfile changed: base {based}, python {python}, wheel {wheel} replaced")
    return dockerfile


def cpu_requirements(lock: str, wheel_name: str) -> str:
    """The locked requirements without CUDA libraries, torch from the CPU wheel."""
    lines = [line for line in lock.splitlines() if not CUDA_PACKAGES.match(line)]
    return (
        "\n".join(f"torch @ file:///tmp/wheels/{wheel_name}" if line.startswith("torch==") else line for line in lines)
        + "\n"
    )


def prepare_context(artifact: str, mode: str, folder: Path, cuda: bool) -> str:
    """The exported build context, adapted to this machine unless `cuda`; returns the Bento's tag."""
    tag = build_bento(artifact)
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    archive = folder.with_suffix(".tar")
    export_context(tag, archive, mode, artifact)
    with tarfile.open(archive) as context:
        context.extractall(folder, filter="tar")
    archive.unlink()
    if cuda:
        return tag
    wheel = cpu_torch_wheel()
    shutil.copy(wheel, folder / wheel.name)
    shutil.copy(HOST_CA, folder / BUILD_CA)
    dockerfile = folder / "env/docker/Dockerfile"
    dockerfile.write_text(for_this_machine(dockerfile.read_text(), wheel.name))
    lock = folder / "env/python/requirements.lock.txt"
    lock.write_text(cpu_requirements(lock.read_text(), wheel.name))
    return tag


def image_name(tag: str, mode: str) -> str:
    return f"localhost/{tag.replace(':', ':' if mode == 'baked' else '-slim:', 1)}"


def build_image(artifact: str, mode: str, out: Path, cuda: bool) -> tuple[str, float]:
    """The image of `mode`, and the seconds `podman build` took."""
    folder = out / f"context-{mode}"
    image = image_name(prepare_context(artifact, mode, folder, cuda), mode)
    started = time.monotonic()
    podman(
        "build", "--network", "host", "--layers", "-f", str(folder / "env/docker/Dockerfile"), "-t", image, str(folder)
    )
    return image, time.monotonic() - started


def layer_sizes(image: str) -> list[tuple[str, str]]:
    """(size, instruction) of each layer, newest first."""
    history = podman("history", "--format", "{{.Size}}\t{{.CreatedBy}}", image, capture=True).stdout
    return [tuple(line.split("\t", 1)) for line in history.splitlines() if line.strip()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--artifact", required=True, help="model-store tag the Bento serves")
    parser.add_argument("--modes", default="baked,slim", help="baked: the model inside; slim: from S3")
    parser.add_argument("--cuda", action="store_true", help="the Bento's Dockerfile unchanged: the GPU image")
    parser.add_argument("--out", type=Path, default=REPO / "build/container")
    args = parser.parse_args()
    if not args.cuda:
        base_s = ensure_base()
        print(f"base image {BASE_IMAGE}: {'cached' if not base_s else f'built in {base_s:.0f} s'}", file=sys.stderr)
    import bentoml

    built = {
        "artifact": str(bentoml.models.get(args.artifact).tag),
        "bentoml_home": os.environ.get("BENTOML_HOME", str(Path.home() / "bentoml")),
    }
    for mode in args.modes.split(","):
        built[mode], seconds = build_image(args.artifact, mode, args.out, args.cuda)
        size = podman("image", "inspect", "-f", "{{.Size}}", built[mode], capture=True).stdout.strip()
        print(f"{built[mode]}: built in {seconds:.0f} s, {int(size) / 1e9:.2f} GB; layers:", file=sys.stderr)
        for layer_size, instruction in layer_sizes(built[mode]):
            print(f"  {layer_size:>10}  {instruction[:110]}", file=sys.stderr)
    (args.out / "images.json").write_text(json.dumps(built, indent=2))
    print(json.dumps(built))


if __name__ == "__main__":
    main()
