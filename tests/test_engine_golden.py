"""The tiny SD-v1-shaped model, loaded through ldm.util.load_model_from_config from every checkpoint
format, reproduces the reference tensors computed with the original CompVis code (tests/data/tiny-v1)."""
import json
import pickle

import pytest
import torch
from omegaconf import OmegaConf
from pytorch_lightning.callbacks.model_checkpoint import ModelCheckpoint
from safetensors.torch import load_file

from ldm.models.diffusion.ddim import DDIMSampler
from ldm.models.diffusion.plms import PLMSSampler
from ldm.util import load_model_from_config

SINGLE_PASS, SAMPLING = 1e-4, 2e-3  # tolerances of the reference README, relative to 1 + max|ref|


@pytest.fixture(scope="module")
def meta(tiny_dir):
    return json.loads((tiny_dir / "golden.json").read_text())


@pytest.fixture(scope="module")
def config(tiny_dir):
    return OmegaConf.load(tiny_dir / "config.yaml")


@pytest.fixture(scope="module")
def checkpoints(tiny_dir, tmp_path_factory):
    """The tiny weights as .safetensors (shipped), as a plain .ckpt and as a Lightning-style .ckpt."""
    folder = tmp_path_factory.mktemp("ckpt")
    state_dict = load_file(tiny_dir / "model.safetensors")
    plain, lightning = folder / "model.ckpt", folder / "model-lightning.ckpt"
    torch.save({"state_dict": state_dict, "global_step": 0}, plain)
    torch.save({"state_dict": state_dict, "epoch": 5, "global_step": 470000, "pytorch-lightning_version": "1.4.2",
                "callbacks": {ModelCheckpoint: {"monitor": None, "best_model_path": "/data/last.ckpt"}}}, lightning)
    return {"safetensors": tiny_dir / "model.safetensors", "ckpt": plain, "lightning": lightning}


def assert_close(name, ours, ref, tol):
    ours, ref = ours.detach().float().cpu(), ref.float()
    assert ours.shape == ref.shape, f"{name}: shape {tuple(ours.shape)} != {tuple(ref.shape)}"
    err = float((ours - ref).abs().max()) / (1 + float(ref.abs().max()))
    assert err <= tol, f"{name}: relative error {err:.2e} > {tol:.0e}"


@torch.no_grad()
def check_single_pass_tensors(model, golden, meta):
    """The text encoder, UNet and autoencoder outputs and the noise schedule."""
    assert_close("alphas_cumprod", model.alphas_cumprod, golden["alphas_cumprod"], SINGLE_PASS)
    cond = model.get_learned_conditioning(meta["prompts"])
    assert_close("text_cond", cond, golden["text_cond"], SINGLE_PASS)
    eps = model.apply_model(golden["unet_x"], golden["unet_t"], golden["text_cond"][:2])
    assert_close("unet_eps", eps, golden["unet_eps"], SINGLE_PASS)
    posterior = model.encode_first_stage(golden["vae_image"])
    assert_close("vae_mean", posterior.mean, golden["vae_mean"], SINGLE_PASS)
    assert_close("vae_std", posterior.std, golden["vae_std"], SINGLE_PASS)
    decoded = model.decode_first_stage(0.18215 * golden["vae_mean"])
    assert_close("vae_decoded", decoded, golden["vae_decoded"], SINGLE_PASS)


@torch.no_grad()
def check_sampling_tensors(model, golden, meta):
    """DDIM and PLMS txt2img and DDIM img2img, latents and decoded images."""
    steps, scale, t_enc = meta["steps"], meta["scale"], meta["t_enc"]
    c, uc = golden["text_cond"][0:1], golden["text_cond"][1:2]
    for name, sampler_class in (("ddim", DDIMSampler), ("plms", PLMSSampler)):
        latent, _ = sampler_class(model).sample(
            S=steps, batch_size=1, shape=list(golden["x_T"].shape[1:]), conditioning=c, verbose=False, eta=0.0,
            unconditional_guidance_scale=scale, unconditional_conditioning=uc, x_T=golden["x_T"].clone())
        assert_close(f"{name}_txt2img_latent", latent, golden[f"{name}_txt2img_latent"], SAMPLING)
        assert_close(f"{name}_txt2img_image", model.decode_first_stage(latent), golden[f"{name}_txt2img_image"],
                     SAMPLING)

    sampler = DDIMSampler(model)
    sampler.make_schedule(ddim_num_steps=steps, ddim_eta=0.0, verbose=False)
    assert sampler.ddim_timesteps.tolist() == golden["ddim_timesteps_S10"].tolist()
    z_enc = sampler.stochastic_encode(0.18215 * golden["vae_mean"], torch.tensor([t_enc]),
                                      noise=golden["img2img_noise"])
    assert_close("ddim_img2img_zenc", z_enc, golden["ddim_img2img_zenc"], SINGLE_PASS)
    latent = sampler.decode(golden["ddim_img2img_zenc"].clone(), c, t_enc, unconditional_guidance_scale=scale,
                            unconditional_conditioning=uc, verbose=False)
    assert_close("ddim_img2img_latent", latent, golden["ddim_img2img_latent"], SAMPLING)
    assert_close("ddim_img2img_image", model.decode_first_stage(latent), golden["ddim_img2img_image"], SAMPLING)


@pytest.fixture(scope="module")
def model_from_safetensors(checkpoints, config):
    return load_model_from_config(config, checkpoints["safetensors"], device="cpu")


def test_every_golden_tensor_from_safetensors(model_from_safetensors, golden, meta):
    model = model_from_safetensors
    assert not model.training
    assert not any(p.requires_grad for p in model.parameters())
    assert all(p.dtype == torch.float32 for p in model.parameters())  # the file holds float16
    check_single_pass_tensors(model, golden, meta)
    check_sampling_tensors(model, golden, meta)


def check_same_model(path, config, model_from_safetensors, golden, meta):
    """Every tensor of the model loaded from ``path`` equals the safetensors-loaded one bit for bit,
    so every golden tensor is reproduced from that file too (the sampling ones are a deterministic
    function of the same weights); the single-pass ones are checked again directly."""
    model = load_model_from_config(config, path, device="cpu")
    expected, got = model_from_safetensors.state_dict(), model.state_dict()
    assert got.keys() == expected.keys()
    assert all(torch.equal(got[k], expected[k]) for k in got)
    check_single_pass_tensors(model, golden, meta)


@pytest.mark.parametrize("kind", ["ckpt", "lightning"])
def test_torch_checkpoints_give_the_same_model(kind, checkpoints, model_from_safetensors, config, golden, meta):
    check_same_model(checkpoints[kind], config, model_from_safetensors, golden, meta)


def test_reference_lightning_checkpoint(reference_dir, model_from_safetensors, config, golden, meta):
    check_same_model(reference_dir / "tiny-v1" / "model-lightning.ckpt", config, model_from_safetensors, golden, meta)


def test_lightning_checkpoint_is_one_weights_only_loading_refuses(checkpoints):
    """The Lightning-style file really carries a pickled class (else the test above proves little)."""
    with pytest.raises(pickle.UnpicklingError):
        torch.load(checkpoints["lightning"], weights_only=True)


def test_config_given_as_yaml_path_or_dict(tiny_dir, config, golden):
    for given in (tiny_dir / "config.yaml", OmegaConf.to_container(config)):
        model = load_model_from_config(given, tiny_dir / "model.safetensors", device="cpu")
        with torch.no_grad():
            eps = model.apply_model(golden["unet_x"], golden["unet_t"], golden["text_cond"][:2])
        assert_close("unet_eps", eps, golden["unet_eps"], SINGLE_PASS)
