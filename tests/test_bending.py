"""The network-bending operators: the research code's numbers, the other operators against their
formulas written out here, identity amounts, seeded randomness, dtype/device, no host reads."""
import json
import math

import numpy as np
import pytest
import scipy.ndimage
import torch

from sounddiffusion.control.bending import OPERATORS, SEEDED_OPERATORS, apply, identity_amount
from sounddiffusion.errors import ParameterError


def latent(shape=(2, 4, 8, 8), seed=0) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def close(got: torch.Tensor, want, tol=1e-6) -> None:
    want = torch.as_tensor(np.asarray(want), dtype=torch.float64)
    assert got.shape == want.shape
    err = float((got.double() - want).abs().max()) / (1 + float(want.abs().max()))
    assert err <= tol, err


# ----------------------------------------------------------------------------- the research code's numbers

def research_cases(reference_dir):
    meta = json.loads((reference_dir / "bending" / "bending.json").read_text())
    from safetensors.torch import load_file

    tensors = load_file(reference_dir / "bending" / "bending.safetensors")
    return [(e["op"], e["amount"], tensors[f"x_{e['op']}"], tensors[f"out_{e['op']}"]) for e in meta["ops"]]


def test_the_15_research_operators_match_its_outputs(reference_dir):
    cases = research_cases(reference_dir)
    assert len(cases) == 15
    for op, amount, x, want in cases:
        got = apply(op, x.clone(), amount)
        err = float((got - want).abs().max()) / (1 + float(want.abs().max()))
        assert err <= 1e-5, (op, err)


# ----------------------------------------------------------------------------- formulas written out here

def channel_matrix(op: str, r: float) -> np.ndarray:
    c, s = math.cos(r), math.sin(r)
    return {"rotate_x": np.array([[1, 0, 0, 0], [0, c, -s, 0], [0, s, c, 0], [0, 0, 0, 1]]),
            "rotate_y": np.array([[c, 0, s, 0], [0, 1, 0, 0], [-s, 0, c, 0], [0, 0, 0, 1]]),
            "rotate_z": np.array([[c, -s, 0, 0], [s, c, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]])}[op]


@pytest.mark.parametrize("op", ["rotate_x", "rotate_y", "rotate_z"])
def test_rotations_act_on_each_group_of_four_channels_and_leave_the_rest(op):
    x = latent((2, 10, 5, 6))
    got = apply(op, x, 0.7)
    xs = x.double().numpy()
    matrix = channel_matrix(op, 0.7)
    for group in (0, 1):
        want = np.einsum("ij,bjhw->bihw", matrix, xs[:, 4 * group:4 * group + 4])
        close(got[:, 4 * group:4 * group + 4], want)
    assert torch.equal(got[:, 8:], x[:, 8:])


def test_rotation_of_eight_channels_differs_from_rotating_only_the_first_group():
    x = latent((1, 8, 4, 4))
    got = apply("rotate_z", x, 1.0)
    assert not torch.allclose(got[:, 4:], x[:, 4:])
    assert torch.allclose(got[:, 4:], apply("rotate_z", x[:, 4:].contiguous(), 1.0))


def test_reflect_flips_channel_k_of_each_group():
    x = latent((1, 9, 3, 3))
    got = apply("reflect", x, 1.0)
    signs = np.array([1, -1, 1, 1, 1, -1, 1, 1, 1])[None, :, None, None]
    close(got, x.numpy() * signs, tol=0)
    with pytest.raises(ParameterError, match="reflect: the amount is the channel to flip, 0 to 3; got 4"):
        apply("reflect", x, 4.0)


def test_elementwise_formulas_outside_the_research_amounts():
    x = latent()
    xs = x.double().numpy()
    close(apply("power", x, 1.5), np.sign(xs) * np.abs(xs) ** 1.5, tol=1e-6)
    close(apply("power", x, 3.0), xs ** 3, tol=1e-6)
    close(apply("clamp", x, -0.5), np.clip(xs, -0.5, 0.5), tol=0)
    close(apply("threshold", x, 1.0), np.where(np.abs(xs) >= 1.0, xs, 0), tol=0)
    close(apply("soft_threshold", x, -0.25), np.sign(xs) * (np.abs(xs) + 0.25), tol=1e-7)
    close(apply("invert", x, -4.0), -0.25 - xs, tol=1e-7)
    close(apply("log", x, 10.0), np.log10(np.abs(xs)), tol=1e-6)
    close(apply("abs", x, 123.0), np.abs(xs), tol=0)


def test_soft_threshold_is_zero_at_zero_and_rescale_of_a_constant_item_is_zero():
    x = torch.zeros(1, 4, 2, 2)
    assert torch.equal(apply("soft_threshold", x, 0.5), x)
    x = torch.stack([torch.full((4, 3, 3), 2.0), latent((1, 4, 3, 3))[0]])
    got = apply("rescale", x, 2.0)
    assert torch.equal(got[0], torch.zeros(4, 3, 3))
    xs = x[1].double().numpy()
    close(got[1], (xs - xs.min()) / (xs.max() - xs.min()) * 4.0 - 2.0)


def test_rescale_ranges_each_batch_item_separately():
    x = latent((3, 4, 5, 5)) * torch.tensor([1.0, 10.0, 0.1])[:, None, None, None]
    got = apply("rescale", x, 0.5)
    assert torch.allclose(got.amin(dim=(1, 2, 3)), torch.full((3,), -0.5))
    assert torch.allclose(got.amax(dim=(1, 2, 3)), torch.full((3,), 0.5))


def test_gaussian_blob_is_the_research_bump_at_64x64_and_scales_to_other_sizes():
    sigma = 1.5
    for height, width in ((64, 64), (6, 9)):
        x = latent((2, 4, height, width))
        cols, rows = np.meshgrid(np.linspace(-5, 5, width), np.linspace(-5, 5, height))
        bump = np.exp(-0.5 * ((cols / sigma) ** 2 + (rows / sigma) ** 2)) / (2 * np.pi * sigma ** 2)
        close(apply("gaussian_blob", x, 3.0), x.double().numpy() + 3.0 * bump, tol=1e-6)


@pytest.mark.parametrize("amount, size", [(1.0, 3), (2.4, 5), (2.5, 7), (0.6, 3), (6.0, 13)])
def test_erode_and_dilate_are_grey_morphology_with_a_window_of_2_round_r_plus_1(amount, size):
    x = latent((2, 5, 7, 9))
    xs = x.numpy()
    footprint = (1, 1, size, size)
    close(apply("erode", x, amount), scipy.ndimage.grey_erosion(xs, size=footprint), tol=0)
    close(apply("dilate", x, amount), scipy.ndimage.grey_dilation(xs, size=footprint), tol=0)


def test_sparse_add_adds_the_amount_to_a_seeded_five_percent():
    x = latent((4, 4, 16, 16))
    got = apply("sparse_add", x, 0.75, generator=torch.Generator().manual_seed(5))
    uniform = torch.rand(x.shape, generator=torch.Generator().manual_seed(5)).numpy()
    close(got, x.double().numpy() + 0.75 * (uniform < 0.05), tol=1e-7)
    changed = float((got != x).double().mean())
    assert 0.03 < changed < 0.07


def test_noise_adds_amount_times_seeded_standard_normal():
    x = latent()
    got = apply("noise", x, 0.3, generator=torch.Generator().manual_seed(9))
    normal = torch.randn(x.shape, generator=torch.Generator().manual_seed(9)).double().numpy()
    close(got, x.double().numpy() + 0.3 * normal, tol=1e-7)


@pytest.mark.parametrize("op", SEEDED_OPERATORS)
def test_seeded_operators_repeat_with_the_same_seed_and_differ_with_another(op):
    x = latent()

    def bent(seed):
        return apply(op, x, 0.5, generator=torch.Generator().manual_seed(seed))

    assert torch.equal(bent(1), bent(1))
    assert not torch.equal(bent(1), bent(2))


# ----------------------------------------------------------------------------- identity, dtypes, errors

def test_identity_amounts_return_the_input_bit_for_bit():
    x = latent()
    with_identity = [op for op in OPERATORS if identity_amount(op) is not None]
    assert set(OPERATORS) - set(with_identity) == {"invert", "log", "abs", "rescale", "reflect"}
    for op in with_identity:
        generator = torch.Generator().manual_seed(0)
        assert apply(op, x, identity_amount(op), generator=generator) is x, op
        assert torch.equal(torch.rand(3, generator=generator), torch.rand(3, generator=torch.Generator().manual_seed(0)))
    assert apply("threshold", x, -1.0) is x
    assert apply("erode", x, 0.49) is x and apply("dilate", x, -3.0) is x


def test_non_identity_amounts_change_the_input_and_never_modify_it_in_place():
    x = latent()
    amounts = {"invert": 2.0, "log": 2.0, "power": 2.0, "clamp": 0.5, "rescale": 1.0, "reflect": 0,
               "abs": 1.0, "multiply": 2.0}
    for op in OPERATORS:
        before = x.clone()
        got = apply(op, x, amounts.get(op, 0.7), generator=torch.Generator().manual_seed(0))
        assert torch.equal(x, before), op
        assert got.shape == x.shape and not torch.equal(got, x), op


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_every_operator_keeps_the_dtype(dtype):
    x = latent().to(dtype)
    for op in OPERATORS:
        amount = {"log": 2.0, "reflect": 3.0, "invert": 1.0}.get(op, 0.8)
        got = apply(op, x, amount, generator=torch.Generator().manual_seed(0))
        assert got.dtype == dtype and got.shape == x.shape, op
        want = apply(op, x.float(), amount, generator=torch.Generator().manual_seed(0))
        finite = torch.isfinite(want)
        assert torch.allclose(got.float()[finite], want[finite], atol=0.05, rtol=0.02), op


def test_no_operator_reads_device_data_back():
    """On the meta device every data read (``.item()``, ``bool(t)``, ``nonzero``) raises."""
    x = torch.empty(2, 8, 8, 8, device="meta")
    for op in OPERATORS:
        amount = {"log": 2.0, "reflect": 1.0}.get(op, 0.8)
        got = apply(op, x, amount, generator=torch.Generator().manual_seed(0))
        assert got.device.type == "meta" and got.shape == x.shape, op


def test_bad_operators_and_amounts_are_one_line_errors():
    x = latent()
    with pytest.raises(ParameterError, match=r"^unknown bending operator 'spin'; use one of add, multiply, "):
        apply("spin", x, 1.0)
    with pytest.raises(ParameterError, match=r"^bend invert: the amount is 0, but invert computes 1/amount - x"):
        apply("invert", x, 0.0)
    for base in (0.0, -2.0, 1.0):
        with pytest.raises(ParameterError, match=r"^bend log: the amount is the logarithm's base"):
            apply("log", x, base)
    with pytest.raises(ParameterError, match=r"^bend add: the amount is nan; it must be a finite number$"):
        apply("add", x, math.nan)
    with pytest.raises(ParameterError, match=r"^bend rotate_x: needs at least 4 channels, the tensor has 3$"):
        apply("rotate_x", latent((1, 3, 2, 2)), 0.5)
    assert torch.equal(apply("clamp", x, math.inf), x)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_cuda_every_operator_runs_without_a_host_sync_and_gives_the_cpu_numbers():
    x = latent((2, 8, 16, 16))
    amounts = {"log": 2.0, "reflect": 1.0, "invert": 2.0}
    results, on_device = {}, x.cuda()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for op in OPERATORS:
            results[op] = apply(op, on_device, amounts.get(op, 0.8), generator=torch.Generator().manual_seed(4))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    for op in OPERATORS:
        want = apply(op, x, amounts.get(op, 0.8), generator=torch.Generator().manual_seed(4))
        assert results[op].device.type == "cuda", op
        assert torch.allclose(results[op].cpu(), want, rtol=1e-5, atol=1e-6, equal_nan=True), op


# ----------------------------------------------------------------------------- huge amounts

@pytest.mark.parametrize("amount", [7.0, 7.6, 100.0, 1e300])
def test_a_window_wider_than_the_tensor_is_each_channels_extreme(amount):
    # 8x8: from every pixel a radius of 7 or more reaches every other pixel (1e300 was a ValueError)
    x = latent((2, 5, 8, 6))
    want_max = x.double().numpy().max(axis=(2, 3), keepdims=True) * np.ones((1, 1, 8, 6))
    close(apply("dilate", x, amount), want_max, tol=0)
    close(apply("erode", x, amount), x.double().numpy().min(axis=(2, 3), keepdims=True) * np.ones((1, 1, 8, 6)),
          tol=0)


def test_the_largest_window_below_the_tensor_size_is_still_a_window():
    x = latent((1, 4, 8, 8))
    want = scipy.ndimage.maximum_filter(x.double().numpy(), size=(1, 1, 13, 13), mode="constant", cval=-np.inf)
    close(apply("dilate", x, 6.0), want, tol=0)  # radius 6 < 7: pixels at opposite corners stay apart


@pytest.mark.parametrize("op, amount", [("multiply", 1e300), ("add", 3.5e38), ("subtract", -1e39),
                                        ("noise", 1e300), ("sparse_add", 4e38), ("gaussian_blob", 1e39),
                                        ("rescale", 1.8e38), ("invert", 1e-39), ("invert", -2e-39)])
def test_amounts_beyond_float32_are_refused_in_one_line(op, amount):
    # x * 1e300 in float32 is inf everywhere (NaN where x = 0): a black frame, said nothing before
    with pytest.raises(ParameterError) as caught:
        apply(op, latent(), amount)
    message = str(caught.value)
    assert message.startswith(f"bend {op}: the amount {amount:g} would put the values beyond float32's range")
    assert "\n" not in message


@pytest.mark.parametrize("op, amount", [("multiply", 3e38), ("add", -3.4e38), ("rescale", 1.7e38),
                                        ("invert", 3e-39), ("clamp", 1e300), ("threshold", 1e300),
                                        ("soft_threshold", 1e300), ("rotate_z", 1e300)])
def test_large_amounts_that_can_stay_finite_are_taken(op, amount):
    apply(op, latent(), amount)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_no_amount_escapes_as_anything_but_a_parameter_error(dtype):
    # clamp=1e300 and (in half precision) power=70000 were RuntimeErrors of torch's scalar conversion
    x = latent((1, 8, 8, 8)).to(dtype)
    for op in OPERATORS:
        for amount in (1e300, -1e300, 1e-300, 3e38, 7e4, -7e4, 2.5):
            try:
                got = apply(op, x, amount, generator=torch.Generator().manual_seed(0))
            except ParameterError as error:
                assert str(error).startswith(f"bend {op}: ") and "\n" not in str(error)
            else:
                assert got.shape == x.shape and got.dtype == dtype, (op, amount)
    assert torch.equal(apply("clamp", x, 1e300), x)  # a bound past the dtype's range clips nothing finite
