"""On a CUDA GPU (marker ``cuda``; ``python -m pytest -m cuda`` runs only these, and they skip with the
reason where PyTorch sees no GPU): the tiny model's golden tensors in float32 with TF32 off against
the strict tolerances and in float16 against loose ones; the frame loop on CUDA against the CPU;
the CUDA-graph path (``--cuda_graphs``) against the eager one across changes of step count,
strength, sampler, picture size and --scale 1 in one process, and with UNet block bends whose
amount changes every frame (identity at the frame the graph is captured on).

The frame loop is driven by tests/frame_capture.py, which tests/test_cuda_graphs.py runs on the CPU
too (so a change of the loop's or the writer's signature fails there, not first on a GPU). The
float16 tolerances are those of ../shared/tools/device/check_engine_golden_device.py; the
frame-loop ones are the float16 sampling tolerance. None of these has run on a GPU yet.
"""
import json

import pytest
import torch
from frame_capture import SIZE, render_frames, rising_tone
from omegaconf import OmegaConf

from ldm.models.diffusion.ddim import DDIMSampler
from ldm.models.diffusion.plms import PLMSSampler
from ldm.util import load_model_from_config
from sounddiffusion.control.bending import SEEDED_OPERATORS, operator_noise
from sounddiffusion.control.bending_specs import BlockBender, parse_bend
from sounddiffusion.control.graph_bends import GRAPH_OPERATORS, apply_parameters, bend_parameters
from sounddiffusion.model.cuda_graphs import StaticShapeCalls
from sounddiffusion.model.loading import build_demo_model, engine_for_model

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: PyTorch sees none here")]

# (single pass, sampling) tolerances, relative to 1 + max|reference|
TOLERANCES = {torch.float32: (1e-4, 2e-3), torch.float16: (1e-2, 5e-2)}
FP16_FRAMES = 5e-2
DEVICE = "cuda"


def rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    ours, ref = ours.detach().float().cpu(), ref.detach().float().cpu()
    assert ours.shape == ref.shape, f"shape {tuple(ours.shape)} != {tuple(ref.shape)}"
    return float((ours - ref).abs().max()) / (1 + float(ref.abs().max()))


@pytest.fixture
def no_tf32():
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["float32", "float16"])
@torch.no_grad()
def test_golden_tensors_on_cuda(dtype, tiny_dir, golden, no_tf32):
    single, sampling = TOLERANCES[dtype]
    meta = json.loads((tiny_dir / "golden.json").read_text())
    model = load_model_from_config(OmegaConf.load(tiny_dir / "config.yaml"), str(tiny_dir / "model.safetensors"),
                                   device=DEVICE).to(dtype).eval()
    g = {k: v.to(DEVICE, dtype) if v.is_floating_point() else v.to(DEVICE) for k, v in golden.items()}
    errors = {
        "text_cond": (rel_err(model.get_learned_conditioning(meta["prompts"]), golden["text_cond"]), single),
        "unet_eps": (rel_err(model.apply_model(g["unet_x"], g["unet_t"], g["text_cond"][:2]), golden["unet_eps"]),
                     single),
        "vae_mean": (rel_err(model.encode_first_stage(g["vae_image"]).mean, golden["vae_mean"]), single),
        "vae_decoded": (rel_err(model.decode_first_stage(0.18215 * g["vae_mean"]), golden["vae_decoded"]), single),
    }
    c, uc = g["text_cond"][0:1], g["text_cond"][1:2]
    for name, sampler_class in (("ddim", DDIMSampler), ("plms", PLMSSampler)):
        latent, _ = sampler_class(model).sample(
            S=meta["steps"], batch_size=1, shape=list(g["x_T"].shape[1:]), conditioning=c, verbose=False, eta=0.0,
            unconditional_guidance_scale=meta["scale"], unconditional_conditioning=uc, x_T=g["x_T"].clone())
        errors[f"{name}_txt2img_latent"] = (rel_err(latent, golden[f"{name}_txt2img_latent"]), sampling)
    sampler = DDIMSampler(model)
    sampler.make_schedule(ddim_num_steps=meta["steps"], ddim_eta=0.0, verbose=False)
    latent = sampler.decode(g["ddim_img2img_zenc"].clone(), c, meta["t_enc"], verbose=False,
                            unconditional_guidance_scale=meta["scale"], unconditional_conditioning=uc)
    errors["ddim_img2img_latent"] = (rel_err(latent, golden["ddim_img2img_latent"]), sampling)
    off = {name: f"{err:.2e} > {tol:.0e}" for name, (err, tol) in errors.items() if not err <= tol}
    assert not off, off


# ----------------------------------------------------------------------------- the frame loop

@pytest.fixture(scope="module")
def song(tmp_path_factory):
    return rising_tone(tmp_path_factory.mktemp("song") / "song.wav")


def demo_engine(device, **options):
    return engine_for_model(build_demo_model(), device=device, **options)


def graphed_engine():
    """The demo engine with ``--cuda_graphs``; returns (engine, its wrapper, the list of captures)."""
    engine = demo_engine(DEVICE, cuda_graphs=True)
    wrapper = engine.model.model.diffusion_model.forward
    assert isinstance(wrapper, StaticShapeCalls)
    captures, capture = [], wrapper.capture
    wrapper.capture = lambda run: captures.append(1) or capture(run)
    return engine, wrapper, captures


def assert_same_frames(ours, reference, tol=FP16_FRAMES):
    assert sorted(ours) == sorted(reference)
    errors = {i: rel_err(ours[i], reference[i]) for i in reference}
    assert all(err <= tol for err in errors.values()), errors


def test_frame_loop_on_cuda_matches_the_cpu(song):
    cuda = demo_engine(DEVICE)  # float16 weights, channels_last
    assert cuda.dtype == (torch.float16 if DEVICE == "cuda" else torch.float32)
    assert_same_frames(render_frames(cuda, song), render_frames(demo_engine("cpu"), song))


def test_cuda_graphs_give_the_eager_frames(song):
    """One process: step count, strength, sampler, --scale 1 on a frame, then the picture size
    change; a graph per picture size (and one for the batch of --scale 1), stale ones released."""
    eager, (graphed, wrapper, captures) = demo_engine(DEVICE), graphed_engine()
    for changes in (dict(), dict(ddim_steps=6), dict(strength=0.75), dict(ddim=True),
                    dict(scale="0:(7.5), 1:(1), 2:(7.5)")):
        assert_same_frames(render_frames(graphed, song, **changes), render_frames(eager, song, **changes))
    assert len(captures) == 2 and sorted(key.x_shape[0] for key in wrapper.calls) == [1, 2], list(wrapper.calls)
    assert_same_frames(render_frames(graphed, song, H=2 * SIZE), render_frames(eager, song, H=2 * SIZE))
    assert len(captures) == 3 and len(wrapper.calls) == 1 and not wrapper.refused, (list(wrapper.calls),
                                                                                     wrapper.refused)


@pytest.mark.parametrize("text", ["multiply=0:(1), 1:(1.8), 2:(0.4), 3:(1.3)@middle_block",
                                  "rotate_z=0:(0), 1:(0.9), 2:(-1.2), 3:(0.5)@output_blocks.1",
                                  "noise=0:(0), 1:(0.5), 2:(1.5), 3:(0.8)@input_blocks.1"])
def test_cuda_graphs_give_the_eager_frames_with_block_bends(song, text):
    """The graph is captured at frame 0, where the amount is the identity; every later frame
    must take its own amount (and, for noise, its own seeded noise)."""
    eager, (graphed, wrapper, captures) = demo_engine(DEVICE), graphed_engine()
    ours, reference = render_frames(graphed, song, 4, bend=(text,)), render_frames(eager, song, 4, bend=(text,))
    assert_same_frames(ours, reference)
    unbent = render_frames(eager, song, 4)
    assert all(rel_err(reference[i], unbent[i]) > 0 for i in (1, 2, 3))
    assert len(captures) == 1 and not wrapper.refused


def test_block_bend_amounts_and_noise_reach_the_gpu_without_a_host_sync(tiny_dir):
    """set_amounts copies each frame's parameters and noise from pinned memory without waiting
    for the GPU, and no graph operator reads a value back (what a capture would refuse)."""
    unet = load_model_from_config(OmegaConf.load(tiny_dir / "config.yaml"), str(tiny_dir / "model.safetensors"),
                                  device=DEVICE).model.diffusion_model
    x = torch.randn(2, 8, 16, 16, device=DEVICE)
    inputs = {}
    for op in GRAPH_OPERATORS:
        values = bend_parameters(op, {"log": 2.0, "reflect": 1.0, "invert": 2.0}.get(op, 0.8))
        parameters = torch.zeros(4, device=DEVICE)
        parameters[:len(values)] = torch.tensor(values, device=DEVICE)
        noise = operator_noise(op, tuple(x.shape), None).to(DEVICE) if op in SEEDED_OPERATORS else None
        inputs[op] = (parameters, noise)
    specs = [parse_bend("noise=0.5@middle_block"), parse_bend("rotate_z=0.3@output_blocks.1")]
    with torch.inference_mode(), BlockBender(unet, specs, lambda i: torch.Generator().manual_seed(i)) as bender:
        bender.set_amounts([0.0, 0.0])
        unet(torch.randn(2, 4, 8, 8, device=DEVICE), torch.tensor([5, 5], device=DEVICE),
             context=torch.randn(2, 77, 32, device=DEVICE))  # makes the noise buffer of middle_block's shape
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            bender.set_amounts([0.7, 1.1])
            results = {op: apply_parameters(op, x, *inputs[op]) for op in GRAPH_OPERATORS}
        finally:
            torch.cuda.set_sync_debug_mode("default")
    assert all(result.device.type == "cuda" and result.shape == x.shape for result in results.values())
