"""``--bend`` specs: parsing and its one-line errors, step placement, UNet block hooks, and the
operators with their amounts in a device tensor that those hooks use (so that CUDA graphs replay
each frame's amount) against the float operators of sounddiffusion.control.bending."""
import math

import pytest
import torch
from omegaconf import OmegaConf

from sounddiffusion.control.bending import SEEDED_OPERATORS, apply, identity_amount, operator_noise
from sounddiffusion.control.bending_specs import (BendSpec, BlockBender, check_block, check_graph_bends, parse_bend,
                                                  step_index)
from sounddiffusion.control.graph_bends import GRAPH_OPERATORS, PARAMETERS, apply_parameters, bend_parameters
from sounddiffusion.errors import ParameterError

PLACES = ("latent, step=K (an integer >= 0 or a fraction between 0 and 1), input_blocks.N, "
          "middle_block or output_blocks.N")


@pytest.mark.parametrize("text, want", [
    ("add=0.5*rms", BendSpec("add", "0.5*rms", "latent", None)),
    (" multiply = 1+beat @ latent ", BendSpec("multiply", "1+beat", "latent", None)),
    ("rotate_z=0.8*beat@step=0.5", BendSpec("rotate_z", "0.8*beat", "step", 0.5)),
    ("noise=0.1@step=0", BendSpec("noise", "0.1", "step", 0.0)),
    ("noise=0.1@step=25", BendSpec("noise", "0.1", "step", 25.0)),
    ("dilate=3*onset@output_blocks.5", BendSpec("dilate", "3*onset", "output_blocks.5", None)),
    ("clamp=2-rms@input_blocks.11", BendSpec("clamp", "2-rms", "input_blocks.11", None)),
    ("reflect=2@middle_block", BendSpec("reflect", "2", "middle_block", None)),
])
def test_good_specs(text, want):
    got = parse_bend(text)
    assert got == want and got.text == text
    assert got.is_block == (want.where not in ("latent", "step"))


@pytest.mark.parametrize("text, message", [
    ("rotate_z", "--bend 'rotate_z': expected OP=AMOUNT[@WHERE], e.g. rotate_z=0.8*beat@step=0.5"),
    ("spin=1", "--bend 'spin=1': unknown operator 'spin'; use one of add, multiply, subtract, threshold, "
               "soft_threshold, invert, log, power, abs, clamp, rescale, rotate_x, rotate_y, rotate_z, "
               "reflect, sparse_add, noise, gaussian_blob, erode, dilate"),
    ("add=", "--bend 'add=': the amount is missing; give a number or an expression after 'add=', "
             "e.g. add=0.5*rms"),
    ("add=@step=2", "--bend 'add=@step=2': the amount is missing; give a number or an expression "
                    "after 'add=', e.g. add=0.5*rms"),
    ("add=1@step=-1", "--bend 'add=1@step=-1': step -1 is negative; use an integer step >= 0 or a "
                      "fraction between 0 and 1 (e.g. step=0.8)"),
    ("add=1@step=-0.5", "--bend 'add=1@step=-0.5': step -0.5 is negative; use an integer step >= 0 or a "
                        "fraction between 0 and 1 (e.g. step=0.8)"),
    ("add=1@step=1.5", "--bend 'add=1@step=1.5': step '1.5' is neither an integer >= 0 nor a fraction "
                       "between 0 and 1; use e.g. step=3 or step=0.8"),
    ("add=1@step=half", "--bend 'add=1@step=half': step 'half' is neither an integer >= 0 nor a fraction "
                        "between 0 and 1; use e.g. step=3 or step=0.8"),
    ("add=1@input_blocks.x", "--bend 'add=1@input_blocks.x': bad block 'input_blocks.x'; use "
                             "input_blocks.N or output_blocks.N (N an integer >= 0) or middle_block"),
    ("add=1@output_blocks", "--bend 'add=1@output_blocks': bad block 'output_blocks'; use "
                            "input_blocks.N or output_blocks.N (N an integer >= 0) or middle_block"),
    ("add=1@foo", f"--bend 'add=1@foo': unknown place 'foo' after '@'; use {PLACES}"),
    ("add=1@", f"--bend 'add=1@': nothing after '@'; use {PLACES}"),
])
def test_bad_specs_are_one_line_errors(text, message):
    with pytest.raises(ParameterError) as caught:
        parse_bend(text)
    assert str(caught.value) == message


@pytest.mark.parametrize("text, n_steps, want", [
    ("add=1@step=0", 10, 0), ("add=1@step=3", 10, 3), ("add=1@step=10", 10, 10),
    ("add=1@step=99", 10, 10), ("add=1@step=0.8", 10, 8), ("add=1@step=0.5", 7, 3),
    ("add=1@step=0.29", 100, 29), ("add=1@step=0.99", 50, 49), ("add=1@step=0.5", 1, 0),
])
def test_step_index(text, n_steps, want):
    assert step_index(parse_bend(text), n_steps) == want


@pytest.mark.parametrize("written", ["0.0", "0.", ".0", "0e0", "0.000", "00"])
def test_step_zero_written_as_a_decimal_is_step_zero(written):
    # step=0 was accepted and step=0.0 refused; both mean the latent before the first step
    spec = parse_bend(f"add=1@step={written}")
    assert spec == parse_bend("add=1@step=0")
    assert [step_index(spec, n) for n in (1, 2, 10)] == [0, 0, 0]


def test_a_step_too_large_to_write_out_is_the_final_latent():
    spec = parse_bend("add=1@step=" + "9" * 400)  # int(float(...)) of this was an OverflowError
    assert step_index(spec, 10) == 10 and step_index(spec, 0) == 0


@pytest.mark.parametrize("written", ["\u0663", "\uff13", "0.\u0665", "1.0", "inf", "nan", "1e400"])
def test_other_steps_are_refused_in_one_line(written):
    with pytest.raises(ParameterError) as caught:
        parse_bend(f"add=1@step={written}")
    message = str(caught.value)
    assert "\n" not in message and ("neither an integer" in message or "is negative" in message), message


def test_a_long_bad_spec_is_shown_shortened():
    text = "add=" + " + ".join(["0.1*onset"] * 600) + "@somewhere"
    with pytest.raises(ParameterError) as caught:
        parse_bend(text)
    message = str(caught.value)
    assert len(message) < 250 and "unknown place 'somewhere'" in message, message
    assert "--bend 'add=0.1*onset + 0.1*onset + 0...." in message


def test_step_index_of_a_bend_elsewhere_is_a_mistake():
    with pytest.raises(ValueError, match="is not a step=K bend"):
        step_index(parse_bend("add=1"), 10)


# ----------------------------------------------------------------------------- UNet blocks

@pytest.fixture(scope="module")
def unet(tiny_dir):
    from ldm.util import instantiate_from_config
    from sounddiffusion.model.loading import init_random_weights

    config = OmegaConf.load(tiny_dir / "config.yaml")
    model = instantiate_from_config(config.model.params.unet_config).eval()
    init_random_weights(model)  # fresh modules zero their output layers: random weights everywhere
    return model


def unet_inputs():
    generator = torch.Generator().manual_seed(3)
    return (torch.randn(2, 4, 8, 8, generator=generator), torch.tensor([10, 500]),
            torch.randn(2, 77, 32, generator=generator))


def block_names(unet):
    return ([f"input_blocks.{i}" for i in range(len(unet.input_blocks))] + ["middle_block"]
            + [f"output_blocks.{i}" for i in range(len(unet.output_blocks))])


def run_with_probes(unet) -> tuple[dict, torch.Tensor]:
    """The UNet's output and every block's output, seen by hooks registered last (after any bend)."""
    seen, handles = {}, []
    for name in block_names(unet):
        block = unet.get_submodule(name)
        handles.append(block.register_forward_hook(
            lambda _m, _i, out, name=name: seen.__setitem__(name, out.clone())))
    try:
        with torch.no_grad():
            out = unet(*unet_inputs())
    finally:
        for handle in handles:
            handle.remove()
    return seen, out


def test_check_block_finds_blocks_and_lists_the_valid_range(unet):
    assert check_block(parse_bend("add=1@input_blocks.2"), unet) is unet.input_blocks[2]
    assert check_block(parse_bend("add=1@middle_block"), unet) is unet.middle_block
    assert check_block(parse_bend("add=1@output_blocks.11"), unet) is unet.output_blocks[11]
    with pytest.raises(ParameterError) as caught:
        check_block(parse_bend("add=1@output_blocks.12"), unet)
    assert str(caught.value) == ("--bend 'add=1@output_blocks.12': this model has no block output_blocks.12; "
                                 "use input_blocks.0 to input_blocks.11, middle_block, "
                                 "or output_blocks.0 to output_blocks.11")
    with pytest.raises(ParameterError, match="this model has no block input_blocks.40"):
        BlockBender(unet, [parse_bend("add=1@input_blocks.40")])


def test_a_block_bend_changes_that_block_and_everything_after_and_nothing_before(unet):
    names = block_names(unet)
    before, plain = run_with_probes(unet)
    specs = [parse_bend("noise=0.1@latent"), parse_bend("add=0.5@input_blocks.2")]
    with BlockBender(unet, specs) as bender:
        bender.set_amounts([0.1, 0.5])
        after, bent = run_with_probes(unet)
    position = names.index("input_blocks.2")
    for name in names[:position]:
        assert torch.equal(after[name], before[name]), name
    assert torch.equal(after["input_blocks.2"], before["input_blocks.2"] + 0.5)
    for name in names[position + 1:]:
        assert not torch.allclose(after[name], before[name]), name
    assert not torch.allclose(bent, plain)
    # the hooks are gone after the context: the same numbers as before
    assert all(not block._forward_hooks for block in map(unet.get_submodule, names))
    again, out = run_with_probes(unet)
    assert torch.equal(out, plain)


def test_identity_amounts_leave_the_unet_untouched_and_amounts_change_per_call(unet):
    _, plain = run_with_probes(unet)
    specs = [parse_bend("multiply=1+beat@middle_block"), parse_bend("rotate_x=beat@output_blocks.3")]
    with BlockBender(unet, specs) as bender:
        bender.set_amounts([1.0, 0.0])
        _, quiet = run_with_probes(unet)
        bender.set_amounts([1.5, 0.3])
        _, loud = run_with_probes(unet)
    assert torch.equal(quiet, plain)
    assert not torch.allclose(loud, plain)


def test_seeded_block_bends_draw_from_the_callers_generators(unet):
    asked = []

    def generator_for(index):
        asked.append(index)
        return torch.Generator().manual_seed(100 + index)

    specs = [parse_bend("add=1"), parse_bend("noise=0.5@output_blocks.0"), parse_bend("dilate=1@middle_block")]
    outputs = []
    for _ in range(2):
        with BlockBender(unet, specs, generator_for) as bender:
            bender.set_amounts([1.0, 0.5, 1.0])
            outputs.append(run_with_probes(unet)[1])
    assert asked == [1, 1]
    assert torch.equal(outputs[0], outputs[1])


def test_amounts_must_be_set_and_match_the_specs(unet):
    specs = [parse_bend("add=1@middle_block")]
    with BlockBender(unet, specs) as bender:
        with pytest.raises(RuntimeError, match="set_amounts must be called before the UNet runs"):
            run_with_probes(unet)
        with pytest.raises(ValueError, match="2 amounts for 1 bends"):
            bender.set_amounts([1.0, 2.0])
    assert not unet.middle_block._forward_hooks


def test_seeded_block_bends_draw_each_frame_from_that_frames_generator(unet):
    """Noise is drawn into a static buffer when set_amounts starts a frame (and at the first call of
    a shape): every call in a frame adds the same noise, as a hook drawing from a fresh generator
    of that frame at each call does."""
    frame = [0]

    def generator_for(index):
        return torch.Generator().manual_seed(1000 * frame[0] + index)

    spec = parse_bend("noise=0.5@output_blocks.0")
    block = unet.get_submodule(spec.where)
    with BlockBender(unet, [spec], generator_for) as bender:
        outputs = {}
        for frame[0], amount in ((0, 0.5), (1, 1.5), (2, 0.0)):
            bender.set_amounts([amount])
            outputs[frame[0]] = [run_with_probes(unet)[1] for _ in range(2)]
    for number, amount in ((0, 0.5), (1, 1.5), (2, 0.0)):
        handle = block.register_forward_hook(
            lambda _m, _i, out, amount=amount, seed=1000 * number: apply(
                spec.op, out, amount, generator=torch.Generator().manual_seed(seed)))
        try:
            want = run_with_probes(unet)[1]
        finally:
            handle.remove()
        assert all(torch.equal(got, want) for got in outputs[number]), number


# ----------------------------------------------------------------------------- amounts in a device tensor

AMOUNTS = {"invert": [0.5, -2.0], "log": [2.0, 0.5], "power": [1.0, 2.0, 3.0, 0.5, -1.5], "reflect": [0.0, 2.4],
           "clamp": [math.inf, 0.3], "threshold": [0.0, -1.0, 0.3], "abs": [1.0]}


def parameter_tensor(op, amount):
    row = torch.zeros(PARAMETERS)
    values = bend_parameters(op, amount)
    row[:len(values)] = torch.tensor(values)
    return row


@pytest.mark.parametrize("op", GRAPH_OPERATORS)
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_amounts_from_a_tensor_give_the_float_operators_numbers(op, layout):
    x = torch.randn(2, 10, 6, 7, generator=torch.Generator().manual_seed(0)).to(memory_format=layout)
    identity = identity_amount(op)
    for amount in AMOUNTS.get(op, [identity if identity is not None else 0.5, 0.3, -0.7, 1.25]):
        noise = operator_noise(op, tuple(x.shape), torch.Generator().manual_seed(5)) if op in SEEDED_OPERATORS else None
        got = apply_parameters(op, x, parameter_tensor(op, amount), noise)
        want = apply(op, x, amount, generator=torch.Generator().manual_seed(5))
        assert got.shape == x.shape and got.dtype == x.dtype
        if op == "power":  # pow with a tensor exponent vs PyTorch's x*x, x*x*x, sqrt paths: an ulp or so
            torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6, equal_nan=True)
        else:
            assert torch.equal(got.nan_to_num(), want.nan_to_num()), (op, amount)
        if amount == identity:  # computed, not skipped, and x's layout kept (the next conv's numbers)
            assert got is not x and torch.equal(got, x) and got.stride() == x.stride(), op


def test_amounts_from_a_tensor_are_checked_as_the_float_ones_and_windows_are_refused():
    for op, amount, words in (("invert", 0.0, "invert computes 1/amount"), ("log", 1.0, "base"),
                              ("reflect", 4.0, "channel to flip"), ("add", math.nan, "finite")):
        with pytest.raises(ParameterError, match=words):
            bend_parameters(op, amount)
    assert "erode" not in GRAPH_OPERATORS and "dilate" not in GRAPH_OPERATORS
    check_graph_bends([parse_bend("dilate=2@latent"), parse_bend("add=1@middle_block")])  # fine
    with pytest.raises(ParameterError) as caught:
        check_graph_bends([parse_bend("erode=1+onset@output_blocks.2")])
    assert str(caught.value) == (
        "--bend 'erode=1+onset@output_blocks.2': erode inside a UNet block cannot be replayed from CUDA graphs "
        "(its window size follows the amount): leave --cuda_graphs out, or bend the latent (@latent or @step=K)")
