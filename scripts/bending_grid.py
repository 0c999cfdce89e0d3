#!/usr/bin/env python
"""A picture grid of the network-bending operators: one frame of the demo model per operator.

One txt2img latent of the demo model (128x128, DDIM, 10 steps) is bent by each operator of
``sounddiffusion.control.bending`` after its last step (the research code's "layer past the last step")
and decoded; the unbent frame comes first. Additive amounts are given in units of the latent's
standard deviation (a model's latents may be far narrower or wider than a real model's), so the
same grid reads alike for any prompt and seed; each tile is labelled with the amount actually
used. The demo model's latent channels are luminance, two colour-opponent channels and sharpness,
so a uniform offset reads as a colour cast.

    python scripts/bending_grid.py                        # writes outputs/bending-grid.png
    python scripts/bending_grid.py docs/bending.png --prompt "a lighthouse in a storm" --seed 3
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sounddiffusion import cli  # noqa: E402

log = logging.getLogger("sounddiffusion")

AMOUNTS = {  # op -> (amount, whether it is in units of the latent's standard deviation)
    "add": (2.0, True), "multiply": (2.5, False), "subtract": (2.0, True), "threshold": (1.0, True),
    "soft_threshold": (0.5, True), "invert": (0.25, False), "log": (2.0, False), "power": (1.5, False),
    "abs": (1.0, False), "clamp": (0.3, True), "rescale": (1.0, True), "rotate_x": (1.5, False),
    "rotate_y": (1.5, False), "rotate_z": (1.5, False), "reflect": (1.0, False),
    "sparse_add": (5.0, True), "noise": (1.0, True), "gaussian_blob": (150.0, True),
    "erode": (1.0, False), "dilate": (1.0, False),
}
"""A visible amount for each operator on the demo model's final latent."""

TILE_COLUMNS = 7
LABEL_HEIGHT = 14


def build_parser():
    parser = cli.make_parser("bending_grid.py", __doc__)
    parser.add_argument("out", nargs="?", default="outputs/bending-grid.png",
                        help="the PNG to write (default: %(default)s)")
    parser.add_argument("--prompt", default="a lighthouse on a cliff in a storm, oil painting",
                        help="the prompt of the frame every operator bends")
    parser.add_argument("--seed", type=int, default=42, help="start noise and seeded operators")
    parser.add_argument("--size", type=int, default=128, help="tile width and height in pixels")
    parser.add_argument("--steps", type=int, default=10, help="DDIM steps")
    return parser


def bent_latents(latent, seed: int):
    """(labels, latents (1 + len(OPERATORS), 4, h, w)): the unbent latent, then each operator's."""
    import torch

    from sounddiffusion.control.bending import OPERATORS, apply

    spread = float(latent.std())
    labels, latents = ["no bend"], [latent]
    for op in OPERATORS:
        factor, relative = AMOUNTS[op]
        amount = factor * spread if relative else factor
        generator = torch.Generator().manual_seed(seed + 1)  # not the start noise's numbers
        latents.append(apply(op, latent, amount, generator=generator))
        labels.append(f"{op}={amount:.3g}")
    return labels, torch.cat(latents)


def grid_image(images, labels: list[str]):
    """uint8 images (N, H, W, 3) -> one PIL image, TILE_COLUMNS tiles a row, each labelled below."""
    from PIL import Image, ImageDraw

    count, height, width = images.shape[:3]
    rows = -(-count // TILE_COLUMNS)
    grid = Image.new("RGB", (TILE_COLUMNS * width, rows * (height + LABEL_HEIGHT)), "white")
    draw = ImageDraw.Draw(grid)
    for index, (pixels, label) in enumerate(zip(images, labels)):
        left, top = (index % TILE_COLUMNS) * width, (index // TILE_COLUMNS) * (height + LABEL_HEIGHT)
        grid.paste(Image.fromarray(pixels), (left, top))
        draw.text((left + 3, top + height + 1), label, fill="black")
    return grid


def main(args):
    from sounddiffusion.model.loading import load_engine
    from sounddiffusion.settings import ModelSettings

    engine = load_engine(ModelSettings(demo=True, device="cpu"))
    cond = engine.text_conditioning(args.prompt)[None]
    x_T = engine.noise(engine.latent_shape(1, args.size, args.size), args.seed)
    latent = engine.txt2img(cond, x_T=x_T, sampler="ddim", steps=args.steps, seed=args.seed)
    labels, latents = bent_latents(latent, args.seed)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    grid_image(engine.decode(latents), labels).save(out)
    log.info("wrote %s (%d operators)", out, len(labels) - 1)


if __name__ == "__main__":
    cli.main_entry(build_parser, main)
