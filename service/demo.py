"""Serve the demo artifact (the trained toy model, int8) on 127.0.0.1, render one prompt over HTTP, write the
image, read it back with the toy's checker, stop the server."""

import argparse
import io
import socket
from pathlib import Path

from PIL import Image

from models.toy import SIZE, STEPS
from models.toy.checker import judge, read
from models.toy.scenes import parse_caption
from service.client import FluxClient
from service.launcher import free_port, running_server
from service.schema import GenerationRequest


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m service.demo", description=__doc__)
    parser.add_argument("--port", type=int, help="HTTP port (default: 3000, or a free one when 3000 is taken)")
    parser.add_argument("--out", type=Path, default=Path("build/demo.png"))
    parser.add_argument("--artifact", default="flux-toy-int8:latest", help="model-store tag to serve")
    parser.add_argument("--prompt", default="a large red circle at the bottom left on a black background")
    args = parser.parse_args()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    port = args.port or (3000 if port_is_free(3000) else free_port())
    env = {"FLUX_ARTIFACT": args.artifact, "FLUX_GRPC_ADDRESS": f"127.0.0.1:{free_port()}"}  # the demo speaks HTTP
    with running_server(port, args.out.with_suffix(".server.log"), env) as url:
        print(f"serving {args.artifact} on {url}")
        request = GenerationRequest(prompt=args.prompt, width=SIZE, height=SIZE, steps=STEPS, seed=42)
        args.out.write_bytes(FluxClient(url).txt2img(request))
    print(f"wrote {args.out.resolve()}")
    report(args.prompt, Image.open(io.BytesIO(args.out.read_bytes())))


def report(prompt: str, image: Image.Image) -> None:
    """What the checker sees, against what the prompt asked."""
    seen = read(image)
    print(f"asked:            {prompt}")
    print(f"the checker sees: {seen.caption() if seen.things else f'nothing on a {seen.background} background'}")
    if (asked := parse_caption(prompt)) is not None:
        verdict = judge(asked, seen)
        wrong = [name for name, ok in verdict.matches.items() if not ok]
        print("drawn as asked" if verdict.all else f"not as asked: {', '.join(wrong)}")


def port_is_free(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) != 0


if __name__ == "__main__":
    main()
