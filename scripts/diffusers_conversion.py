"""CompVis Stable Diffusion weights in diffusers' layout, for comparing with diffusers on the same weights.

:func:`diffusers_unet` and :func:`diffusers_vae` build diffusers' ``UNet2DConditionModel`` and
``AutoencoderKL`` over a ``LatentDiffusion``'s own tensors (shared, not copied); the key maps
(:func:`unet_key_map`, :func:`vae_key_map`) and state-dict renames are plain functions of the
CompVis config. diffusers is imported only inside the builders: scripts/benchmark.py and its
tests need it (requirements-bench.txt), Sound Diffusion itself never does.
"""
from __future__ import annotations

import torch

from ldm.modules.diffusionmodules.openaimodel import attention_heads

UNET_RESNET = {"in_layers.0": "norm1", "in_layers.2": "conv1", "emb_layers.1": "time_emb_proj",
               "out_layers.0": "norm2", "out_layers.3": "conv2", "skip_connection": "conv_shortcut"}
VAE_RESNET = {"nin_shortcut": "conv_shortcut"}
VAE_ATTENTION = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}


def _levels_with_attention(unet_params) -> list[bool]:
    """For each level of ``channel_mult``: whether its blocks hold a transformer."""
    return [2 ** level in unet_params["attention_resolutions"] for level in range(len(unet_params["channel_mult"]))]


def diffusers_unet_config(unet_params) -> dict:
    """``UNet2DConditionModel`` arguments for a CompVis ``UNetModel`` config (its ``params``)."""
    p = dict(unet_params)
    if not p.get("use_spatial_transformer"):
        raise ValueError("only UNets with use_spatial_transformer (SD v1) convert to diffusers here")
    channels = [p["model_channels"] * m for m in p["channel_mult"]]
    attention = _levels_with_attention(p)
    heads = [attention_heads(ch, p.get("num_heads", -1), p.get("num_head_channels", -1), p.get("legacy", True),
                             True)[0] for ch in channels]
    return dict(
        sample_size=p.get("image_size", 32), in_channels=p["in_channels"], out_channels=p["out_channels"],
        down_block_types=tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attention),
        up_block_types=tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attention)),
        block_out_channels=tuple(channels), layers_per_block=p["num_res_blocks"],
        cross_attention_dim=p["context_dim"], attention_head_dim=tuple(heads),
        transformer_layers_per_block=p.get("transformer_depth", 1), use_linear_projection=False,
        flip_sin_to_cos=True, freq_shift=0, norm_num_groups=32, norm_eps=1e-5, act_fn="silu")


def unet_key_map(unet_params) -> dict[str, str]:
    """CompVis UNet module paths -> diffusers ``UNet2DConditionModel`` module paths."""
    levels, per_level = len(unet_params["channel_mult"]), unet_params["num_res_blocks"]
    attention = _levels_with_attention(unet_params)
    names = {"time_embed.0": "time_embedding.linear_1", "time_embed.2": "time_embedding.linear_2",
             "input_blocks.0.0": "conv_in", "out.0": "conv_norm_out", "out.2": "conv_out",
             "middle_block.0": "mid_block.resnets.0", "middle_block.1": "mid_block.attentions.0",
             "middle_block.2": "mid_block.resnets.1"}
    block = 1
    for level in range(levels):
        for j in range(per_level):
            names[f"input_blocks.{block}.0"] = f"down_blocks.{level}.resnets.{j}"
            names[f"input_blocks.{block}.1"] = f"down_blocks.{level}.attentions.{j}"
            block += 1
        if level != levels - 1:
            names[f"input_blocks.{block}.0.op"] = f"down_blocks.{level}.downsamplers.0.conv"
            block += 1
    block = 0
    for up in range(levels):  # up block 0 is the deepest level
        has_attention = attention[levels - 1 - up]
        for j in range(per_level + 1):
            names[f"output_blocks.{block}.0"] = f"up_blocks.{up}.resnets.{j}"
            if has_attention:
                names[f"output_blocks.{block}.1"] = f"up_blocks.{up}.attentions.{j}"
            if j == per_level and up != levels - 1:
                names[f"output_blocks.{block}.{2 if has_attention else 1}.conv"] = f"up_blocks.{up}.upsamplers.0.conv"
            block += 1
    return names


def vae_key_map(ddconfig) -> dict[str, str]:
    """CompVis ``AutoencoderKL`` module paths -> diffusers ``AutoencoderKL`` module paths."""
    if ddconfig.get("attn_resolutions"):
        raise ValueError("autoencoders with attention outside the middle block do not convert to diffusers")
    levels, per_level = len(ddconfig["ch_mult"]), ddconfig["num_res_blocks"]
    names = {}
    for side in ("encoder", "decoder"):
        names.update({f"{side}.norm_out": f"{side}.conv_norm_out",
                      f"{side}.mid.block_1": f"{side}.mid_block.resnets.0",
                      f"{side}.mid.attn_1": f"{side}.mid_block.attentions.0",
                      f"{side}.mid.block_2": f"{side}.mid_block.resnets.1"})
    for level in range(levels):
        for j in range(per_level):
            names[f"encoder.down.{level}.block.{j}"] = f"encoder.down_blocks.{level}.resnets.{j}"
        names[f"encoder.down.{level}.downsample.conv"] = f"encoder.down_blocks.{level}.downsamplers.0.conv"
        up = levels - 1 - level  # diffusers numbers the decoder's blocks in the order they run
        for j in range(per_level + 1):
            names[f"decoder.up.{level}.block.{j}"] = f"decoder.up_blocks.{up}.resnets.{j}"
        names[f"decoder.up.{level}.upsample.conv"] = f"decoder.up_blocks.{up}.upsamplers.0.conv"
    return names


def _rename(key: str, names: dict[str, str]) -> tuple[str, str]:
    """(new key, the diffusers module path it was mapped to) for the longest matching module path."""
    parts = key.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        prefix = ".".join(parts[:cut])
        if prefix in names:
            return ".".join([names[prefix], *parts[cut:]]), names[prefix]
    return key, ""


def _rename_inside(key: str, module: str, inner: dict[str, str]) -> str:
    rest = key[len(module) + 1:] if module else key
    for old, new in inner.items():
        if rest == old or rest.startswith(old + "."):
            return f"{module}.{new}{rest[len(old):]}" if module else new + rest[len(old):]
    return key


def unet_to_diffusers(state_dict: dict[str, torch.Tensor], unet_params) -> dict[str, torch.Tensor]:
    """A CompVis UNet state dict (keys without ``model.diffusion_model.``) in diffusers' layout.

    The tensors are the same objects (no copy)."""
    names, out = unet_key_map(unet_params), {}
    for key, value in state_dict.items():
        new, module = _rename(key, names)
        if ".resnets." in module:
            new = _rename_inside(new, module, UNET_RESNET)
        out[new] = value
    return out


def vae_to_diffusers(state_dict: dict[str, torch.Tensor], ddconfig) -> dict[str, torch.Tensor]:
    """A CompVis autoencoder state dict (keys without ``first_stage_model.``) in diffusers' layout.

    The middle attention's 1x1 convolutions become linear layers: (C, C, 1, 1) -> (C, C) views."""
    names, out = vae_key_map(ddconfig), {}
    for key, value in state_dict.items():
        new, module = _rename(key, names)
        if ".resnets." in module:
            new = _rename_inside(new, module, VAE_RESNET)
        elif ".attentions." in module:
            new = _rename_inside(new, module, VAE_ATTENTION)
            if value.ndim == 4:
                value = value.flatten(1)
        out[new] = value
    return out


def diffusers_vae_config(first_stage_params, scale_factor: float) -> dict:
    dd = first_stage_params["ddconfig"]
    levels = len(dd["ch_mult"])
    return dict(in_channels=dd["in_channels"], out_channels=dd["out_ch"],
                down_block_types=("DownEncoderBlock2D",) * levels, up_block_types=("UpDecoderBlock2D",) * levels,
                block_out_channels=tuple(dd["ch"] * m for m in dd["ch_mult"]), layers_per_block=dd["num_res_blocks"],
                latent_channels=dd["z_channels"], norm_num_groups=32, sample_size=dd["resolution"],
                scaling_factor=scale_factor, force_upcast=False)


def _load_assigned(module: torch.nn.Module, state_dict: dict[str, torch.Tensor]) -> torch.nn.Module:
    """``module`` (built on the meta device) holding ``state_dict``'s tensors; every key must fit."""
    module.load_state_dict(state_dict, strict=True, assign=True)
    left = [name for name, t in [*module.named_parameters(), *module.named_buffers()] if t.is_meta]
    if left:
        raise RuntimeError(f"no weights for {left[:5]}")
    return module.eval().requires_grad_(False)


def diffusers_unet(model, config):
    """diffusers' ``UNet2DConditionModel`` over ``model``'s UNet weights (shared, not copied)."""
    from diffusers import UNet2DConditionModel

    params = config.model.params.unet_config.params
    with torch.device("meta"):
        unet = UNet2DConditionModel(**diffusers_unet_config(params))
    return _load_assigned(unet, unet_to_diffusers(model.model.diffusion_model.state_dict(), params))


def diffusers_vae(model, config):
    """diffusers' ``AutoencoderKL`` over ``model``'s autoencoder weights (shared, not copied)."""
    from diffusers import AutoencoderKL

    params = config.model.params.first_stage_config.params
    with torch.device("meta"):
        vae = AutoencoderKL(**diffusers_vae_config(params, float(model.scale_factor)))
    return _load_assigned(vae, vae_to_diffusers(model.first_stage_model.state_dict(), params["ddconfig"]))


def diffusers_ddim(model):
    """diffusers' DDIM scheduler with the model's noise schedule and CompVis's timesteps (1, 21, ...)."""
    from diffusers import DDIMScheduler

    return DDIMScheduler(num_train_timesteps=model.num_timesteps, beta_start=model.linear_start,
                         beta_end=model.linear_end, beta_schedule="scaled_linear", clip_sample=False,
                         set_alpha_to_one=False, steps_offset=1, timestep_spacing="leading")
