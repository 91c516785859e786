"""`python -m models PRESET --out DIR`: write a FLUX.1-dev-shaped pipeline with random weights as a diffusers folder
(`toy`: the trained one); `python -m models train --out DIR`: train the toy model."""

import argparse
import shutil
import sys

from models.architecture import PRESETS, build_pipeline
from models.toy import TRAINED


def main() -> None:
    if sys.argv[1:2] == ["train"]:
        from models.toy.train import main as train

        return train(sys.argv[2:])
    parser = argparse.ArgumentParser(prog="python -m models", description=__doc__)
    parser.add_argument(
        "preset", choices=sorted(PRESETS), help="; ".join(f"{p.name}: {p.description}" for p in PRESETS.values())
    )
    parser.add_argument("--out", required=True, help="folder to write (diffusers layout)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.preset == "toy":
        shutil.copytree(TRAINED, args.out, dirs_exist_ok=True)
    else:
        build_pipeline(args.preset, seed=args.seed).save_pretrained(args.out)
    print(args.out)


if __name__ == "__main__":
    main()
