"""The tiny CompVis models and diffusers' UNet2DConditionModel over the same weights, for the tests
that compare our samplers with diffusers' schedulers.

The diffusers UNet is built by diffusers' own single-file converters
(``create_unet_diffusers_config_from_ldm``, ``convert_ldm_unet_checkpoint``), so nothing of ours
takes part in the reference. diffusers is a test dependency (requirements-dev.txt); callers skip
without it (``pytest.importorskip``).
"""
from pathlib import Path

import torch
import yaml
from omegaconf import OmegaConf
from safetensors.torch import load_file

from ldm.util import load_model_from_config

DATA = Path(__file__).resolve().parent / "data"
TINY_V1, TINY_V2_V = DATA / "tiny-v1", DATA / "tiny-v2-v"
# the SD scheduler config (scaled-linear betas over 1000 steps) the tiny models were made with
GUIDANCE_PROJECTION = "model.diffusion_model.time_embedding.cond_proj.weight"
SD_BETAS = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000)


def compvis_model(folder: Path, ckpt: Path | None = None, config=None):
    """The CompVis model of ``folder`` (config.yaml, model.safetensors or ``ckpt``), float32 on the CPU."""
    config = OmegaConf.load(folder / "config.yaml") if config is None else config
    model = load_model_from_config(config, str(ckpt or folder / "model.safetensors"), device="cpu")
    return model.float().eval()


def diffusers_unet(folder: Path, state_dict: dict | None = None, **config):
    """diffusers' UNet2DConditionModel over the UNet weights of ``folder`` (or of the CompVis
    ``state_dict``), float32; ``config`` overrides entries of the converted config (e.g.
    time_cond_proj_dim). A guidance projection ``model.diffusion_model.time_embedding.cond_proj.weight``
    becomes diffusers' ``time_embedding.cond_proj.weight`` (diffusers' converter to CompVis keeps
    that name; its converter from CompVis knows no such key)."""
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, create_unet_diffusers_config_from_ldm

    original = yaml.safe_load((folder / "config.yaml").read_text())
    checkpoint = load_file(folder / "model.safetensors") if state_dict is None else state_dict
    unet_config = {**create_unet_diffusers_config_from_ldm(original, checkpoint), **config}
    weights = convert_ldm_unet_checkpoint(checkpoint, unet_config)
    if GUIDANCE_PROJECTION in checkpoint:
        weights["time_embedding.cond_proj.weight"] = checkpoint[GUIDANCE_PROJECTION]
    unet = UNet2DConditionModel(**unet_config)
    unet.load_state_dict({k: v.float() for k, v in weights.items()}, strict=True)
    return unet.float().eval()


def diffusers_output(unet, x, t, cond, scale=1.0, uncond=None, timestep_cond=None):
    """The diffusers UNet's output as diffusers' pipelines guide it: classifier-free guidance on
    [uncond; cond] for scale > 1 with uncond, else one conditional call."""
    t = torch.as_tensor(t)
    if scale > 1 and uncond is not None:
        out_u, out_c = unet(torch.cat([x, x]), t, encoder_hidden_states=torch.cat([uncond, cond])).sample.chunk(2)
        return out_u + scale * (out_c - out_u)
    return unet(x, t, encoder_hidden_states=cond, timestep_cond=timestep_cond).sample


def relative_error(ours, ref) -> float:
    """max |ours - ref| / (1 + max |ref|), the measure of ../shared/tools' checks."""
    return float((ours.float() - ref.float()).abs().max()) / (1 + float(ref.float().abs().max()))


def counting_calls(model):
    """A list that receives the batch size of every UNet call of the CompVis ``model`` (a forward
    hook on its UNet); remove with ``.handle.remove()``."""
    calls = CallLog()
    unet = model.model.diffusion_model
    calls.handle = unet.register_forward_hook(lambda module, args, out: calls.append(args[0].shape[0]))
    return calls


class CallLog(list):
    handle = None
