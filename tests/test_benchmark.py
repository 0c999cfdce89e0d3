"""scripts/diffusers_conversion.py: the CompVis -> diffusers conversion reproduces our model's outputs, and a
run on the tiny model writes the table and the ratio line."""
import re
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from conftest import load_module
from ldm.models.diffusion.sampling import make_ddim_schedule
from ldm.util import load_model_from_config

pytest.importorskip("diffusers", reason="diffusers is a benchmark-only dependency: pip install -r requirements-bench.txt")

REPO = Path(__file__).resolve().parents[1]
TOL = 1e-4  # relative to 1 + max|ours|, as the reference README's single-pass tolerance


@pytest.fixture(scope="module")
def conversion():
    from scripts import diffusers_conversion

    return diffusers_conversion


@pytest.fixture(scope="module")
def bench():
    return load_module(REPO / "scripts" / "benchmark.py", "benchmark_script")


@pytest.fixture(scope="module")
def tiny(tiny_dir):
    config = OmegaConf.load(tiny_dir / "config.yaml")
    model = load_model_from_config(config, str(tiny_dir / "model.safetensors"))
    return model.eval(), config


def assert_close(name, theirs, ours):
    err = float((theirs.float() - ours.float()).abs().max()) / (1 + float(ours.abs().max()))
    assert err <= TOL, f"{name}: relative difference {err:.2e} > {TOL:.0e}"


@torch.no_grad()
def test_diffusers_unet_predicts_our_noise(conversion, tiny):
    model, config = tiny
    unet = conversion.diffusers_unet(model, config)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 16, 16, generator=generator)
    t = torch.tensor([10, 500])
    context = torch.randn(2, 77, 32, generator=generator)
    ours = model.apply_model(x, t, context)
    assert_close("unet eps", unet(x, t, encoder_hidden_states=context).sample, ours)
    # the conversion shares the weights: no second copy of the UNet
    assert unet.conv_in.weight.data_ptr() == model.model.diffusion_model.input_blocks[0][0].weight.data_ptr()


@torch.no_grad()
def test_diffusers_vae_encodes_and_decodes_as_ours(conversion, tiny):
    model, config = tiny
    vae = conversion.diffusers_vae(model, config)
    image = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(1)) * 2 - 1
    ours = model.encode_first_stage(image)
    theirs = vae.encode(image).latent_dist
    assert_close("vae mean", theirs.mean, ours.mean)
    assert_close("vae std", theirs.std, ours.std)
    latent = model.scale_factor * ours.mean
    assert_close("vae decode", vae.decode(latent / vae.config.scaling_factor).sample, model.decode_first_stage(latent))


def test_diffusers_ddim_visits_our_timesteps(conversion, tiny):
    model, _ = tiny
    scheduler = conversion.diffusers_ddim(model)
    scheduler.set_timesteps(50)
    ours = make_ddim_schedule(model.alphas_cumprod, 50, verbose=False)
    assert scheduler.timesteps.tolist() == ours.timesteps[::-1].tolist()
    assert_close("alphas_cumprod", scheduler.alphas_cumprod, model.alphas_cumprod)


def test_key_maps_cover_the_full_size_layout(conversion):
    """Every full-size SD v1 UNet and VAE key lands on a diffusers module path."""
    config = OmegaConf.load(REPO / "configs" / "stable-diffusion" / "v1-inference.yaml").model.params
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from ldm.util import instantiate_from_config

    with torch.device("meta"):
        ours_unet = instantiate_from_config(config.unet_config)
        ours_vae = instantiate_from_config(config.first_stage_config)
        unet = UNet2DConditionModel(**conversion.diffusers_unet_config(config.unet_config.params))
        vae = AutoencoderKL(**conversion.diffusers_vae_config(config.first_stage_config.params, 0.18215))
    for theirs, converted in ((unet, conversion.unet_to_diffusers(ours_unet.state_dict(), config.unet_config.params)),
                              (vae, conversion.vae_to_diffusers(ours_vae.state_dict(), config.first_stage_config.params.ddconfig))):
        expected = {k: tuple(v.shape) for k, v in theirs.state_dict().items()}
        assert {k: tuple(v.shape) for k, v in converted.items()} == expected


@pytest.mark.slow
def test_tiny_run_writes_table_and_ratio_line(bench, tiny_dir, tmp_path, capsys):
    out = tmp_path / "bench.md"
    status = bench.main(["--device", "cpu", "--quick", "--config", str(tiny_dir / "config.yaml"), "--size", "64",
                         "--steps", "4", "--frames", "1", "--out", str(out)])
    assert status == 0
    text = out.read_text()
    assert text == capsys.readouterr().out
    rows = [line for line in text.splitlines() if line.startswith("| ") and not line.startswith("| way")]
    # the separator, then one per way; on a CPU without native bfloat16 a measured UNet
    # evaluation stands for upstream-autocast (its frames would take hours)
    probed = not bench.native_bfloat16(torch.device("cpu"))
    assert len(rows) == 1 + len(bench.WAYS) - probed
    if probed:
        assert re.search(r"one UNet evaluation \(batch 2, 64x64\) took \d+\.\d+ s in autocast", text), text
    for row in rows[1:]:
        cells = row.split("|")
        frames, seconds, warmup = int(cells[3]), float(cells[4]), float(cells[8])
        assert frames == 1 and seconds > 0 and warmup > 0
    assert re.search(r"^- Command: `python scripts/benchmark.py --device cpu --quick ", text, re.M), text
    last = text.strip().splitlines()[-1]
    match = re.fullmatch(r"ratio_vs_diffusers=(\d+\.\d+) ratio_vs_upstream=(\d+\.\d+)", last)
    assert match, last
    assert all(float(x) > 0 for x in match.groups())
