#!/usr/bin/env python
"""A picture sheet of camera motion: frames of one of the README's recipes rendered by the demo model.

The recipe's flags go to audio2video's frame loop unchanged (examples/audio/drums.wav, 12 fps,
demo model on the CPU, started as with ``--init-img`` from a drawn test pattern, so that the
motion shows); every ``--every``-th frame is shown, labelled with its number, time and the
recipe's scheduled value on that frame, with a cross at the centre of zoom and rotation.

    python scripts/motion_sheet.py                          # the fly-in, writes outputs/motion-sheet.png
    python scripts/motion_sheet.py docs/motion-sheet.jpg    # the README's picture
    python scripts/motion_sheet.py --recipe turn --every 3
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sounddiffusion import cli  # noqa: E402

log = logging.getLogger("sounddiffusion")

REPO = Path(__file__).resolve().parents[1]
SOUND = REPO / "examples" / "audio" / "drums.wav"
STRENGTH = "0.05"  # the demo model redraws its soft blobs within a few frames at more; real models keep more
RECIPES = {  # the README's three recipes: flags of audio2video.py, and the value each tile is labelled with
    "fly-in": ({"zoom": "1.01 + 0.05*onset", "strength": STRENGTH}, "zoom"),
    "turn": ({"angle": "0.3 + 1.5*beat", "strength": STRENGTH}, "angle"),
    "pan": ({"translation_x": "clip(40*rms, 0, 8)", "strength": STRENGTH}, "translation_x"),
}
LABEL_HEIGHT = 28
COLUMNS = 6


def build_parser():
    parser = cli.make_parser("motion_sheet.py", __doc__)
    parser.add_argument("out", nargs="?", default="outputs/motion-sheet.png",
                        help="the PNG to write (default: %(default)s)")
    parser.add_argument("--recipe", default="fly-in", choices=tuple(RECIPES), help="which README recipe")
    parser.add_argument("--size", type=int, default=192, help="frame width and height in pixels")
    parser.add_argument("--tiles", type=int, default=12, help="how many frames the sheet shows")
    parser.add_argument("--every", type=int, default=3, help="show every Nth frame")
    parser.add_argument("--steps", type=int, default=20, help="denoising steps (x strength per frame)")
    parser.add_argument("--seed", type=int, default=7)
    return parser


def test_pattern(size: int):
    """A picture with structure the eye can follow: a checkerboard of warm and cool squares under
    concentric rings, (size, size, 3) uint8. The demo model draws only soft blobs, which hide
    the motion; started from this, the frames show where the camera goes."""
    import numpy as np

    y, x = np.mgrid[0:size, 0:size] / size
    squares = ((x * 8).astype(int) + (y * 8).astype(int)) % 2
    rings = np.cos(np.hypot(x - 0.5, y - 0.5) * 2 * np.pi * 6) > 0.6
    warm, cool, light = np.array([214, 110, 60]), np.array([50, 90, 170]), np.array([245, 235, 200])
    picture = np.where(squares[..., None] == 1, warm, cool)
    return np.where(rings[..., None], light, picture).astype(np.uint8)


class Keep:
    """A frame writer that keeps the latents of the frames it is asked for."""

    def __init__(self, wanted: set[int]):
        self.wanted, self.latents = wanted, {}

    def submit(self, index, picture, chain):
        if index in self.wanted:
            self.latents[index] = picture


def sheet(pictures, labels: list[str], centre: tuple[float, float]):
    """uint8 pictures (N, H, W, 3) -> one PIL image, COLUMNS a row, each labelled below, with a
    small cross at ``centre`` (fractions of the width and height)."""
    from PIL import Image, ImageDraw

    count, height, width = pictures.shape[:3]
    rows = -(-count // COLUMNS)
    grid = Image.new("RGB", (COLUMNS * width, rows * (height + LABEL_HEIGHT)), "white")
    draw = ImageDraw.Draw(grid)
    for index, (pixels, label) in enumerate(zip(pictures, labels)):
        left, top = (index % COLUMNS) * width, (index // COLUMNS) * (height + LABEL_HEIGHT)
        grid.paste(Image.fromarray(pixels), (left, top))
        x, y = left + centre[0] * width, top + centre[1] * height
        draw.line([(x - 5, y), (x + 5, y)], fill="white")
        draw.line([(x, y - 5), (x, y + 5)], fill="white")
        for line, text in enumerate(label.split("\n")):
            draw.text((left + 4, top + height + 2 + 12 * line), text, fill="black")
    return grid


def check_args(args) -> None:
    """Counts of at least 1 and a size the autoencoder takes, before the model loads."""
    from sounddiffusion.errors import ParameterError

    for name in ("tiles", "every", "steps"):
        if getattr(args, name) < 1:
            raise ParameterError(f"--{name} {getattr(args, name)}: use 1 or more")
    if args.size < 64 or args.size % 64:
        raise ParameterError(f"--size {args.size}: use a multiple of 64 such as 128 or 192")


def main(args):
    import torch

    check_args(args)
    from sounddiffusion.model.loading import load_engine
    from sounddiffusion.settings import ModelSettings, VideoSettings
    from sounddiffusion.video.frame_chain import ChainState
    from sounddiffusion.video.frame_plan import plan_frames
    from sounddiffusion.video.loop import sample_frames

    flags, shown = RECIPES[args.recipe]
    settings = VideoSettings(audio=str(SOUND), fps=12, H=args.size, W=args.size, ddim_steps=args.steps,
                             seed=args.seed, **flags)
    plan = plan_frames(settings)
    wanted = [k * args.every for k in range(args.tiles) if k * args.every < plan.n_frames]
    engine = load_engine(ModelSettings(demo=True, device="cpu"))
    keep = Keep(set(wanted))
    # as audio2video --init-img: frame 0 is img2img from the picture's latent (frame -1)
    start = ChainState(-1, engine.encode_image(test_pattern(args.size)[None]))
    sample_frames(engine, plan, settings, keep, start=0, stop=wanted[-1] + 1, chain=start)
    pictures = engine.decode(torch.cat([keep.latents[index] for index in wanted]))
    labels = [f"frame {index}, {plan.time_of(index):.2f} s\n"
              + (f"{shown} {plan.values[shown][index]:.3g}" if index else "start: the test pattern")
              for index in wanted]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    centre = (float(plan.values["transform_center_x"][0]), float(plan.values["transform_center_y"][0]))
    sheet(pictures, labels, centre).save(out, quality=90)  # quality: for a .jpg
    command = " ".join(f'--{name} "{value}"' for name, value in flags.items())
    log.info("wrote %s: %s, frames %s of %s (%s)", out, args.recipe, wanted[0], wanted[-1], command)


if __name__ == "__main__":
    cli.main_entry(build_parser, main)
