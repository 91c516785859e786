"""Serve the demo artifact on 127.0.0.1, render one image over HTTP, write it, stop the server."""

import argparse
from pathlib import Path

from service.client import FluxClient
from service.launcher import running_server
from service.schema import GenerationRequest


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m service.demo", description=__doc__)
    parser.add_argument("--port", type=int, default=3000)
    parser.add_argument("--out", type=Path, default=Path("build/demo.png"))
    parser.add_argument("--prompt", default="a lighthouse on a cliff at dawn, oil painting")
    args = parser.parse_args()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with running_server(args.port, args.out.with_suffix(".server.log")) as url:
        print(f"serving on {url}")
        request = GenerationRequest(prompt=args.prompt, width=256, height=256, steps=4, seed=42)
        args.out.write_bytes(FluxClient(url).txt2img(request))
    print(f"wrote {args.out.resolve()}")


if __name__ == "__main__":
    main()
