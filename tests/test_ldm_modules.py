"""The SD v1 model modules against the original CompVis code's outputs (tests/data/tiny-v1),
the full-size v1 layout, and shapes/backends the reference data does not cover."""
import json
import math
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from ldm.models.autoencoder import AutoencoderKL
from ldm.modules.attention import CrossAttention, set_attention_backend
from ldm.modules.diffusionmodules.openaimodel import AttentionBlock, UNetModel
from ldm.modules.diffusionmodules.util import make_ddim_timesteps
from ldm.modules.distributions.distributions import DiagonalGaussianDistribution
from ldm.modules.encoders.clip_tokenizer import SimpleTokenizer
from ldm.checkpoint import fit_state_dict
from ldm.util import instantiate_from_config

REPO = Path(__file__).resolve().parents[1]
TOLERANCE = 1e-4  # max|ours - ref| / (1 + max|ref|) for one pass in float32


def relative_error(ours, ref):
    return float((ours.float() - ref.float()).abs().max()) / (1 + float(ref.abs().max()))


def randomize(module, seed=0):
    """Gaussian weights everywhere (fresh modules zero their output layers, hiding most of the net)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) / math.sqrt(p[0].numel() if p.ndim > 1 else 50))


@pytest.fixture(scope="module")
def checkpoint(tiny_sd):
    return tiny_sd


@pytest.fixture(scope="module")
def tiny_model(tiny_dir, checkpoint):
    """The tiny SD-v1-shaped model with the reference weights (float16 values, computed in float32).

    Loaded with ``load_state_dict(strict=True)`` after the loader's key fitting (text-tower names of
    the installed transformers, no stale position_ids or EMA counters)."""
    model = instantiate_from_config(OmegaConf.load(tiny_dir / "config.yaml").model)
    fitted = fit_state_dict(checkpoint, model.state_dict(), "model.safetensors")
    model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in fitted.items()}, strict=True)
    return model.eval()


def test_tokens_match_reference(tiny_model, prompts, golden):
    assert torch.equal(tiny_model.cond_stage_model.tokenize(prompts), golden["tokens"])


def test_long_prompt_is_cut_with_end_token_last():
    tokenizer = SimpleTokenizer()
    text = " ".join(f"word{i}" for i in range(100))
    ids = tokenizer.encode(text)
    tokens = tokenizer.tokenize([text])[0]
    assert len(ids) > 75 and tokens.shape == (77,)
    assert tokens.tolist() == [tokenizer.sot_token, *ids[:75], tokenizer.eot_token]


@torch.no_grad()
def test_text_conditioning_matches_reference(tiny_model, prompts, golden):
    cond = tiny_model.get_learned_conditioning(prompts)
    assert cond.shape == golden["text_cond"].shape == (3, 77, 32)
    assert relative_error(cond, golden["text_cond"]) <= TOLERANCE


@torch.no_grad()
def test_unet_matches_reference(tiny_model, golden):
    eps = tiny_model.apply_model(golden["unet_x"], golden["unet_t"], golden["text_cond"][:2])
    assert relative_error(eps, golden["unet_eps"]) <= TOLERANCE
    as_dict = tiny_model.apply_model(golden["unet_x"], golden["unet_t"], {"c_crossattn": [golden["text_cond"][:2]]})
    assert torch.equal(as_dict, eps)


@torch.no_grad()
def test_einsum_attention_backend_agrees_with_sdpa(tiny_model, golden):
    args = (golden["unet_x"], golden["unet_t"], golden["text_cond"][:2])
    sdpa = tiny_model.apply_model(*args)
    set_attention_backend(tiny_model, "einsum")
    try:
        backends = {m.attention_backend for m in tiny_model.modules() if isinstance(m, CrossAttention)}
        einsum = tiny_model.apply_model(*args)
    finally:
        set_attention_backend(tiny_model, "sdpa")
    assert backends == {"einsum"}
    assert relative_error(einsum, sdpa) <= TOLERANCE
    assert relative_error(einsum, golden["unet_eps"]) <= TOLERANCE
    with pytest.raises(ValueError, match="xformers"):
        set_attention_backend(tiny_model, "xformers")


@torch.no_grad()
def test_autoencoder_matches_reference(tiny_model, golden):
    posterior = tiny_model.encode_first_stage(golden["vae_image"])
    assert relative_error(posterior.mean, golden["vae_mean"]) <= TOLERANCE
    assert relative_error(posterior.std, golden["vae_std"]) <= TOLERANCE
    decoded = tiny_model.decode_first_stage(0.18215 * golden["vae_mean"])
    assert relative_error(decoded, golden["vae_decoded"]) <= TOLERANCE


@torch.no_grad()
def test_first_stage_encoding_scales_a_posterior_sample(tiny_model, golden):
    posterior = tiny_model.encode_first_stage(golden["vae_image"])
    z = tiny_model.get_first_stage_encoding(posterior, generator=torch.Generator().manual_seed(3))
    noise = torch.randn(posterior.mean.shape, generator=torch.Generator().manual_seed(3))
    assert torch.allclose(z, 0.18215 * (posterior.mean + posterior.std * noise))
    assert torch.equal(tiny_model.get_first_stage_encoding(posterior.mode()), 0.18215 * posterior.mean)


def test_noise_schedule_matches_reference(tiny_model, checkpoint, golden):
    assert relative_error(tiny_model.alphas_cumprod, golden["alphas_cumprod"]) <= TOLERANCE
    assert tiny_model.num_timesteps == 1000 and tiny_model.parameterization == "eps"
    # every schedule buffer equals what the original code stored in the checkpoint
    names = [k for k in checkpoint if "." not in k]
    assert len(names) == 12
    for name in names:
        buffer = getattr(tiny_model, name)
        assert buffer.dtype == torch.float32
        assert relative_error(buffer, checkpoint[name]) <= 1e-6, name


def test_ddim_timesteps_match_reference(golden):
    assert make_ddim_timesteps("uniform", 10, 1000, verbose=False).tolist() == golden["ddim_timesteps_S10"].tolist()


def test_q_sample_mixes_signal_and_noise_by_schedule(tiny_model, golden):
    x0, noise = golden["unet_x"][:1], golden["x_T"]
    t = torch.tensor([500])
    alpha_bar = golden["alphas_cumprod"][500]
    expected = alpha_bar.sqrt() * x0 + (1 - alpha_bar).sqrt() * noise
    assert relative_error(tiny_model.q_sample(x0, t, noise), expected) <= 1e-6


def test_ema_scope_swaps_in_ema_weights(tiny_dir):
    config = OmegaConf.load(tiny_dir / "config.yaml").model
    config.params.use_ema = True
    model = instantiate_from_config(config).requires_grad_(False)  # as loaded for inference
    keys = set(model.state_dict())
    assert {"model_ema.decay", "model_ema.num_updates", "model_ema.diffusion_modelout2weight"} <= keys
    weight = model.model.diffusion_model.out[2].weight
    trained = torch.randn(weight.shape)
    with torch.no_grad():
        weight.copy_(trained)
        model.model_ema.diffusion_modelout2weight.fill_(0.5)
    with model.ema_scope():
        assert torch.all(weight == 0.5)
    assert torch.equal(weight, trained)


def test_full_size_v1_matches_real_checkpoint_layout(reference_dir):
    manifest = json.loads((reference_dir / "sd-v1-keys.json").read_text())
    with torch.device("meta"):
        model = instantiate_from_config(
            OmegaConf.load(REPO / "configs" / "stable-diffusion" / "v1-inference.yaml").model
        )
    shapes = {k: list(v.shape) for k, v in model.state_dict().items()}
    layout = {**manifest["keys"], **manifest["optional"]}
    checkpoint = {key: torch.empty(shape, device="meta") for key, shape in layout.items()}
    fitted = fit_state_dict(checkpoint, model.state_dict(), "sd-v1-keys.json")
    assert {key: list(value.shape) for key, value in fitted.items()} == shapes

    def millions(module):
        return sum(p.numel() for p in module.parameters()) / 1e6

    assert millions(model.model.diffusion_model) == pytest.approx(859.5, abs=0.05)
    assert millions(model.first_stage_model) == pytest.approx(83.7, abs=0.05)
    assert millions(model.cond_stage_model) == pytest.approx(123.1, abs=0.05)


@pytest.mark.parametrize(
    "attention",
    [
        dict(use_spatial_transformer=True, context_dim=24, num_head_channels=8, transformer_depth=2),
        dict(use_spatial_transformer=True, context_dim=24, num_heads=4, legacy=True),
        dict(use_spatial_transformer=False, num_heads=2, legacy=False),
        dict(use_spatial_transformer=False, num_head_channels=16, legacy=True),
    ],
)
@torch.no_grad()
def test_unet_other_shapes(attention):
    unet = UNetModel(
        image_size=16, in_channels=5, out_channels=3, model_channels=32, num_res_blocks=3,
        attention_resolutions=[2, 4], channel_mult=[1, 3, 2], **attention,
    )
    randomize(unet)
    x = torch.randn(2, 5, 24, 40)
    context = torch.randn(2, 7, 24) if attention["use_spatial_transformer"] else None
    out = unet(x, torch.tensor([3, 999]), context)
    assert out.shape == (2, 3, 24, 40)
    assert torch.isfinite(out).all() and out.std() > 0


@torch.no_grad()
def test_attention_block_uses_legacy_qkv_order():
    block = AttentionBlock(64, num_heads=4)
    randomize(block)
    x = torch.randn(2, 64, 6, 10)
    # upstream QKVAttentionLegacy: per head, the qkv channels are [q | k | v] of 16 each
    qkv = block.qkv(block.norm(x.reshape(2, 64, 60))).reshape(2 * 4, 3 * 16, 60)
    q, k, v = qkv.split(16, dim=1)
    weights = torch.softmax(torch.einsum("bct,bcs->bts", q, k) / math.sqrt(16), dim=-1)
    attended = torch.einsum("bts,bcs->bct", weights, v).reshape(2, 64, 60)
    expected = x + block.proj_out(attended).reshape(2, 64, 6, 10)
    assert relative_error(block(x), expected) <= 1e-5


@torch.no_grad()
def test_autoencoder_other_shapes():
    ddconfig = dict(
        double_z=True, z_channels=3, resolution=64, in_channels=3, out_ch=3, ch=32, ch_mult=[1, 2, 2],
        num_res_blocks=1, attn_resolutions=[32], dropout=0.0,
    )
    vae = AutoencoderKL(ddconfig=ddconfig, embed_dim=3, lossconfig={"target": "torch.nn.Identity"})
    randomize(vae)
    assert len(vae.encoder.down[1].attn) == 1 and len(vae.decoder.up[1].attn) == 2
    posterior = vae.encode(torch.randn(1, 3, 48, 80))
    assert isinstance(posterior, DiagonalGaussianDistribution)
    assert posterior.mean.shape == posterior.std.shape == (1, 3, 12, 20)
    assert vae.decode(posterior.mode()).shape == (1, 3, 48, 80)
