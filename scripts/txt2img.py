#!/usr/bin/env python
"""Text to image with Stable Diffusion v1 (CompVis's txt2img, with the same flags).

    python scripts/txt2img.py --prompt "a red juicy apple floating in outer space, like a planet" --plms
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sounddiffusion import cli  # noqa: E402


def build_parser():
    parser = cli.make_parser("txt2img.py", __doc__)
    cli.add_prompt_args(parser)
    cli.add_sampling_args(parser)
    cli.add_image_output_args(parser, default_outdir="outputs/txt2img-samples")
    cli.add_model_args(parser)
    return parser


def main(args):
    from sounddiffusion.jobs.image_jobs import run_txt2img
    from sounddiffusion.settings import PromptImageSettings

    run_txt2img(cli.settings_from_args(PromptImageSettings, args), cli.model_settings(args))


if __name__ == "__main__":
    cli.main_entry(build_parser, main)
