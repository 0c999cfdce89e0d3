"""Colour matching, latent slerp, cross-fades, in-between weights, contrast and latent noise."""
import math

import numpy as np
import pytest
import torch
from skimage.color import deltaE_ciede2000, rgb2hsv, rgb2lab

from sounddiffusion.errors import ParameterError
from sounddiffusion.video.cadence import cross_fade, slerp
from sounddiffusion.video.color import COLOR_SPACES, match_colors
from sounddiffusion.video.frame_chain import adjust_contrast, latent_noise


def reference_picture(seed: int = 0) -> np.ndarray:
    """A (48, 64, 3) uint8 picture with smooth colour gradients and some noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:48, 0:64]
    picture = np.stack([60 + 2.5 * x, 40 + 3 * y, 200 - 1.5 * x - y], axis=-1)
    return np.clip(picture + rng.normal(0, 6, picture.shape), 0, 255).astype(np.uint8)


def colour_cast(rgb: np.ndarray) -> np.ndarray:
    """The picture with a warm cast and more contrast, as a drifting render gets."""
    values = rgb.astype(np.float64)
    shifted = (values - 128) * 1.2 + 128 + np.array([30.0, 5.0, -25.0])
    return np.clip(shifted, 0, 255).astype(np.uint8)


def mean_lab(rgb: np.ndarray) -> np.ndarray:
    return rgb2lab(rgb).reshape(-1, 3).mean(axis=0)


@pytest.mark.parametrize("space", COLOR_SPACES)
def test_strength_zero_is_bit_identical(space):
    picture = colour_cast(reference_picture())
    out = match_colors(picture, reference_picture(1), space=space, strength=0.0)
    assert out.dtype == np.uint8 and np.array_equal(out, picture) and out is not picture


@pytest.mark.parametrize("space", COLOR_SPACES)
def test_full_strength_brings_the_mean_colour_back(space):
    reference = reference_picture()
    drifted = colour_cast(reference_picture(1))
    before = deltaE_ciede2000(mean_lab(reference), mean_lab(drifted))
    matched = match_colors(drifted, reference, space=space, strength=1.0)
    after = deltaE_ciede2000(mean_lab(reference), mean_lab(matched))
    half = deltaE_ciede2000(mean_lab(reference),
                            mean_lab(match_colors(drifted, reference, space=space, strength=0.5)))
    assert matched.shape == drifted.shape and matched.dtype == np.uint8
    assert before > 10
    assert after < 0.15 * before, (space, before, after)
    assert after < half < before


def test_rgb_matching_moves_each_channel_distribution_to_the_reference():
    """Per channel, the earth mover's distance to the reference drops to rounding and ties
    (the cast clips some values to 255, and equal values are all mapped alike)."""
    reference = reference_picture()
    drifted = colour_cast(reference_picture(1))
    matched = match_colors(drifted, reference, space="rgb")

    def emd(x, y, channel):
        return np.abs(np.sort(x[..., channel], axis=None).astype(float)
                      - np.sort(y[..., channel], axis=None)).mean()

    for channel in range(3):
        assert emd(drifted, reference, channel) > 5
        assert emd(matched, reference, channel) < 1.5


def test_hsv_hue_is_matched_around_the_red_wrap():
    """Reds on both sides of hue 0 stay red: the hue circle is not cut through them."""
    rng = np.random.default_rng(3)
    hues = (rng.normal(0.0, 0.02, (32, 32)) % 1.0)  # reds around 0 and 1
    from skimage.color import hsv2rgb

    def red_picture(hue_shift):
        hsv = np.stack([(hues + hue_shift) % 1.0, np.full_like(hues, 0.8), np.full_like(hues, 0.8)], -1)
        return np.rint(hsv2rgb(hsv) * 255).astype(np.uint8)

    reference, shifted = red_picture(0.0), red_picture(0.04)
    matched_hue = rgb2hsv(match_colors(shifted, reference, space="hsv"))[..., 0]
    circular_distance = np.minimum(matched_hue, 1 - matched_hue)
    assert circular_distance.max() < 0.1  # no pixel sent towards green or cyan
    mean_angle = np.angle(np.exp(2j * np.pi * matched_hue).mean()) / (2 * np.pi)
    assert abs(mean_angle) < 0.01


def test_match_colors_refuses_bad_arguments():
    picture = reference_picture()
    with pytest.raises(ParameterError, match="'xyz'"):
        match_colors(picture, picture, space="xyz")
    with pytest.raises(ParameterError, match="1.5"):
        match_colors(picture, picture, space="lab", strength=1.5)
    with pytest.raises(ValueError):
        match_colors(picture.astype(np.float32), picture, space="lab")


def test_slerp_endpoints_are_exact_and_the_norm_is_kept():
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(1, 4, 8, 8, generator=generator)
    b = torch.randn(1, 4, 8, 8, generator=generator)
    b = b * (a.norm() / b.norm())  # equal norms
    assert torch.equal(slerp(a, b, 0.0), a) and torch.equal(slerp(a, b, 1.0), b)
    for t in (0.25, 0.5, 0.75):
        assert slerp(a, b, t).norm().item() == pytest.approx(a.norm().item(), rel=1e-5)
    # Independent Gaussian latents are nearly orthogonal: lerp's middle is ~1/sqrt(2) as long.
    assert torch.lerp(a, b, 0.5).norm().item() < 0.8 * a.norm().item()
    # The angle from a grows linearly with t.
    angle = lambda x, y: math.acos(float(torch.sum(x * y) / (x.norm() * y.norm())))
    total = angle(a, b)
    assert angle(a, slerp(a, b, 0.3)) == pytest.approx(0.3 * total, rel=1e-4)


def test_slerp_of_nearly_parallel_latents_is_lerp_and_keeps_dtype():
    a = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    b = a * 2
    assert torch.allclose(slerp(a, b, 0.5), 1.5 * a)
    half = slerp(a.half(), torch.randn(1, 4, 8, 8).half(), 0.5)
    assert half.dtype == torch.float16 and torch.isfinite(half).all()


def test_in_between_frames_sit_at_their_share_of_the_gap():
    """Frames 5 and 6 between diffused frames 4 and 7 are 1/3 and 2/3 of the way. With two
    orthogonal latents of norm 1 the angle is pi/2 and slerp is sin((1 - t) pi/2) a + sin(t pi/2) b."""
    from sounddiffusion.video.camera import Camera
    from sounddiffusion.video.frame_chain import ChainState
    from sounddiffusion.video.frame_writer import PixelBlend
    from sounddiffusion.video.loop import inbetween
    from sounddiffusion.video.motion import Motion2D

    still = Camera([Motion2D()] * 8, 48, 48)  # no motion: nothing to decode, the engine is not needed

    generator = torch.Generator().manual_seed(5)
    a = torch.randn(1, 4, 6, 6, generator=generator, dtype=torch.float64)
    b = torch.randn(1, 4, 6, 6, generator=generator, dtype=torch.float64)
    b = b - (b * a).sum() / (a * a).sum() * a  # Gram-Schmidt: orthogonal to a
    a, b = (a / a.norm()).float(), (b / b.norm()).float()
    chain = ChainState(index=4, latent=a)
    for index, t in ((5, 1 / 3), (6, 2 / 3)):
        want = math.sin((1 - t) * math.pi / 2) * a + math.sin(t * math.pi / 2) * b
        torch.testing.assert_close(inbetween(None, chain, (7, b), index, "latent", still), want, rtol=0, atol=1e-6)
        blend = inbetween(None, chain, (7, b), index, "pixel", still)
        assert isinstance(blend, PixelBlend) and blend.t == pytest.approx(t, abs=1e-15)
        assert (blend.first_index, blend.second_index) == (4, 7)


def test_cadence_rounds_to_the_nearest_whole_frame():
    from sounddiffusion.video.frame_plan import cadence_frames

    # 2.7 rounds to 3 (not down to 2): frames 0, 3, 6 and the last, 9
    assert np.flatnonzero(cadence_frames(np.full(10, 2.7))).tolist() == [0, 3, 6, 9]
    assert np.flatnonzero(cadence_frames(np.full(10, 2.3))).tolist() == [0, 2, 4, 6, 8, 9]
    # the value at the last diffused frame sets the next gap: 1.6 -> 2, then 3.9 -> 4, then 1.2 -> 1
    cadence = np.array([1.6, 9, 3.9, 9, 9, 9, 1.2, 1.2, 9, 9])
    assert np.flatnonzero(cadence_frames(cadence)).tolist() == [0, 2, 6, 7, 8, 9]


def _slerp_before(a: torch.Tensor, b: torch.Tensor, t: float) -> torch.Tensor:
    """slerp as it was before it chose on the device (it read the angle back with ``if``)."""
    if t == 0:
        return a.clone()
    if t == 1:
        return b.clone()
    work = torch.promote_types(a.dtype, torch.float32)
    x, y = a.to(work), b.to(work)
    cosine = torch.sum(x * y) / (torch.linalg.vector_norm(x) * torch.linalg.vector_norm(y))
    theta = torch.arccos(cosine.clamp(-1.0, 1.0))
    if not torch.isfinite(theta) or theta < 1e-3:
        return torch.lerp(x, y, t).to(a.dtype)
    sine = torch.sin(theta)
    return ((torch.sin((1 - t) * theta) / sine) * x + (torch.sin(t * theta) / sine) * y).to(a.dtype)


def test_slerp_gives_the_same_bits_as_before_for_every_kind_of_pair():
    generator = torch.Generator().manual_seed(9)
    a = torch.randn(1, 4, 8, 8, generator=generator)
    other = torch.randn(1, 4, 8, 8, generator=generator)
    pairs = {"random": (a, other), "parallel": (a, 2 * a), "same": (a, a.clone()),
             "nearly parallel": (a, a + 1e-5 * other), "antiparallel": (a, -a), "antiparallel, longer": (a, -3 * a),
             "nearly antiparallel": (a, -a + 1e-4 * other), "zero": (torch.zeros_like(a), other),
             "half": (a.half(), other.half()), "bfloat16": (a.bfloat16(), -a.bfloat16()), "double": (a.double(), other.double())}
    for name, (x, y) in pairs.items():
        for t in (0.0, 1e-3, 0.25, 1 / 3, 0.5, 0.9, 1.0):
            got, want = slerp(x, y, t), _slerp_before(x, y, t)
            assert got.dtype == want.dtype and torch.equal(got, want), (name, t)


def test_slerp_never_reads_the_device_back():
    # On the meta device every read of a value (``if tensor:``, ``.item()``) raises.
    a, b = torch.empty(1, 4, 8, 8, device="meta"), torch.empty(1, 4, 8, 8, device="meta")
    for t in (0.25, 0.5):
        got = slerp(a, b, t)
        assert got.device.type == "meta" and got.shape == a.shape


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_slerp_on_cuda_runs_without_a_host_sync():
    generator = torch.Generator().manual_seed(3)
    a, b = (torch.randn(1, 4, 64, 64, generator=generator) for _ in range(2))
    on_device = (a.cuda(), b.cuda())
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        results = [slerp(*on_device, t) for t in (0.25, 0.5, 0.75)]
    finally:
        torch.cuda.set_sync_debug_mode("default")
    for t, got in zip((0.25, 0.5, 0.75), results):
        torch.testing.assert_close(got.cpu(), slerp(a, b, t), rtol=1e-5, atol=1e-6)


def test_cross_fade_endpoints_and_middle():
    a = np.zeros((4, 4, 3), np.uint8)
    b = np.full((4, 4, 3), 201, np.uint8)
    assert np.array_equal(cross_fade(a, b, 0.0), a) and np.array_equal(cross_fade(a, b, 1.0), b)
    middle = cross_fade(a, b, 0.5)
    assert middle.dtype == np.uint8 and (middle == 100).all()  # 100.5 rounds to even


def test_adjust_contrast_on_pictures_and_latents():
    picture = reference_picture()
    assert np.array_equal(adjust_contrast(picture, 1.0), picture)
    softer = adjust_contrast(picture, 0.5)
    assert softer.dtype == np.uint8
    values, result = picture.astype(float), softer.astype(float)
    np.testing.assert_allclose(result.mean(axis=(0, 1)), values.mean(axis=(0, 1)), atol=0.6)
    np.testing.assert_allclose(result.std(axis=(0, 1)), 0.5 * values.std(axis=(0, 1)), rtol=0.02)

    latent = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(2)) + 3
    assert torch.equal(adjust_contrast(latent, 1.0), latent)
    harder = adjust_contrast(latent, 1.5)
    assert torch.allclose(harder.mean(dim=(-2, -1)), latent.mean(dim=(-2, -1)), atol=1e-5)
    assert torch.allclose(harder.std(dim=(-2, -1)), 1.5 * latent.std(dim=(-2, -1)), rtol=1e-5)
    with pytest.raises(ParameterError, match="--contrast -1"):
        adjust_contrast(latent, -1)


def test_latent_noise_is_seeded_and_zero_is_identity():
    latent = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(4))
    generator = torch.Generator().manual_seed(5)
    state = generator.get_state()
    assert torch.equal(latent_noise(latent, 0.0, generator), latent)
    assert torch.equal(generator.get_state(), state)  # nothing drawn

    first = latent_noise(latent, 0.1, torch.Generator().manual_seed(9))
    again = latent_noise(latent, 0.1, torch.Generator().manual_seed(9))
    assert torch.equal(first, again)
    expected = latent + 0.1 * torch.randn(latent.shape, generator=torch.Generator().manual_seed(9))
    assert torch.allclose(first, expected)
    assert (first - latent).std().item() == pytest.approx(0.1, rel=0.15)
    with pytest.raises(ParameterError, match="--latent_noise -0.1"):
        latent_noise(latent, -0.1, generator)
