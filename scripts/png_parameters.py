#!/usr/bin/env python
"""The generation parameters a PNG of this project carries (all flags, checkpoint name and hash,
seed; a video's saved frame also its frame number and time), as JSON.

    python scripts/png_parameters.py outputs/audio2img-samples/bell/fft-00000.png
    python /path/to/sound-diffusion/scripts/png_parameters.py *.png     # from any folder

Works from any folder. Exit status 0; 2 when a file cannot be read as an image; 1 when one of
the files carries no parameters (made elsewhere, or its text chunks were stripped).
"""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sounddiffusion import cli  # noqa: E402


def build_parser():
    parser = cli.make_parser("png_parameters.py", __doc__)
    parser.add_argument("images", nargs="+", metavar="IMAGE.png", help="PNGs written by this project's tools")
    return parser


def main(args):
    from sounddiffusion.images import read_png_parameters

    status = 0
    for image in args.images:
        parameters = read_png_parameters(image)
        if not parameters:
            print(f"png_parameters.py: {image} carries no parameters", file=sys.stderr)
            status = 1
            continue
        text = json.dumps(parameters, indent=2, sort_keys=True, ensure_ascii=False)
        print(f"{image}: {text}" if len(args.images) > 1 else text)
    return status


if __name__ == "__main__":
    cli.main_entry(build_parser, main)
