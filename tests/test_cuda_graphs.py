"""sounddiffusion.model.cuda_graphs on a CPU, through the real interfaces it sits behind (Engine ->
sampler -> apply_model -> the UNet's forward, the frame loop with its writer and block bends), with
tests/graph_recorder.py standing in for CUDA-graph capture: it records a call's operations once and
replays them without running Python, so what a graph would freeze (a hook's float amount, a skipped
identity bend) is frozen here too. Checked: the samples are the plain UNet's bit for bit across
changes of step count, strength, sampler, picture size, conditioning shape and --scale 1; block
bends take each frame's amount inside replays; stale graphs are released; what cannot be captured
runs eagerly with one debug log; erode/dilate block bends with --cuda_graphs are one line, exit 2.
The real graphs are tested on CUDA in tests/test_cuda.py."""
import argparse
import gc
import inspect
import logging
import weakref

import pytest
import torch
from cli_checks import DEMO, assert_one_line_error, click_track
from frame_capture import FrameCollector, render_frames, rising_tone
from graph_recorder import CountingCapture, recorded_capture

from ldm.util import load_model_from_config
from sounddiffusion import cli
from sounddiffusion.control.bending import apply
from sounddiffusion.control.bending_specs import BlockBender, parse_bend
from sounddiffusion.errors import ParameterError
from sounddiffusion.model.cuda_graphs import StaticShapeCalls, use_static_calls
from sounddiffusion.model.configs import load_config
from sounddiffusion.model import loading
from sounddiffusion.model.loading import build_demo_model, engine_for_model
from sounddiffusion.video import loop
from sounddiffusion.video.frame_writer import FrameWriter

LOGGER = "sounddiffusion.model.cuda_graphs"


def tiny_engine(tiny_dir):
    model = load_model_from_config(load_config(tiny_dir / "config.yaml"), str(tiny_dir / "model.safetensors"),
                                   device="cpu")
    return engine_for_model(model, device="cpu")


def static_engine(engine):
    """``engine`` with its UNet's forward routed through static calls recorded on the CPU, as
    ``engine_for_model(..., cuda_graphs=True)`` routes it on CUDA; returns (engine, counter, wrapper)."""
    counter = CountingCapture()
    wrapper = use_static_calls(engine.model.model.diffusion_model, capture=counter, device_type="cpu")
    return engine, counter, wrapper


@pytest.fixture(scope="module")
def tiny(tiny_dir):
    """(plain tiny engine, the same weights through static calls, counter, wrapper)."""
    return (tiny_engine(tiny_dir), *static_engine(tiny_engine(tiny_dir)))


def img2img(engine, *, side, steps, strength, sampler="ddim", scale=7.5):
    generator = torch.Generator().manual_seed(side + steps)
    shape = (1, 4, side // 8, side // 8)
    init, noise = torch.randn(shape, generator=generator), torch.randn(shape, generator=generator)
    cond = torch.randn(1, 77, engine.context_dim, generator=generator)
    return engine.img2img(init, cond, noise=noise, strength=strength, sampler=sampler, steps=steps, seed=1,
                          scale=scale)


def references_to(wrapper):
    """Weak references to what the wrapper's captured calls hold (static output, replay)."""
    return [ref for call in wrapper.calls.values() for ref in (weakref.ref(call.output), weakref.ref(call.replay))]


@pytest.mark.slow
def test_static_calls_give_the_plain_samples_and_release_stale_graphs(tiny):
    plain, static, counter, wrapper = tiny
    runs = [dict(side=64, steps=4, strength=0.5), dict(side=64, steps=6, strength=0.5),
            dict(side=64, steps=6, strength=0.75, sampler="plms"), dict(side=64, steps=4, strength=1.0)]
    for run in runs:  # step count, strength and sampler change: the timesteps are an input, one capture
        assert torch.equal(img2img(static, **run), img2img(plain, **run)), run
    assert len(wrapper.calls) == 1 and counter.captures == 1 and not wrapper.refused
    # every UNet call of the sampler is a replay: 2 + 3 + (4 + 1 PLMS warm-up) + 4
    assert counter.replays == 2 + 3 + 5 + 4
    run = dict(side=64, steps=4, strength=0.5, scale=1.0)  # --scale 1: the batch of 1, its own graph
    assert torch.equal(img2img(static, **run), img2img(plain, **run))
    assert counter.captures == 2 and sorted(key.x_shape[0] for key in wrapper.calls) == [1, 2]
    stale = references_to(wrapper)
    run = dict(side=128, steps=4, strength=0.5)  # a new picture size: both graphs of 64x64 released
    assert torch.equal(img2img(static, **run), img2img(plain, **run))
    gc.collect()
    assert counter.captures == 3 and [key.x_shape for key in wrapper.calls] == [(2, 4, 16, 16)]
    assert all(ref() is None for ref in stale), "a released graph's buffers are still referenced"


def test_a_conditioning_of_another_shape_is_another_graph(tiny_dir):
    """Same latent batch, contexts of 77, 1 and 154 tokens (a longer prompt, the demo's one token):
    each its own graph (1 token would otherwise broadcast silently into the 77-token buffer)."""
    unet = tiny_engine(tiny_dir).model.model.diffusion_model
    counter = CountingCapture()
    wrapper = StaticShapeCalls(unet.forward, capture=counter, device_type="cpu")
    generator = torch.Generator().manual_seed(4)
    x, t = torch.randn(2, 4, 8, 8, generator=generator), torch.tensor([900, 900])
    with torch.inference_mode():
        for tokens in (77, 1, 154, 77):
            context = torch.randn(2, tokens, 32, generator=generator)
            assert torch.equal(wrapper(x, t, context=context), unet(x, t, context=context)), tokens
    assert counter.captures == 3 and len(wrapper.calls) == 3


@torch.inference_mode()
def test_a_conditioning_of_another_width_is_another_graph():
    """SD 1.x (D = 768) and 2.x (D = 1024) contexts with the same latent: kept apart (here on a
    function of any width, since one UNet takes one D; a width of 1 would broadcast silently)."""
    def scaled(x, timesteps, context=None):
        return x * context.mean() + timesteps.float().view(-1, 1, 1, 1)

    wrapper = StaticShapeCalls(scaled, capture=recorded_capture, device_type="cpu")
    generator = torch.Generator().manual_seed(5)
    x, t = torch.randn(2, 4, 8, 8, generator=generator), torch.tensor([10, 10])
    for width in (768, 1024, 1):
        context = torch.randn(2, 77, width, generator=generator)
        assert torch.equal(wrapper(x, t, context=context), scaled(x, t, context=context)), width
    assert len(wrapper.calls) == 3


def frozen_amount_reference(unet, forward, spec, amount, inputs):
    """The UNet's eager ``forward`` with ``spec`` at ``amount`` applied by a plain hook calling
    ``bending.apply`` with the float (the eager definition, independent of BlockBender)."""
    block = unet.get_submodule(spec.where)
    handle = block.register_forward_hook(lambda _m, _i, out: apply(spec.op, out, amount))
    try:
        return forward(*inputs[:2], context=inputs[2])
    finally:
        handle.remove()


@pytest.mark.parametrize("text", ["multiply=1@middle_block", "rotate_z=0@output_blocks.2",
                                  "clamp=inf@input_blocks.4"])
def test_a_block_bend_captured_at_identity_bends_later_calls(tiny_dir, text):
    """The bug a replay would hide: the graph is captured on a frame whose amount is the identity,
    and every later call must still take its own amount."""
    unet = tiny_engine(tiny_dir).model.model.diffusion_model
    counter = CountingCapture()
    wrapper = use_static_calls(unet, capture=counter, device_type="cpu")
    spec = parse_bend(text)
    later = {"multiply": [1.7, 0.4, 1.0], "rotate_z": [0.8, -1.3, 0.0], "clamp": [0.05, 0.2, float("inf")]}[spec.op]
    generator = torch.Generator().manual_seed(6)
    inputs = (torch.randn(2, 4, 8, 8, generator=generator), torch.tensor([700, 700]),
              torch.randn(2, 77, 32, generator=generator))
    with torch.inference_mode():
        with BlockBender(unet, [spec]) as bender:
            outputs = []
            for amount in [float(spec.amount), *later]:
                bender.set_amounts([amount])
                outputs.append(wrapper(*inputs[:2], context=inputs[2]))
        plain = wrapper.fn(*inputs[:2], context=inputs[2])
        for amount, got in zip([float(spec.amount), *later], outputs):
            assert torch.equal(got, frozen_amount_reference(unet, wrapper.fn, spec, amount, inputs)), amount
    assert counter.captures == 1 and counter.replays == 4
    assert not torch.equal(outputs[1], plain)


@pytest.fixture(scope="module")
def song(tmp_path_factory):
    return rising_tone(tmp_path_factory.mktemp("song") / "song.wav")


@pytest.fixture(scope="module")
def demo(song):
    """(plain demo engine, demo engine through static calls, counter, wrapper)."""
    return (engine_for_model(build_demo_model(), device="cpu"),
            *static_engine(engine_for_model(build_demo_model(), device="cpu")))


def test_the_frame_collector_takes_what_the_frame_writer_takes():
    assert list(inspect.signature(FrameCollector.submit).parameters) == \
        list(inspect.signature(FrameWriter.submit).parameters)


@pytest.mark.parametrize("text", ["multiply=0:(1), 1:(1.8), 2:(0.4), 3:(1.3)@middle_block",
                                  "rotate_z=0:(0), 1:(0.9), 2:(-1.2), 3:(0.5)@output_blocks.1",
                                  "noise=0:(0), 1:(0.5), 2:(1.5), 3:(0.8)@input_blocks.1"])
def test_block_bends_in_replayed_frames_are_the_eager_frames(demo, song, text):
    """Four frames through the real frame loop, the bend's amount the identity at frame 0 (where
    the graph is captured) and different at each later frame: the frames from replays are the
    eager frames bit for bit, and the bend did act from frame 1 on."""
    plain, static, counter, wrapper = demo
    captures = counter.captures
    graphed = render_frames(static, song, 4, bend=(text,))
    eager = render_frames(plain, song, 4, bend=(text,))
    unbent = render_frames(plain, song, 4)
    assert counter.captures == captures + 1 and len(wrapper.calls) == 1 and not wrapper.refused
    for index in range(4):
        assert torch.equal(graphed[index], eager[index]), index
    assert torch.equal(eager[0], unbent[0])  # the identity amount at frame 0
    assert all(not torch.equal(eager[index], unbent[index]) for index in (1, 2, 3))


def test_a_render_keeps_one_graph_and_scale_1_frames_a_second(demo, song):
    """A scale schedule reaching 1 on a frame calls the UNet without the unconditional half."""
    plain, static, _, wrapper = demo
    scale = "0:(7.5), 1:(1), 2:(7.5)"
    graphed, eager = render_frames(static, song, 3, scale=scale), render_frames(plain, song, 3, scale=scale)
    assert all(torch.equal(graphed[i], eager[i]) for i in range(3))
    assert sorted(key.x_shape[0] for key in wrapper.calls) == [1, 2]


@pytest.mark.parametrize("op", ["erode", "dilate"])
def test_a_window_bend_with_graphs_is_one_line_before_the_model_loads(run_tool, tmp_path, monkeypatch, op):
    monkeypatch.setattr(loop, "load_engine", lambda *a: pytest.fail("the model was loaded"))
    monkeypatch.setattr(loading, "check_cuda_graphs", lambda *a: None)  # as on a machine with CUDA
    clicks = click_track(tmp_path / "clicks.wav", seconds=1.0)
    status, _, err = run_tool("audio2video", ["--path", clicks, *DEMO, "--cuda_graphs", "--outdir", tmp_path,
                                              "--bend", f"{op}=2*onset@output_blocks.1"])
    assert_one_line_error(status, err, "audio2video", "--bend", op, "--cuda_graphs", "@latent")


def test_the_frame_loop_refuses_a_window_bend_on_a_graphed_unet(demo, song):
    _, static, _, _ = demo
    with pytest.raises(ParameterError, match="dilate inside a UNet block cannot be replayed from CUDA graphs"):
        render_frames(static, song, 1, bend=("dilate=1@middle_block",))


def refused_calls(wrapper, caplog, call, unet, tol=0.0, times=3):
    """Run ``call`` ``times`` times, each against the plain UNet (relative error at most ``tol``);
    returns the wrapper's debug records."""
    caplog.clear()
    generator = torch.Generator().manual_seed(2)
    with caplog.at_level(logging.DEBUG, logger=LOGGER):
        for _ in range(times):
            x, t = torch.randn(2, 4, 8, 8, generator=generator), torch.tensor([50, 50])
            c = torch.randn(2, 77, 32, generator=generator)
            got = call(x, t, c)
            with torch.inference_mode():
                want = unet(x, t, context=c)
            assert float((got - want).abs().max()) <= tol * (1 + float(want.abs().max()))
    return [r for r in caplog.records if r.name == LOGGER]


@pytest.mark.parametrize("case", ["autocast", "gradients", "other device", "extra input", "too many shapes"])
def test_refuses_what_it_cannot_capture_with_one_debug_log(case, caplog, tiny_dir):
    unet = tiny_engine(tiny_dir).model.model.diffusion_model

    def forward(x, timesteps, context=None, **extra):  # the UNet's forward, taking (and dropping) extras
        return unet(x, timesteps, context=context)

    counter = CountingCapture()
    wrapper = StaticShapeCalls(forward, capture=counter, device_type="cuda" if case == "other device" else "cpu",
                               max_signatures=1)
    if case == "too many shapes":  # the same size with a 1-token context: kept, and the only one allowed
        with torch.inference_mode():
            wrapper(torch.zeros(2, 4, 8, 8), torch.tensor([1, 1]), context=torch.zeros(2, 1, 32))
    captures = counter.captures

    def call(x, t, c):
        if case == "gradients":
            return wrapper(x, t, context=c).detach()
        with torch.inference_mode():
            if case == "autocast":
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    return wrapper(x, t, context=c).float()
            if case == "extra input":
                return wrapper(x, t, context=c, y=None)
            return wrapper(x, t, context=c)

    records = refused_calls(wrapper, caplog, call, unet, tol=0.05 if case == "autocast" else 0.0)
    assert counter.captures == captures  # nothing new captured
    assert len(records) == 1 and "runs eagerly" in records[0].getMessage(), [r.getMessage() for r in records]


def test_a_failed_capture_is_not_retried(caplog, tiny_dir):
    unet = tiny_engine(tiny_dir).model.model.diffusion_model
    attempts = []

    def failing(run):
        attempts.append(1)
        raise RuntimeError("operation not permitted when stream is capturing")

    wrapper = StaticShapeCalls(unet.forward, capture=failing, device_type="cpu")
    with torch.inference_mode():
        records = refused_calls(wrapper, caplog, lambda x, t, c: wrapper(x, t, context=c), unet)
    assert len(attempts) == 1 and not wrapper.calls
    assert len(records) == 1 and "capture failed" in records[0].getMessage()


def test_flag_reaches_the_settings_and_needs_cuda(tiny_dir):
    parser = argparse.ArgumentParser()
    cli.add_model_args(parser)
    settings = cli.model_settings(parser.parse_args(["--cuda_graphs", "--device", "cpu"]))
    assert settings.cuda_graphs and "cuda_graphs" not in settings.parameters()
    assert not cli.model_settings(parser.parse_args([])).cuda_graphs
    model = load_model_from_config(load_config(tiny_dir / "config.yaml"), str(tiny_dir / "model.safetensors"),
                                   device="cpu")
    with pytest.raises(ParameterError, match="--cuda_graphs needs a CUDA GPU"):
        engine_for_model(model, device="cpu", cuda_graphs=True)
