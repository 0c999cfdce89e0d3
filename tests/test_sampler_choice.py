"""--sampler on the command lines and in the Engine: the choice and its record, the combinations
refused before the model loads (one line each), the Engine's few-step paths against the samplers
driven directly with the same noise, UNet calls per step, and an LCM-distilled UNet (guidance
embedding) taking --scale as its w."""
import pytest
import torch
from safetensors.torch import load_file, save_file

from cli_checks import DEMO, assert_one_line_error
from conftest import DATA
from ldm.models.diffusion.euler_ancestral import EulerAncestralSampler
from ldm.models.diffusion.lcm import LCMSampler
from sounddiffusion.errors import ParameterError
from sounddiffusion.images import read_png_parameters
from sounddiffusion.model.engine import step_generator
from sounddiffusion.model.loading import load_engine
from sounddiffusion.model.samplers import check_strength, img2img_step_count, timesteps_run, unet_evaluations
from sounddiffusion.settings import ImageSettings, ModelSettings, VideoSettings

GUIDANCE_PROJECTION = "model.diffusion_model.time_embedding.cond_proj.weight"


@pytest.fixture(scope="module")
def demo():
    return load_engine(ModelSettings(demo=True, device="cpu"))


def unet_calls(engine):
    """A list receiving the batch size of each UNet call, and the hook to remove."""
    calls = []
    handle = engine.model.model.register_forward_hook(lambda module, args, out: calls.append(args[0].shape[0]))
    return calls, handle


# ------------------------------------------------------------------------------- the choice

def test_defaults_switches_and_sampler_are_one_choice():
    assert ImageSettings().sampler == "ddim" and VideoSettings().sampler == "plms"
    assert ImageSettings(plms=True).sampler == "plms" and VideoSettings(ddim=True).sampler == "ddim"
    # --sampler X and the old switch record alike
    assert ImageSettings(sampler="plms").parameters() == ImageSettings(plms=True).parameters()
    assert VideoSettings(sampler="ddim").parameters() == VideoSettings(ddim=True).parameters()
    lcm = VideoSettings(sampler="lcm")
    assert (lcm.sampler, lcm.ddim, lcm.parameters()["sampler"]) == ("lcm", False, "lcm")
    with pytest.raises(ParameterError, match="--plms and --sampler lcm"):
        ImageSettings(plms=True, sampler="lcm")
    with pytest.raises(ParameterError, match="--sampler dpm"):
        VideoSettings(sampler="dpm")


def test_png_records_the_sampler(run_tool, tmp_path):
    status, _, err = run_tool("txt2img", ["--prompt", "a bell", "--outdir", tmp_path, "--sampler", "euler_a",
                                          "--scale", "0", "--skip_grid", *DEMO])
    assert status == 0, err
    parameters = read_png_parameters(tmp_path / "samples" / "sample-00000.png")
    assert parameters["sampler"] == "euler_a" and parameters["plms"] is False and parameters["vae"] is None


@pytest.mark.parametrize("tool,flags,words", [
    ("txt2img", ["--plms", "--sampler", "lcm"], ["--plms and --sampler lcm"]),
    ("audio2video", ["--ddim", "--sampler", "euler_a"], ["--ddim and --sampler euler_a"]),
    ("audio2img", ["--sampler", "euler_a", "--ddim_steps", "0"], ["--ddim_steps 0", "at least 1"]),
    ("txt2img", ["--sampler", "plms", "--ddim_eta", "0.5"], ["PLMS is deterministic", "--sampler ddim"]),
    ("audio2video", ["--sampler", "lcm", "--ddim_eta", "0.5"], ["LCM adds its own noise", "--ddim_eta"]),
    ("txt2img", ["--sampler", "lcm", "--ddim_steps", "60"], ["at most 50"]),
    ("img2img", ["--sampler", "euler_a", "--ddim_steps", "2", "--strength", "0.4"], ["int(2 x 0.4) = 0", "0.5"]),
    ("img2img", ["--sampler", "lcm", "--ddim_steps", "4", "--strength", "0.07"], ["at least 0.08"]),
])
def test_bad_combinations_are_one_line(run_tool, tmp_path, sound, image, monkeypatch, tool, flags, words):
    from sounddiffusion.model import loading

    monkeypatch.setattr(loading, "build_demo_model", lambda: pytest.fail("the model loaded"))
    inputs = {"txt2img": [], "img2img": ["--init-img", image], "audio2img": ["--prompt", sound],
              "audio2video": ["--path", sound]}[tool]
    status, _, err = run_tool(tool, [*inputs, "--outdir", tmp_path, *DEMO, *flags])
    assert_one_line_error(status, err, tool, *words)


def test_scheduled_strength_is_checked_frame_by_frame(run_tool, tmp_path, sound, monkeypatch):
    from sounddiffusion.model import loading

    monkeypatch.setattr(loading, "build_demo_model", lambda: pytest.fail("the model loaded"))
    # 4 fps: frames 0..1 of the 0.5 s tone; frame 0 is txt2img, frame 1 img2img at 0.1 (and 0.6 runs)
    base = ["--path", sound, "--fps", "4", "--outdir", tmp_path, *DEMO, "--sampler", "euler_a"]
    status, _, err = run_tool("audio2video", [*base, "--strength", "where(t == 1, 0.1, 0.6)"])
    assert_one_line_error(status, err, "audio2video", "frame 1 at 0.25 s", "int(2 x 0.1) = 0")
    # only frame 0 (txt2img) has the low value: nothing to refuse; strength 0 keeps the frame
    for strength in ("where(t == 0, 0.1, 0.6)", "where(t == 1, 0, 0.6)"):
        status, _, err = run_tool("audio2video", [*base, "--strength", strength, "--dry_run"])
        assert status == 0, err


# ------------------------------------------------------------------------------- the Engine

def conditions(engine, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1, 77, engine.context_dim, generator=g), torch.randn(1, 4, 8, 8, generator=g)


@pytest.mark.parametrize("sampler_class,kind,scale", [(LCMSampler, "lcm", 1.0), (LCMSampler, "lcm", 2.0),
                                                      (EulerAncestralSampler, "euler_a", 0.0)])
def test_engine_runs_the_sampler_with_its_seeded_noise(demo, sampler_class, kind, scale):
    cond, x_T = conditions(demo)
    uncond = demo.text_conditioning("")[None]
    sampler = sampler_class(demo.model)
    want, _ = sampler.sample(S=3, batch_size=1, shape=[4, 8, 8], conditioning=cond, x_T=x_T, verbose=False,
                             unconditional_guidance_scale=scale, unconditional_conditioning=uncond,
                             generator=step_generator(7))
    calls, handle = unet_calls(demo)
    got = demo.txt2img(cond, x_T=x_T, sampler=kind, steps=3, scale=scale, seed=7)
    handle.remove()
    assert torch.equal(got, want)
    rows = 2 if scale > 1 else 1  # no unconditional batch at guidance 0 or 1
    assert calls == [rows] * 3 and sum(calls) == unet_evaluations(kind, 3, scale)

    init, noise = conditions(demo, 1)[1], conditions(demo, 2)[1]
    want = sampler.img2img(init, cond, S=4, strength=0.5, init_noise=noise, unconditional_guidance_scale=scale,
                           unconditional_conditioning=uncond, generator=step_generator(9), verbose=False)
    got = demo.img2img(init, cond, noise=noise, strength=0.5, sampler=kind, steps=4, scale=scale, seed=9)
    assert torch.equal(got, want)


@pytest.mark.parametrize("kind", ["lcm", "euler_a"])
def test_engine_strength_0_keeps_and_1_redraws(demo, kind):
    cond, x_T = conditions(demo)
    init = conditions(demo, 1)[1]
    assert torch.equal(demo.img2img(init, cond, noise=x_T, strength=0.0, sampler=kind, steps=4, scale=1), init)
    assert torch.equal(demo.img2img(init, cond, noise=x_T, strength=1.0, sampler=kind, steps=4, scale=1, seed=3),
                       demo.txt2img(cond, x_T=x_T, sampler=kind, steps=4, scale=1, seed=3))


@pytest.mark.parametrize("kind", ["ddim", "plms", "lcm", "euler_a"])
def test_engine_img2img_runs_the_steps_the_schedule_csv_reports(demo, kind):
    """One rule for what img2img runs (sounddiffusion.model.samplers): the Engine's UNet calls at
    each strength are unet_evaluations(img2img_step_count), and where check_strength refuses a
    strength the Engine refuses it with the same one line."""
    cond, x_T = conditions(demo)
    init = conditions(demo, 1)[1]
    for strength in (0.0, 0.1, 0.25, 0.5, 0.99, 1.0):
        run = dict(noise=x_T, strength=strength, sampler=kind, steps=4, scale=1, seed=3)
        try:
            check_strength(kind, 4, strength)
        except ParameterError as refused:
            with pytest.raises(ParameterError) as caught:
                demo.img2img(init, cond, **run)
            assert str(caught.value) == str(refused)
            continue
        calls, handle = unet_calls(demo)
        demo.img2img(init, cond, **run)
        handle.remove()
        assert sum(calls) == unet_evaluations(kind, img2img_step_count(kind, 4, strength), 1), strength


def test_engine_img2img_builds_a_few_step_schedule_once(demo, monkeypatch):
    import ldm.models.diffusion.euler_ancestral as euler_module
    import ldm.models.diffusion.lcm as lcm_module

    built = []
    for module, name in ((lcm_module, "lcm_timesteps"), (euler_module, "trailing_timesteps")):
        real = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *args, _real=real, _name=name: built.append(_name) or _real(*args))
    cond, x_T = conditions(demo)
    for kind in ("lcm", "euler_a"):
        demo.img2img(conditions(demo, 1)[1], cond, noise=x_T, strength=0.5, sampler=kind, steps=4, scale=1)
    assert built == ["lcm_timesteps", "trailing_timesteps"]


def test_step_hooks_see_the_ddpm_latent_with_euler_ancestral(demo):
    """Bends act on the latent as DDIM holds it: x_T sqrt(1 - a_999) before Euler's first step
    (Euler's own latent is x_T sigma_max, sigma_max = sqrt((1 - a) / a))."""
    cond, x_T = conditions(demo)
    seen = []
    demo.txt2img(cond, x_T=x_T, sampler="euler_a", steps=2, scale=0,
                 before_step=lambda i, x: seen.append((i, x.clone())) or x)
    a = float(demo.model.alphas_cumprod[999])
    assert [i for i, _ in seen] == [0, 1]
    assert torch.allclose(seen[0][1], x_T * (1 - a) ** 0.5, atol=1e-5)
    # a hook that doubles the latent changes Euler's latent by the same factor
    doubled = demo.txt2img(cond, x_T=x_T, sampler="euler_a", steps=1, scale=0, before_step=lambda i, x: 2 * x)
    assert torch.allclose(doubled, demo.txt2img(cond, x_T=2 * x_T, sampler="euler_a", steps=1, scale=0), atol=1e-5)


def test_timesteps_the_csv_reports():
    assert list(timesteps_run("ddim", 10, 0.5)) == [401, 301, 201, 101, 1]  # int(10 x 0.5) of 1, 101, ..., 901
    assert list(timesteps_run("plms", 10, 0.0)) == []
    assert list(timesteps_run("euler_a", 4, 0.5)) == [499, 249]  # the last 2 of 999, 749, 499, 249
    # LCM: 4 of the grid points 19, 39, ..., 20 int(50 r) - 1, the noisiest first
    assert list(timesteps_run("lcm", 4, 0.5)) == [499, 379, 259, 139]
    assert list(timesteps_run("lcm", 4)) == [999, 759, 499, 259]
    assert unet_evaluations("plms", 12, 7.5) == 26 and unet_evaluations("lcm", 4, 8.0, embeds_guidance=True) == 4


# ------------------------------------------------------------------------------- LCM-distilled UNets

@pytest.fixture(scope="module")
def lcm_files(tmp_path_factory):
    """tiny-v1 with a random guidance projection (256 -> 32) and a config that declares it."""
    folder = tmp_path_factory.mktemp("tiny-lcm")
    state = load_file(DATA / "tiny-v1" / "model.safetensors")
    state[GUIDANCE_PROJECTION] = 0.1 * torch.randn(32, 256, generator=torch.Generator().manual_seed(4))
    save_file(state, folder / "model.safetensors")
    config = (DATA / "tiny-v1" / "config.yaml").read_text()
    marker = "unet_config:\n      target: ldm.modules.diffusionmodules.openaimodel.UNetModel\n      params:\n"
    assert marker in config
    (folder / "config.yaml").write_text(config.replace(marker, marker + "        time_cond_proj_dim: 256\n"))
    return folder


def test_guidance_embedding_takes_scale_as_w(lcm_files):
    engine = load_engine(ModelSettings(config=str(lcm_files / "config.yaml"),
                                       ckpt=str(lcm_files / "model.safetensors"), device="cpu"))
    assert engine.embeds_guidance
    cond = engine.text_conditioning("a lighthouse")[None]
    x_T = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    seen = []
    apply_model = engine.model.apply_model

    def recording(x, t, c, **kwargs):
        seen.append((x.shape[0], kwargs.get("guidance_scale")))
        return apply_model(x, t, c, **kwargs)

    engine.model.apply_model = recording
    try:
        pictures = {w: engine.txt2img(cond, x_T=x_T, sampler="lcm", steps=2, scale=w, seed=5) for w in (2.0, 8.0)}
    finally:
        del engine.model.apply_model
    assert seen == [(1, 2.0), (1, 2.0), (1, 8.0), (1, 8.0)]  # one call per step, w as the UNet's input
    assert (pictures[2.0] - pictures[8.0]).abs().max() > 1e-3
    # the same as the embedding's forward with that w, step by step (LCMSampler driven directly)
    want, _ = LCMSampler(engine.model).sample(S=2, batch_size=1, shape=[4, 8, 8], conditioning=cond, x_T=x_T,
                                              verbose=False, unconditional_guidance_scale=8.0,
                                              generator=step_generator(5))
    assert torch.equal(pictures[8.0], want)


def test_lcm_distilled_checkpoint_from_the_command_line(run_tool, tmp_path, lcm_files):
    status, _, err = run_tool("txt2img", ["--config", lcm_files / "config.yaml", "--ckpt", lcm_files / "model.safetensors",
                                          "--sampler", "lcm", "--ddim_steps", "2", "--scale", "8", "--H", "64",
                                          "--W", "64", "--outdir", tmp_path, "--skip_grid"])
    assert status == 0, err
    parameters = read_png_parameters(tmp_path / "samples" / "sample-00000.png")
    assert (parameters["sampler"], parameters["scale"]) == ("lcm", 8.0)
