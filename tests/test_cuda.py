"""On a CUDA GPU (marker ``cuda``; ``python -m pytest -m cuda`` runs only these, and they skip with the
reason where PyTorch sees no GPU): the tiny model's golden tensors in float32 with TF32 off against
the strict tolerances and in float16 against loose ones; the frame loop on CUDA against the CPU;
the CUDA-graph path (``--cuda_graphs``) against the eager one across changes of step count,
strength and picture size in one process.

The float16 tolerances are those of ../shared/tools/device/check_engine_golden_device.py; the
frame-loop ones are the float16 sampling tolerance. Neither has been run here yet (no GPU lent).
"""
import json

import numpy as np
import pytest
import soundfile as sf
import torch
from omegaconf import OmegaConf

from ldm.models.diffusion.ddim import DDIMSampler
from ldm.models.diffusion.plms import PLMSSampler
from ldm.util import load_model_from_config
from sounddiffusion.model.cuda_graphs import StaticShapeCalls
from sounddiffusion.model.loading import build_demo_model, engine_for_model
from sounddiffusion.settings import VideoSettings
from sounddiffusion.sound.audio import SAMPLE_RATE
from sounddiffusion.video import loop
from sounddiffusion.video.frame_plan import plan_frames

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: PyTorch sees none here")]

# (single pass, sampling) tolerances, relative to 1 + max|reference|
TOLERANCES = {torch.float32: (1e-4, 2e-3), torch.float16: (1e-2, 5e-2)}
FP16_FRAMES = 5e-2
SIZE = 64
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

class Captured:
    """Stands in for the FrameWriter: keeps each submitted latent (on the CPU) by frame index."""

    def __init__(self):
        self.latents: dict[int, torch.Tensor] = {}

    def submit(self, index, latent):
        self.latents[index] = latent.float().cpu()


@pytest.fixture(scope="module")
def song(tmp_path_factory):
    """1 s at 44.1 kHz, a tone getting louder."""
    t = np.arange(SAMPLE_RATE) / SAMPLE_RATE
    path = tmp_path_factory.mktemp("song") / "song.wav"
    sf.write(path, (np.linspace(0.05, 0.6, t.size) * np.sin(2 * np.pi * 330 * t)).astype(np.float32), SAMPLE_RATE,
             subtype="FLOAT")
    return path


def demo_engine(device, **options):
    return engine_for_model(build_demo_model(), device=device, **options)


def frames(engine, song, count=3, **changes):
    video = VideoSettings(**{**dict(audio=str(song), fps=4, strength=0.5, ddim_steps=4, seed=3, H=SIZE, W=SIZE),
                             **changes})
    captured = Captured()
    loop.sample_frames(engine, plan_frames(video), video, captured, start=0, stop=count, latent=None)
    return captured.latents


def assert_same_frames(ours, reference, tol=FP16_FRAMES):
    errors = {i: rel_err(ours[i], reference[i]) for i in reference}
    assert all(err <= tol for err in errors.values()), errors


def test_frame_loop_on_cuda_matches_the_cpu(song):
    cuda = demo_engine(DEVICE)  # float16 weights, channels_last
    assert cuda.dtype == (torch.float16 if DEVICE == "cuda" else torch.float32)
    assert_same_frames(frames(cuda, song), frames(demo_engine("cpu"), song))


def test_cuda_graphs_give_the_eager_frames(song):
    """One process: step count, strength and picture size change; a graph per picture size."""
    eager, graphed = demo_engine(DEVICE), demo_engine(DEVICE, cuda_graphs=True)
    wrapper = graphed.model.model.diffusion_model.forward
    assert isinstance(wrapper, StaticShapeCalls)
    for changes in (dict(), dict(ddim_steps=6), dict(strength=0.75), dict(ddim=True), dict(H=2 * SIZE)):
        assert_same_frames(frames(graphed, song, **changes), frames(eager, song, **changes))
    assert len(wrapper.calls) == 2 and not wrapper.refused, (list(wrapper.calls), wrapper.refused)
