"""scripts/bending_grid.py without the model: one bent latent per operator, the labelled grid."""

import numpy as np
import torch

from conftest import REPO, load_module
from sounddiffusion.control.bending import OPERATORS


def load_script():
    return load_module(REPO / "scripts" / "bending_grid.py", "bending_grid")


def test_one_visibly_bent_latent_per_operator_after_the_unbent_one():
    grid = load_script()
    assert set(grid.AMOUNTS) == set(OPERATORS)
    latent = 8 * torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    labels, latents = grid.bent_latents(latent, 42)
    assert labels[0] == "no bend" and [label.split("=")[0] for label in labels[1:]] == list(OPERATORS)
    assert latents.shape == (1 + len(OPERATORS), 4, 16, 16)
    assert torch.equal(latents[0], latent[0])
    for label, bent in zip(labels[1:], latents[1:]):
        assert torch.isfinite(bent).all() and not torch.equal(bent, latent[0]), label


def test_the_grid_has_seven_tiles_a_row_with_a_label_band():
    grid = load_script()
    images = np.zeros((21, 32, 24, 3), dtype=np.uint8)
    picture = grid.grid_image(images, [f"op{i}" for i in range(21)])
    assert picture.size == (7 * 24, 3 * (32 + grid.LABEL_HEIGHT))
    pixels = np.asarray(picture)
    assert (pixels[:32, :, :] == 0).all() and (pixels[32:32 + grid.LABEL_HEIGHT] < 255).any()
