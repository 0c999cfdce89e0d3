#!/usr/bin/env python
"""Image to image with Stable Diffusion v1 (CompVis's img2img flags; --plms works here too).

    python scripts/img2img.py --init-img sketch.png --prompt "a fantasy landscape" --strength 0.75
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sounddiffusion import cli  # noqa: E402


def build_parser():
    parser = cli.make_parser("img2img.py", __doc__)
    cli.add_prompt_args(parser)
    parser.add_argument("--init-img", dest="init_img", required=True, metavar="IMG",
                        help="the image to start from (resized and center-cropped to HxW)")
    parser.add_argument("--strength", type=float, default=0.75,
                        help="strength for noising/unnoising: 1.0 corresponds to full destruction "
                             "of information in init image")
    cli.add_sampling_args(parser)
    cli.add_image_output_args(parser, default_outdir="outputs/img2img-samples")
    cli.add_model_args(parser)
    return parser


def main(args):
    from sounddiffusion.jobs.image_jobs import run_img2img
    from sounddiffusion.settings import PromptImageSettings

    run_img2img(cli.settings_from_args(PromptImageSettings, args), cli.model_settings(args))


if __name__ == "__main__":
    cli.main_entry(build_parser, main)
