"""Where the layers that LoRA files name sit in a CompVis Stable Diffusion model.

LoRA files name layers as their trainers saw the model: diffusers' ``UNet2DConditionModel``
(``down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k``) and transformers' ``CLIPTextModel``
(``text_model.encoder.layers.3.self_attn.q_proj``), written with dots (diffusers, peft) or with
underscores behind a prefix (kohya: ``lora_unet_down_blocks_1_...``, ``lora_te_text_model_...``);
some kohya files name the UNet's layers by their CompVis paths (``lora_unet_input_blocks_4_1_proj_in``).
:func:`lora_targets` lists every spelling a loaded model accepts and the CompVis weight it means.

The UNet's layout is read from its instantiated modules, as diffusers' converter reads it from a
config: which levels hold transformers, how many ResBlocks each level has, where the down- and
upsamplers sit. So every ``channel_mult``/``attention_resolutions``/``num_res_blocks`` maps, also UNets
whose deepest level has attention (there an output block's upsampler is its layer 2, not 1).
SD 2.x text-encoder LoRAs name transformers' CLIP layers too (kohya and diffusers train SD 2.x
through them); OpenCLIP stacks q, k and v in one ``in_proj_weight``, so those map onto its row blocks.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from torch import nn

from ldm.modules.attention import SpatialTransformer
from ldm.modules.diffusionmodules.openaimodel import Downsample, ResBlock, Upsample
from ldm.modules.encoders.modules import FrozenCLIPEmbedder, FrozenOpenCLIPEmbedder

UNET = "model.diffusion_model."
TEXT_V1 = "cond_stage_model.transformer."
TEXT_V2 = "cond_stage_model.model.transformer.resblocks."
# UNet layers outside the down/mid/up blocks: CompVis path -> diffusers name.
_UNET_OUTSIDE = {"time_embed.0": "time_embedding.linear_1", "time_embed.2": "time_embedding.linear_2",
                 "input_blocks.0.0": "conv_in", "out.2": "conv_out"}
# A ResBlock's layers under diffusers' ResnetBlock2D names (a SpatialTransformer's are the same in both).
_RESNET = {"in_layers.2": "conv1", "emb_layers.1": "time_emb_proj", "out_layers.3": "conv2",
           "skip_connection": "conv_shortcut"}
# transformers' CLIP layer -> OpenCLIP layer (SD 2.x); q, k, v are row blocks of attn.in_proj_weight.
_OPENCLIP = {"self_attn.out_proj": "attn.out_proj", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}
_QKV = ("q_proj", "k_proj", "v_proj")


@dataclass(frozen=True)
class LoraTarget:
    """One weight a LoRA module changes.

    parameter: its path in the LatentDiffusion model, e.g. "model.diffusion_model.input_blocks.1.1.proj_in.weight";
    layer: the layer under the trainer's name, e.g. "unet.down_blocks.0.attentions.0.proj_in" or
    "text_encoder.encoder.layers.0.self_attn.q_proj" (for messages);
    rows: (start, stop) when the layer is a block of rows of a packed parameter (OpenCLIP's q, k, v), else None.
    """
    parameter: str
    layer: str
    rows: tuple[int, int] | None = None


def _block_kind(layer: nn.Module) -> str | None:
    if isinstance(layer, ResBlock):
        return "resnets"
    if isinstance(layer, SpatialTransformer):
        return "attentions"
    return None  # AttentionBlock (UNets without a spatial transformer): no LoRA names it


def _unet_blocks(unet: nn.Module) -> dict[str, str]:
    """CompVis path -> diffusers name of every ResBlock, SpatialTransformer and resampling conv."""
    blocks = {}
    level, index = 0, 0  # diffusers: down_blocks.<level>.{resnets,attentions}.<index>
    for i, block in list(enumerate(unet.input_blocks))[1:]:
        if isinstance(block[0], Downsample):
            if isinstance(block[0].op, nn.Conv2d):
                blocks[f"input_blocks.{i}.0.op"] = f"down_blocks.{level}.downsamplers.0.conv"
            level, index = level + 1, 0
            continue
        for k, layer in enumerate(block):
            if _block_kind(layer):
                blocks[f"input_blocks.{i}.{k}"] = f"down_blocks.{level}.{_block_kind(layer)}.{index}"
        index += 1
    counts = {"resnets": 0, "attentions": 0}
    for k, layer in enumerate(unet.middle_block):
        kind = _block_kind(layer)
        if kind:
            blocks[f"middle_block.{k}"] = f"mid_block.{kind}.{counts[kind]}"
            counts[kind] += 1
    level, index = 0, 0  # diffusers: up_blocks.<level> counts from the deepest level up
    for i, block in enumerate(unet.output_blocks):
        for k, layer in enumerate(block):
            if isinstance(layer, Upsample):
                if layer.use_conv:
                    blocks[f"output_blocks.{i}.{k}.conv"] = f"up_blocks.{level}.upsamplers.0.conv"
            elif _block_kind(layer):
                blocks[f"output_blocks.{i}.{k}"] = f"up_blocks.{level}.{_block_kind(layer)}.{index}"
        if isinstance(block[-1], Upsample):  # a level ends with its upsampler (the last level has none)
            level, index = level + 1, 0
        else:
            index += 1
    return blocks


def unet_layer_names(unet: nn.Module) -> dict[str, str]:
    """diffusers layer name -> CompVis module path inside ``unet``, for every Linear and Conv2d layer.

    unet: an ``ldm.modules.diffusionmodules.openaimodel.UNetModel``. Example entries for SD v1:
    "down_blocks.0.resnets.0.conv1" -> "input_blocks.1.0.in_layers.2",
    "up_blocks.0.upsamplers.0.conv" -> "output_blocks.2.1.conv"."""
    names = {}
    for path, name in {**_UNET_OUTSIDE, **_unet_blocks(unet)}.items():
        block = unet.get_submodule(path)
        inner = _RESNET if isinstance(block, ResBlock) else None
        for sub, layer in block.named_modules():
            if not isinstance(layer, (nn.Linear, nn.Conv2d)) or (inner is not None and sub not in inner):
                continue
            renamed = inner[sub] if inner is not None else sub
            names[f"{name}.{renamed}" if renamed else name] = f"{path}.{sub}" if sub else path
    return names


def text_layer_targets(cond_stage_model: nn.Module) -> dict[str, LoraTarget]:
    """transformers-CLIP layer name without "text_model." (e.g. "encoder.layers.0.self_attn.q_proj") -> target.

    SD v1's FrozenCLIPEmbedder holds a transformers CLIPTextModel (the names match);
    SD 2.x's FrozenOpenCLIPEmbedder holds OpenCLIP blocks (renamed; q/k/v are rows of in_proj_weight).
    Any other text encoder: no targets."""
    targets = {}
    if isinstance(cond_stage_model, FrozenCLIPEmbedder):
        for path, layer in cond_stage_model.transformer.named_modules():
            if isinstance(layer, nn.Linear):
                name = path.removeprefix("text_model.")
                targets[name] = LoraTarget(f"{TEXT_V1}{path}.weight", f"text_encoder.{name}")
    elif isinstance(cond_stage_model, FrozenOpenCLIPEmbedder):
        for n, block in enumerate(cond_stage_model.model.transformer.resblocks):
            width = block.attn.out_proj.in_features
            for i, q in enumerate(_QKV):
                name = f"encoder.layers.{n}.self_attn.{q}"
                targets[name] = LoraTarget(f"{TEXT_V2}{n}.attn.in_proj_weight", f"text_encoder.{name}",
                                           (i * width, (i + 1) * width))
            for clip, openclip in _OPENCLIP.items():
                name = f"encoder.layers.{n}.{clip}"
                targets[name] = LoraTarget(f"{TEXT_V2}{n}.{openclip}.weight", f"text_encoder.{name}")
    return targets


def _unet_spellings(name: str, path: str) -> list[str]:
    """kohya (by diffusers' name, or by the CompVis path as kohya's SDXL and SD v1 extraction scripts
    write), diffusers/peft and bare spellings; attention projections also under diffusers' older
    attention-processor names (``attn1.processor.to_q``, ``attn1.processor.to_out`` for ``to_out.0``)."""
    dotted = [name, re.sub(r"\.(attn[12])\.(to_[qkv]|to_out)(\.0)?$", r".\1.processor.\2", name)]
    return [f"lora_unet_{name.replace('.', '_')}", f"lora_unet_{path.replace('.', '_')}",
            *{f"{prefix}{n}" for n in dotted for prefix in ("unet.", "")}]


def _text_spellings(name: str) -> list[str]:
    """kohya (with or without transformers' "text_model."), diffusers/peft, and diffusers' older
    ``self_attn.to_q`` ... ``to_out`` for ``q_proj`` ... ``out_proj``."""
    dotted = [name, re.sub(r"\.self_attn\.(q|k|v|out)_proj$", r".self_attn.to_\1", name)]
    underscored = name.replace(".", "_")
    prefixes = ("text_encoder.text_model.", "text_encoder.", "text_model.")
    return [f"lora_te_text_model_{underscored}", f"lora_te_{underscored}",
            *{f"{prefix}{n}" for n in dotted for prefix in prefixes}]


def lora_targets(model: nn.Module) -> dict[str, LoraTarget]:
    """Every module name a LoRA file may use for a layer of ``model`` -> the weight it changes.

    model: a CompVis LatentDiffusion (``model.model.diffusion_model`` the UNet, ``model.cond_stage_model``
    the text encoder). Names are a file key without its ".lora_down.weight"/".lora_A.weight"/... ending."""
    spellings = {}
    for name, path in unet_layer_names(model.model.diffusion_model).items():
        target = LoraTarget(f"{UNET}{path}.weight", f"unet.{name}")
        spellings.update(dict.fromkeys(_unet_spellings(name, path), target))
    for name, target in text_layer_targets(model.cond_stage_model).items():
        spellings.update(dict.fromkeys(_text_spellings(name), target))
    return spellings
