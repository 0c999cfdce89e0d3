"""sounddiffusion.model.cuda_graphs on a CPU: the static-buffer "copy in, replay, copy out" logic with an
eager stand-in for the graph gives bit-identical samples to the plain UNet across changes of step
count, strength, sampler and picture size, and refuses (runs eagerly, one debug log) what it cannot
capture. The real graphs are tested on CUDA in tests/test_cuda.py."""
import argparse
import logging

import pytest
import torch

from ldm.util import load_model_from_config
from sounddiffusion import cli
from sounddiffusion.errors import ParameterError
from sounddiffusion.model.cuda_graphs import StaticShapeCalls, eager_capture, use_static_calls
from sounddiffusion.model.loading import engine_for_model, load_config

LOGGER = "sounddiffusion.model.cuda_graphs"


class CountingCapture:
    """eager_capture that counts captures and replays."""

    def __init__(self):
        self.captures = 0
        self.replays = 0

    def __call__(self, run):
        self.captures += 1
        replay, output = eager_capture(run)

        def counted():
            self.replays += 1
            replay()

        return counted, output


def toy(x, timesteps, context=None):
    """(B, C, H, W), (B,), (B, M, D) -> (B, C, H, W): depends on every input."""
    return 2 * x + timesteps.float().view(-1, 1, 1, 1) + context.mean((1, 2)).view(-1, 1, 1, 1)


def toy_inputs(seed, batch=2, side=4):
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, 4, side, side, generator=generator), torch.randint(0, 1000, (batch,), generator=generator),
            torch.randn(batch, 5, 3, generator=generator))


def tiny_engine(tiny_dir):
    model = load_model_from_config(load_config(tiny_dir / "config.yaml"), str(tiny_dir / "model.safetensors"),
                                   device="cpu")
    return engine_for_model(model, device="cpu")


@pytest.fixture(scope="module")
def engines(tiny_dir):
    """(plain engine, engine whose UNet runs through static buffers, its capture counter, the wrapper)."""
    counter = CountingCapture()
    static = tiny_engine(tiny_dir)
    wrapper = use_static_calls(static.model.model.diffusion_model, capture=counter, device_type="cpu")
    return tiny_engine(tiny_dir), static, counter, wrapper


def img2img(engine, *, side, steps, strength, sampler="ddim"):
    generator = torch.Generator().manual_seed(side + steps)
    shape = (1, 4, side // 8, side // 8)
    init, noise = torch.randn(shape, generator=generator), torch.randn(shape, generator=generator)
    cond = torch.randn(1, 77, engine.context_dim, generator=generator)
    return engine.img2img(init, cond, noise=noise, strength=strength, sampler=sampler, steps=steps, seed=1)


def test_static_buffers_give_the_plain_samples_bit_for_bit(engines):
    plain, static, counter, wrapper = engines
    runs = [dict(side=64, steps=4, strength=0.5), dict(side=64, steps=6, strength=0.5),
            dict(side=64, steps=6, strength=0.75, sampler="plms"), dict(side=64, steps=4, strength=1.0)]
    for run in runs:  # step count, strength and sampler change: the timesteps are an input, one capture
        assert torch.equal(img2img(static, **run), img2img(plain, **run)), run
    assert len(wrapper.calls) == 1 and counter.captures == 1
    # every UNet call is a replay (a real capture only records): 2 + 3 + (4 + 1 PLMS warm-up) + 4
    assert counter.replays == 2 + 3 + 5 + 4
    run = dict(side=128, steps=4, strength=0.5)  # a new picture size: new buffers, a second capture
    assert torch.equal(img2img(static, **run), img2img(plain, **run))
    assert len(wrapper.calls) == 2 and counter.captures == 2
    run = dict(side=64, steps=4, strength=0.5)  # back to the first size: its buffers are reused
    assert torch.equal(img2img(static, **run), img2img(plain, **run))
    assert counter.captures == 2


@torch.inference_mode()
def test_each_call_returns_its_own_output():
    wrapper = StaticShapeCalls(toy, capture=eager_capture, device_type="cpu")
    first, second = toy_inputs(0), toy_inputs(1)
    out_first = wrapper(first[0], first[1], context=first[2])
    out_second = wrapper(second[0], second[1], context=second[2])
    assert torch.equal(out_first, toy(*first[:2], context=first[2]))  # not overwritten by the replay
    assert torch.equal(out_second, toy(*second[:2], context=second[2]))
    assert out_second.data_ptr() != wrapper.calls[next(iter(wrapper.calls))].output.data_ptr()


def refused_calls(wrapper, caplog, call, times=3):
    """Run ``call`` ``times`` times; returns the debug records of the wrapper's logger."""
    caplog.clear()
    with caplog.at_level(logging.DEBUG, logger=LOGGER):
        for _ in range(times):
            x, t, c = toy_inputs(2)
            assert torch.equal(call(x, t, c), toy(x, t, context=c))
    return [r for r in caplog.records if r.name == LOGGER]


@pytest.mark.parametrize("case", ["autocast", "gradients", "other device", "extra input", "too many shapes"])
def test_refuses_what_it_cannot_capture_with_one_debug_log(case, caplog):
    counter = CountingCapture()
    wrapper = StaticShapeCalls(lambda x, t, context=None, **kw: toy(x, t, context=context), capture=counter,
                               device_type="cuda" if case == "other device" else "cpu", max_signatures=1)
    if case == "too many shapes":
        with torch.inference_mode():
            x, t, c = toy_inputs(3, side=8)
            wrapper(x, t, context=c)
    captures = counter.captures

    def call(x, t, c):
        if case == "gradients":
            return wrapper(x, t, context=c)
        with torch.inference_mode():
            if case == "autocast":
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    return wrapper(x, t, context=c)
            if case == "extra input":
                return wrapper(x, t, context=c, y=None)
            return wrapper(x, t, context=c)

    records = refused_calls(wrapper, caplog, call)
    assert counter.captures == captures  # nothing new captured
    assert len(records) == 1 and "runs eagerly" in records[0].getMessage(), [r.getMessage() for r in records]


def test_a_failed_capture_is_not_retried(caplog):
    attempts = []

    def failing(run):
        attempts.append(1)
        raise RuntimeError("operation not permitted when stream is capturing")

    wrapper = StaticShapeCalls(toy, capture=failing, device_type="cpu")
    with torch.inference_mode():
        records = refused_calls(wrapper, caplog, lambda x, t, c: wrapper(x, t, context=c))
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
