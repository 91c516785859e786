"""Serve the demo artifact on 127.0.0.1, render one image over HTTP, write it, stop the server."""

import argparse
import socket
from pathlib import Path

from service.client import FluxClient
from service.launcher import free_port, running_server
from service.schema import GenerationRequest


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m service.demo", description=__doc__)
    parser.add_argument("--port", type=int, help="HTTP port (default: 3000, or a free one when 3000 is taken)")
    parser.add_argument("--out", type=Path, default=Path("build/demo.png"))
    parser.add_argument("--prompt", default="a lighthouse on a cliff at dawn, oil painting")
    args = parser.parse_args()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    port = args.port or (3000 if port_is_free(3000) else free_port())
    env = {"FLUX_GRPC_ADDRESS": f"127.0.0.1:{free_port()}"}  # the demo speaks HTTP; gRPC out of the way
    with running_server(port, args.out.with_suffix(".server.log"), env) as url:
        print(f"serving on {url}")
        request = GenerationRequest(prompt=args.prompt, width=256, height=256, steps=4, seed=42)
        args.out.write_bytes(FluxClient(url).txt2img(request))
    print(f"wrote {args.out.resolve()}")


def port_is_free(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) != 0


if __name__ == "__main__":
    main()
