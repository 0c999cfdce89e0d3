"""SD 2.x: the tiny eps- and v-prediction models (tests/data/tiny-v2, tiny-v2-v) loaded through
ldm.util.load_model_from_config reproduce the reference tensors computed with the original
Stability-AI code and open_clip; PLMS handles v-prediction; checkpoint families are told apart."""
import functools
import json

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file, save_file

from ldm.checkpoint import checkpoint_family, checkpoint_family_of_keys
from ldm.models.diffusion.ddim import DDIMSampler
from ldm.models.diffusion.plms import PLMSSampler
from ldm.modules.encoders.modules import FrozenOpenCLIPEmbedder
from ldm.util import CheckpointError, load_model_from_config

DATA = __import__("pathlib").Path(__file__).resolve().parent / "data"
SINGLE_PASS, SAMPLING = 1e-4, 2e-3  # tolerances of the reference README, relative to 1 + max|ref|
EOT = 49407


def assert_close(name, ours, ref, tol):
    ours, ref = ours.detach().float().cpu(), ref.float()
    assert ours.shape == ref.shape, f"{name}: shape {tuple(ours.shape)} != {tuple(ref.shape)}"
    err = float((ours - ref).abs().max()) / (1 + float(ref.abs().max()))
    assert err <= tol, f"{name}: relative error {err:.2e} > {tol:.0e}"


class Tiny:
    """One tiny SD 2.x model with its golden tensors and settings."""

    def __init__(self, name):
        folder = DATA / name
        self.folder = folder
        self.config = OmegaConf.load(folder / "config.yaml")
        self.meta = json.loads((folder / "golden.json").read_text())
        self.golden = load_file(folder / "golden.safetensors")
        self.model = load_model_from_config(self.config, folder / "model.safetensors", device="cpu")


@functools.cache
def load_tiny(name) -> Tiny:
    return Tiny(name)


@pytest.fixture(params=["tiny-v2", "tiny-v2-v"])
def tiny(request):
    return load_tiny(request.param)


@pytest.fixture
def tiny_v():
    return load_tiny("tiny-v2-v")


@torch.no_grad()
def test_single_pass_tensors(tiny):
    model, g = tiny.model, tiny.golden
    assert model.parameterization == tiny.meta["parameterization"]
    assert_close("text_cond", model.get_learned_conditioning(tiny.meta["prompts"]), g["text_cond"], SINGLE_PASS)
    assert_close("unet_out", model.apply_model(g["unet_x"], g["unet_t"], g["text_cond"][:2]), g["unet_out"],
                 SINGLE_PASS)
    posterior = model.encode_first_stage(g["vae_image"])
    assert_close("vae_mean", posterior.mean, g["vae_mean"], SINGLE_PASS)
    assert_close("vae_std", posterior.std, g["vae_std"], SINGLE_PASS)
    assert_close("vae_decoded", model.decode_first_stage(0.18215 * g["vae_mean"]), g["vae_decoded"], SINGLE_PASS)


@torch.no_grad()
def test_sampling_tensors(tiny):
    """DDIM and PLMS txt2img and DDIM img2img (for v: PLMS on the converted eps, see the reference README)."""
    model, g, meta = tiny.model, tiny.golden, tiny.meta
    c, uc = g["text_cond"][0:1], model.get_learned_conditioning([""])
    for name, sampler_class in (("ddim", DDIMSampler), ("plms", PLMSSampler)):
        latent, _ = sampler_class(model).sample(
            S=meta["steps"], batch_size=1, shape=list(g["x_T"].shape[1:]), conditioning=c, verbose=False, eta=0.0,
            unconditional_guidance_scale=meta["scale"], unconditional_conditioning=uc, x_T=g["x_T"].clone())
        assert_close(f"{name}_txt2img_latent", latent, g[f"{name}_txt2img_latent"], SAMPLING)
    sampler = DDIMSampler(model)
    sampler.make_schedule(ddim_num_steps=meta["steps"], ddim_eta=0.0, verbose=False)
    z_enc = sampler.stochastic_encode(0.18215 * g["vae_mean"], torch.tensor([meta["t_enc"]]), noise=g["img2img_noise"])
    assert_close("ddim_img2img_zenc", z_enc, g["ddim_img2img_zenc"], SINGLE_PASS)
    latent = sampler.decode(g["ddim_img2img_zenc"].clone(), c, meta["t_enc"], verbose=False,
                            unconditional_guidance_scale=meta["scale"], unconditional_conditioning=uc)
    assert_close("ddim_img2img_latent", latent, g["ddim_img2img_latent"], SAMPLING)


def img2img(sampler_class, model, z_enc, c, uc, t_enc, steps=10):
    sampler = sampler_class(model)
    sampler.make_schedule(ddim_num_steps=steps, verbose=False)
    return sampler.decode(z_enc.clone(), c, t_enc, unconditional_guidance_scale=7.5, unconditional_conditioning=uc,
                          verbose=False)


def update_cosine(a, b, start):
    """Cosine of the two updates a - start and b - start."""
    return float(torch.nn.functional.cosine_similarity((a - start).flatten(), (b - start).flatten(), dim=0))


@torch.no_grad()
def test_plms_img2img_on_a_v_model_follows_ddim(tiny_v):
    """The reference PLMS treats v as eps; ours converts. At strength 0.9 (9 of 10 steps) its img2img
    result is finite, bounded and moves the latent the way DDIM (checked against the reference
    above) does; PLMS fed the raw v (measured: update cosine 0.73, 4.5x DDIM's range) does not."""
    model, g = tiny_v.model, tiny_v.golden
    c, uc, z_enc = g["text_cond"][0:1], model.get_learned_conditioning([""]), g["ddim_img2img_zenc"]
    ddim = img2img(DDIMSampler, model, z_enc, c, uc, t_enc=9)
    plms = img2img(PLMSSampler, model, z_enc, c, uc, t_enc=9)
    assert torch.isfinite(plms).all()
    assert float(plms.abs().max()) <= 1.5 * float(ddim.abs().max())
    assert update_cosine(plms, ddim, z_enc) > 0.95

    model.parameterization = "eps"  # the reference PLMS's mistake: v taken for eps
    try:
        wrong = img2img(PLMSSampler, model, z_enc, c, uc, t_enc=9)
    finally:
        model.parameterization = "v"
    assert update_cosine(wrong, ddim, z_enc) < 0.9
    assert float(wrong.abs().max()) > 2 * float(ddim.abs().max())


def test_v_conversions_invert_the_v_definition(tiny_v):
    """v = sqrt(a) eps - sqrt(1 - a) x0 and x_t = sqrt(a) x0 + sqrt(1 - a) eps give back eps and x0."""
    model = tiny_v.model
    gen = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(3, 4, 8, 8, generator=gen), torch.randn(3, 4, 8, 8, generator=gen)
    t = torch.tensor([0, 420, 999])
    a = model.alphas_cumprod.double()[t].reshape(-1, 1, 1, 1)
    x_t = (a.sqrt() * x0 + (1 - a).sqrt() * eps).float()
    v = (a.sqrt() * eps - (1 - a).sqrt() * x0).float()
    torch.testing.assert_close(model.predict_eps_from_z_and_v(x_t, t, v), eps, atol=1e-5, rtol=0)
    torch.testing.assert_close(model.predict_start_from_z_and_v(x_t, t, v), x0, atol=1e-5, rtol=0)


def test_openclip_tokens_are_padded_with_zero(tiny):
    encoder = tiny.model.cond_stage_model
    tokens = encoder.tokenize(tiny.meta["prompts"])
    assert torch.equal(tokens, tiny.golden["tokens"])
    for row in tokens.tolist():
        end = row.index(EOT)
        assert row[0] == 49406 and set(row[end + 1:]) == {0}
    long = encoder.tokenize(["very " * 100])
    assert long.shape == (1, 77) and long[0, -1] == EOT and long[0, 0] == 49406 and 0 not in long[0].tolist()


def test_openclip_layers_and_default_size():
    """ViT-H/14 text defaults (meta device: no memory); penultimate skips the last block, then ln_final."""
    with torch.device("meta"):
        full = FrozenOpenCLIPEmbedder(layer="penultimate")
    assert full.model.token_embedding.weight.shape == (49408, 1024)
    assert len(full.model.transformer.resblocks) == 24 and full.model.positional_embedding.shape == (77, 1024)
    assert full.model.transformer.resblocks[0].attn.in_proj_weight.shape == (3072, 1024)
    torch.manual_seed(0)
    small = FrozenOpenCLIPEmbedder(layer="last", text_cfg={"width": 16, "heads": 2, "layers": 2})
    for p in small.parameters():
        torch.nn.init.normal_(p, std=0.2)
    penultimate = FrozenOpenCLIPEmbedder(layer="penultimate", text_cfg={"width": 16, "heads": 2, "layers": 2})
    penultimate.load_state_dict(small.state_dict())
    with torch.no_grad():
        x = small.model.token_embedding(small.tokenize(["a cat"])) + small.model.positional_embedding
        after_first = small.model.ln_final(small.model.transformer.resblocks[0](x))
        torch.testing.assert_close(penultimate.encode(["a cat"]), after_first)
        assert small.encode(["a cat"]).shape == (1, 77, 16)
        assert not torch.allclose(small.encode(["a cat"]), after_first)
    with pytest.raises(ValueError, match="layer 'pooled'"):
        FrozenOpenCLIPEmbedder(layer="pooled", text_cfg={"width": 16, "heads": 2, "layers": 1})


@pytest.mark.parametrize("name, family", [("sd-v1", "sd-v1"), ("sd-v2", "sd-v2")])
def test_family_of_the_full_size_layouts(reference_dir, name, family):
    manifest = json.loads((reference_dir / f"{name}-keys.json").read_text())
    assert checkpoint_family_of_keys(manifest["keys"]) == family
    text_free = {k: v for k, v in manifest["keys"].items() if not k.startswith("cond_stage_model.")}
    assert checkpoint_family_of_keys(text_free) == family  # from the context width alone
    inpainting = {**manifest["keys"], "model.diffusion_model.input_blocks.0.0.weight": [320, 9, 3, 3]}
    assert checkpoint_family_of_keys(inpainting) is None


def test_family_of_files(tmp_path, tiny_dir):
    assert checkpoint_family(tiny_dir / "model.safetensors") == "sd-v1"
    assert checkpoint_family(DATA / "tiny-v2" / "model.safetensors") == "sd-v2"
    sd = load_file(DATA / "tiny-v2-v" / "model.safetensors")
    torch.save({"state_dict": sd, "global_step": 0}, tmp_path / "v2.ckpt")
    assert checkpoint_family(tmp_path / "v2.ckpt") == "sd-v2"
    save_file({"first_stage_model.encoder.conv_in.weight": torch.zeros(2, 3, 3, 3)}, tmp_path / "vae.safetensors")
    assert checkpoint_family(tmp_path / "vae.safetensors") is None
    with pytest.raises(CheckpointError, match="does not exist"):
        checkpoint_family(tmp_path / "absent.safetensors")


def test_torch_checkpoint_and_conv_shaped_projections_load(tiny, tmp_path):
    """A .ckpt of the same weights, with the transformers' proj_in/proj_out stored as 1x1 convolutions,
    gives the same model."""
    sd = load_file(tiny.folder / "model.safetensors")
    sd = {k: v[..., None, None] if k.endswith((".proj_in.weight", ".proj_out.weight")) else v for k, v in sd.items()}
    torch.save({"state_dict": sd}, tmp_path / "conv.ckpt")
    model = load_model_from_config(tiny.config, tmp_path / "conv.ckpt", device="cpu")
    g = tiny.golden
    with torch.no_grad():
        assert_close("unet_out", model.apply_model(g["unet_x"], g["unet_t"], g["text_cond"][:2]), g["unet_out"],
                     SINGLE_PASS)


def test_v1_file_with_a_v2_config_names_both_families(tiny_dir):
    with pytest.raises(CheckpointError, match=r"the file is SD v1, the config builds SD 2.x\): \d+ weights missing"):
        load_model_from_config(DATA / "tiny-v2" / "config.yaml", tiny_dir / "model.safetensors", device="cpu")
